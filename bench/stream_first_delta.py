"""Time to first delta: through Parley (POST /chat, "stream": true) minus straight from the fake model.

The production command (gunicorn.conf.py, gevent workers), PostgreSQL, and
the fake Claude server streaming over SSE with no added latency. Each
round sends one stream to the fake model directly (the Messages API with
"stream": true, the request Parley's SDK sends) and one through Parley, in
alternating order, one at a time, so that both see the same machine. The
figure is the difference per round, p50 and p99, with the ratio of the two
medians. Target: under 10 ms at p50.

    python -m bench.stream_first_delta [--streams 200]
"""
from __future__ import annotations

import argparse
import statistics

from bench.serving import (
    DIRECT_HEADERS,
    claude_env,
    client_key,
    database,
    fake_model,
    gunicorn,
    open_conversations,
    read_stream,
)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * fraction), len(ordered) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    options = parser.parse_args()
    with database() as url, fake_model(0.0) as model_url:
        key = client_key(url)
        env = claude_env(url, model_url)
        with gunicorn("main:create_app()", env) as (server, _):
            conversations = open_conversations(server, key, options.streams + 10)
            parley_headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            direct, through, failures = [], [], 0
            for n, conversation_id in enumerate(conversations):
                message = f"question {n}"
                body = {"model": "claude-bench", "max_tokens": 1024, "stream": True, "messages": [{"role": "user", "content": message}]}
                runs = [
                    (direct, lambda b=body: read_stream(model_url, "/v1/messages", DIRECT_HEADERS, b)),
                    (through, lambda c=conversation_id, m=message: read_stream(
                        server, "/chat", parley_headers, {"conversation_id": c, "message": m, "stream": True})),
                ]
                if n % 2:
                    runs.reverse()
                results = [(sink, run()) for sink, run in runs]
                if n < 10:
                    continue  # warm-up: connections, caches, the first statements
                for sink, result in results:
                    if result["status"] != 200 or result["ended"] != "done" or not result["deltas"]:
                        failures += 1
                    else:
                        sink.append(result["deltas"][0] * 1000)
    pairs = min(len(direct), len(through))
    added = [t - d for d, t in zip(direct[:pairs], through[:pairs], strict=True)]
    print(f"\ntime to first delta, {pairs} streams each, one at a time (ms)")
    print(f"{'path':<28}{'p50':>9}{'p99':>9}")
    print(f"{'fake model directly':<28}{statistics.median(direct):9.2f}{_percentile(direct, 0.99):9.2f}")
    print(f"{'through Parley':<28}{statistics.median(through):9.2f}{_percentile(through, 0.99):9.2f}")
    print(f"{'added by Parley (per pair)':<28}{statistics.median(added):9.2f}{_percentile(added, 0.99):9.2f}")
    print(f"ratio through/direct (p50): {statistics.median(through) / statistics.median(direct):.2f}x; failed streams: {failures}")


if __name__ == "__main__":
    main()
