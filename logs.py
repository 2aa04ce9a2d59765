"""Log lines as JSON (or plain text), each carrying the request's ID.

A request's ID is the client's `X-Request-ID` when it sends a sensible one,
otherwise a new one; it is echoed in the response's `X-Request-ID` and put
on every log line written while the request is served.
"""
from __future__ import annotations

import logging
import re
import sys
import time
import uuid

from flask import Flask, Response, g, has_request_context, request
from pythonjsonlogger.json import JsonFormatter

REQUEST_ID_HEADER = "X-Request-ID"
# A client's own request ID is echoed when it is 1 to 200 visible ASCII characters other than
# brackets, which the text log format puts it in, and commas, with which a server joins two
# headers of the same name into one ("!" to "+", "-" to "Z" and "^" to "~").
_REQUEST_ID = re.compile(r"[!-+\--Z^-~]{1,200}")
_HANDLER_NAME = "parley"
log = logging.getLogger("parley.request")


class _StderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is at each line, not as it was when set up."""

    @property
    def stream(self):  # noqa: ANN201 - logging.StreamHandler's attribute
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _RequestIdFilter(logging.Filter):
    """Adds the request's ID, and keeps tracebacks out of the log.

    A traceback can carry SQL with its parameters (message text) or a key, so
    an exception is logged by its type only, whichever library logs it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = g.get("request_id") if has_request_context() else None
        if record.exc_info:
            record.msg = f"{record.getMessage()} ({record.exc_info[0].__name__})"
            record.args = ()
            record.exc_info = record.exc_text = record.stack_info = None
        return True


class _TextFormatter(logging.Formatter):
    """For people: a request's line ends with what JSON gives as fields (`GET /healthz 200 1.2 ms`)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if hasattr(record, "duration_ms"):
            line += f" {record.method} {record.path} {record.status} {record.duration_ms} ms"
        return line


def configure(log_format: str, level: str = "info") -> None:
    """Send every log line of `level` or above to stderr as JSON (`json`) or text (`text`), once per process."""
    root = logging.getLogger()
    if any(handler.get_name() == _HANDLER_NAME for handler in root.handlers):
        return
    handler = _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(_RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s", timestamp=False)
        )
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    root.addHandler(handler)
    # Below INFO only Parley's own lines: the SDKs' debug lines carry whole requests (conversations, keys).
    root.setLevel(max(logging.getLevelName(level.upper()), logging.INFO))
    logging.getLogger("parley").setLevel(level.upper())
    # Python's warnings too (e.g. gevent's about patching late, in --preload's workers), not raw stderr lines.
    logging.captureWarnings(True)
    # Their INFO lines say nothing an operator acts on ("Context impl PostgresqlImpl.",
    # "Found credentials in environment variables.") and would fill every command's output.
    for chatty in ("alembic", "botocore", "httpx2", "httpx"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def init_app(app: Flask) -> None:
    configure(app.config["LOG_FORMAT"], app.config["LOG_LEVEL"])

    @app.before_request
    def _assign_request_id() -> None:
        sent = request.headers.get(REQUEST_ID_HEADER, "")
        g.request_id = sent if _REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex
        g.log_started = time.perf_counter()

    @app.after_request
    def _log_request(response: Response) -> Response:
        response.headers[REQUEST_ID_HEADER] = g.get("request_id") or uuid.uuid4().hex
        elapsed_ms = (time.perf_counter() - g.get("log_started", time.perf_counter())) * 1000
        log.info(
            "request",
            extra={"method": request.method, "path": request.path, "status": response.status_code,
                   "duration_ms": round(elapsed_ms, 2)},
        )
        return response
