"""Parley's application factory and HTTP routes.

Run it with `flask --app main run` (embedded default) or
`gunicorn "main:create_app()"` (production).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import current_app, g, request
from flask_limiter import Limiter
from flask_openapi3 import APIBlueprint, Info, OpenAPI, SecurityScheme, Tag
from werkzeug.exceptions import BadRequest

import archiving
import auth
import database_utils
import errors
import export
from auth import authenticate, create_key, list_keys, revoke_key
from config import load_config
from conversations import (
    chat_turn,
    conversation_dict,
    open_conversation,
    read_conversation,
    search_conversations,
)
from database_utils import ADMIN, CLIENT, STAFF, ApiKey, get_session, utcnow
from errors import Forbidden, Unauthorized
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
    KeyCreate,
    KeyCreated,
    KeyList,
    KeyOut,
    KeyRef,
    NewChatRequest,
    SearchPage,
    SearchQuery,
)

__version__ = "0.2.0"

# Who may call what, by endpoint. Everything on `api` needs a key.
ACCESS: dict[str, set[str]] = {
    "new_chat": {CLIENT},
    "chat": {CLIENT},
    "end_chat": {CLIENT},
    "get_conversation": {CLIENT, STAFF},
    "search": {STAFF},
    "keys_create": {ADMIN},
    "keys_list": {ADMIN},
    "keys_revoke": {ADMIN},
}

_ERRORS = {code: ErrorResponse for code in (400, 401, 403, 404, 413, 429)}
_MODEL_ERRORS = {code: ErrorResponse for code in (409, 502, 503, 504)}

chats = Tag(name="conversations", description="Open, talk in, end and read conversations")
staff = Tag(name="staff", description="Look up any conversation (staff keys; audited)")
admin = Tag(name="keys", description="Manage API keys (admin keys)")
ops = Tag(name="operations", description="Liveness and readiness probes (no key needed)")

api = APIBlueprint("parley", __name__, abp_responses=_ERRORS, abp_security=[{"bearer": []}])
probes = APIBlueprint("probes", __name__)


def create_app(config: Mapping[str, Any] | None = None) -> OpenAPI:
    """Build the app from the environment, with `config` overriding it."""
    app = OpenAPI(
        __name__,
        info=Info(title="Parley", version=__version__, description="Conversation service for Claude-powered assistants."),
        security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer", description="An API key: `Authorization: Bearer prly_...`")},
        validation_error_status=400,
        validation_error_model=ErrorResponse,
        validation_error_callback=errors.validation_error_response,
        doc_prefix="/docs",
    )
    app.config.update(load_config())
    app.config.update(config or {})
    app.config.setdefault("RATELIMIT_STORAGE_URI", app.config["REDIS_URL"] or "memory://")
    app.config.setdefault("RATELIMIT_APPLICATION", app.config["RATE_LIMIT"])
    app.config.setdefault("RATELIMIT_HEADERS_ENABLED", True)
    # If Redis goes away, keep limiting per process rather than failing requests.
    app.config.setdefault("RATELIMIT_IN_MEMORY_FALLBACK_ENABLED", True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    errors.init_app(app)
    database_utils.init_app(app)
    auth.init_app(app)
    archiving.init_app(app)
    export.init_app(app)
    if app.config["DATABASE_URL"].startswith("sqlite"):
        # The embedded default needs no setup step: bring its schema up to date.
        database_utils.upgrade_embedded_database(app.config["DATABASE_URL"])
    app.extensions["parley.archive"] = make_archive(app.config["ARCHIVE_URL"], app.config["S3_ENDPOINT_URL"])
    app.extensions["parley.model"] = make_model(app.config)
    app.before_request(_require_json_body)
    limiter = Limiter(key_func=_rate_limit_key, app=app)
    limiter.exempt(probes)
    app.register_api(api)
    app.register_api(probes)
    app.add_url_rule("/openapi.json", "openapi_json", lambda: app.api_doc)
    return app


def _require_json_body() -> None:
    """Reject bodies that are not one JSON object before validation sees them."""
    if request.method not in ("POST", "PUT", "PATCH") or request.routing_exception is not None:
        return
    if not request.is_json:
        raise errors.ApiError("the request body must be JSON (Content-Type: application/json)")
    try:
        body = request.get_json()
    except (BadRequest, RecursionError):
        raise errors.ApiError("the request body is not valid JSON in UTF-8") from None
    if not isinstance(body, dict):
        raise errors.ApiError("the request body must be a JSON object")


@api.before_request
def _authorize() -> None:
    """401 without a usable key, 403 when its role may not call this route."""
    key = _authenticated_key()
    if key.role not in ACCESS[request.endpoint.rpartition(".")[2]]:
        raise Forbidden(f"a {key.role} key may not call {request.method} {request.path}")
    g.api_key = key


def _authenticated_key() -> ApiKey:
    """The request's key, looked up once (the rate limiter asks first), or 401."""
    if "auth" not in g:
        try:
            g.auth = authenticate(get_session(), request.headers.get("Authorization"))
        except Unauthorized as exc:
            g.auth = exc
    if isinstance(g.auth, Unauthorized):
        raise g.auth
    return g.auth


