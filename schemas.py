"""Request and response bodies of the HTTP API, as pydantic models.

Requests reject unknown fields and text that PostgreSQL or the model
providers cannot take (NUL bytes, lone surrogates). The OpenAPI document is
generated from these models.
"""
from __future__ import annotations

import copy
import functools
import json
import re
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from flask_openapi3 import FileStorage
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from werkzeug import datastructures

from states import Handoff, KeyState, Role, Status

MAX_NAME_CHARS = 200
MAX_KEY_NAME_CHARS = 100
MAX_SYSTEM_PROMPT_CHARS = 100_000
MAX_METADATA_BYTES = 16 * 1024
# Deepest nesting of a stored JSON value (metadata, a variable): what every JSON library reads back.
MAX_JSON_DEPTH = 64
# File IDs one /chat message may refer to.
MAX_FILES_PER_MESSAGE = 10
# The largest seq a message can have: the column is a 32-bit INTEGER.
MAX_SEQ = 2**31 - 1


def _storable_text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("text must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("text must not be empty or only whitespace")
    return value


# A NUL in a string, as json.dumps writes it: the escape \u0000 after an even run of backslashes
# (a string holding a backslash and then "u0000" is written with its backslash doubled).
_ENCODED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def holds_nul(encoded: str) -> bool:
    """Whether JSON text from json.dumps has a NUL in a string (PostgreSQL refuses them in JSON and text)."""
    return "\x00" in encoded or _ENCODED_NUL.search(encoded) is not None


def too_deep(value: Any) -> bool:
    """Whether a JSON value nests more than MAX_JSON_DEPTH arrays and objects."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _storable_metadata(value: dict[str, Any]) -> dict[str, Any]:
    if too_deep(value):
        raise ValueError(f"metadata must nest at most {MAX_JSON_DEPTH} levels of arrays and objects")
    try:
        encoded = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise ValueError("metadata must not contain NaN, Infinity or a number beyond a double (1e400)") from None
    _storable_text(encoded)
    if holds_nul(encoded):
        raise ValueError("metadata must not contain NUL characters")
    if len(encoded.encode("utf-8")) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata must be at most {MAX_METADATA_BYTES} bytes as JSON")
    return value


def _utc(value: datetime) -> datetime:
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError("date is out of range") from None


Text = Annotated[str, AfterValidator(_storable_text)]
# Responses write times as Python's isoformat() (`+00:00`), as the archive does.
Timestamp = Annotated[datetime, PlainSerializer(lambda value: value.isoformat(), return_type=str, when_used="json")]
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_utc)]
MessageText = Annotated[str, StringConstraints(min_length=1), AfterValidator(_storable_text), AfterValidator(_not_blank)]
UserId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\w.@:+\-]+$")]
USER_ID_RULE = "1 to 128 letters, digits and . _ @ : + -"


def is_user_id(value: str) -> bool:
    """Whether `value` is a user_id as `/new_chat` takes it (for the commands that name one)."""
    try:
        TypeAdapter(UserId).validate_python(value)
    except ValidationError:
        return False
    return True
# Clients may show a citation's source as a link: only web addresses, never `javascript:` or `data:`.
SourceUrl = Annotated[Text, StringConstraints(min_length=1, max_length=2048, pattern=r"^(?i:https?)://[^\s]+$")]
STAGE_PATTERN = r"^[a-z0-9_.-]{1,64}$"
VARIABLE_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
Stage = Annotated[str, StringConstraints(pattern=STAGE_PATTERN)]
Reason = Annotated[Text, StringConstraints(max_length=1000)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewChatRequest(_Request):
    user_id: UserId = Field(description="Your application's ID for the end user.")
    conversation_name: Annotated[Text, StringConstraints(max_length=MAX_NAME_CHARS)] | None = None
    system_prompt: Annotated[Text, StringConstraints(max_length=MAX_SYSTEM_PROMPT_CHARS)] | None = None
    metadata: Annotated[dict[str, Any], AfterValidator(_storable_metadata)] = Field(default_factory=dict)
    # Strict: JSON's true or false only, not "yes" or 1, which would be taken silently.
    knowledge: StrictBool | None = Field(
        default=None, description="Search the knowledge base on each turn (citations in replies); default KNOWLEDGE_DEFAULT."
    )


class ChatRequest(_Request):
    conversation_id: uuid.UUID
    message: MessageText = Field(description="The user's message; limited by MAX_MESSAGE_CHARS (413 beyond).")
    stream: StrictBool = Field(
        default=False,
        description="Answer with server-sent events (as does `Accept: text/event-stream`): `delta`..., then `done`, `handoff` or `error`.",
    )
    file_ids: list[uuid.UUID] = Field(
        default_factory=list,
        max_length=MAX_FILES_PER_MESSAGE,
        description="Files of this conversation (POST /conversations/{id}/files) sent to the model with this message.",
    )


class IdempotencyHeader(BaseModel):
    """The optional header of the POST routes that change a conversation (documented in the README)."""

    idempotency_key: str | None = Field(
        default=None,
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x2b\x2d-\x7e]+$",
        description="Makes a retry safe: the same key and body return the first response without running again.",
    )

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # flask-openapi3 asks for the header model's schema on every request
        # it validates (measured: 9% of a turn's CPU); it never changes.
        return copy.deepcopy(_header_schema(cls, args, tuple(sorted(kwargs.items()))))


@functools.cache
def _header_schema(model: type[BaseModel], args: tuple, kwargs: tuple) -> dict[str, Any]:
    return BaseModel.model_json_schema.__func__(model, *args, **dict(kwargs))


class ConversationRef(_Request):
    conversation_id: uuid.UUID


class ConversationRead(ConversationRef):
    after_seq: int | None = Field(
        default=None, ge=0, le=MAX_SEQ, description="Only the messages after this seq (e.g. the last one you have): new staff messages."
    )


class ConversationPath(BaseModel):
    conversation_id: uuid.UUID


class FilePath(BaseModel):
    conversation_id: uuid.UUID
    file_id: uuid.UUID


def _a_file_part(value: Any) -> Any:
    """flask-openapi3 takes any value for a file: a plain form field (curl's `-F file=<path`) is not one."""
    if not isinstance(value, datastructures.FileStorage):
        raise ValueError("must be a file part, with a filename (curl: -F file=@path)")
    return value


class FileUpload(BaseModel):
    """A multipart/form-data body with one part named `file`."""

    file: Annotated[FileStorage, AfterValidator(_a_file_part)] = Field(description="The file: PNG, JPEG, GIF, WebP, PDF, plain text or Markdown; at most MAX_FILE_BYTES.")


class FileOut(BaseModel):
    file_id: uuid.UUID
    conversation_id: uuid.UUID
    name: str
    content_type: str = Field(description="The type found in the file's bytes (not the one it was sent with).")
    size: int = Field(description="Bytes.")
    sha256: str = Field(description="SHA-256 of the bytes, hex.")
    location: str = Field(description="The object's key relative to ARCHIVE_URL.")
    token_estimate: int = Field(description="What the file costs in the context budget when a turn sends it.")
    uploaded_by: uuid.UUID | None = Field(description="The key that uploaded it.")
    uploaded_at: Timestamp

    @classmethod
    def of(cls, row: Any) -> FileOut:
        """From a `database_utils.ConversationFile`."""
        return cls(**{name: getattr(row, name) for name in cls.model_fields})


class FileList(BaseModel):
    files: list[FileOut]


class VariablePath(BaseModel):
    conversation_id: uuid.UUID
    name: Annotated[str, StringConstraints(pattern=VARIABLE_NAME_PATTERN)]


class HandoffRequest(_Request):
    reason: Annotated[Reason, AfterValidator(_not_blank)] = Field(description="Why a human is needed; kept in the handoff history.")


class _MayBeAbsent(_Request):
    @model_validator(mode="before")
    @classmethod
    def _body_may_be_absent(cls, data: Any) -> Any:
        return {} if data is None else data


class ClaimRequest(_MayBeAbsent):
    """No body, or `{}`: a claim takes no fields."""


class ReleaseRequest(_MayBeAbsent):
    note: Reason | None = Field(default=None, description="Kept in the handoff history.")


class StaffMessageRequest(_Request):
    message: MessageText = Field(description="Shown to the user as a staff message; the model is not called.")


class StageRequest(_Request):
    stage: Stage | None = Field(description="The new stage, or null to clear it.")
    expected_stage: Stage | None = Field(
        default=None, description="Compare-and-set: the stage you expect now (null: no stage); 409 when it differs."
    )


class VariableValue(_Request):
    value: Any = Field(description="Any JSON value; VARIABLE_MAX_BYTES as JSON at most (413 beyond).")


class VariablesPatch(BaseModel):
    """Name -> value for each variable to set."""

    model_config = ConfigDict(extra="allow")


class KnowledgePassageReport(BaseModel):
    passage_id: str
    document_id: str | None
    title: str
    score: float = Field(description="0..1; for Kendra its ScoreConfidence as 1.0, 0.75, 0.5, 0.25 or 0.")
    confidence: str | None = Field(default=None, description="Kendra's ScoreConfidence label.")
    used: bool = Field(description="Put into the system context (and cited).")


class KnowledgeReport(BaseModel):
    backend: Literal["database", "kendra"]
    band: Literal["high", "low"] = Field(description="high: the best passage reached the threshold.")
    threshold: float = Field(description="KNOWLEDGE_MIN_SCORE, or KENDRA_MIN_CONFIDENCE as a score.")
    policy: Literal["answer", "decline", "handoff"] | None = Field(
        description="KNOWLEDGE_LOW_CONFIDENCE_POLICY, applied when the band is low; null when high."
    )
    tokens: int = Field(description="Estimated tokens the passages added to the system context.")
    passages: list[KnowledgePassageReport] = Field(description="What the search found, best first (KNOWLEDGE_TOP_K at most).")


class Citation(BaseModel):
    passage_id: str
    document_id: str | None
    title: str
    source_url: str | None
    score: float


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class ContextInfo(BaseModel):
    messages_sent: int
    messages_dropped: int
    tokens: int = Field(description="Estimated tokens sent, system prompt included.")
    truncated: bool = Field(description="True when the newest message alone exceeded the budget and was cut.")
    missing_variables: list[str] = Field(
        default_factory=list, description="Placeholders of the system prompt with no variable set; rendered empty."
    )
    knowledge: KnowledgeReport | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="Only on a knowledge-base conversation: what the turn's search found and how it was used.",
    )


_STREAM_EVENTS = """Server-sent events, when the request has `"stream": true` or `Accept: text/event-stream`:

- `event: delta`, `data: {"text": "..."}`: the next piece of the reply, as the provider produces it;
- `event: done`, `data:` this ChatResponse object (`conversation_id`, `reply`, `seq`, `usage`, `context`,
  `model`, `incomplete`): once, last, after the turn is stored;
- `event: error`, `data: {"error": "...", "message": "..."}` (the JSON error shape): once, last,
  instead of `done`, when the provider fails mid-stream; nothing of the turn is stored.

A comment line `: heartbeat` comes every STREAM_HEARTBEAT_SECONDS (15) while the model is silent.
Errors found before the stream starts (400, 401, 403, 404, 409, 413, 422, 429, and a provider that
fails before its first byte: 502, 503, 504) are ordinary JSON responses with their status."""
_STREAM_EXAMPLE = (
    'event: delta\ndata: {"text": "Hello"}\n\nevent: delta\ndata: {"text": " there"}\n\n'
    'event: done\ndata: {"conversation_id": "...", "reply": "Hello there", "seq": 2, "model": "claude-sonnet-4-5", '
    '"usage": {"input_tokens": 12, "output_tokens": 3}, "context": {"messages_sent": 1, "messages_dropped": 0, '
    '"tokens": 12, "truncated": false}, "incomplete": false}\n\n'
)


class ChatResponse(BaseModel):
    model_config = ConfigDict(
        openapi_extra={
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string", "description": _STREAM_EVENTS},
                    "example": _STREAM_EXAMPLE,
                }
            }
        }
    )

    conversation_id: uuid.UUID
    reply: str
    seq: int = Field(description="Sequence number of the reply in the conversation's log.")
    model: str
    usage: Usage = Field(description="Tokens the provider reported for this turn.")
    context: ContextInfo
    incomplete: bool = Field(
        default=False, description="True when a streamed reply stopped early because its client went away."
    )
    citations: list[Citation] = Field(
        default_factory=list, description="The knowledge base passages the reply was given (high confidence only)."
    )

    @classmethod
    def of(cls, turn: Any) -> ChatResponse:
        """From a `conversations.Turn`."""
        context = turn.context
        return cls(
            conversation_id=turn.conversation_id,
            reply=turn.reply.text,
            seq=turn.seq,
            model=turn.reply.model,
            usage=Usage(**turn.reply.usage),
            incomplete=turn.reply.incomplete,
            context=ContextInfo(
                messages_sent=context.messages_sent,
                messages_dropped=context.messages_dropped,
                tokens=context.token_count,
                truncated=context.truncated,
                missing_variables=turn.missing_variables,
                knowledge=turn.retrieval.report() if turn.retrieval else None,
            ),
            citations=turn.retrieval.citations() if turn.retrieval else [],
        )


