"""One JSON error shape, `{"error": ..., "message": ...}`, for every failure.

Services raise `ApiError` (or a provider's `ModelError`); `init_app` turns
those and every other exception into that shape. Internal details (SQL,
stack traces, credentials) are never put into a response or a log line:
unexpected errors are logged by type only.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, jsonify, request
from gunicorn.http.errors import NoMoreData, ParseException
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, PendingRollbackError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from database_utils import DatabaseNotMigrated
from llm import ModelError
from s3_utils import ArchiveError
from schemas import ErrorResponse

log = logging.getLogger("parley")
# Bytes of an over-size body read and thrown away, so that a client reusing
# its connection finds the next response, not the rest of its upload.
MAX_DRAIN_BYTES = 16 * 1024 * 1024


DATABASE_UNAVAILABLE = "database_unavailable"
DATABASE_NOT_MIGRATED = "database_not_migrated"
# A setting the database cannot use (KNOWLEDGE_LANGUAGE): the operator's to fix, so never kept for a retry.
MISCONFIGURED = "misconfigured"


class ApiError(Exception):
    status = 400
    error = "bad_request"
    retry_after: int | None = None
    details: list[dict[str, str]] | None = None  # one entry per refused field

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnsupportedMediaType(ApiError):
    status = 415
    error = "unsupported_media_type"


class Unauthorized(ApiError):
    status = 401
    error = "unauthorized"


class Forbidden(ApiError):
    status = 403
    error = "forbidden"


class NotFound(ApiError):
    status = 404
    error = "not_found"


class Conflict(ApiError):
    status = 409
    error = "conflict"


class TurnInProgress(Conflict):
    """Another turn holds the conversation's lease; retry shortly."""

    error = "turn_in_progress"
    retry_after = 1


class RequestInProgress(Conflict):
    """The first request with this Idempotency-Key is still running."""

    error = "request_in_progress"
    retry_after = 1


class IdempotencyClaimLost(Conflict):
    """A retry took this request's Idempotency-Key over after its lock ran out: the retry's answer is the key's."""


class IdempotencyKeyReused(ApiError):
    status = 422
    error = "idempotency_key_reused"


class PayloadTooLarge(ApiError):
    status = 413
    error = "payload_too_large"


class ShuttingDown(ApiError):
    """A turn that would begin after its worker was told to stop (SIGTERM): it could outlast the
    graceful timeout. It comes on a connection kept alive from before the signal, or accepted
    just after it."""

    status = 503
    error = "shutting_down"
    retry_after = 1


def error_response(
    status: int, error: str, message: str, details: list | None = None, retry_after: int | None = None, **extra: object
) -> Response:
    body = {"error": error, "message": message, **extra}
    if details is not None:
        body["details"] = details
    response = jsonify(body)
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


# Pydantic's messages for dates, completed with an example of what it takes.
_DATE_EXAMPLE = "use ISO 8601 with an offset, e.g. 2026-11-01T00:00:00Z or 2026-11-01T09:30:00+01:00"
_DATE_ERRORS = {"timezone_aware", "datetime_parsing", "datetime_from_date_parsing", "datetime_type"}


def validation_error_response(exc: ValidationError) -> Response:
    """400 listing each invalid field, without echoing the input back."""
    refused = InvalidInput(exc)
    return error_response(refused.status, refused.error, refused.message, refused.details)


class InvalidInput(ApiError):
    """Input that failed its pydantic model: each field's problem in `details`, as flask-openapi3's own validation answers."""

    error = "invalid_request"

    def __init__(self, exc: ValidationError) -> None:
        self.details = [{"field": ".".join(str(part) for part in e["loc"]), "problem": _problem(e)} for e in exc.errors()]
        super().__init__("; ".join(f"{d['field'] or 'body'}: {d['problem']}" for d in self.details))


def _problem(error: Mapping[str, Any]) -> str:
    if error["type"] in _DATE_ERRORS:
        return f"{error['msg']}: {_DATE_EXAMPLE}"
    if error["type"] in ("too_long", "too_short") and isinstance(error.get("input"), str):
        # A length checked after a validator is pydantic's length of any sequence: "items".
        context = error["ctx"]
        bound = f"at most {context['max_length']}" if error["type"] == "too_long" else f"at least {context['min_length']}"
        return f"should have {bound} characters, not {context['actual_length']}"
    return error["msg"]


