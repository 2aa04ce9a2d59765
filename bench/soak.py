"""Soak: 60 s of 32 clients on their own conversations and 8 sharing one, then count.

The production command, PostgreSQL, the fake model answering after
`--latency` seconds. Afterwards every user message the server acknowledged
(200) must be stored exactly once with its reply, every refused one (409
while another turn held the shared conversation) must be absent, and no
request may get a 5xx.

    python -m bench.soak [--seconds 60] [--latency 0.2]
"""
from __future__ import annotations

import argparse
from collections import Counter

from sqlalchemy import create_engine, text

from bench.serving import client_key, database, fake_model, gunicorn, open_conversations, run_load, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--own", type=int, default=32)
    parser.add_argument("--shared", type=int, default=8)
    options = parser.parse_args()
    with database() as url, fake_model(options.latency) as model_url:
        key = client_key(url)
        env = {"DATABASE_URL": url, "ARCHIVE_URL": "file:///tmp/parley-bench-archive", "LLM_PROVIDER": "anthropic",
               "ANTHROPIC_API_KEY": "sk-bench", "ANTHROPIC_BASE_URL": model_url, "WEB_CONCURRENCY": "2"}
        with gunicorn("main:create_app()", env) as (server, _pid):
            own = open_conversations(server, key, options.own)
            shared = open_conversations(server, key, 1)[0]
            conversations = own + [shared] * options.shared
            names = [f"own{n}" for n in range(options.own)] + [f"shared{n}" for n in range(options.shared)]
            report = run_load(server, key, conversations, options.seconds, names)
        stored = _stored_messages(url)

    requests = report["requests"]
    statuses = Counter(str(r["status"]) for r in requests)
    acknowledged = [r["message"] for r in requests if r["status"] == 200]
    refused = [r["message"] for r in requests if r["status"] != 200]
    shared_409 = sum(1 for r in requests if r["client"].startswith("shared") and r["status"] == 409)
    user_messages = Counter(content for role, content in stored if role == "user")
    lost = [m for m in acknowledged if user_messages[m] == 0]
    duplicated = [m for m, count in user_messages.items() if count > 1]
    stored_refused = [m for m in refused if user_messages[m]]
    replies = sum(1 for role, _ in stored if role == "assistant")
    server_errors = sum(count for status, count in statuses.items() if status.startswith("5") or status.startswith("error"))
    summary = summarize(report)
    print(f"{len(requests)} requests in {report['seconds']:.0f} s: {dict(statuses)}")
    print(f"acknowledged turns {len(acknowledged)}; stored user messages {sum(user_messages.values())}, replies {replies}")
    print(f"lost {len(lost)}, duplicated {len(duplicated)}, stored although refused {len(stored_refused)}, "
          f"5xx or transport errors {server_errors}")
    print(f"409 turn_in_progress on the shared conversation: {shared_409} "
          f"(its turns answered: {sum(1 for r in requests if r['client'].startswith('shared') and r['status'] == 200)})")
    print(f"p50 {summary['p50_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms for answered turns")
    ok = not lost and not duplicated and not stored_refused and server_errors == 0 and replies == len(acknowledged)
    print("RESULT: " + ("nothing lost or duplicated, no 5xx" if ok else "FAILED"))


def _stored_messages(url: str) -> list[tuple[str, str]]:
    engine = create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT role, content FROM messages")).all()
    engine.dispose()
    return [(row.role, row.content) for row in rows]


if __name__ == "__main__":
    main()
