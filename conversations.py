"""What the routes do: open a conversation, run a turn, end it, read it back.

Each function takes its collaborators (session, model, archive, settings)
as arguments and raises `errors.ApiError` subclasses for the client's
mistakes; model, archive and database faults propagate as their own types.

A turn has two halves with the model call between them, so that plain
replies, streams and idempotent replays share them:
- `prepare_turn` takes the conversation's turn lease (one turn at a time,
  across workers) and builds the context, then commits: no connection or
  transaction is held while the model works;
- `complete_turn` stores the user's message and the reply and releases the
  lease; `abandon_turn` releases it when the model failed, storing nothing.
"""
from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

import releases
from auth import Caller
from config import turn_lease_seconds
from context_cache import TailCache
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
    Conversation,
    Message,
    claim_turn,
    commit_each_statement,
    find_conversations,
    finish_turn,
    get_conversation,
    list_messages,
    lock_conversation,
    record_audit,
    release_turn,
    utcnow,
)
from errors import ApiError, Conflict, NotFound, PayloadTooLarge, TurnInProgress
from llm import ModelReply
from prompt_template import check_template, render_system_prompt
from s3_utils import Archive, read_document
from schemas import (
    ConversationDetail,
    ConversationHistory,
    ConversationOut,
    MessageOut,
    NewChatRequest,
    SearchPage,
    SearchQuery,
)
from states import Handoff, Role, Status

log = logging.getLogger("parley")


@dataclass(frozen=True)
class PreparedTurn:
    """A turn between its two halves: the lease is held, the context is built."""

    conversation_id: uuid.UUID
    lease_id: uuid.UUID
    user: MemoryMessage
    context: ContextWindow
    handoff: str = Handoff.BOT  # not bot: the message is held for a human (handoff.py)
    user_messages: int = 0  # before this one
    missing_variables: list[str] = field(default_factory=list)
    knowledge: bool = False  # the conversation searches the knowledge base on each turn
    retrieval: Any = None  # knowledge.Retrieval, once searched (between the two halves)
    lease_until: float = 0.0  # time.monotonic() when the lease runs out if nobody gives it back


@dataclass(frozen=True)
class Turn:
    conversation_id: uuid.UUID
    reply: ModelReply
    seq: int
    context: ContextWindow
    missing_variables: list[str] = field(default_factory=list)
    retrieval: Any = None  # knowledge.Retrieval: citations and the context's knowledge report


def _check_room(tokens: int, budget: int, what: str) -> None:
    """413 when a system prompt leaves no room for a message in the context budget."""
    if tokens + MIN_TRUNCATED_TOKENS > budget:
        raise PayloadTooLarge(f"{what} is about {tokens} tokens; with room for a message it must fit CONTEXT_MAX_TOKENS={budget}")


def open_conversation(
    session: Session, settings: Mapping[str, Any], request: NewChatRequest, owner: Caller
) -> Conversation:
    """Add a conversation to the session; the caller commits."""
    if request.system_prompt:
        _check_room(estimate_tokens(request.system_prompt), settings["CONTEXT_MAX_TOKENS"], "system_prompt")
        check_template(request.system_prompt)
    now = utcnow()
    conversation = Conversation(
        conversation_id=uuid.uuid4(),
        owner_key_id=owner.key_id,
        user_id=request.user_id,
        conversation_name=request.conversation_name,
        system_prompt=request.system_prompt,
        meta=request.metadata,
        status=Status.ACTIVE,
        created_at=now,
        updated_at=now,
        handoff=Handoff.BOT,
        handoff_since=now,
        user_message_count=0,
        variables={},
        knowledge=settings["KNOWLEDGE_DEFAULT"] if request.knowledge is None else request.knowledge,
        message_count=0,
        token_count=0,
        input_tokens=0,
        output_tokens=0,
    )
    session.add(conversation)
    session.flush()
    return conversation


