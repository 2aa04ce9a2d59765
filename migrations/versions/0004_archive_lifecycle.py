"""Archive lifecycle: object checksums, claims, relative locations, idle lookup, CLI audit events

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_conversations = sa.table(
    "conversations",
    sa.column("conversation_id", sa.Uuid()),
    sa.column("s3_file_location", sa.String()),
)
_MARKER = "/conversations/"


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch_op:
        batch_op.add_column(sa.Column("archive_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_conversations_status_updated", ["status", "updated_at"])
    with op.batch_alter_table("audit_events") as batch_op:
        batch_op.alter_column("key_id", existing_type=sa.Uuid(), nullable=True)
    # Locations become keys relative to the archive root:
    # s3://bucket/prefix/conversations/dt=.../id.json -> conversations/dt=.../id.json
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(_conversations.c.conversation_id, _conversations.c.s3_file_location).where(
            _conversations.c.s3_file_location.like("%://%")
        )
    ).all()
    for conversation_id, location in rows:
        relative = "conversations/" + location.rpartition(_MARKER)[2]
        bind.execute(
            _conversations.update()
            .where(_conversations.c.conversation_id == conversation_id)
            .values(s3_file_location=relative)
        )


def downgrade() -> None:
    # Relative locations stay relative: the archive root they were under is not known here.
    with op.batch_alter_table("audit_events") as batch_op:
        batch_op.alter_column("key_id", existing_type=sa.Uuid(), nullable=False)
    with op.batch_alter_table("conversations") as batch_op:
        batch_op.drop_index("ix_conversations_status_updated")
        batch_op.drop_column("claimed_until")
        batch_op.drop_column("archive_sha256")
