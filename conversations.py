"""What the routes do: open a conversation, run a turn, end it, read it back.

Each function takes its collaborators (session, model, archive, settings)
as arguments and raises `errors.ApiError` subclasses for the client's
mistakes; model, archive and database faults propagate as their own types.
"""
from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Row
from sqlalchemy.orm import Session

from conversation_memory import (
    ASSISTANT,
    MIN_TRUNCATED_TOKENS,
    USER,
    ContextWindow,
    ConversationMemory,
    MemoryMessage,
    estimate_tokens,
)
from database_utils import (
    ACTIVE,
    CLIENT,
    ENDED,
    STAFF,
    ApiKey,
    Conversation,
    Message,
    find_conversations,
    get_conversation,
    list_messages,
    load_context_tail,
    lock_conversation,
    record_audit,
    reserve_seqs,
)
from errors import ApiError, Conflict, NotFound, PayloadTooLarge
from llm import ChatModel, ModelReply
from s3_utils import Archive, read_document
from schemas import NewChatRequest, SearchQuery


@dataclass(frozen=True)
class Turn:
    conversation_id: uuid.UUID
    reply: ModelReply
    seq: int
    context: ContextWindow


def open_conversation(
    session: Session, settings: Mapping[str, Any], request: NewChatRequest, owner: ApiKey
) -> Conversation:
    if request.system_prompt:
        tokens, budget = estimate_tokens(request.system_prompt), settings["CONTEXT_MAX_TOKENS"]
        if tokens + MIN_TRUNCATED_TOKENS > budget:
            raise PayloadTooLarge(
                f"system_prompt is about {tokens} tokens; with room for a message it must fit CONTEXT_MAX_TOKENS={budget}"
            )
    conversation = Conversation(
        conversation_id=uuid.uuid4(),
        owner_key_id=owner.key_id,
        user_id=request.user_id,
        conversation_name=request.conversation_name,
        system_prompt=request.system_prompt,
        meta=request.metadata,
    )
    session.add(conversation)
    session.commit()
    return conversation


def chat_turn(
    session: Session,
    model: ChatModel,
    settings: Mapping[str, Any],
    viewer: ApiKey,
    conversation_id: uuid.UUID,
    text: str,
) -> Turn:
    """Answer one user message and store both messages together.

    A turn is atomic: if the model fails, nothing is stored and the client
    may send the same message again.
    """
    if len(text) > settings["MAX_MESSAGE_CHARS"]:
        raise PayloadTooLarge(f"message is longer than {settings['MAX_MESSAGE_CHARS']} characters")
    conversation = _visible_conversation(session, viewer, conversation_id)
    if conversation.status != ACTIVE:
        raise Conflict(f"conversation {conversation_id} has ended; open a new one")
    memory = _load_memory(session, conversation, settings)
    user = memory.update_memory(USER, text)
    context = memory.get_current_context()
    # End the read transaction: nothing is held open during the model call.
    session.commit()

    reply = model.reply(context.system, context.messages)
    assistant = memory.update_memory(ASSISTANT, reply.text, usage=reply.usage)
    last_seq = reserve_seqs(session, conversation_id, 2, user.token_count + assistant.token_count, reply.usage)
    if last_seq is None:
        session.rollback()
        raise Conflict("the conversation ended while its reply was being generated")
    user.seq, assistant.seq = last_seq - 1, last_seq
    session.add_all([_to_row(conversation_id, user), _to_row(conversation_id, assistant)])
    session.commit()
    return Turn(conversation_id, reply, last_seq, context)


def read_conversation(session: Session, archive: Archive, viewer: ApiKey, conversation_id: uuid.UUID) -> dict[str, Any]:
    """Metadata and the full log, from the database or, once ended, the archive (checksum verified).

    A staff read is recorded in the audit table before anything is returned.
    """
    conversation = _visible_conversation(session, viewer, conversation_id)
    if viewer.role == STAFF:
        record_audit(session, viewer, "read_conversation", conversation_id=conversation_id)
    if conversation.status != ENDED:  # active, or ending: the live rows are whole until it is ended
        messages = [message_dict(row) for row in list_messages(session, conversation_id)]
        if len(messages) < conversation.message_count:
            # Ended (and its live rows deleted) between the two reads: look again.
            conversation = session.get(Conversation, conversation_id, populate_existing=True)
    if conversation.status == ENDED:
        location, checksum = conversation.s3_file_location, conversation.archive_sha256
        messages = read_document(archive, location, checksum)["messages"]
    return {**conversation_dict(conversation), "messages": messages}


