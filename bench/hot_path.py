"""Hot path: /chat with a zero-latency model, 16 clients, against the minimal persisting turn.

All four run under the production command (`gunicorn -c gunicorn.conf.py`,
2 gevent workers), on one PostgreSQL database, driven by the same load
generator, one after another and repeated, so that noise hits them alike:
- baseline: `bench.minimal_app` (parse the body; in one transaction, one
  UPDATE of the conversation and one INSERT of two messages);
- the baseline with one call to the fake server through the anthropic SDK
  before its transaction (one message, no context, the reply read as JSON):
  the least a turn that reaches Claude through the SDK can cost, on this
  machine, where the fake server and the load generator share the two cores;
- Parley with the echo model (no network: the service's own cost);
- Parley with the anthropic SDK against the local fake server answering at
  once (adds the SDK and an HTTP round trip per turn).

    python -m bench.hot_path [--seconds 15] [--rounds 2] [--clients 16] [--message-bytes 0]

Each client talks on one conversation for the whole run, so the context sent
grows to the token budget; with the default short messages (about 20
bytes) that is hundreds of messages a turn. `--message-bytes 400` pads each
user message to 400 bytes (and so each reply, which quotes it), for a
context of a few dozen longer messages.

Each round's line ends with how the two workers split the 16 connections
(`ConnectionSplit`, in the middle of the run): they stay where they landed
for the whole run, so one worker may carry most of the load (3+13 has been
seen), for any of the setups.
"""
from __future__ import annotations

import argparse
import statistics
from urllib.parse import urlparse

from bench.serving import (
    ConnectionSplit,
    client_key,
    database,
    fake_model,
    gunicorn,
    hot_path_setups,
    open_conversations,
    run_load,
    summarize,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--message-bytes", type=int, default=0, help="pad each user message to about this many bytes")
    options = parser.parse_args()
    labels = {
        "baseline": "baseline",
        "minimal_sdk": "baseline + one SDK call",
        "echo": "parley (echo)",
        "anthropic": "parley (anthropic SDK, fake at 0 s)",
    }
    results: dict[str, list[dict]] = {label: [] for label in labels.values()}
    with database() as url, fake_model(0.0) as model_url:
        key = client_key(url)
        servers = hot_path_setups(url, model_url)
        setups = {labels[name]: server for name, server in servers.items()}
        common = servers["baseline"][1]
        for round_number in range(options.rounds):
            for name, (app, env) in setups.items():
                with gunicorn(app, env) as (server, master):
                    # The baseline has no /new_chat: open the conversations through Parley's API beforehand.
                    conversations = _conversations(url, key, options.clients, common)
                    with ConnectionSplit(master, urlparse(server).port, delay=options.seconds / 2) as split:
                        report = run_load(server, key, conversations, options.seconds, message_bytes=options.message_bytes)
                summary = summarize(report, warmup=2.0)
                results[name].append(summary)
                print(f"round {round_number + 1} {name:<38} {summary['per_second']:8.1f} turns/s  "
                      f"p50 {summary['p50_ms']:6.1f} ms  p99 {summary['p99_ms']:6.1f} ms  {summary['statuses']}  "
                      f"connections per worker {split}")
    baseline = statistics.median(r["per_second"] for r in results["baseline"])
    baseline_p99 = statistics.median(r["p99_ms"] for r in results["baseline"])
    print(f"\n{'':<38} {'turns/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>7} {'p99 ratio':>10}")
    for name, runs in results.items():
        rate = statistics.median(r["per_second"] for r in runs)
        p50 = statistics.median(r["p50_ms"] for r in runs)
        p99 = statistics.median(r["p99_ms"] for r in runs)
        print(f"{name:<38} {rate:9.1f} {p50:8.1f} {p99:8.1f} {rate / baseline:6.2f}x {p99 / baseline_p99:9.2f}x")
    print(f"(ratio: throughput against the baseline's {baseline:.1f} turns/s; p99 ratio: p99 against the baseline's "
          f"{baseline_p99:.1f} ms)")
    with_sdk = statistics.median(r["per_second"] for r in results[labels["minimal_sdk"]])
    sdk = statistics.median(r["per_second"] for r in results[labels["anthropic"]])
    print(f"{labels['anthropic']} against {labels['minimal_sdk']}: {sdk / with_sdk:.2f}x "
          f"({sdk:.1f} against {with_sdk:.1f} turns/s; both pay for the SDK and the fake server on these cores)")


def _conversations(url: str, key: str, count: int, env: dict[str, str]) -> list[str]:
    with gunicorn("main:create_app()", {**env, "LLM_PROVIDER": "echo", "WEB_CONCURRENCY": "1"}) as (parley, _pid):
        return open_conversations(parley, key, count)


if __name__ == "__main__":
    main()
