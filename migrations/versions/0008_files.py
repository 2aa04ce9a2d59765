"""Files in a conversation: the conversation_files table, and the file IDs a user message referred to

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "conversation_files",
        sa.Column("file_id", sa.Uuid(), nullable=False),
        sa.Column("conversation_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("content_type", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("location", sa.String(length=1024), nullable=False),
        sa.Column("token_estimate", sa.Integer(), nullable=False),
        sa.Column("uploaded_by", sa.Uuid(), nullable=True),
        sa.Column("uploaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.conversation_id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["uploaded_by"], ["api_keys.key_id"]),
        sa.PrimaryKeyConstraint("file_id"),
    )
    op.create_index(
        "ix_conversation_files_conversation", "conversation_files", ["conversation_id", "uploaded_at", "file_id"]
    )
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("file_ids", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("file_ids")
    op.drop_index("ix_conversation_files_conversation", table_name="conversation_files")
    op.drop_table("conversation_files")
