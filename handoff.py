"""Human handoff: the state machine `bot -> needs_human -> human -> bot`.

- `bot`: the model answers /chat;
- `needs_human`: someone asked for a person (the client, staff, or an
  automatic trigger); /chat stores the user's messages and answers 202;
- `human`: a staff key claimed it and writes to the user (role `staff`);
  /chat still stores and answers 202;
- release gives it back to the model, which sees the staff messages from
  then on (conversation_memory.py says how).

Each move takes the conversation's row lock, checks the state it moves
from (409 naming the current state otherwise), and keeps who, when and
why. Staff actions are audited in the same transaction.
"""
from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from auth import Caller
from conversation_memory import ASSISTANT, STAFF, MemoryMessage, estimate_tokens
from conversations import PreparedTurn, visible_conversation
from database_utils import (
    ApiKey,
    Conversation,
    add_audit,
    add_transition,
    append_messages,
    finish_turn,
    lock_conversation,
    utcnow,
)
from errors import Conflict, PayloadTooLarge, TurnInProgress, Unauthorized
from llm import ModelReply
from states import Handoff, KeyState, Role, Status


class HandoffConflict(Conflict):
    """The conversation is not in the state this move starts from."""

    error = "handoff_conflict"


@dataclass(frozen=True)
class Trigger:
    """Why a conversation is handed off without anyone calling /handoff."""

    actor: str  # "phrase", "message_limit" or "model"
    reason: str


@dataclass(frozen=True)
class HeldTurn:
    conversation_id: uuid.UUID
    handoff: str
    seq: int


def automatic_trigger(settings: Mapping[str, Any], prepared: PreparedTurn, text: str) -> Trigger | None:
    """A trigger that hands this turn's conversation to a human instead of the model, if any."""
    if prepared.handoff != Handoff.BOT:
        return None
    said = " ".join(text.casefold().split())
    for phrase in handoff_phrases(settings):
        if phrase in said:
            return Trigger("phrase", f"the user wrote {phrase!r}")
    limit = settings["HANDOFF_AFTER_MESSAGES"]
    # The N+1st message only: once staff give the conversation back, the model answers the rest.
    if limit is not None and prepared.user_messages == limit:
        return Trigger("message_limit", f"more than HANDOFF_AFTER_MESSAGES={limit} user messages")
    return None


def handoff_phrases(settings: Mapping[str, Any]) -> list[str]:
    raw = settings["HANDOFF_PHRASES"] or ""
    if raw.strip().lower() == "none":
        return []
    return [" ".join(phrase.casefold().split()) for phrase in raw.split(",") if phrase.strip()]


def hold_turn(session: Session, prepared: PreparedTurn, trigger: Trigger | None, reply: ModelReply | None = None) -> HeldTurn:
    """Store the user's message (and the model's words, if it asked for a human) without
    answering, release the turn lease, and hand off when `trigger` says so; the caller commits."""
    stored = [prepared.user]
    usage = {"input_tokens": 0, "output_tokens": 0}
    if reply is not None:
        usage = reply.usage
        if reply.text.strip():
            words = MemoryMessage(ASSISTANT, reply.text, estimate_tokens(reply.text), created_at=utcnow(), usage=usage,
                                  incomplete=reply.incomplete)  # cut short when its client left mid-stream
            stored.append(words)
    last_seq = finish_turn(session, prepared.conversation_id, prepared.lease_id, stored, usage)
    if last_seq is None:
        session.rollback()
        raise Conflict("the conversation ended or its turn lease expired while the message was being stored")
    conversation = lock_conversation(session, prepared.conversation_id)
    if trigger is not None and conversation.handoff == Handoff.BOT:
        add_transition(conversation, "handoff", Handoff.NEEDS_HUMAN, None, trigger.actor, trigger.reason)
    return HeldTurn(prepared.conversation_id, conversation.handoff, last_seq)


def request_handoff(session: Session, viewer: Caller, conversation_id: uuid.UUID, reason: str) -> Conversation:
    """bot -> needs_human, asked by the owning client or by staff."""
    conversation = _moving(session, viewer, conversation_id, Handoff.BOT, "ask for a human")
    add_transition(conversation, "handoff", Handoff.NEEDS_HUMAN, viewer, viewer.role, reason)
    _audit(session, viewer, "handoff", conversation_id, reason)
    return conversation