class ChatHeld(BaseModel):
    """/chat's 202: the message is stored for the human who has (or will take) the conversation."""

    conversation_id: uuid.UUID
    handoff: Handoff
    seq: int = Field(description="Sequence number of the last message stored (the user's, or the model's words before it asked for a human).")


class MessageOut(BaseModel):
    seq: int
    role: str
    content: str
    created_at: Timestamp
    token_count: int = Field(description="Local estimate of the message's tokens.")
    usage: Usage | None = Field(default=None, description="Provider-reported usage, on replies.")
    incomplete: bool = Field(default=False, description="A streamed reply cut short because its client went away.")
    file_ids: list[uuid.UUID] = Field(default_factory=list, description="The conversation files this user message referred to.")

    @classmethod
    def of(cls, message: Any) -> MessageOut:
        """From a `database_utils.Message`."""
        return cls(
            seq=message.seq,
            role=message.role,
            content=message.content,
            created_at=message.created_at,
            token_count=message.token_count,
            usage=message.usage,
            incomplete=bool(message.incomplete),
            file_ids=message.file_ids or [],
        )


class TransitionOut(BaseModel):
    from_state: str | None = Field(alias="from")
    to_state: str | None = Field(alias="to")
    by: uuid.UUID | None = Field(description="The key that made the move; null for an automatic trigger.")
    actor: str = Field(description="client, staff, or the trigger: phrase, message_limit, model, knowledge.")
    reason: str | None
    at: Timestamp

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class ConversationOut(BaseModel):
    conversation_id: uuid.UUID
    user_id: str
    conversation_name: str | None
    system_prompt: str | None
    status: Status
    created_at: Timestamp
    updated_at: Timestamp
    ended_at: Timestamp | None
    message_count: int
    token_count: int
    usage: Usage
    metadata: dict[str, Any]
    handoff: Handoff = Field(description="bot, needs_human (waiting for staff) or human (a staff member answers).")
    handoff_since: Timestamp | None
    assigned_to: uuid.UUID | None = Field(description="The staff key that claimed the conversation, while `human`.")
    stage: str | None
    variables: dict[str, Any]
    knowledge: bool = Field(default=False, description="Each turn searches the knowledge base.")
    s3_file_location: str | None = None

    @classmethod
    def of(cls, conversation: Any) -> ConversationOut:
        """From a `database_utils.Conversation`."""
        return cls(
            conversation_id=conversation.conversation_id,
            user_id=conversation.user_id,
            conversation_name=conversation.conversation_name,
            system_prompt=conversation.system_prompt,
            status=conversation.status,
            created_at=conversation.created_at,
            updated_at=conversation.updated_at,
            ended_at=conversation.ended_at,
            message_count=conversation.message_count,
            token_count=conversation.token_count,
            usage=Usage(input_tokens=conversation.input_tokens, output_tokens=conversation.output_tokens),
            metadata=conversation.meta,
            handoff=conversation.handoff,
            handoff_since=conversation.handoff_since,
            assigned_to=conversation.assigned_key_id,
            stage=conversation.stage,
            variables=conversation.variables,
            knowledge=bool(conversation.knowledge),
            s3_file_location=conversation.s3_file_location,
        )


