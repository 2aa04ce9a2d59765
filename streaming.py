"""Server-sent events for POST /chat: a streamed turn, and a stored reply replayed as a short stream.

A streamed turn plugs into the turn's two halves (`conversations.prepare_turn`
before the stream starts; at its end, `store` (the route's: `complete_turn`,
or `handoff.hold_turn` when the model asked for a human) or `abandon_turn`). The
provider's stream is read by a helper thread (a greenlet under gunicorn's
gevent workers) into a queue, so that the response can send a heartbeat
comment while the model is silent, and so that a client that goes away stops
the upstream request at once: the WSGI server closes the response's
generator, whose `finally` closes the provider's stream, stores the reply so
far marked `incomplete`, and releases the lease.

Events (`event:` name, `data:` one JSON object):
- `delta` `{"text": ...}` as the provider produces it;
- `done`: the stored turn, the same object as /chat's JSON answer;
- `handoff` instead of `done` when the model called the request_human tool:
  the same object as /chat's 202 answer `{conversation_id, handoff, seq}`;
- `error` `{"error", "message"}` instead of `done` when the turn failed (a model's error also
  has `retryable`, and `retry_after` in seconds when the provider gave one).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, stream_with_context
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session
from werkzeug.datastructures import MIMEAccept

from conversations import PreparedTurn, abandon_turn
from database_utils import get_session
from errors import ApiError, model_error_body
from llm import ModelError, ModelReply, ReplyStream

log = logging.getLogger("parley")

MIMETYPE = "text/event-stream"
HEARTBEAT = ": heartbeat\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Tries to get a database connection for storing a finished reply (DB_POOL_TIMEOUT each).
STORE_ATTEMPTS = 3
# How long a stream's end waits for its reader to stop after closing the provider's stream.
_READER_JOIN_SECONDS = 5.0


def wanted(stream_flag: bool, accept_header: str | None, accept: Any) -> bool:
    """A stream when the body says `"stream": true` or the client prefers text/event-stream."""
    if stream_flag:
        return True
    if accept_header is None:
        return False
    if ";" in accept_header:  # a media type's parameters (`; charset=utf-8`) do not change which type is wanted
        accept = MIMEAccept([(value.partition(";")[0].strip(), quality) for value, quality in accept])
    return accept.best_match(["application/json", MIMETYPE]) == MIMETYPE


def event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def respond(events: Iterator[str]) -> Response:
    """The events as a response that proxies pass on without buffering."""
    return Response(stream_with_context(events), mimetype=MIMETYPE, headers=HEADERS)


def replay(body: dict[str, Any]) -> Iterator[str]:
    """A stored /chat answer as a short stream: the whole reply in one `delta`, then `done`."""
    yield event("delta", {"text": body["reply"]})
    yield event("done", body)


def stream_turn(
    prepared: PreparedTurn,
    upstream: ReplyStream,
    heartbeat_seconds: float,
    store: Callable[[ModelReply], tuple[str, dict[str, Any]]],
    forget: Callable[[], None],
) -> Iterator[str]:
    """Forward the provider's deltas, then store the turn and send `done` or `handoff` (or `error`).

    `store` stores and commits the turn (with its Idempotency-Key response)
    and returns the last event's name and data; `forget` undoes what the
    request claimed when nothing is stored. Whatever ends the stream, the
    `finally` leaves the turn stored or abandoned, never holding its lease.
    """
    # The view's session was closed when the view returned; the stream has its own.
    session = get_session()
    reader = _Reader(upstream)
    settled = False
    try:
        while True:
            try:
                kind, value = reader.items.get(timeout=heartbeat_seconds)
            except queue.Empty:
                yield HEARTBEAT
                continue
            if kind == "delta":
                yield event("delta", {"text": value})
            elif kind == "error":
                _abandon(session, prepared, forget)
                settled = True
                yield event("error", _error_body(value))
                return
            else:
                last, failure = None, None
                for _ in range(STORE_ATTEMPTS):
                    try:
                        last = store(upstream.reply)
                        break
                    except PoolTimeoutError as exc:  # the reply is paid for and its client waits: try again
                        session.rollback()
                        failure = exc
                        yield HEARTBEAT
                    except (ApiError, SQLAlchemyError) as exc:  # the lease was lost, or the database failed
                        failure = exc
                        break
                settled = True
                if last is None:
                    _abandon(session, prepared, forget)
                    yield event("error", _error_body(failure))
                else:
                    yield event(*last)
                return
    finally:
        reader.stop()
        if not settled:
            _keep_what_came(session, prepared, upstream, store, forget)


def _keep_what_came(
    session: Session, prepared: PreparedTurn, upstream: ReplyStream, store: Callable[[ModelReply], Any], forget: Callable[[], None]
) -> None:
    """The client went away mid-stream: store the reply so far (marked incomplete, or the handoff
    the model had begun to ask for), or nothing."""
    try:
        partial = upstream.reply or upstream.partial_reply()
        if partial is not None:
            store(partial)
            return
    except Exception as exc:  # the client is gone; the log and the released lease are what is left
        log.warning("could not store the incomplete reply of %s: %s", prepared.conversation_id, exc.__class__.__name__)
    _abandon(session, prepared, forget)


def _abandon(session: Session, prepared: PreparedTurn, forget: Callable[[], None]) -> None:
    abandon_turn(session, prepared)
    forget()


def _error_body(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ModelError):
        body = model_error_body(exc, " mid-stream")
        if exc.retry_after is not None:  # what a response's Retry-After would have said
            body["retry_after"] = exc.retry_after
        return body
    if isinstance(exc, ApiError):
        return {"error": exc.error, "message": exc.message}
    if isinstance(exc, SQLAlchemyError):
        log.warning("could not store a streamed turn: %s", exc.__class__.__name__)
        return {"error": "database_unavailable", "message": "the reply could not be stored; send the message again"}
    log.error("stream failed: %s", exc.__class__.__name__)
    return {"error": "internal_error", "message": "the reply failed; retry"}


class _Reader:
    """Reads the provider's stream on its own thread into `items`: ("delta", text)..., then ("end", None) or ("error", exc)."""

    def __init__(self, upstream: ReplyStream) -> None:
        self.upstream = upstream
        self.items: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="parley-stream-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for text in self.upstream:
                self.items.put(("delta", text))
        except Exception as exc:
            self.items.put(("error", exc))
            return
        self.items.put(("end", None))

    def stop(self) -> None:
        """Close the provider's stream (a no-op once it ended) and wait for the reader."""
        if self._thread.is_alive():
            try:
                self.upstream.close()
            except Exception as exc:  # closing a connection mid-read may complain; it is closed all the same
                log.debug("closing the provider's stream: %s", exc.__class__.__name__)
            self._thread.join(_READER_JOIN_SECONDS)