def _rate_limit_key() -> str:
    """Limits count per valid key; requests without one share their address's budget."""
    try:
        return f"key:{_authenticated_key().key_id}"
    except Unauthorized:
        return f"addr:{request.remote_addr or 'unknown'}"


def _archive():
    return current_app.extensions["parley.archive"]


def _caller() -> ApiKey:
    return g.api_key


@api.post("/new_chat", tags=[chats], responses={201: ConversationOut})
def new_chat(body: NewChatRequest):
    """Open a conversation for a user; the server assigns its ID."""
    conversation = open_conversation(get_session(), current_app.config, body, _caller())
    return conversation_dict(conversation), 201


@api.post("/chat", tags=[chats], responses={200: ChatResponse, **_MODEL_ERRORS})
def chat(body: ChatRequest):
    """Post the user's message and get the model's reply."""
    model = current_app.extensions["parley.model"]
    turn = chat_turn(get_session(), model, current_app.config, _caller(), body.conversation_id, body.message)
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


@api.post("/end_chat", tags=[chats], responses={200: ConversationOut, 202: ConversationOut, 409: ErrorResponse, 503: ErrorResponse})
def end_chat(body: ConversationRef):
    """Archive the conversation and mark it ended. Repeating it is harmless.

    202 with `status: "ending"` when the archive could not be written in
    time: the conversation is frozen and readable, and is archived later.
    """
    conversation = archiving.end_conversation(get_session(), _archive(), current_app.config, _caller(), body.conversation_id)
    return conversation_dict(conversation), 200 if conversation.status == database_utils.ENDED else 202


@api.get("/get_conversation", tags=[chats, staff], responses={200: ConversationDetail, 503: ErrorResponse})
def get_conversation(query: ConversationRef):
    """A conversation's metadata and full log, live or archived.

    Clients see the conversations created with their key; staff see any
    (each read is audited).
    """
    return read_conversation(get_session(), _archive(), _caller(), query.conversation_id)


@api.get("/conversations", tags=[staff], responses={200: SearchPage})
def search(query: SearchQuery):
    """Find conversations by user, status, dates or name text, newest first."""
    return search_conversations(get_session(), _caller(), query)


@api.post("/keys", tags=[admin], responses={201: KeyCreated})
def keys_create(body: KeyCreate):
    """Create a key. Its secret is in this response only."""
    if body.expires_at is not None and body.expires_at <= utcnow():
        raise errors.ApiError("expires_at must be in the future")
    key, secret = create_key(get_session(), body.role, body.name, body.expires_at)
    return {**_key_dict(key), "key": secret}, 201


@api.get("/keys", tags=[admin], responses={200: KeyList})
def keys_list():
    """Every key, without secrets."""
    return {"keys": [_key_dict(key) for key in list_keys(get_session())]}


@api.post("/keys/revoke", tags=[admin], responses={200: KeyOut})
def keys_revoke(body: KeyRef):
    """Revoke a key at once. Repeating it is harmless."""
    return _key_dict(revoke_key(get_session(), body.key_id))


def _key_dict(key: ApiKey) -> dict[str, Any]:
    return {
        "key_id": str(key.key_id),
        "name": key.name,
        "role": key.role,
        "prefix": key.prefix,
        "state": key.state(utcnow()),
        "created_at": key.created_at.isoformat(),
        "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


@probes.get("/healthz", tags=[ops], responses={200: Health})
def healthz():
    """The process is up."""
    return {"status": "ok"}


@probes.get("/readyz", tags=[ops], responses={200: Health, 503: Health})
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
