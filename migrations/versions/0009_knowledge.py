"""Knowledge base: documents, passages, their full-text index and the conversation's knowledge switch

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29

The index is made here and only here, per database:
- PostgreSQL: a `search_vector tsvector` column on knowledge_passages with a
  GIN index (knowledge.py fills it with to_tsvector(KNOWLEDGE_LANGUAGE, text));
- SQLite: an FTS5 table over knowledge_passages (external content), kept in
  step by triggers.
The models do not describe these objects; migrations/env.py leaves them out
of the models-vs-migrations comparison.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SQLITE_FTS = [
    # porter: English stemming ("refunds" finds "refund"), as PostgreSQL's english configuration does.
    "CREATE VIRTUAL TABLE knowledge_fts USING fts5(text, content='knowledge_passages', content_rowid='passage_id', "
    "tokenize='porter unicode61 remove_diacritics 2')",
    "CREATE TRIGGER knowledge_passages_fts_insert AFTER INSERT ON knowledge_passages BEGIN "
    "INSERT INTO knowledge_fts(rowid, text) VALUES (new.passage_id, new.text); END",
    "CREATE TRIGGER knowledge_passages_fts_delete AFTER DELETE ON knowledge_passages BEGIN "
    "INSERT INTO knowledge_fts(knowledge_fts, rowid, text) VALUES ('delete', old.passage_id, old.text); END",
]


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("knowledge", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table(
        "knowledge_documents",
        sa.Column("document_id", sa.Uuid(), nullable=False),
        sa.Column("title", sa.String(length=300), nullable=False),
        sa.Column("source_url", sa.String(length=2048), nullable=True),
        sa.Column("content_type", sa.String(length=32), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("char_count", sa.Integer(), nullable=False),
        sa.Column("passage_count", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["created_by"], ["api_keys.key_id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("document_id"),
    )
    op.create_index("ix_knowledge_documents_created", "knowledge_documents", ["created_at", "document_id"])
    op.create_index("ix_knowledge_documents_sha256", "knowledge_documents", ["sha256"], unique=True)
    op.create_table(
        "knowledge_passages",
        sa.Column("passage_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("document_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["document_id"], ["knowledge_documents.document_id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("passage_id"),
    )
    op.create_index("ix_knowledge_passages_document", "knowledge_passages", ["document_id", "position"])
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE knowledge_passages ADD COLUMN search_vector tsvector NOT NULL")
        # Kept in the row (compressed) rather than in the TOAST table: a search reads and
        # ranks every matching passage's vector, and fetching each one out of line made
        # a 10,000-passage search about 5x slower (bench/knowledge_search.py).
        op.execute("ALTER TABLE knowledge_passages ALTER COLUMN search_vector SET STORAGE MAIN")
        op.execute("CREATE INDEX ix_knowledge_passages_search ON knowledge_passages USING gin (search_vector)")
    else:
        for statement in _SQLITE_FTS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP INDEX ix_knowledge_passages_search")
    else:
        op.execute("DROP TRIGGER knowledge_passages_fts_delete")
        op.execute("DROP TRIGGER knowledge_passages_fts_insert")
        op.execute("DROP TABLE knowledge_fts")
    op.drop_index("ix_knowledge_passages_document", table_name="knowledge_passages")
    op.drop_table("knowledge_passages")
    op.drop_index("ix_knowledge_documents_sha256", table_name="knowledge_documents")
    op.drop_index("ix_knowledge_documents_created", table_name="knowledge_documents")
    op.drop_table("knowledge_documents")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("knowledge")
