"""Parley's application factory and HTTP routes.

Run it with `make run` (the embedded default, on gunicorn) or
`gunicorn -c gunicorn.conf.py "main:create_app()"` (production).
"""
from __future__ import annotations

import io
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from flask import Response, current_app, g, request, send_file
from flask_cors import CORS
from flask_limiter import Limiter
from flask_openapi3 import APIBlueprint, Info, OpenAPI, SecurityScheme, Tag
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

import ansi
import archive_setup
import archiving
import audit
import auth
import database_utils
import dialog_stage
import errors
import export
import files
import handoff
import idempotency
import knowledge
import logs
import metrics
import pages
import readiness
import staff_console
import streaming
import variables
from auth import Caller, authenticate, create_key, key_of, list_keys, revoke_key
from config import load_config
from context_cache import TailCache
from conversations import (
    PreparedTurn,
    abandon_turn,
    complete_turn,
    open_conversation,
    read_conversation,
    search_conversations,
)
from database_utils import get_session, rollback_session, utcnow
from errors import Forbidden, Unauthorized
from llm import ChatModel, ModelReply, make_model
from s3_utils import make_archive
from schemas import (
    AuditPage,
    AuditQuery,
    ChatHeld,
    ChatRequest,
    ChatResponse,
    ClaimRequest,
    ConversationDetail,
    ConversationOut,
    ConversationPath,
    ConversationRead,
    ConversationRef,
    ErrorResponse,
    FileList,
    FileOut,
    FilePath,
    FileUpload,
    HandoffRequest,
    Health,
    IdempotencyHeader,
    KeyCreate,
    KeyCreated,
    KeyList,
    KeyOut,
    KeyRef,
    KnowledgeDocumentList,
    KnowledgeDocumentOut,
    KnowledgeDocumentPath,
    KnowledgeListQuery,
    MessageOut,
    NewChatRequest,
    ReleaseRequest,
    SearchPage,
    SearchQuery,
    ServiceIndex,
    StaffMessageRequest,
    StageRequest,
    VariableOut,
    VariablePath,
    VariablesOut,
    VariablesPatch,
    VariableValue,
    declare_response_headers,
    knowledge_upload_body,
)
from states import Handoff, Role, Status

__version__ = "0.3.0"

log = logging.getLogger("parley")

# Who may call each route on `api`, by endpoint name, filled in by `@allow`.
ROUTE_ROLES: dict[str, frozenset[Role]] = {}
# Routes that honour an Idempotency-Key header, and the model of each one's body.
IDEMPOTENT_ROUTES: dict[str, type[BaseModel]] = {
    "new_chat": NewChatRequest,
    "chat": ChatRequest,
    "end_chat": ConversationRef,
    "request_human": HandoffRequest,
    "claim_conversation": ClaimRequest,
    "write_staff_message": StaffMessageRequest,
    "release_conversation": ReleaseRequest,
}
# POST routes whose body may be left out altogether.
BODYLESS_ROUTES = frozenset({"claim_conversation", "release_conversation"})
# POST routes that take multipart/form-data uploads, each with its own body
# limit (MAX_CONTENT_LENGTH stays small for JSON); the knowledge route also takes JSON.
UPLOAD_LIMITS: dict[str, Callable[[Mapping[str, Any]], int]] = {
    "upload_file": files.max_request_bytes,
    knowledge.UPLOAD_ENDPOINT: knowledge.max_request_bytes,
}
MULTIPART_ONLY_ROUTES = frozenset({"upload_file"})
# How long the rate limiter waits on Redis before it limits from process memory instead.
REDIS_TIMEOUT_SECONDS = 0.5

_ERRORS = {code: ErrorResponse for code in (400, 401, 403, 404, 413, 429, 503)}
_MODEL_ERRORS = {code: ErrorResponse for code in (409, 422, 502, 503, 504)}

chats = Tag(name="conversations", description="Open, talk in, end and read conversations")
staff = Tag(name="staff", description="Look up any conversation (staff keys; audited)")
handoffs = Tag(name="handoff", description="Hand a conversation to a human and back; dialog stage; session variables")
admin = Tag(name="keys", description="Manage API keys (admin keys); any key reads its own (/keys/me)")
files_tag = Tag(name="files", description="Files in a conversation: upload, list, download; /chat sends them to the model")
knowledge_base = Tag(name="knowledge", description="Load, list and remove knowledge base documents (admin or staff keys)")
ops = Tag(name="operations", description="Liveness and readiness probes (no key needed)")

api = APIBlueprint("parley", __name__, abp_responses=_ERRORS, abp_security=[{"bearer": []}])
probes = APIBlueprint("probes", __name__)