class ConversationHistory(ConversationOut):
    handoff_history: list[TransitionOut] = Field(description="Every handoff move, oldest first.")
    stage_history: list[TransitionOut] = Field(description="Every stage change, oldest first.")

    @classmethod
    def of(cls, conversation: Any) -> ConversationHistory:
        """From a `database_utils.Conversation`, loading its transitions."""
        return cls(**dict(ConversationOut.of(conversation)), **_histories(conversation.transitions))


def _histories(transitions: list[Any]) -> dict[str, list[TransitionOut]]:
    histories: dict[str, list[TransitionOut]] = {"handoff_history": [], "stage_history": []}
    for t in transitions:
        histories[f"{t.kind}_history"].append(
            TransitionOut(from_state=t.from_state, to_state=t.to_state, by=t.key_id, actor=t.actor, reason=t.reason, at=t.created_at)
        )
    return histories


class ConversationDetail(ConversationHistory):
    messages: list[MessageOut]

    @classmethod
    def of(cls, conversation: Any, messages: list[MessageOut]) -> ConversationDetail:
        """From a `database_utils.Conversation` and its messages (live rows or the archive's)."""
        return cls(**dict(ConversationHistory.of(conversation)), messages=messages)


class VariablesOut(BaseModel):
    conversation_id: uuid.UUID
    variables: dict[str, Any]


