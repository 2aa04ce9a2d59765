"""One JSON error shape, `{"error": ..., "message": ...}`, for every failure.

Services raise `ApiError` (or a provider's `ModelError`); `init_app` turns
those and every other exception into that shape. Internal details (SQL,
stack traces, credentials) are never put into a response or a log line:
unexpected errors are logged by type only.
"""
from __future__ import annotations

import logging

from flask import Flask, Response, current_app, jsonify, request
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from database_utils import DatabaseNotMigrated
from llm import ModelError
from s3_utils import ArchiveError

log = logging.getLogger("parley")


class ApiError(Exception):
    status = 400
    error = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


class PayloadTooLarge(ApiError):
    status = 413
    error = "payload_too_large"


def error_response(status: int, error: str, message: str, details: list | None = None) -> Response:
    body = {"error": error, "message": message}
    if details is not None:
        body["details"] = details
    response = jsonify(body)
    response.status_code = status
    return response


# Pydantic's messages for dates, completed with an example of what it takes.
_DATE_EXAMPLE = "use ISO 8601 with an offset, e.g. 2026-11-01T00:00:00Z or 2026-11-01T09:30:00+01:00"
_DATE_ERRORS = {"timezone_aware", "datetime_parsing", "datetime_from_date_parsing", "datetime_type"}


def validation_error_response(exc: ValidationError) -> Response:
    """400 listing each invalid field, without echoing the input back."""
    details = [
        {
            "field": ".".join(str(part) for part in e["loc"]),
            "problem": f"{e['msg']}: {_DATE_EXAMPLE}" if e["type"] in _DATE_ERRORS else e["msg"],
        }
        for e in exc.errors()
    ]
    summary = "; ".join(f"{d['field'] or 'body'}: {d['problem']}" for d in details)
    return error_response(400, "invalid_request", summary, details)


def init_app(app: Flask) -> None:
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(ModelError, _model_error)
    app.register_error_handler(ArchiveError, _archive_error)
    app.register_error_handler(DatabaseNotMigrated, _database_not_migrated)
    app.register_error_handler(OperationalError, _database_unavailable)
    app.register_error_handler(InterfaceError, _database_unavailable)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)


def _api_error(exc: ApiError) -> Response:
    return error_response(exc.status, exc.error, exc.message)


def _model_error(exc: ModelError) -> Response:
    log.warning("model provider failed: %s (%s)", exc.error, exc.__cause__.__class__.__name__)
    return error_response(exc.status, exc.error, exc.message)


def _archive_error(exc: ArchiveError) -> Response:
    log.error("archive failed: %s", exc)
    return error_response(503, "archive_unavailable", "the conversation archive is unavailable; retry later")


def _database_unavailable(exc: DBAPIError) -> Response:
    # str(exc) would include the SQL statement and its parameters.
    log.error("database unavailable on %s %s: %s", request.method, request.path, exc.orig.__class__.__name__)
    return error_response(503, "database_unavailable", "the database is unavailable; retry later")


def _database_not_migrated(exc: DatabaseNotMigrated) -> Response:
    log.error("database not migrated: %s", exc.message)
    return error_response(503, "database_not_migrated", exc.message)


def _http_error(exc: HTTPException) -> Response:
    if exc.code == 429:
        return error_response(429, "rate_limited", f"rate limit of {exc.description} exceeded; retry after Retry-After seconds")
    if exc.code == 413:
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        return error_response(413, PayloadTooLarge.error, f"the request body is larger than {limit} bytes")
    error = (exc.name or "error").lower().replace(" ", "_")
    response = error_response(exc.code or 500, error, exc.description or exc.name)
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def _unexpected_error(exc: Exception) -> Response:
    log.error("unexpected %s on %s %s", exc.__class__.__name__, request.method, request.path)
    return error_response(500, "internal_error", "an unexpected error occurred")