def allow(*roles: Role) -> Callable[[Callable], Callable]:
    """Declare the roles that may call a route; every other key gets 403."""

    def register(view: Callable) -> Callable:
        ROUTE_ROLES[view.__name__] = frozenset(roles)
        return view

    return register


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
    # flask-limiter's own headers would set Retry-After on every response, to its window's reset,
    # over the Retry-After of a 409 or 503: `_rate_limit_headers` sends them instead.
    app.config["RATELIMIT_HEADERS_ENABLED"] = False
    # If Redis goes away, keep limiting per process rather than failing requests. A Redis that
    # stops answering counts as gone after REDIS_TIMEOUT_SECONDS. Requests that met the failure
    # while another one was switching to the fallback pass unlimited instead of failing.
    app.config.setdefault("RATELIMIT_IN_MEMORY_FALLBACK_ENABLED", True)
    app.config.setdefault("RATELIMIT_SWALLOW_ERRORS", True)
    if app.config["RATELIMIT_STORAGE_URI"].startswith(("redis://", "rediss://", "unix://")):
        app.config.setdefault("RATELIMIT_STORAGE_OPTIONS", {
            "socket_timeout": REDIS_TIMEOUT_SECONDS, "socket_connect_timeout": REDIS_TIMEOUT_SECONDS})
    ansi.init_app(app)
    if app.config["TRUSTED_PROXY_HOPS"]:
        # Take the client's address and scheme from that many proxies' X-Forwarded-* headers.
        hops = app.config["TRUSTED_PROXY_HOPS"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=0, x_port=0, x_prefix=0)
    if app.config["CORS_ORIGINS"]:
        origins = [origin.strip() for origin in app.config["CORS_ORIGINS"].split(",") if origin.strip()]
        CORS(app, origins=origins, allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
             expose_headers=["Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
                             "X-Request-ID", idempotency.REPLAYED_HEADER],
             max_age=600)

    logs.init_app(app)
    errors.init_app(app)
    database_utils.init_app(app)
    metrics.init_app(app, app.extensions["parley.engine"])
    auth.init_app(app)
    idempotency.init_app(app)
    archive_setup.init_app(app)
    audit.init_app(app)
    readiness.init_app(app)
    archiving.init_app(app)
    export.init_app(app)
    pages.init_app(app)
    staff_console.init_app(app)
    knowledge.init_app(app)
    if app.config["DATABASE_URL"].startswith("sqlite"):
        # The embedded default needs no setup step: bring its schema up to date.
        database_utils.upgrade_embedded_database(app.config["DATABASE_URL"])
    app.extensions["parley.archive"] = make_archive(app.config["ARCHIVE_URL"], app.config["S3_ENDPOINT_URL"])
    app.extensions["parley.model"] = make_model(app.config)
    app.extensions["parley.context_cache"] = TailCache(app.config["CONTEXT_CACHE_CONVERSATIONS"])
    # Whether the worker serving this app was told to stop; gunicorn.conf.py's post_worker_init
    # points it at the worker. A turn that would begin then is refused (errors.ShuttingDown).
    app.extensions["parley.stopping"] = lambda: False
    limiter = Limiter(key_func=_rate_limit_key, app=app)
    limiter.exempt(probes)
    limiter.request_filter(lambda: request.method == "OPTIONS")  # a CORS preflight carries no key to count
    app.after_request(lambda response: _rate_limit_headers(limiter, response))
    app.register_api(api)
    app.register_api(probes)
    undeclared = {rule.endpoint.rpartition(".")[2] for rule in app.url_map.iter_rules()
                  if rule.endpoint.startswith(f"{api.name}.")} - ROUTE_ROLES.keys()
    if undeclared:  # each would answer 500 to every call: stop here instead
        raise RuntimeError(f"routes that declare no roles (@allow): {', '.join(sorted(undeclared))}")
    limiter.exempt(app.view_functions["metrics"])
    # The document is made once, now (a few ms): /openapi.json and /docs serve the same one.
    declare_response_headers(app.api_doc, CONTENT_TYPE_LATEST, idempotency.REPLAYED_HEADER,
                             idempotency.NEVER_REPLAYED_STATUSES)
    app.add_url_rule("/openapi.json", "openapi_json", lambda: app.api_doc)
    return app


