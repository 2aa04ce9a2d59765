"""API keys, conversation ownership, audit events, staff search indexes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _is_postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key_id"),
        sa.UniqueConstraint("key_hash"),
    )
    op.create_table(
        "audit_events",
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("key_id", sa.Uuid(), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("conversation_id", sa.Uuid(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.key_id"]),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_index("ix_audit_events_conversation", "audit_events", ["conversation_id", "created_at"])
    op.create_index("ix_audit_events_key", "audit_events", ["key_id", "created_at"])

    with op.batch_alter_table("conversations") as batch_op:
        batch_op.add_column(sa.Column("owner_key_id", sa.Uuid(), nullable=True))
        batch_op.create_foreign_key("fk_conversations_owner_key_id", "api_keys", ["owner_key_id"], ["key_id"])
        batch_op.drop_index("ix_conversations_created_at")
        batch_op.drop_index("ix_conversations_user_id_created_at")
        batch_op.create_index("ix_conversations_created", ["created_at", "conversation_id"])
        batch_op.create_index("ix_conversations_user_created", ["user_id", "created_at", "conversation_id"])
        batch_op.create_index("ix_conversations_status_created", ["status", "created_at", "conversation_id"])
        batch_op.create_index("ix_conversations_owner", ["owner_key_id"])

    if _is_postgresql():
        # Trigram index for staff search by name text (ILIKE '%...%').
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        op.create_index(
            "ix_conversations_name_trgm",
            "conversations",
            ["conversation_name"],
            postgresql_using="gin",
            postgresql_ops={"conversation_name": "gin_trgm_ops"},
        )


def downgrade() -> None:
    if _is_postgresql():
        op.drop_index("ix_conversations_name_trgm", table_name="conversations")
    with op.batch_alter_table("conversations") as batch_op:
        batch_op.drop_index("ix_conversations_owner")
        batch_op.drop_index("ix_conversations_status_created")
        batch_op.drop_index("ix_conversations_user_created")
        batch_op.drop_index("ix_conversations_created")
        batch_op.create_index("ix_conversations_user_id_created_at", ["user_id", "created_at"])
        batch_op.create_index("ix_conversations_created_at", ["created_at"])
        batch_op.drop_constraint("fk_conversations_owner_key_id", type_="foreignkey")
        batch_op.drop_column("owner_key_id")
    op.drop_index("ix_audit_events_key", table_name="audit_events")
    op.drop_index("ix_audit_events_conversation", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("api_keys")