class VariableOut(BaseModel):
    name: str
    value: Any


class CheckReason(BaseModel):
    error: str = Field(description="Error class or S3 error code, e.g. OperationalError, NoSuchBucket, Timeout.")
    hint: str = Field(description="What to check or run; never contains a secret.")


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
    reasons: dict[str, CheckReason] | None = Field(default=None, description="Why each failed check failed.")


class ServiceIndex(BaseModel):
    model_config = ConfigDict(
        openapi_extra={
            "description": "The chat page (text/html), or this object for clients that ask for application/json.",
            "content": {"text/html": {"schema": {"type": "string", "description": "The chat page."}}},
        }
    )

    name: str
    version: str
    docs: str = Field(description="The interactive API documentation.")
    openapi: str = Field(description="The OpenAPI document.")


class SearchQuery(_Request):
    user_id: UserId | None = None
    status: Status | None = None
    created_from: UtcDatetime | None = Field(default=None, description="Created at or after (ISO 8601 with offset).")
    created_to: UtcDatetime | None = Field(default=None, description="Created before.")
    ended_from: UtcDatetime | None = None
    ended_to: UtcDatetime | None = None
    name: Annotated[Text, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)] | None = Field(
        default=None, description="Text the conversation name contains (case-insensitive)."
    )
    stage: Stage | None = Field(default=None, description="Conversations at this dialog stage.")
    handoff: Handoff | None = Field(
        default=None, description="Conversations in this handoff state, oldest waiting first (the staff queue: needs_human)."
    )
    limit: int = Field(default=50, ge=1, le=100)
    cursor: Annotated[str, StringConstraints(max_length=200, pattern=r"^[A-Za-z0-9_\-]+$")] | None = Field(
        default=None, description="next_cursor from the previous page."
    )


