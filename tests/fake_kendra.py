"""A local fake of AWS Kendra's Retrieve API (JSON 1.1 protocol), for tests.

boto3's `kendra` client, pointed at it with `endpoint_url`, sends
`POST /` with `X-Amz-Target: AWSKendraFrontendService.Retrieve` and a JSON
body; the server records each request and answers with `result_items`, or
with an error while `fail_status` is set. It binds to 127.0.0.1 only.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CONTENT_TYPE = "application/x-amz-json-1.1"
TARGET = "AWSKendraFrontendService.Retrieve"


@dataclass
class KendraRequest:
    target: str | None
    content_type: str | None
    authorization: str | None
    body: dict[str, Any]


def result_item(n: int, confidence: str, title: str, content: str, uri: str | None = None) -> dict[str, Any]:
    """One ResultItem as Kendra's Retrieve answers it."""
    item = {
        "Id": f"result-{n}",
        "DocumentId": f"s3://kb/doc-{n}.html",
        "DocumentTitle": title,
        "Content": content,
        "DocumentAttributes": [],
        "ScoreAttributes": {"ScoreConfidence": confidence},
    }
    if uri:
        item["DocumentURI"] = uri
    return item


class FakeKendra:
    def __init__(self) -> None:
        self.requests: list[KendraRequest] = []
        self.result_items: list[dict[str, Any]] = []
        self.fail_status: int | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                target = self.headers.get("X-Amz-Target")
                fake.requests.append(KendraRequest(target, self.headers.get("Content-Type"), self.headers.get("Authorization"), body))
                if fake.fail_status is not None:
                    self._send(fake.fail_status, {"__type": "InternalServerException", "message": "injected failure"})
                elif target != TARGET:
                    self._send(400, {"__type": "UnknownOperationException", "message": f"unknown target {target}"})
                else:
                    self._send(200, {"QueryId": "q-1", "ResultItems": fake.result_items[: body.get("PageSize", 10)]})

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("x-amzn-RequestId", "fake-request-id")
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> FakeKendra:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