def prepare_turn(
    session: Session,
    settings: Mapping[str, Any],
    viewer: Caller,
    conversation_id: uuid.UUID,
    text: str,
    file_ids: list[str] | None = None,
    file_tokens: int = 0,
    tails: TailCache | None = None,
) -> PreparedTurn:
    """Take the turn lease and build the context for the user's message `text`.

    409 `turn_in_progress` while another turn holds the conversation. The
    lease is committed before returning, and given back if building the
    context fails. Files sent with the message (files.py) are recorded on it
    by `file_ids` and take `file_tokens` of the budget. `tails`: this
    worker's cached context tails (context_cache.py).
    """
    if len(text) > settings["MAX_MESSAGE_CHARS"]:
        raise PayloadTooLarge(f"message is longer than {settings['MAX_MESSAGE_CHARS']} characters")
    lease_id, lease_seconds = uuid.uuid4(), turn_lease_seconds(settings)
    lease_until = time.monotonic() + lease_seconds
    owner = viewer.key_id if viewer.role == Role.CLIENT else None
    budget, cap = settings["CONTEXT_MAX_TOKENS"] - file_tokens, settings["CONTEXT_MAX_MESSAGES"]
    commit_each_statement(session)  # the claim commits by itself: no transaction to begin and end
    try:
        claimed = claim_turn(session, conversation_id, owner, lease_id, lease_seconds, budget, cap, tails)
    except BaseException:
        # The claim may have committed before a later read of the tail (or the claim's
        # retry) failed: give the lease back. Nothing matches it if the claim never committed.
        _give_back(session, conversation_id, lease_id, lease_until)
        raise
    if claimed is None:
        _explain_unclaimable(session, viewer, conversation_id)
    claimed, tail = claimed
    try:
        system, missing = render_system_prompt(claimed.system_prompt, claimed.variables)
        if system:  # a template's variables may have grown it, or CONTEXT_MAX_TOKENS shrunk since it was set
            _check_room(estimate_tokens(system), budget, "the system prompt as rendered")
        memory = ConversationMemory(
            system_prompt=system,
            max_tokens=budget,
            max_messages=cap,
            messages=tail,
            earlier_messages=claimed.message_count - len(tail),
        )
        user = memory.update_memory(USER, text)
        user.file_ids = file_ids
        context = memory.get_current_context()
        session.commit()
    except BaseException:
        _give_back(session, conversation_id, lease_id, lease_until)
        raise
    return PreparedTurn(
        conversation_id,
        lease_id,
        user,
        context,
        claimed.handoff,
        claimed.user_message_count,
        missing,
        claimed.knowledge,
        lease_until=lease_until,
    )


def complete_turn(session: Session, prepared: PreparedTurn, reply: ModelReply, alone: bool = False) -> Turn:
    """Store the user's message and the reply, and release the lease; the caller commits.

    If the lease was lost (the turn outlived TURN_LEASE_SECONDS and another
    turn took the conversation, or it ended), nothing is stored: 409. With
    `alone` (nothing else is to be committed with the turn), the store
    commits by itself where it is one statement (`commit_each_statement`).
    """
    if alone:
        commit_each_statement(session)
    assistant = MemoryMessage(
        role=ASSISTANT,
        content=reply.text,
        token_count=estimate_tokens(reply.text),
        created_at=utcnow(),
        usage=reply.usage,
        incomplete=reply.incomplete,
    )
    last_seq = finish_turn(session, prepared.conversation_id, prepared.lease_id, [prepared.user, assistant], reply.usage)
    if last_seq is None:
        session.rollback()
        raise Conflict("the conversation ended or its turn lease expired while the reply was being generated")
    return Turn(prepared.conversation_id, reply, last_seq, prepared.context, prepared.missing_variables, prepared.retrieval)


def abandon_turn(session: Session, prepared: PreparedTurn) -> None:
    """Release the lease of a turn that failed; nothing of it is stored.

    Safe after a failed commit whose outcome is unknown: a stored turn has
    released its lease already, and this changes nothing. If the database
    cannot take the release now, it is tried again in the background until
    the lease would have run out (releases.py).
    """
    _give_back(session, prepared.conversation_id, prepared.lease_id, prepared.lease_until)


def _give_back(session: Session, conversation_id: uuid.UUID, lease_id: uuid.UUID, lease_until: float) -> None:
    def release(on: Session) -> None:
        on.rollback()
        release_turn(on, conversation_id, lease_id)
        on.commit()

    for attempt in range(2):  # the second on a fresh connection, after a restart broke the first
        try:
            release(session)
            return
        except SQLAlchemyError as exc:
            session.rollback()
            if attempt:
                log.warning("could not release the turn lease of %s: %s; trying again in the background",
                            conversation_id, exc.__class__.__name__)
    releases.later(f"the turn lease of {conversation_id}", release, session, lease_until - time.monotonic())