class SearchPage(BaseModel):
    conversations: list[ConversationOut]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null on the last page.")


class AuditQuery(_Request):
    key_id: uuid.UUID | None = Field(default=None, description="Events made with this key.")
    action: Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[a-z_]+$")] | None = Field(
        default=None, description="e.g. read_conversation, search_conversations."
    )
    conversation_id: uuid.UUID | None = None
    created_from: UtcDatetime | None = Field(default=None, description="At or after (ISO 8601 with offset).")
    created_to: UtcDatetime | None = Field(default=None, description="Before.")
    limit: int = Field(default=50, ge=1, le=100)
    cursor: Annotated[str, StringConstraints(max_length=200, pattern=r"^[A-Za-z0-9_\-]+$")] | None = Field(
        default=None, description="next_cursor from the previous page."
    )


class AuditEventOut(BaseModel):
    event_id: int
    key_id: uuid.UUID
    key_name: str
    key_role: Role
    action: str
    conversation_id: uuid.UUID | None
    detail: dict[str, Any] | None
    created_at: Timestamp


class AuditPage(BaseModel):
    events: list[AuditEventOut]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null on the last page.")


class KeyCreate(_Request):
    role: Role
    name: Annotated[Text, StringConstraints(min_length=1, max_length=MAX_KEY_NAME_CHARS), AfterValidator(_not_blank)]
    expires_at: UtcDatetime | None = Field(default=None, description="When the key stops working; default never.")