def _require_json_body() -> None:
    """Reject bodies that are not one JSON object before validation sees them."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    has_body = bool(request.content_length) or "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if coding not in ("", "identity") and has_body:  # the body would be read as it came (RFC 9110: 415)
        raise errors.UnsupportedMediaType(f"Content-Encoding {coding!r} is not supported; send the body uncompressed")
    endpoint = request.endpoint.rpartition(".")[2]
    if endpoint in UPLOAD_LIMITS:
        request.max_content_length = UPLOAD_LIMITS[endpoint](current_app.config)
        if endpoint in MULTIPART_ONLY_ROUTES or request.mimetype == "multipart/form-data":
            return
    limit = request.max_content_length
    if request.content_length is None and limit is not None:
        # A chunked body has no length to refuse up front, and Werkzeug stops reading it at the
        # limit without a word: read one byte more, to tell a body of the limit from a longer one.
        request.max_content_length = limit + 1
        too_large = len(request.get_data(cache=True)) > limit
        request.max_content_length = limit
        if too_large:
            raise RequestEntityTooLarge()
    if request.content_length and len(request.get_data(cache=True)) < request.content_length:
        # The client went before its body was all sent (the server reads to the end of the stream).
        raise errors.ApiError("the request body ended before the length its Content-Length gave")
    if endpoint in BODYLESS_ROUTES and not (has_body and request.get_data(cache=True)):  # chunked, too, may be empty
        return
    if not request.is_json:
        raise errors.ApiError("the request body must be JSON (Content-Type: application/json)")
    if b"\x00" in request.get_data(cache=True)[:4]:
        # Python's json would take UTF-16 or UTF-32 (it guesses from the zero bytes); JSON on the wire is UTF-8.
        raise errors.ApiError("the request body must be JSON in UTF-8")
    try:
        body = request.get_json()
    except (BadRequest, RecursionError):
        raise errors.ApiError(_why_not_json(request.get_data(cache=True))) from None
    if not isinstance(body, dict):
        raise errors.ApiError("the request body must be a JSON object")


def _why_not_json(body: bytes) -> str:
    """Word what is wrong with a body that did not parse (only then is it parsed again)."""
    try:
        json.loads(body.decode("utf-8-sig"))  # a UTF-8 byte order mark is ignored, as RFC 8259 allows
    except UnicodeDecodeError as exc:
        return f"the request body is not valid UTF-8 (byte {exc.start})"
    except json.JSONDecodeError as exc:
        return f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    except RecursionError:
        return "the request body is nested too deeply to parse"
    except ValueError:  # Python's limit on digits in one integer
        return f"a number in the request body has more than {sys.get_int_max_str_digits()} digits"
    return "the request body is not valid JSON"


@api.before_request
def _authorize() -> Response | None:
    """401 without a usable key, 403 when its role may not call this route; 503 for a turn
    that would begin on a worker that is stopping.

    Then, on the idempotent routes, claim the request's Idempotency-Key: a
    replay is answered here, without running the route.
    """
    if request.method == "OPTIONS":
        return None  # a browser's CORS preflight carries no key
    key = _authenticated_key()
    endpoint = request.endpoint.rpartition(".")[2]
    roles = ROUTE_ROLES[endpoint]
    if key.role not in roles:
        needed = " or ".join(sorted(roles))
        article = "an" if needed[0] in "aeiou" else "a"
        raise Forbidden(f"{request.method} {request.path} needs {article} {needed} key; this key's role is {key.role}")
    g.api_key = key
    _require_json_body()  # after the key: a caller without one learns nothing about the body
    if endpoint == "chat" and current_app.extensions["parley.stopping"]():
        raise errors.ShuttingDown("this worker is stopping: send the message again")
    sent = request.headers.get(idempotency.HEADER)
    if sent is None or endpoint not in IDEMPOTENT_ROUTES:
        return None
    session = get_session()
    defaults = idempotency.body_defaults(IDEMPOTENT_ROUTES[endpoint])
    digest = idempotency.fingerprint(request.method, request.path, request.get_json(silent=True), defaults)
    idempotency.purge_now_and_then(session, current_app)
    outcome = idempotency.claim(session, key.lineage_id, idempotency.check_key(sent), digest, current_app.config)
    if isinstance(outcome, idempotency.Replay):
        if endpoint == "chat" and outcome.status == 200 and _wants_stream():
            response = streaming.respond(streaming.replay(outcome.body))
            response.headers[idempotency.REPLAYED_HEADER] = "true"
            return response
        response = current_app.json.response(outcome.body)  # the bytes the first answer had
        response.status_code = outcome.status
        response.headers[idempotency.REPLAYED_HEADER] = "true"
        return response
    g.idempotency_claim = outcome
    return None


@api.after_request
def _keep_failure(response: Response) -> Response:
    """Store a claimed request's error answer for its retries (`idempotency.keeps`), apart from its work."""
    claim = g.get("idempotency_claim")
    if claim is None or g.get("idempotency_saved"):
        return response
    body = response.get_json(silent=True)
    if not idempotency.keeps(response.status_code, body):
        return response
    session = get_session()
    try:
        session.rollback()  # nothing of a failed request is committed with its answer
        idempotency.save_response(session, claim, response.status_code, body)
        session.commit()
        g.idempotency_saved = True
    except errors.IdempotencyClaimLost:  # a retry holds the key now: its answer is the key's
        session.rollback()
    except SQLAlchemyError as exc:  # released at teardown, or its lock runs out
        session.rollback()
        log.warning("could not store a failed request's answer: %s", exc.__class__.__name__)
    return response


