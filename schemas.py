"""Request and response bodies of the HTTP API, as pydantic models.

Requests reject unknown fields and text that PostgreSQL or the model
providers cannot take (NUL bytes, lone surrogates). The OpenAPI document is
generated from these models.
"""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

MAX_NAME_CHARS = 200
MAX_SYSTEM_PROMPT_CHARS = 100_000
MAX_METADATA_BYTES = 16 * 1024


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


def _storable_metadata(value: dict[str, Any]) -> dict[str, Any]:
    try:
        encoded = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise ValueError("metadata must not contain NaN or Infinity") from None
    _storable_text(encoded)
    # json.dumps writes NUL as the escape \u0000, which PostgreSQL also refuses.
    if "\\u0000" in encoded:
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
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_utc)]
MessageText = Annotated[str, StringConstraints(min_length=1), AfterValidator(_storable_text), AfterValidator(_not_blank)]
UserId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\w.@:+\-]+$")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewChatRequest(_Request):
    user_id: UserId = Field(description="Your application's ID for the end user.")
    conversation_name: Annotated[Text, StringConstraints(max_length=MAX_NAME_CHARS)] | None = None
    system_prompt: Annotated[Text, StringConstraints(max_length=MAX_SYSTEM_PROMPT_CHARS)] | None = None
    metadata: Annotated[dict[str, Any], AfterValidator(_storable_metadata)] = Field(default_factory=dict)


class ChatRequest(_Request):
    conversation_id: uuid.UUID
    message: MessageText = Field(description="The user's message; limited by MAX_MESSAGE_CHARS (413 beyond).")


class ConversationRef(_Request):
    conversation_id: uuid.UUID


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class ContextInfo(BaseModel):
    messages_sent: int
    messages_dropped: int
    tokens: int = Field(description="Estimated tokens sent, system prompt included.")
    truncated: bool = Field(description="True when the newest message alone exceeded the budget and was cut.")


class ChatResponse(BaseModel):
    conversation_id: uuid.UUID
    reply: str
    seq: int = Field(description="Sequence number of the reply in the conversation's log.")
    model: str
    usage: Usage = Field(description="Tokens the provider reported for this turn.")
    context: ContextInfo


class MessageOut(BaseModel):
    seq: int
    role: str
    content: str
    created_at: datetime
    token_count: int = Field(description="Local estimate of the message's tokens.")
    usage: Usage | None = Field(default=None, description="Provider-reported usage, on replies.")


class ConversationOut(BaseModel):
    conversation_id: uuid.UUID
    user_id: str
    conversation_name: str | None
    system_prompt: str | None
    status: str
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None
    message_count: int
    token_count: int
    usage: Usage
    metadata: dict[str, Any]
    s3_file_location: str | None = None


class ConversationDetail(ConversationOut):
    messages: list[MessageOut]


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class SearchQuery(_Request):
    user_id: UserId | None = None
    status: Literal["active", "ending", "ended"] | None = None
    created_from: UtcDatetime | None = Field(default=None, description="Created at or after (ISO 8601 with offset).")
    created_to: UtcDatetime | None = Field(default=None, description="Created before.")
    ended_from: UtcDatetime | None = None
    ended_to: UtcDatetime | None = None
    name: Annotated[Text, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)] | None = Field(
        default=None, description="Text the conversation name contains (case-insensitive)."
    )
    limit: int = Field(default=50, ge=1, le=100)
    cursor: Annotated[str, StringConstraints(max_length=200, pattern=r"^[A-Za-z0-9_\-]+$")] | None = Field(
        default=None, description="next_cursor from the previous page."
    )


class SearchPage(BaseModel):
    conversations: list[ConversationOut]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null on the last page.")


Role = Literal["client", "staff", "admin"]


class KeyCreate(_Request):
    role: Role
    name: Annotated[Text, StringConstraints(min_length=1, max_length=100)]
    expires_at: UtcDatetime | None = Field(default=None, description="When the key stops working; default never.")


class KeyRef(_Request):
    key_id: uuid.UUID


class KeyOut(BaseModel):
    key_id: uuid.UUID
    name: str
    role: Role
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    state: Literal["active", "revoked", "expired"]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="The secret. Shown only in this response; store it now.")


class KeyList(BaseModel):
    keys: list[KeyOut]


class ErrorResponse(BaseModel):
    error: str = Field(description="Stable machine-readable code, e.g. not_found.")
    message: str
    details: list[dict[str, Any]] | None = None
