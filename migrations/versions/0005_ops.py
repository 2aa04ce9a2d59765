"""Indexes for a client's own conversation list and for audit retention

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The new index starts with owner_key_id, so it also serves what the old one did.
    op.create_index(
        "ix_conversations_owner_created", "conversations", ["owner_key_id", "created_at", "conversation_id"]
    )
    op.drop_index("ix_conversations_owner", table_name="conversations")
    op.create_index("ix_audit_events_created", "audit_events", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_audit_events_created", table_name="audit_events")
    op.create_index("ix_conversations_owner", "conversations", ["owner_key_id"])
    op.drop_index("ix_conversations_owner_created", table_name="conversations")