def init_app(app: Flask) -> None:
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(ModelError, _model_error)
    app.register_error_handler(ArchiveError, _archive_error)
    app.register_error_handler(DatabaseNotMigrated, _database_not_migrated)
    app.register_error_handler(OperationalError, _database_unavailable)
    app.register_error_handler(InterfaceError, _database_unavailable)
    app.register_error_handler(PendingRollbackError, _database_unavailable)
    app.register_error_handler(PoolTimeoutError, _database_busy)
    app.register_error_handler(DBAPIError, _database_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(ParseException, _broken_body)
    app.register_error_handler(NoMoreData, _broken_body)
    app.register_error_handler(Exception, _unexpected_error)


def _broken_body(exc: Exception) -> Response:
    """gunicorn found the body's chunked framing broken (or the body cut short) while Parley read it.

    gunicorn closes the connection after this answer: it cannot read the body
    to its end, so it cannot tell where a next request would start.
    """
    return error_response(400, "bad_request", f"the request body is malformed: {exc.__class__.__name__}")


def _api_error(exc: ApiError) -> Response:
    return error_response(exc.status, exc.error, exc.message, exc.details, retry_after=exc.retry_after)


def model_error_body(exc: ModelError, where: str = "") -> dict[str, Any]:
    """A model error's body (`error`, `message`, `retryable`), logged once: for a response, and for
    a stream's `error` event (`where` says " mid-stream"), which adds `retry_after` itself."""
    cause = exc.message if exc.__cause__ is None else exc.__cause__.__class__.__name__  # Parley's own finding, or the SDK's error
    log.warning("model provider failed%s: %s (%s)", where, exc.error, cause)
    return ErrorResponse(error=exc.error, message=exc.message, retryable=exc.retryable).model_dump(exclude_none=True)


def _model_error(exc: ModelError) -> Response:
    return error_response(exc.status, **model_error_body(exc), retry_after=exc.retry_after)


def _archive_error(exc: ArchiveError) -> Response:
    log.error("archive failed: %s", exc)
    return error_response(503, "archive_unavailable", "the conversation archive is unavailable; retry later")


def _database_unavailable(exc: SQLAlchemyError) -> Response:
    """The connection or its transaction was lost (a restart, a network fault)."""
    # str(exc) would include the SQL statement and its parameters.
    cause = getattr(exc, "orig", None) or exc
    log.error("database unavailable on %s %s: %s", request.method, request.path, cause.__class__.__name__)
    return error_response(503, DATABASE_UNAVAILABLE, "the database is unavailable; retry later", retry_after=1)


def _database_busy(exc: PoolTimeoutError) -> Response:
    log.error("no database connection free on %s %s", request.method, request.path)
    return error_response(503, DATABASE_UNAVAILABLE, "the database is busy; retry later", retry_after=1)


def _database_error(exc: DBAPIError) -> Response:
    """Other driver errors: a lost connection is a 503, anything else a 500."""
    if exc.connection_invalidated:
        return _database_unavailable(exc)
    return _unexpected_error(exc)


def _database_not_migrated(exc: DatabaseNotMigrated) -> Response:
    log.error("database not migrated: %s", exc.message)
    return error_response(503, DATABASE_NOT_MIGRATED, exc.message)


def _http_error(exc: HTTPException) -> Response:
    if exc.code == 429:
        return error_response(429, "rate_limited", f"rate limit of {exc.description} exceeded; retry after Retry-After seconds")
    if exc.code == 413:
        limit = request.max_content_length  # MAX_CONTENT_LENGTH, or an upload route's own limit
        response = error_response(413, PayloadTooLarge.error, f"the request body is larger than {limit} bytes")
        _drain_body()
        response.headers["Connection"] = "close"
        return response
    error = (exc.name or "error").lower().replace(" ", "_")
    response = error_response(exc.code or 500, error, exc.description or exc.name)
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def _drain_body() -> None:
    """Read what is left of a refused body (up to a limit), so the connection stays in step."""
    stream = request.environ.get("wsgi.input")
    remaining = min(request.content_length or 0, MAX_DRAIN_BYTES)
    try:
        while stream is not None and remaining > 0:
            chunk = stream.read(min(remaining, 64 * 1024))
            if not chunk:
                break
            remaining -= len(chunk)
    except OSError:
        pass


def _unexpected_error(exc: Exception) -> Response:
    kind = exc.__class__
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    log.error("unexpected %s on %s %s", name, request.method, request.path)
    return error_response(500, "internal_error", "an unexpected error occurred")