def _explain_unclaimable(session: Session, viewer: Caller, conversation_id: uuid.UUID) -> None:
    """Raise the reason `claim_turn` found nothing to claim: 404, ended, or busy."""
    conversation = _visible_conversation(session, viewer, conversation_id)
    session.rollback()
    if conversation.status != Status.ACTIVE:
        raise Conflict(f"conversation {conversation_id} is {conversation.status}; open a new one")
    raise TurnInProgress(f"another turn on conversation {conversation_id} is in progress; retry when it is done")


def read_conversation(
    session: Session, archive: Archive, viewer: Caller, conversation_id: uuid.UUID, after_seq: int | None = None
) -> ConversationDetail:
    """Metadata and the full log (with `after_seq`, only the newer messages),
    from the database or, once ended, the archive.

    A staff read is recorded in the audit table before anything is returned.
    """
    conversation = _visible_conversation(session, viewer, conversation_id)
    if viewer.role == Role.STAFF:
        record_audit(session, viewer, "read_conversation", conversation_id=conversation_id)
    if conversation.status != Status.ENDED:  # active, or ending: the live rows are whole until it is ended
        messages = [MessageOut.of(row) for row in list_messages(session, conversation_id, after_seq)]
        if len(messages) < conversation.message_count - (after_seq or 0):
            # Ended (and its live rows deleted) between the two reads, or erased: look again.
            conversation = session.get(Conversation, conversation_id, populate_existing=True)
            if conversation is None:
                raise NotFound(f"conversation {conversation_id} does not exist")
    if conversation.status == Status.ENDED:
        location, checksum = conversation.s3_file_location, conversation.archive_sha256
        archived = read_document(archive, location, checksum)["messages"]
        messages = [MessageOut.model_validate(m) for m in archived if after_seq is None or m["seq"] > after_seq]
    return ConversationDetail.of(conversation, messages)


def conversation_dict(conversation: Conversation, history: bool = False) -> dict[str, Any]:
    """The conversation as the API shows it; with `history`, its handoff and stage transitions too."""
    return (ConversationHistory if history else ConversationOut).of(conversation).model_dump(mode="json")


def message_dict(row: Message) -> dict[str, Any]:
    return MessageOut.of(row).model_dump(mode="json")


def search_conversations(session: Session, viewer: Caller, query: SearchQuery) -> SearchPage:
    """Conversations newest first, one page at a time: a client sees its own,
    staff see all (and staff searches are audited)."""
    after = decode_cursor(query.cursor) if query.cursor else None
    filters = query.model_dump(exclude={"cursor", "limit"})
    if viewer.role == Role.CLIENT:
        filters["owner_key_id"] = viewer.key_id
    rows = find_conversations(session, filters, after, query.limit + 1)
    if viewer.role == Role.STAFF:
        record_audit(session, viewer, "search_conversations", detail=query.model_dump(mode="json", exclude_none=True))
    page = rows[: query.limit]
    more = len(rows) > query.limit
    return SearchPage(
        conversations=[ConversationOut.of(row) for row in page],
        next_cursor=encode_cursor(page[-1], "handoff_since" if query.handoff else "created_at") if more else None,
    )


def encode_cursor(conversation: Conversation, position: str = "created_at") -> str:
    raw = json.dumps([getattr(conversation, position).isoformat(), str(conversation.conversation_id)])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created_at, conversation_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not (isinstance(created_at, str) and isinstance(conversation_id, str)):
            raise ValueError("cursor parts are not strings")
        position = datetime.fromisoformat(created_at), uuid.UUID(conversation_id)
        if position[0].tzinfo is None:
            raise ValueError("naive timestamp")
        position[0].astimezone(timezone.utc)
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError):
        raise ApiError("cursor is not one this service returned") from None
    return position


def _visible_conversation(
    session: Session, viewer: Caller, conversation_id: uuid.UUID, lock: bool = False
) -> Conversation:
    """The conversation if `viewer` may see it; 404 otherwise, so IDs cannot be probed."""
    conversation = lock_conversation(session, conversation_id) if lock else get_conversation(session, conversation_id)
    if conversation is None or (viewer.role == Role.CLIENT and conversation.owner_key_id != viewer.key_id):
        raise NotFound(f"conversation {conversation_id} does not exist")
    return conversation


def visible_conversation(
    session: Session, viewer: Caller, conversation_id: uuid.UUID, lock: bool = False
) -> Conversation:
    """The conversation if `viewer` may see it (locked until commit with `lock`), else 404."""
    return _visible_conversation(session, viewer, conversation_id, lock)