@api.teardown_request
def _release_unanswered_claim(_exc: BaseException | None = None) -> None:
    """A claimed request whose answer was not stored (`idempotency.keeps`): let its retry run."""
    claim = g.pop("idempotency_claim", None)
    if claim is None or g.get("idempotency_saved"):
        return
    idempotency.release(get_session(), claim)


def _respond(body: BaseModel, status: int = 200) -> tuple[dict[str, Any], int]:
    """Commit the request's work, with its stored response when it has an Idempotency-Key."""
    data = body.model_dump(mode="json")
    session = get_session()
    claim = g.get("idempotency_claim")
    if claim is not None:
        idempotency.save_response(session, claim, status, data)
    session.commit()
    g.idempotency_saved = claim is not None  # a commit that failed leaves the claim to be released
    return data, status


def _wants_stream() -> bool:
    body = request.get_json(silent=True)
    flag = isinstance(body, dict) and body.get("stream") is True
    return streaming.wanted(flag, request.headers.get("Accept"), request.accept_mimetypes)


def _authenticated_key() -> Caller:
    """The request's key, looked up once (the rate limiter asks first), or 401.

    A key this worker has not cached is read from the database: that read's
    transaction ends here, before the body is read, so a client that sends
    its body slowly (or stalls) holds no connection of the pool.
    """
    if "auth" not in g:
        try:
            session = get_session()
            g.auth = authenticate(session, request.headers.get("Authorization"))
            session.rollback()  # nothing to keep: the key was only read
        except (Unauthorized, SQLAlchemyError) as exc:  # a database failure is answered once, by the route
            g.auth = exc
            rollback_session()
    if isinstance(g.auth, Exception):
        raise g.auth
    return g.auth


def _rate_limit_key() -> str:
    """Limits count per valid key; requests without one (or whose key could not be looked up) share their address's budget."""
    try:
        return f"key:{_authenticated_key().key_id}"
    except (Unauthorized, SQLAlchemyError):
        return f"addr:{request.remote_addr or 'unknown'}"


def _rate_limit_headers(limiter: Limiter, response: Response) -> Response:
    """X-RateLimit-Limit, -Remaining and -Reset on every limited response; Retry-After only on a 429.

    Other answers keep the Retry-After they were given (a 409's 1 s, a provider's wait on a 503).
    """
    limit = limiter.current_limit
    if limit is None:
        return response
    try:
        reset_at, remaining = limit.reset_at, limit.remaining
    except RedisError as exc:  # Redis went away after the check: no counts to report
        log.warning("no rate-limit headers: %s", exc.__class__.__name__)
        if response.status_code == 429:
            response.headers["Retry-After"] = str(limit.limit.get_expiry())  # at most one whole window
        return response
    response.headers["X-RateLimit-Limit"] = str(limit.limit.amount)
    response.headers["X-RateLimit-Remaining"] = str(remaining)
    response.headers["X-RateLimit-Reset"] = str(reset_at)
    if response.status_code == 429:
        response.headers["Retry-After"] = str(max(1, int(reset_at - time.time())))  # as flask-limiter counts it
    return response


def _archive():
    return current_app.extensions["parley.archive"]


def _caller() -> Caller:
    return g.api_key


@api.post("/new_chat", tags=[chats], responses={201: ConversationOut, 409: ErrorResponse, 422: ErrorResponse})
@allow(Role.CLIENT)
def new_chat(body: NewChatRequest, header: IdempotencyHeader):
    """Open a conversation for a user; the server assigns its ID. Honours Idempotency-Key."""
    conversation = open_conversation(get_session(), current_app.config, body, _caller())
    return _respond(ConversationOut.of(conversation), 201)


