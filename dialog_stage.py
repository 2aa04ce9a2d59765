"""The dialog stage: a short name the client app keeps on a conversation to
track where the dialog is (e.g. `awaiting_confirmation`).

`PUT /conversations/{id}/stage` with `expected_stage` is a compare-and-set
under the conversation's row lock, so two requests can never both move
from the same stage. Every change is kept with who and when.
"""
from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from auth import Caller
from conversations import visible_conversation
from database_utils import Conversation, add_audit, add_transition
from errors import Conflict
from states import Role, Status


class StageMismatch(Conflict):
    error = "stage_mismatch"


def set_stage(
    session: Session, viewer: Caller, conversation_id: uuid.UUID, stage: str | None, check: bool, expected: str | None
) -> Conversation:
    """Set the stage; with `check`, only when it is `expected` now (409 otherwise). The caller commits."""
    conversation = visible_conversation(session, viewer, conversation_id, lock=True)
    if conversation.status != Status.ACTIVE:
        session.rollback()
        raise Conflict(f"conversation {conversation_id} is {conversation.status}; its stage is kept as it was")
    if check and conversation.stage != expected:
        current = conversation.stage
        session.rollback()
        raise StageMismatch(f"conversation {conversation_id} is at stage {current or 'null'}, not {expected or 'null'}")
    if conversation.stage != stage:
        add_transition(conversation, "stage", stage, viewer, viewer.role, None)
    if viewer.role == Role.STAFF:
        add_audit(session, viewer, "set_stage", conversation_id, {"stage": stage})
    return conversation
