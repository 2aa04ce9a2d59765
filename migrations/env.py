"""Alembic environment: the models' metadata and the app's DATABASE_URL."""
from __future__ import annotations

import sys
from logging.config import fileConfig
from pathlib import Path

from alembic import context
from sqlalchemy import create_engine, pool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import load_config  # noqa: E402
from database_utils import Base  # noqa: E402

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or load_config()["DATABASE_URL"]


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    """Leave out indexes that exist on one database only (info["only_dialect"])."""
    only = getattr(obj, "info", {}).get("only_dialect")
    return only is None or only == context.get_context().dialect.name


# The knowledge base's full-text index (revision 0008), which the models do not
# describe: SQLite's FTS5 table and its shadow tables, PostgreSQL's tsvector column.
_UNMODELLED_TABLE_PREFIX = "knowledge_fts"
_UNMODELLED_COLUMNS = {("knowledge_passages", "search_vector")}
_UNMODELLED_INDEXES = {"ix_knowledge_passages_search"}


def include_name(name, type_, parent_names) -> bool:
    """Leave the database-specific search objects out of the comparison."""
    if type_ == "table":
        return not (name or "").startswith(_UNMODELLED_TABLE_PREFIX)
    if type_ == "column":
        return (parent_names.get("table_name"), name) not in _UNMODELLED_COLUMNS
    if type_ == "index":
        return name not in _UNMODELLED_INDEXES
    return True


# Batch mode lets ALTER-style revisions also run on SQLite.
_OPTIONS = {
    "target_metadata": target_metadata,
    "render_as_batch": True,
    "include_object": include_object,
    "include_name": include_name,
}


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of running it (`alembic upgrade --sql`)."""
    context.configure(url=_url(), literal_binds=True, **_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, **_OPTIONS)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
