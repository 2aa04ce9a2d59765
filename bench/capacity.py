"""Capacity: many clients, each on its own conversation, with a model that takes 2 s to answer.

The production command (2 gevent workers), PostgreSQL, and the fake model
server answering after `--latency` seconds. Each client sends its next
message as soon as it has the reply, so the ideal rate is clients / latency;
the figure is the achieved rate against it, with latency, errors, the
workers' peak memory and the cores each group of processes used. Under
each, the same clients on the fake model server directly: the most this
machine and measurement allow. Run for 400 clients, then 1,000.

    python -m bench.capacity [--clients 400 1000] [--latency 2] [--seconds 30]
"""
from __future__ import annotations

import argparse
import os

from bench.serving import (
    CoreUse,
    WorkerMemory,
    client_key,
    database,
    fake_model,
    gunicorn,
    open_conversations,
    run_load,
    summarize,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[400, 1000])
    parser.add_argument("--latency", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=30)
    options = parser.parse_args()
    with database() as url, fake_model(options.latency) as model_url:
        key = client_key(url)
        env = {
            "DATABASE_URL": url,
            "ARCHIVE_URL": "file:///tmp/parley-bench-archive",
            "LLM_PROVIDER": "anthropic",
            "ANTHROPIC_API_KEY": "sk-bench",
            "ANTHROPIC_BASE_URL": model_url,
            "WEB_CONCURRENCY": "2",
        }
        print(f"{'clients':>8} {'turns/s':>9} {'ideal':>7} {'ratio':>6} {'p50 s':>7} {'p99 s':>7} {'errors':>7} "
              f"{'peak MiB (all workers)':>23}  statuses")
        for clients in options.clients:
            with gunicorn("main:create_app()", env) as (server, master_pid):
                conversations = open_conversations(server, key, clients)
                with (WorkerMemory(master_pid) as memory,
                      CoreUse(master_pid, options.seconds / 4, options.seconds / 2) as use):
                    report = run_load(server, key, conversations, options.seconds)
            summary = summarize(report, warmup=options.latency * 2)
            ideal = clients / options.latency
            errors = sum(count for status, count in summary["statuses"].items() if status != "200")
            print(f"{clients:>8} {summary['per_second']:9.1f} {ideal:7.0f} {summary['per_second'] / ideal:5.2f}x "
                  f"{summary['p50_ms'] / 1000:7.2f} {summary['p99_ms'] / 1000:7.2f} {errors:>7} "
                  f"{memory.peak_total_mib:12.0f} ({memory.peak_worker_mib:.0f} max/worker)  {summary['statuses']}")
            print(f"{'':>8} cores used in the middle of the run ({os.cpu_count()} on this machine): "
                  + ", ".join(f"{group} {cores:.2f}" for group, cores in use.cores.items()))
            # The same clients on the fake model server itself: what this machine and this
            # measurement allow with no Parley in between.
            direct = summarize(run_load(model_url, "sk-bench", conversations, options.seconds, path="/v1/messages"),
                               warmup=options.latency * 2)
            print(f"{'':>8} {direct['per_second']:9.1f} {ideal:7.0f} {direct['per_second'] / ideal:5.2f}x "
                  f"{direct['p50_ms'] / 1000:7.2f} {direct['p99_ms'] / 1000:7.2f}   (the fake model server directly, "
                  f"same clients; Parley at {summary['per_second'] / direct['per_second']:.2f}x of it)")


if __name__ == "__main__":
    main()