class KeyRef(_Request):
    key_id: uuid.UUID


class KeyOut(BaseModel):
    key_id: uuid.UUID
    name: str
    role: Role
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    state: KeyState
    created_at: Timestamp
    expires_at: Timestamp | None
    revoked_at: Timestamp | None

    @classmethod
    def of(cls, key: Any, now: datetime) -> KeyOut:
        """From a `database_utils.ApiKey`."""
        return cls(
            key_id=key.key_id,
            name=key.name,
            role=key.role,
            prefix=key.prefix,
            state=key.state(now),
            created_at=key.created_at,
            expires_at=key.expires_at,
            revoked_at=key.revoked_at,
        )


class KeyCreated(KeyOut):
    key: str = Field(description="The secret. Shown only in this response; store it now.")


class KeyList(BaseModel):
    keys: list[KeyOut]


class ErrorResponse(BaseModel):
    error: str = Field(description="Stable machine-readable code, e.g. not_found.")
    message: str
    details: list[dict[str, Any]] | None = None
    retryable: bool | None = Field(
        default=None, description="On model failures: whether sending the same request again may succeed."
    )


class KnowledgeText(_Request):
    """A document sent as JSON: plain text or Markdown."""

    title: Annotated[Text, StringConstraints(min_length=1, max_length=300), AfterValidator(_not_blank)]
    text: Annotated[Text, StringConstraints(min_length=1), AfterValidator(_not_blank)] = Field(
        description="Plain text or Markdown; split into passages of 1,200 characters overlapping by 200."
    )
    source_url: SourceUrl | None = Field(default=None, description="Where the document lives (http or https); shown with its citations.")


class KnowledgeUploadForm(_Request):
    """The form fields of a multipart upload, beside `file`."""

    title: Annotated[Text, StringConstraints(max_length=300)] | None = Field(
        default=None, description="Default: the document's own title (HTML <title>, PDF metadata, a Markdown # heading), else the file name."
    )
    source_url: SourceUrl | None = None

    @model_validator(mode="before")
    @classmethod
    def _blank_is_absent(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v != ""} if isinstance(data, dict) else data


class KnowledgeDocumentOut(BaseModel):
    document_id: uuid.UUID
    title: str
    source_url: str | None
    content_type: Literal["text", "markdown", "html", "pdf"]
    char_count: int = Field(description="Characters of extracted text, whitespace collapsed.")
    passage_count: int
    created_by: uuid.UUID | None = Field(description="The key that loaded it; null when loaded with knowledge-load.")
    created_at: Timestamp

    @classmethod
    def of(cls, document: Any) -> KnowledgeDocumentOut:
        """From a `database_utils.KnowledgeDocument`."""
        return cls(
            document_id=document.document_id,
            title=document.title,
            source_url=document.source_url,
            content_type=document.content_type,
            char_count=document.char_count,
            passage_count=document.passage_count,
            created_by=document.created_by,
            created_at=document.created_at,
        )


class KnowledgeDocumentList(BaseModel):
    documents: list[KnowledgeDocumentOut]
    total: int


class KnowledgeListQuery(_Request):
    limit: int = Field(default=100, ge=1, le=1000)
    offset: int = Field(default=0, ge=0, le=10_000_000)


