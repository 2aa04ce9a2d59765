"""Human handoff state, dialog stage, session variables and their transitions

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("handoff", sa.String(length=16), server_default="bot", nullable=False))
        batch.add_column(sa.Column("handoff_since", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("assigned_key_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("user_message_count", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("stage", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("variables", sa.JSON(), server_default="{}", nullable=False))
        batch.create_foreign_key("fk_conversations_assigned_key_id", "api_keys", ["assigned_key_id"], ["key_id"])
    # Existing conversations have waited in "bot" since they began; their
    # user messages were the odd ones of a log of whole turns.
    op.execute("UPDATE conversations SET handoff_since = created_at, user_message_count = (message_count + 1) / 2")
    op.create_index("ix_conversations_handoff_since", "conversations", ["handoff", "handoff_since", "conversation_id"])
    op.create_index("ix_conversations_stage_created", "conversations", ["stage", "created_at", "conversation_id"])
    op.create_table(
        "conversation_transitions",
        sa.Column("transition_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("conversation_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("from_state", sa.String(length=64), nullable=True),
        sa.Column("to_state", sa.String(length=64), nullable=True),
        sa.Column("key_id", sa.Uuid(), nullable=True),
        sa.Column("actor", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.conversation_id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.key_id"]),
        sa.PrimaryKeyConstraint("transition_id"),
    )
    op.create_index(
        "ix_conversation_transitions_conversation", "conversation_transitions", ["conversation_id", "transition_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_conversation_transitions_conversation", table_name="conversation_transitions")
    op.drop_table("conversation_transitions")
    op.drop_index("ix_conversations_stage_created", table_name="conversations")
    op.drop_index("ix_conversations_handoff_since", table_name="conversations")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_constraint("fk_conversations_assigned_key_id", type_="foreignkey")
        for column in ("variables", "stage", "user_message_count", "assigned_key_id", "handoff_since", "handoff"):
            batch.drop_column(column)
