"""Key lineage: a rotated key and the keys it was rotated to share the Idempotency-Keys they send

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05

Each key starts a lineage of its own; until now a rotation moved the answers kept for the old
key to the new one, so every record already sits under the key whose lineage it now belongs to.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("lineage_id", sa.Uuid(), nullable=True))
    op.execute("UPDATE api_keys SET lineage_id = key_id")
    with op.batch_alter_table("api_keys") as batch:
        batch.alter_column("lineage_id", existing_type=sa.Uuid(), nullable=False)


def downgrade() -> None:
    # As a rotation moved them before: each record under the newest key of its lineage.
    op.execute(
        "UPDATE idempotency_keys SET key_id = (SELECT k.key_id FROM api_keys k WHERE k.lineage_id = idempotency_keys.key_id "
        "ORDER BY k.created_at DESC LIMIT 1)"
    )
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("lineage_id")
