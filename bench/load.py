"""A load generator on gevent: N clients, each posting /chat (or the plan's path) on its own keep-alive connection.

Run by the benchmarks as a process of its own. It reads a JSON plan on
stdin and prints a JSON report: every request's status, latency and the
message it sent, so the caller can count what the server stored.

Plan: {"url": "http://127.0.0.1:PORT", "key": "prly_...", "seconds": 30,
       "clients": [{"conversation_id": "...", "name": "c1"}, ...], "path": "/chat", "message_bytes": 0}
With message_bytes, each message is padded with words to about that length.
"""
from gevent import monkey

monkey.patch_all()

import http.client  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from urllib.parse import urlparse  # noqa: E402

import gevent  # noqa: E402

from bench.messages import padded  # noqa: E402


def _client(plan: dict, client: dict, results: list) -> None:
    target = urlparse(plan["url"])
    headers = {"Authorization": f"Bearer {plan['key']}", "Content-Type": "application/json"}
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
    deadline = time.monotonic() + plan["seconds"]
    n = 0
    while time.monotonic() < deadline:
        message = padded(f"{client['name']} message {n}", plan.get("message_bytes", 0))
        body = json.dumps({"conversation_id": client["conversation_id"], "message": message})
        started = time.monotonic()
        try:
            connection.request("POST", plan.get("path", "/chat"), body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            status = response.status
            retry_after = response.getheader("Retry-After")
        except (OSError, http.client.HTTPException) as exc:
            status, retry_after = f"error:{exc.__class__.__name__}", None
            connection.close()
            connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
        results.append({"client": client["name"], "message": message, "status": status,
                        "started": started, "seconds": time.monotonic() - started})
        n += 1
        if status == 409:  # the conversation is busy: wait as told, like a polite client
            gevent.sleep(min(float(retry_after or 1), 1.0) * 0.1)


def main() -> None:
    plan = json.load(sys.stdin)
    results: list = []
    started = time.monotonic()
    gevent.joinall([gevent.spawn(_client, plan, client, results) for client in plan["clients"]])
    json.dump({"seconds": time.monotonic() - started, "requests": results}, sys.stdout)


if __name__ == "__main__":
    main()