def conversation_dict(conversation: Conversation) -> dict[str, Any]:
    return {
        "conversation_id": str(conversation.conversation_id),
        "user_id": conversation.user_id,
        "conversation_name": conversation.conversation_name,
        "system_prompt": conversation.system_prompt,
        "status": conversation.status,
        "created_at": conversation.created_at.isoformat(),
        "updated_at": conversation.updated_at.isoformat(),
        "ended_at": conversation.ended_at.isoformat() if conversation.ended_at else None,
        "message_count": conversation.message_count,
        "token_count": conversation.token_count,
        "usage": {"input_tokens": conversation.input_tokens, "output_tokens": conversation.output_tokens},
        "metadata": conversation.meta,
        "s3_file_location": conversation.s3_file_location,
    }


def message_dict(row: Message) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "role": row.role,
        "content": row.content,
        "created_at": row.created_at.isoformat(),
        "token_count": row.token_count,
        "usage": row.usage,
    }


def search_conversations(session: Session, viewer: ApiKey, query: SearchQuery) -> dict[str, Any]:
    """Staff lookup, newest first, one page at a time (audited)."""
    after = decode_cursor(query.cursor) if query.cursor else None
    rows = find_conversations(session, query.model_dump(exclude={"cursor", "limit"}), after, query.limit + 1)
    record_audit(session, viewer, "search_conversations", detail=query.model_dump(mode="json", exclude_none=True))
    page = rows[: query.limit]
    more = len(rows) > query.limit
    return {
        "conversations": [conversation_dict(row) for row in page],
        "next_cursor": encode_cursor(page[-1]) if more else None,
    }


def encode_cursor(conversation: Conversation) -> str:
    raw = json.dumps([conversation.created_at.isoformat(), str(conversation.conversation_id)])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created_at, conversation_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        position = datetime.fromisoformat(created_at), uuid.UUID(conversation_id)
        if position[0].tzinfo is None:
            raise ValueError("naive timestamp")
        position[0].astimezone(timezone.utc)
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError):
        raise ApiError("cursor is not one this service returned") from None
    return position


def _visible_conversation(
    session: Session, viewer: ApiKey, conversation_id: uuid.UUID, lock: bool = False
) -> Conversation:
    """The conversation if `viewer` may see it; 404 otherwise, so IDs cannot be probed."""
    conversation = lock_conversation(session, conversation_id) if lock else get_conversation(session, conversation_id)
    if conversation is None or (viewer.role == CLIENT and conversation.owner_key_id != viewer.key_id):
        raise NotFound(f"conversation {conversation_id} does not exist")
    return conversation


def _load_memory(session: Session, conversation: Conversation, settings: Mapping[str, Any]) -> ConversationMemory:
    budget, cap = settings["CONTEXT_MAX_TOKENS"], settings["CONTEXT_MAX_MESSAGES"]
    rows = load_context_tail(session, conversation, budget, cap)
    return ConversationMemory(
        system_prompt=conversation.system_prompt,
        max_tokens=budget,
        max_messages=cap,
        messages=[_to_memory(row) for row in rows],
        earlier_messages=rows[0].seq - 1 if rows else 0,
    )


def _to_memory(row: Row) -> MemoryMessage:
    # Unpacking by position: attribute access on a Row costs several times
    # more, and this runs for every message in the context window.
    seq, role, content, created_at, token_count, usage = row
    return MemoryMessage(role, content, created_at, token_count, seq, usage)


def _to_row(conversation_id: uuid.UUID, message: MemoryMessage) -> Message:
    return Message(
        conversation_id=conversation_id,
        seq=message.seq,
        role=message.role,
        content=message.content,
        created_at=message.created_at,
        token_count=message.token_count,
        usage=message.usage,
    )
