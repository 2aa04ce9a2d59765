"""Bulk test data, inserted directly (much faster than going through /chat)."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, insert, update
from sqlalchemy.orm import Session

from database_utils import Conversation, Message

SEED_TOKENS_PER_MESSAGE = 50


def seed_conversation(
    session: Session, messages: int, user_id: str = "seed", owner_key_id: uuid.UUID | None = None
) -> uuid.UUID:
    """A conversation with `messages` alternating user/assistant messages."""
    conversation_id = uuid.uuid4()
    start = datetime.now(timezone.utc) - timedelta(days=1)
    session.add(
        Conversation(
            conversation_id=conversation_id,
            owner_key_id=owner_key_id,
            user_id=user_id,
            message_count=messages,
            token_count=messages * SEED_TOKENS_PER_MESSAGE,
        )
    )
    session.flush()
    rows = [
        {
            "conversation_id": conversation_id,
            "seq": seq,
            "role": "user" if seq % 2 else "assistant",
            "content": f"message {seq} " + "lorem ipsum " * 10,
            "created_at": start + timedelta(seconds=seq),
            "token_count": SEED_TOKENS_PER_MESSAGE,
        }
        for seq in range(1, messages + 1)
    ]
    for first in range(0, len(rows), 5_000):
        session.execute(insert(Message), rows[first : first + 5_000])
    session.commit()
    return conversation_id


def truncate_conversation(session: Session, conversation_id: uuid.UUID, messages: int) -> None:
    """Put a seeded conversation back to its first `messages` messages."""
    session.execute(delete(Message).where(Message.conversation_id == conversation_id, Message.seq > messages))
    session.execute(
        update(Conversation)
        .where(Conversation.conversation_id == conversation_id)
        .values(message_count=messages, token_count=messages * SEED_TOKENS_PER_MESSAGE)
    )
    session.commit()


def seed_conversations(session: Session, count: int, users: int = 1_000, offset: int = 0, batch: int = 10_000) -> None:
    """Conversations number `offset` to `offset + count - 1`, five minutes apart.

    Deterministic: conversation i belongs to user-(i % users), is ended when
    i % 3 == 0, and is named after a product line, so filters select known
    fractions of the table.
    """
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    products = ("router", "billing", "membership", "delivery", "warranty")
    for first in range(offset, offset + count, batch):
        rows = []
        for i in range(first, min(first + batch, offset + count)):
            created = start + timedelta(minutes=5 * i)
            ended = i % 3 == 0
            rows.append(
                {
                    "conversation_id": uuid.UUID(int=i + 1),
                    "user_id": f"user-{i % users}",
                    "conversation_name": f"{products[i % len(products)]} question #{i}",
                    "status": "ended" if ended else "active",
                    "created_at": created,
                    "updated_at": created,
                    "ended_at": created + timedelta(minutes=30) if ended else None,
                    "meta": {},
                }
            )
        session.execute(insert(Conversation), rows)
    session.commit()
