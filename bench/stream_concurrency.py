"""Concurrent streams: 1,000 clients each reading a 10 s streamed reply at once.

The production command (gunicorn.conf.py, 2 gevent workers), PostgreSQL,
and the fake Claude server (on gevent) streaming a 100-word reply with a
frame every 100 ms. Every client opens its own conversation's stream at the
same moment. Reported: streams held to their `done`, errors, the delay of
each delta behind its schedule (its arrival after the stream's first delta,
minus 100 ms per delta before it) at p50 and p99, and the workers' memory
per stream (peak resident memory under load minus at rest, over the
streams). The baseline is the same clients streaming straight from the fake
model in the same run; the ratio compares the delays.

    python -m bench.stream_concurrency [--clients 1000] [--interval 0.1] [--words 100]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import Counter

from bench.serving import (
    DIRECT_HEADERS,
    ROOT,
    WorkerMemory,
    _children,
    _rss_mib,
    claude_env,
    client_key,
    database,
    fake_model,
    gunicorn,
    open_conversations,
)


def run_streams(url: str, path: str, headers: dict, bodies: list[dict]) -> list[dict]:
    plan = {"url": url, "path": path, "headers": headers, "bodies": bodies}
    done = subprocess.run([sys.executable, "-m", "bench.stream_load"], cwd=ROOT, input=json.dumps(plan),
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)["streams"]


def delays(streams: list[dict], interval: float) -> list[float]:
    """Each delta's lateness behind its stream's schedule, in ms."""
    late = []
    for stream in streams:
        arrivals = stream["deltas"]
        late += [(at - arrivals[0] - n * interval) * 1000 for n, at in enumerate(arrivals)]
    return late


def summarize(label: str, streams: list[dict], interval: float, words: int) -> dict:
    held = [s for s in streams if s["status"] == 200 and s["ended"] == "done" and len(s["deltas"]) == words]
    late = sorted(delays(held, interval))
    p99 = late[min(int(len(late) * 0.99), len(late) - 1)] if late else float("nan")
    failures = Counter(f"{s['status']}/{s['ended']}" for s in streams if s not in held)
    return {"label": label, "held": len(held), "errors": len(streams) - len(held), "failures": dict(failures),
            "p50": statistics.median(late) if late else float("nan"), "p99": p99,
            "longest": max((s["seconds"] for s in held), default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between the fake model's frames")
    parser.add_argument("--words", type=int, default=100, help="deltas per reply")
    options = parser.parse_args()
    interval, words = options.interval, options.words
    with database() as url, fake_model(0.0, "--stream-interval", str(interval), "--reply-words", str(words)) as model_url:
        key = client_key(url)
        env = claude_env(url, model_url)
        direct_body = {"model": "claude-bench", "max_tokens": 1024, "stream": True, "messages": [{"role": "user", "content": "go"}]}
        started = time.monotonic()
        baseline = run_streams(model_url, "/v1/messages", DIRECT_HEADERS, [direct_body] * options.clients)
        print(f"baseline: {options.clients} direct streams in {time.monotonic() - started:.1f} s", flush=True)
        with gunicorn("main:create_app()", env) as (server, master_pid):
            conversations = open_conversations(server, key, options.clients)
            time.sleep(1.0)
            at_rest = sum(_rss_mib(pid) for pid in _children(master_pid))
            bodies = [{"conversation_id": c, "message": "go", "stream": True} for c in conversations]
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            started = time.monotonic()
            with WorkerMemory(master_pid) as memory:
                through = run_streams(server, "/chat", headers, bodies)
            print(f"through Parley: {options.clients} streams in {time.monotonic() - started:.1f} s", flush=True)
    rows = [summarize("fake model directly", baseline, interval, words), summarize("through Parley", through, interval, words)]
    print(f"\n{options.clients} concurrent streams, {words} deltas {interval * 1000:.0f} ms apart")
    print(f"{'path':<22}{'held':>7}{'errors':>8}{'delay p50 ms':>14}{'delay p99 ms':>14}{'longest s':>11}")
    for row in rows:
        print(f"{row['label']:<22}{row['held']:>7}{row['errors']:>8}{row['p50']:14.1f}{row['p99']:14.1f}{row['longest']:11.1f}")
    for row in rows:
        if row["failures"]:
            print(f"{row['label']}: failed streams by (status, end): {row['failures']}")
    per_stream = (memory.peak_total_mib - at_rest) * 1024 / max(rows[1]["held"], 1)
    print(f"workers' memory: {at_rest:.0f} MiB at rest, {memory.peak_total_mib:.0f} MiB peak; "
          f"{per_stream:.0f} KiB per stream")
    print(f"ratio delay p99 through/direct: {rows[1]['p99'] / rows[0]['p99']:.2f}x")


if __name__ == "__main__":
    main()