@api.post("/chat", tags=[chats], responses={200: ChatResponse, 202: ChatHeld, **_MODEL_ERRORS})
@allow(Role.CLIENT)
def chat(body: ChatRequest, header: IdempotencyHeader):
    """Post the user's message and get the model's reply. Honours Idempotency-Key.

    One turn at a time per conversation: while another turn is in progress
    the answer is 409 `turn_in_progress` with `Retry-After`. While a human
    has the conversation (handoff `needs_human` or `human`), or when a
    handoff trigger fires, the message is stored, the model is not called,
    and the answer is 202 `{handoff, seq}` (as JSON, also when a stream was asked for).

    On a conversation opened with `"knowledge": true`, the message is searched
    in the knowledge base first (knowledge.py): passages that reach the
    threshold go to the model and come back as `citations`; below it,
    KNOWLEDGE_LOW_CONFIDENCE_POLICY answers, declines (no model call) or hands
    off (202). `context.knowledge` reports what was found.

    With `"stream": true` (or `Accept: text/event-stream`) the reply comes as
    server-sent events: `delta` `{text}`..., then one `done` (this route's
    JSON answer), one `handoff` (the 202's object, when the model asked for
    a human) or one `error` (`{error, message}`). Errors found before the
    stream starts are ordinary JSON responses.
    """
    model = current_app.extensions["parley.model"]
    telemetry = metrics.get_metrics(current_app)
    session = get_session()
    prepared = files.prepare_turn_with_files(
        session, _archive(), current_app.config, _caller(), body.conversation_id, body.message, body.file_ids, model.provider,
        current_app.extensions["parley.context_cache"],
    )
    try:
        if "idempotency_claim" in g:
            g.idempotency_claim = idempotency.renew(session, g.idempotency_claim)
        trigger = handoff.automatic_trigger(current_app.config, prepared, body.message)
        if prepared.handoff != Handoff.BOT or trigger is not None:
            return _respond(ChatHeld(**vars(handoff.hold_turn(session, prepared, trigger))), 202)
        prepared = knowledge.consult(session, current_app.config, knowledge.get_backend(), prepared, body.message)
        if prepared.retrieval is not None and prepared.retrieval.action != "model":
            return _answer_from_knowledge(session, prepared)
        if _wants_stream():
            return _stream_chat(session, model, prepared)
        with telemetry.turn():
            with telemetry.model_call(model.provider):
                reply = model.reply(prepared.context.system, prepared.context.messages, current_app.config["HANDOFF_TOOL"])
            telemetry.count_tokens(model.provider, reply.usage)
            alone = "idempotency_claim" not in g  # no stored response to commit with the turn
            answer, status = _store_reply(session, prepared, reply, alone)
            return _respond(answer, status)
    except BaseException:
        abandon_turn(session, prepared)
        raise


def _store_reply(session: Session, prepared: PreparedTurn, reply: ModelReply, alone: bool = False) -> tuple[BaseModel, int]:
    """The model's reply stored: the turn and its 200 answer, or, when the model asked for a human, the held turn's 202."""
    if reply.handoff_reason is not None:
        held = handoff.hold_turn(session, prepared, handoff.Trigger("model", reply.handoff_reason), reply)
        return ChatHeld(**vars(held)), 202
    return ChatResponse.of(complete_turn(session, prepared, reply, alone)), 200


def _answer_from_knowledge(session: Session, prepared: PreparedTurn):
    """A low-confidence turn without a model call: held for a human (202), or the fixed decline reply."""
    if prepared.retrieval.action == "handoff":
        held = handoff.hold_turn(session, prepared, knowledge.handoff_trigger(prepared.retrieval))
        return _respond(ChatHeld(**vars(held)), 202)
    data, status = _respond(ChatResponse.of(complete_turn(session, prepared, knowledge.decline_reply(current_app.config))))
    return streaming.respond(streaming.replay(data)) if _wants_stream() else (data, status)


def _stream_chat(session: Session, model: ChatModel, prepared: PreparedTurn) -> Response:
    """Open the provider's stream (failures are JSON answers), then stream the turn.

    The stream outlives the view (and its teardown), so it takes the
    request's Idempotency-Key claim along: stored with the turn, or released.
    """
    telemetry = metrics.get_metrics(current_app)
    started = time.perf_counter()
    try:
        with telemetry.turn():
            upstream = model.stream(prepared.context.system, prepared.context.messages, current_app.config["HANDOFF_TOOL"])
    except BaseException:
        telemetry.model_seconds.labels(model.provider, "error").observe(time.perf_counter() - started)
        abandon_turn(session, prepared)
        raise
    claim = g.pop("idempotency_claim", None)
    counted: list[ModelReply] = []

    def store(reply: ModelReply) -> tuple[str, dict[str, Any]]:
        """The turn stored and committed: `done` with /chat's answer, or `handoff` with its 202 answer."""
        if not counted:  # the tokens are spent once, however many tries the store takes (streaming.STORE_ATTEMPTS)
            telemetry.count_tokens(model.provider, reply.usage)
            counted.append(reply)
        stream_session = get_session()  # the stream's own (streaming.stream_turn)
        answer, status = _store_reply(stream_session, prepared, reply)
        data = answer.model_dump(mode="json")
        if claim is not None:
            idempotency.save_response(stream_session, claim, status, data)
        stream_session.commit()
        return ("done" if status == 200 else "handoff"), data

    def forget() -> None:
        if claim is not None:
            idempotency.release(get_session(), claim)

    heartbeat = current_app.config["STREAM_HEARTBEAT_SECONDS"]
    events = streaming.stream_turn(prepared, upstream, heartbeat, store, forget)
    return streaming.respond(telemetry.streamed_turn(model.provider, started, events, lambda: upstream.reply is not None))