def claim(session: Session, viewer: Caller, conversation_id: uuid.UUID) -> Conversation:
    """needs_human -> human, assigned to the claiming staff key; the second claimant gets 409."""
    _require_unrevoked(session, viewer)  # before the conversation's lock: revoke_key locks in this order too
    conversation = _moving(session, viewer, conversation_id, Handoff.NEEDS_HUMAN, "claim it")
    add_transition(conversation, "handoff", Handoff.HUMAN, viewer, viewer.role, None)
    conversation.assigned_key_id = viewer.key_id
    _audit(session, viewer, "claim", conversation_id)
    return conversation


def release(session: Session, viewer: Caller, conversation_id: uuid.UUID, note: str | None) -> Conversation:
    """human -> bot, by the assigned staff key: the model answers again."""
    conversation = _moving(session, viewer, conversation_id, Handoff.HUMAN, "release it")
    _require_assignee(session, conversation, viewer)
    # A user's message being stored for staff (or a turn begun before the handoff) comes first:
    # released under it, a held message would be left with no reply and no one to give one.
    _require_no_turn(session, conversation, "release it again once it is stored")
    add_transition(conversation, "handoff", Handoff.BOT, viewer, viewer.role, note)
    conversation.assigned_key_id = None
    _audit(session, viewer, "release", conversation_id, note)
    return conversation


def post_staff_message(
    session: Session, settings: Mapping[str, Any], viewer: Caller, conversation_id: uuid.UUID, text: str
) -> MemoryMessage:
    """Store the assigned staff member's message to the user (role `staff`); no model call."""
    if len(text) > settings["MAX_MESSAGE_CHARS"]:
        raise PayloadTooLarge(f"message is longer than {settings['MAX_MESSAGE_CHARS']} characters")
    conversation = _moving(session, viewer, conversation_id, Handoff.HUMAN, "write to the user")
    _require_assignee(session, conversation, viewer)
    # A turn holds the conversation (one the model is answering, begun before the handoff, or
    # a user message being stored): it comes first, and the staff member writes after it.
    _require_no_turn(session, conversation, "send the message again once it is stored")
    message = MemoryMessage(STAFF, text, estimate_tokens(text), created_at=utcnow())
    append_messages(session, conversation_id, [message])
    _audit(session, viewer, "staff_message", conversation_id, detail={"seq": message.seq})
    return message


def _require_no_turn(session: Session, conversation: Conversation, then: str) -> None:
    """409 `turn_in_progress` while a turn holds the conversation's lease."""
    if conversation.turn_lease_id is not None and conversation.turn_lease_expires_at > utcnow():
        session.rollback()
        raise TurnInProgress(f"conversation {conversation.conversation_id} has a turn in progress; {then}")


def _moving(session: Session, viewer: Caller, conversation_id: uuid.UUID, source: Handoff, action: str) -> Conversation:
    """The conversation locked until commit, if it is active and in `source`; 409 otherwise."""
    conversation = visible_conversation(session, viewer, conversation_id, lock=True)
    if conversation.status != Status.ACTIVE:
        session.rollback()
        next_step = "open a new one" if viewer.role == Role.CLIENT else "nothing more can be done in it"
        raise HandoffConflict(f"conversation {conversation_id} is {conversation.status}; {next_step}")
    if conversation.handoff != source:
        current = conversation.handoff
        session.rollback()
        raise HandoffConflict(f"conversation {conversation_id} is in handoff state {current}; to {action} it must be {source}")
    return conversation


def _require_unrevoked(session: Session, viewer: Caller) -> None:
    """A key is cached by each process for AUTH_CACHE_SECONDS: a key revoked through another one must
    not claim a conversation its revocation puts back in the queue. The key's row is share-locked until
    the claim commits, so a revocation running meanwhile waits for it and then re-queues its conversation."""
    key = session.get(ApiKey, viewer.key_id, with_for_update={"read": True})
    if key is None or key.state(utcnow()) != KeyState.ACTIVE:
        session.rollback()
        raise Unauthorized("this key was revoked or has expired")


def _require_assignee(session: Session, conversation: Conversation, viewer: Caller) -> None:
    if conversation.assigned_key_id != viewer.key_id:
        session.rollback()
        raise HandoffConflict(f"conversation {conversation.conversation_id} is in handoff state human, assigned to another staff key")


def _audit(session: Session, viewer: Caller, action: str, conversation_id: uuid.UUID, reason: str | None = None,
           detail: dict[str, Any] | None = None) -> None:
    if viewer.role == Role.STAFF:
        add_audit(session, viewer, action, conversation_id, detail or ({"reason": reason} if reason else None))