class KnowledgeDocumentPath(BaseModel):
    document_id: uuid.UUID


def knowledge_upload_body() -> dict[str, Any]:
    """POST /knowledge/documents' request body for the OpenAPI document: JSON or a multipart upload."""
    form = KnowledgeUploadForm.model_json_schema()
    form["properties"]["file"] = {
        "type": "string",
        "format": "binary",
        "description": "A .txt, .md, .html or .pdf file (by extension, else by the part's Content-Type).",
    }
    form["required"] = ["file"]
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": KnowledgeText.model_json_schema()},
                "multipart/form-data": {"schema": form},
            },
        }
    }


_TEXT = {"type": "string"}
_WHOLE = {"type": "integer", "minimum": 0}
_REQUEST_ID_HEADER = {
    "description": "The client's own X-Request-ID when it sent a sensible one, else a new one; "
                   "the same ID is in the server's log lines",
    "schema": _TEXT,
}
_RATE_LIMIT_HEADERS = {
    "X-RateLimit-Limit": {"description": "Requests allowed in the window (RATE_LIMIT)", "schema": _WHOLE},
    "X-RateLimit-Remaining": {"description": "Requests left in the window", "schema": _WHOLE},
    "X-RateLimit-Reset": {"description": "When the window ends, in seconds since the epoch", "schema": _WHOLE},
}
_RETRY_AFTER_HEADER = {
    "description": "Seconds to wait before trying again. Always on a 429; on a 409 while another turn or request "
                   "holds the conversation or key; on a 503 when the database is unavailable or busy; on a 502, "
                   "503 or 504 when the model provider gave one",
    "schema": _WHOLE,
}
_REPLAYED_HEADER = {
    "description": "`true` when this is the kept answer to an earlier request with the same Idempotency-Key, replayed",
    "schema": {"type": "string", "enum": ["true"]},
}
_RETRIED_LATER = ("409", "429", "502", "503", "504")
_ERROR_BODY = {"$ref": "#/components/schemas/ErrorResponse"}


def declare_response_headers(document: dict[str, Any], metrics_type: str, replayed_header: str,
                             never_replayed: frozenset[int]) -> None:
    """Add to the OpenAPI document the headers answers carry (flask-openapi3 declares bodies only),
    and `GET /metrics`, which is served outside the API blueprint.

    flask-openapi3 also gives every operation a 400 whose body is a list of errors; Parley's is
    one error object, and an operation with no parameters and no body is never refused with 400.
    """
    for methods in document["paths"].values():
        for operation in methods.values():
            responses = operation["responses"]
            refused = responses.get("400", {}).get("content", {}).get("application/json", {})
            if refused.get("schema", {}).get("type") == "array":
                if operation.get("parameters") or operation.get("requestBody"):
                    refused["schema"] = _ERROR_BODY
                else:
                    del responses["400"]
            limited = "429" in responses
            idempotent = any(p["in"] == "header" and p["name"] == "Idempotency-Key" for p in operation.get("parameters", []))
            for status, response in responses.items():
                headers = response.setdefault("headers", {})
                headers["X-Request-ID"] = _REQUEST_ID_HEADER
                if limited:
                    headers.update(_RATE_LIMIT_HEADERS)
                error = response.get("content", {}).get("application/json", {}).get("schema") == _ERROR_BODY
                if status in _RETRIED_LATER and error:
                    headers["Retry-After"] = _RETRY_AFTER_HEADER
                if idempotent and not (status.isdigit() and int(status) in never_replayed):
                    headers[replayed_header] = _REPLAYED_HEADER
    document["paths"]["/metrics"] = {"get": {
        "tags": ["operations"],
        "summary": "Prometheus metrics of every worker (no key; keep it inside your network)",
        "operationId": "metrics_get",
        "responses": {"200": {
            "description": "Prometheus' text exposition format",
            "headers": {"X-Request-ID": _REQUEST_ID_HEADER},
            "content": {metrics_type: {"schema": _TEXT}},
        }},
    }}
