"""A load generator on gevent for streamed replies: N clients, each reading one stream at once.

Run by the streaming benchmarks as a process of its own. It reads a JSON
plan on stdin and prints a JSON report with, per stream, its status, how it
ended (`done`, `error`, or a connection failure) and the arrival time of
each delta (seconds since the stream's request was sent).

Plan: {"url": "http://127.0.0.1:PORT", "path": "/chat", "headers": {...},
       "bodies": [{...}, ...]}   (one stream per body, all started together)
"""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

from bench.serving import read_stream  # noqa: E402


def main() -> None:
    plan = json.load(sys.stdin)
    jobs = [gevent.spawn(read_stream, plan["url"], plan["path"], plan["headers"], body) for body in plan["bodies"]]
    gevent.joinall(jobs)
    json.dump({"streams": [job.value for job in jobs]}, sys.stdout)


if __name__ == "__main__":
    main()