@api.post(
    "/end_chat",
    tags=[chats],
    responses={200: ConversationOut, 202: ConversationOut, 409: ErrorResponse, 422: ErrorResponse, 503: ErrorResponse},
)
@allow(Role.CLIENT)
def end_chat(body: ConversationRef, header: IdempotencyHeader):
    """Archive the conversation and mark it ended. Repeating it is harmless. Honours Idempotency-Key.

    202 with `status: "ending"` when the archive could not be written in
    time: the conversation is frozen and readable, and is archived later.
    """
    conversation = archiving.end_conversation(get_session(), _archive(), current_app.config, _caller(), body.conversation_id)
    return _respond(ConversationOut.of(conversation), 200 if conversation.status == Status.ENDED else 202)


@api.get("/get_conversation", tags=[chats, staff], responses={200: ConversationDetail, 503: ErrorResponse})
@allow(Role.CLIENT, Role.STAFF)
def get_conversation(query: ConversationRead):
    """A conversation's metadata, handoff and stage history, and full log, live or archived.

    With `after_seq=N`, only the messages after seq N (how a client sees new
    staff messages). Clients see the conversations created with their key;
    staff see any (each read is audited).
    """
    return _respond(read_conversation(get_session(), _archive(), _caller(), query.conversation_id, query.after_seq))


@api.get("/conversations", tags=[chats, staff], responses={200: SearchPage})
@allow(Role.CLIENT, Role.STAFF)
def search(query: SearchQuery):
    """Find conversations by user, status, dates or name text, newest first.

    A client key lists the conversations created with it; staff see all
    (each search is audited).
    """
    return _respond(search_conversations(get_session(), _caller(), query))


@api.post("/conversations/<conversation_id>/handoff", tags=[handoffs],
          responses={200: ConversationOut, 409: ErrorResponse, 422: ErrorResponse})
@allow(Role.CLIENT, Role.STAFF)
def request_human(path: ConversationPath, body: HandoffRequest, header: IdempotencyHeader):
    """Ask for a human: `bot -> needs_human`. Honours Idempotency-Key."""
    conversation = handoff.request_handoff(get_session(), _caller(), path.conversation_id, body.reason)
    return _respond(ConversationOut.of(conversation))


@api.post("/conversations/<conversation_id>/claim", tags=[handoffs, staff],
          responses={200: ConversationOut, 409: ErrorResponse, 422: ErrorResponse})
@allow(Role.STAFF)
def claim_conversation(path: ConversationPath, body: ClaimRequest, header: IdempotencyHeader):
    """Take the conversation: `needs_human -> human`, assigned to this staff key.
    A second claimant gets 409. Honours Idempotency-Key."""
    return _respond(ConversationOut.of(handoff.claim(get_session(), _caller(), path.conversation_id)))


@api.post("/conversations/<conversation_id>/staff_messages", tags=[handoffs, staff],
          responses={201: MessageOut, 409: ErrorResponse, 422: ErrorResponse})
@allow(Role.STAFF)
def write_staff_message(path: ConversationPath, body: StaffMessageRequest, header: IdempotencyHeader):
    """The assigned staff member writes to the user (role `staff`; no model call). Honours Idempotency-Key."""
    message = handoff.post_staff_message(get_session(), current_app.config, _caller(), path.conversation_id, body.message)
    return _respond(MessageOut.of(message), 201)


@api.post("/conversations/<conversation_id>/release", tags=[handoffs, staff],
          responses={200: ConversationOut, 409: ErrorResponse, 422: ErrorResponse})
@allow(Role.STAFF)
def release_conversation(path: ConversationPath, body: ReleaseRequest, header: IdempotencyHeader):
    """Give the conversation back to the model: `human -> bot`. Honours Idempotency-Key."""
    return _respond(ConversationOut.of(handoff.release(get_session(), _caller(), path.conversation_id, body.note)))


@api.put("/conversations/<conversation_id>/stage", tags=[handoffs], responses={200: ConversationOut, 409: ErrorResponse})
@allow(Role.CLIENT, Role.STAFF)
def set_stage(path: ConversationPath, body: StageRequest):
    """Set the dialog stage; with `expected_stage`, only if it is that now (409 otherwise)."""
    check = "expected_stage" in body.model_fields_set
    conversation = dialog_stage.set_stage(get_session(), _caller(), path.conversation_id, body.stage, check, body.expected_stage)
    return _respond(ConversationOut.of(conversation))


