"""Parley's application factory and HTTP routes.

Run it with `flask --app main run` (embedded default) or
`gunicorn "main:create_app()"` (production).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import current_app, request
from flask_openapi3 import APIBlueprint, Info, OpenAPI, Tag
from werkzeug.exceptions import BadRequest

import database_utils
import errors
from config import load_config
from conversations import chat_turn, conversation_dict, end_conversation, open_conversation, read_conversation
from database_utils import get_session
from llm import make_model
from s3_utils import ArchiveError, make_archive
from schemas import (
    ChatRequest,
    ChatResponse,
    ConversationDetail,
    ConversationOut,
    ConversationRef,
    ErrorResponse,
    Health,
    NewChatRequest,
)

__version__ = "0.1.0"

_ERRORS = {400: ErrorResponse, 404: ErrorResponse, 413: ErrorResponse}
_MODEL_ERRORS = {409: ErrorResponse, 502: ErrorResponse, 503: ErrorResponse, 504: ErrorResponse}

chats = Tag(name="conversations", description="Open, talk in, end and read conversations")
ops = Tag(name="operations", description="Liveness and readiness probes")
api = APIBlueprint("parley", __name__, abp_responses=_ERRORS)


def create_app(config: Mapping[str, Any] | None = None) -> OpenAPI:
    """Build the app from the environment, with `config` overriding it."""
    app = OpenAPI(
        __name__,
        info=Info(title="Parley", version=__version__, description="Conversation service for Claude-powered assistants."),
        validation_error_status=400,
        validation_error_model=ErrorResponse,
        validation_error_callback=errors.validation_error_response,
        doc_prefix="/docs",
    )
    app.config.update(load_config())
    app.config.update(config or {})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    errors.init_app(app)
    database_utils.init_app(app)
    if app.config["DATABASE_URL"].startswith("sqlite"):
        # The embedded default needs no setup step: bring its schema up to date.
        database_utils.upgrade_database(app.config["DATABASE_URL"])
    app.extensions["parley.archive"] = make_archive(app.config["ARCHIVE_URL"], app.config["S3_ENDPOINT_URL"])
    app.extensions["parley.model"] = make_model(app.config)
    app.before_request(_require_json_body)
    app.register_api(api)
    app.add_url_rule("/openapi.json", "openapi_json", lambda: app.api_doc)
    return app


def _require_json_body() -> None:
    """Reject non-JSON and malformed JSON bodies before validation sees them."""
    if request.method in ("POST", "PUT", "PATCH"):
        if not request.is_json:
            raise errors.ApiError("the request body must be JSON (Content-Type: application/json)")
        try:
            request.get_json()
        except BadRequest:
            raise errors.ApiError("the request body is not valid JSON in UTF-8") from None


def _archive():
    return current_app.extensions["parley.archive"]


@api.post("/new_chat", tags=[chats], responses={201: ConversationOut})
def new_chat(body: NewChatRequest):
    """Open a conversation for a user; the server assigns its ID."""
    conversation = open_conversation(get_session(), body)
    return conversation_dict(conversation), 201


@api.post("/chat", tags=[chats], responses={200: ChatResponse, **_MODEL_ERRORS})
def chat(body: ChatRequest):
    """Post the user's message and get the model's reply."""
    turn = chat_turn(
        get_session(), current_app.extensions["parley.model"], current_app.config, body.conversation_id, body.message
    )
    return {
        "conversation_id": str(turn.conversation_id),
        "reply": turn.reply.text,
        "seq": turn.seq,
        "model": turn.reply.model,
        "usage": turn.reply.usage,
        "context": {
            "messages_sent": turn.context.messages_sent,
            "messages_dropped": turn.context.messages_dropped,
            "tokens": turn.context.token_count,
            "truncated": turn.context.truncated,
        },
    }


@api.post("/end_chat", tags=[chats], responses={200: ConversationOut, 409: ErrorResponse, 503: ErrorResponse})
def end_chat(body: ConversationRef):
    """Archive the conversation and mark it ended. Repeating it is harmless."""
    return conversation_dict(end_conversation(get_session(), _archive(), body.conversation_id))


@api.get("/get_conversation", tags=[chats], responses={200: ConversationDetail, 503: ErrorResponse})
def get_conversation(query: ConversationRef):
    """A conversation's metadata and full log, live or archived."""
    return read_conversation(get_session(), _archive(), query.conversation_id)


@api.get("/healthz", tags=[ops], responses={200: Health})
def healthz():
    """The process is up."""
    return {"status": "ok"}


@api.get("/readyz", tags=[ops], responses={200: Health, 503: Health})
def readyz():
    """The database and the archive are reachable."""
    checks = {"database": "ok", "archive": "ok"}
    try:
        database_utils.ping()
    except Exception as exc:  # any failure means not ready; the type is enough to report
        checks["database"] = f"unavailable ({exc.__class__.__name__})"
    try:
        _archive().ping()
    except ArchiveError:
        checks["archive"] = "unavailable"
    ready = all(value == "ok" for value in checks.values())
    return {"status": "ok" if ready else "unavailable", "checks": checks}, 200 if ready else 503