@api.get("/conversations/<conversation_id>/variables", tags=[handoffs], responses={200: VariablesOut})
@allow(Role.CLIENT, Role.STAFF)
def list_variables(path: ConversationPath):
    """Every session variable of the conversation."""
    conversation = variables.get_variables(get_session(), _caller(), path.conversation_id)
    return _respond(VariablesOut(conversation_id=path.conversation_id, variables=conversation.variables))


@api.patch("/conversations/<conversation_id>/variables", tags=[handoffs], responses={200: VariablesOut, 409: ErrorResponse})
@allow(Role.CLIENT)
def patch_variables(path: ConversationPath, body: VariablesPatch):
    """Set several variables in one transaction (all or none)."""
    values = variables.set_variables(get_session(), current_app.config, _caller(), path.conversation_id, body.model_extra or {})
    return _respond(VariablesOut(conversation_id=path.conversation_id, variables=values))


@api.get("/conversations/<conversation_id>/variables/<name>", tags=[handoffs], responses={200: VariableOut})
@allow(Role.CLIENT, Role.STAFF)
def read_variable(path: VariablePath):
    """One variable; 404 when it is not set."""
    value = variables.get_variable(get_session(), _caller(), path.conversation_id, path.name)
    return _respond(VariableOut(name=path.name, value=value))


@api.put("/conversations/<conversation_id>/variables/<name>", tags=[handoffs], responses={200: VariableOut, 409: ErrorResponse})
@allow(Role.CLIENT)
def put_variable(path: VariablePath, body: VariableValue):
    """Set one variable to any JSON value."""
    variables.set_variables(get_session(), current_app.config, _caller(), path.conversation_id, {path.name: body.value})
    return _respond(VariableOut(name=path.name, value=body.value))


@api.delete("/conversations/<conversation_id>/variables/<name>", tags=[handoffs], responses={204: None, 409: ErrorResponse})
@allow(Role.CLIENT)
def remove_variable(path: VariablePath):
    """Delete one variable; 404 when it is not set."""
    session = get_session()
    variables.delete_variable(session, _caller(), path.conversation_id, path.name)
    session.commit()
    return "", 204


@api.post("/conversations/<conversation_id>/files", tags=[files_tag],
          responses={201: FileOut, 409: ErrorResponse, 415: ErrorResponse, 422: ErrorResponse, 503: ErrorResponse})
@allow(Role.CLIENT, Role.STAFF)
def upload_file(path: ConversationPath, form: FileUpload):
    """Add a file to an active conversation (multipart/form-data, part `file`): its owner, or the staff key assigned to it.

    PNG, JPEG, GIF, WebP, PDF, plain text or Markdown, recognised by content;
    at most MAX_FILE_BYTES (413). 415 `unsupported_file_type` or
    `file_type_mismatch` (name or declared type disagree with the bytes),
    422 `empty_file`. Nothing is stored unless the file is accepted.
    """
    parts = len(request.files.getlist("file"))
    if parts > 1:  # flask-openapi3 would take the first and drop the rest without a word
        raise errors.ApiError(f"send one file per request; this one has {parts} parts named file")
    archive = _archive()
    row = files.upload_file(get_session(), archive, current_app.config, _caller(), path.conversation_id, form.file)
    try:
        return _respond(FileOut.of(row), 201)
    except SQLAlchemyError:
        files.forget_object(archive, row.location)  # the row was not stored: nor is its object
        raise


@api.get("/conversations/<conversation_id>/files", tags=[files_tag], responses={200: FileList})
@allow(Role.CLIENT, Role.STAFF)
def list_files(path: ConversationPath):
    """The conversation's files, oldest first (staff reads are audited)."""
    rows = files.list_files(get_session(), _caller(), path.conversation_id)
    return FileList(files=[FileOut.of(row) for row in rows]).model_dump(mode="json")


@api.get("/conversations/<conversation_id>/files/<file_id>", tags=[files_tag],
         responses={200: {"description": "The file's bytes, with its stored type",
                          "content": {kind: {"schema": {"type": "string", "format": "binary"}} for kind in files.ALLOWED_TYPES}},
                    503: ErrorResponse})
@allow(Role.CLIENT, Role.STAFF)
def download_file(path: FilePath):
    """The file's bytes, with its type and `Content-Disposition: attachment` (staff reads are audited)."""
    row, data = files.read_file(get_session(), _archive(), _caller(), path.conversation_id, path.file_id)
    response = send_file(io.BytesIO(data), mimetype=row.content_type, as_attachment=True, download_name=row.name,
                         etag=row.sha256, max_age=0)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@api.post(
    "/knowledge/documents",
    tags=[knowledge_base],
    responses={201: KnowledgeDocumentOut, 409: ErrorResponse, 415: ErrorResponse},
    openapi_extensions=knowledge_upload_body(),
)
@allow(Role.ADMIN, Role.STAFF)
def add_knowledge_document():
    """Load a document: JSON `{title, text, source_url?}`, or multipart with `file` (.txt, .md, .html, .pdf)
    and optional `title` and `source_url` fields. Up to KNOWLEDGE_MAX_BYTES.

    400 for a document without text or content that is not what its type says
    (e.g. a broken PDF), 415 for other types, 409 when the same text is loaded already.
    """
    title, text, kind, source_url = knowledge.document_from_request(request)
    document = knowledge.add_document(get_session(), current_app.config, title, text, kind, source_url, _caller())
    return _respond(KnowledgeDocumentOut.of(document), 201)


@api.get("/knowledge/documents", tags=[knowledge_base], responses={200: KnowledgeDocumentList})
@allow(Role.ADMIN, Role.STAFF)
def list_knowledge_documents(query: KnowledgeListQuery):
    """The knowledge base's documents, newest first, a page at a time, with the total."""
    documents, total = knowledge.list_documents(get_session(), query.limit, query.offset)
    return KnowledgeDocumentList(documents=[KnowledgeDocumentOut.of(d) for d in documents], total=total).model_dump(mode="json")


@api.delete("/knowledge/documents/<document_id>", tags=[knowledge_base], responses={204: None})
@allow(Role.ADMIN, Role.STAFF)
def delete_knowledge_document(path: KnowledgeDocumentPath):
    """Remove a document and its passages from the knowledge base; 404 when there is none."""
    session = get_session()
    knowledge.delete_document(session, path.document_id)
    session.commit()
    return "", 204


@api.get("/audit", tags=[admin], responses={200: AuditPage})
@allow(Role.ADMIN)
def audit_events(query: AuditQuery):
    """Audit events (staff reads and searches), newest first, with filters and a cursor."""
    return _respond(audit.list_audit_events(get_session(), query))


@api.post("/keys", tags=[admin], responses={201: KeyCreated})
@allow(Role.ADMIN)
def keys_create(body: KeyCreate):
    """Create a key. Its secret is in this response only."""
    if body.expires_at is not None and body.expires_at <= utcnow():
        raise errors.ApiError("expires_at must be in the future")
    key, secret = create_key(get_session(), body.role, body.name, body.expires_at)
    return KeyCreated(**KeyOut.of(key, utcnow()).model_dump(), key=secret).model_dump(mode="json"), 201


@api.get("/keys", tags=[admin], responses={200: KeyList})
@allow(Role.ADMIN)
def keys_list():
    """Every key, without secrets."""
    now = utcnow()
    return KeyList(keys=[KeyOut.of(key, now) for key in list_keys(get_session())]).model_dump(mode="json")


@api.get("/keys/me", tags=[admin], responses={200: KeyOut})
@allow(Role.CLIENT, Role.STAFF, Role.ADMIN)
def keys_me():
    """The key this request is made with (any role): its ID, as conversations name it in `assigned_to`, and role."""
    return KeyOut.of(key_of(get_session(), _caller().key_id), utcnow()).model_dump(mode="json")


@api.post("/keys/revoke", tags=[admin], responses={200: KeyOut})
@allow(Role.ADMIN)
def keys_revoke(body: KeyRef):
    """Revoke a key at once. Repeating it is harmless."""
    return KeyOut.of(revoke_key(get_session(), body.key_id), utcnow()).model_dump(mode="json")


@probes.get("/", tags=[ops], responses={200: ServiceIndex})
def index():
    """The chat page; clients that prefer JSON (`Accept: application/json`) get where the API documentation is."""
    if request.accept_mimetypes.best_match(["text/html", "application/json"]) == "application/json":
        return ServiceIndex(name="Parley", version=__version__, docs="/docs/swagger", openapi="/openapi.json").model_dump()
    return pages.chat_page(__version__)


@probes.get("/healthz", tags=[ops], responses={200: Health})
def healthz():
    """The process is up."""
    return {"status": "ok"}


@probes.get("/readyz", tags=[ops], responses={200: Health, 503: Health})
def readyz():
    """The database is reachable with its schema at the latest revision, and
    the archive is reachable; each failed check says why, within
    READYZ_TIMEOUT_SECONDS."""
    body, ready = readiness.check_readiness(current_app._get_current_object())
    return body, 200 if ready else 503
