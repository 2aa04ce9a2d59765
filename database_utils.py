"""Database models, engine, per-request sessions, queries and the schema CLI.

The same models run on PostgreSQL (production) and SQLite (the embedded
default). The schema is made only by the Alembic revisions in migrations/.
"""
from __future__ import annotations

import fcntl
import functools
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import click
import orjson
import psycopg
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError as AlembicCommandError
from flask import Flask, current_app, g
from flask.cli import with_appcontext
from psycopg.rows import namedtuple_row
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    Uuid,
    bindparam,
    cast,
    create_engine,
    event,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.pool import NullPool
from sqlalchemy.sql import operators

from config import default
from context_cache import CachedTail, TailCache
from conversation_memory import USER, MemoryMessage
from states import Handoff, KeyState, Status, check_handoff

log = logging.getLogger("parley")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Fewest rows fetched per step when walking back from the newest message.
MIN_TAIL_PAGE = 16
# A pooled PostgreSQL connection idle for this long is pinged before use.
PING_IDLE_SECONDS = 1.0
# libpq's settings for each PostgreSQL connection, unless DATABASE_URL names them: give up
# connecting after 5 s, and drop a connection whose sent data goes unacknowledged for 30 s or
# whose peer stops answering keepalives (a host or network that went away), so that a request
# answers 503 instead of waiting on it for the kernel's 15 minutes.
CONNECT_PARAMETERS = {
    "connect_timeout": 5,
    "tcp_user_timeout": 30_000,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
_TWENTY_DIGITS, _TWENTY_DIGITS_BYTES = re.compile("[0-9]{20}"), re.compile(b"[0-9]{20}")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp, also on SQLite (which stores naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: pass a timezone-aware value")
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class ApiKey(Base):
    """A caller of the API. Only a hash of the secret is stored."""

    __tablename__ = "api_keys"

    key_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    # The key_id of the first key of its rotations (its own, if it was never rotated to): one
    # client's keys over time, to which its Idempotency-Keys belong (see IdempotencyRecord).
    lineage_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    def state(self, now: datetime) -> KeyState:
        if self.revoked_at is not None:
            return KeyState.REVOKED
        if self.expires_at is not None and self.expires_at <= now:
            return KeyState.EXPIRED
        return KeyState.ACTIVE


class Conversation(Base):
    __tablename__ = "conversations"

    conversation_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner_key_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.key_id", name="fk_conversations_owner_key_id"))
    user_id: Mapped[str] = mapped_column(String(128))
    conversation_name: Mapped[str | None] = mapped_column(String(200))
    system_prompt: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=Status.ACTIVE)
    # The archive object's key, relative to ARCHIVE_URL, and the SHA-256 of its bytes.
    s3_file_location: Mapped[str | None] = mapped_column(String(1024))
    archive_sha256: Mapped[str | None] = mapped_column(String(64))
    # While `ending`: someone may be writing its object until then; after it, any job may finish it.
    claimed_until: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    token_count: Mapped[int] = mapped_column(BigInteger, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    # "metadata" is reserved on declarative classes, so the attribute is `meta`.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    # The turn in progress, if any: one turn at a time per conversation,
    # across workers and machines. A lease whose holder died expires.
    turn_lease_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    turn_lease_expires_at: Mapped[datetime | None]
    # Human handoff (handoff.py): the state, since when, and the staff key
    # that claimed it; stage and variables belong to the client app.
    handoff: Mapped[str] = mapped_column(String(16), default=Handoff.BOT, server_default=Handoff.BOT.value)
    handoff_since: Mapped[datetime | None] = mapped_column(default=utcnow)
    assigned_key_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.key_id", name="fk_conversations_assigned_key_id"))
    user_message_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    stage: Mapped[str | None] = mapped_column(String(64))
    variables: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    # Each turn searches the knowledge base (knowledge.py).
    knowledge: Mapped[bool] = mapped_column(default=False, server_default=false())
    transitions: Mapped[list[Transition]] = relationship(order_by="Transition.transition_id", lazy="select")

    # Staff search reads newest first with a (created_at, conversation_id)
    # cursor; each filter has an index that yields rows in that order.
    __table_args__ = (
        Index("ix_conversations_created", "created_at", "conversation_id"),
        Index("ix_conversations_user_created", "user_id", "created_at", "conversation_id"),
        Index("ix_conversations_status_created", "status", "created_at", "conversation_id"),
        Index("ix_conversations_ended_at", "ended_at"),
        # A client's own list: newest first, same cursor as staff search.
        Index("ix_conversations_owner_created", "owner_key_id", "created_at", "conversation_id"),
        Index("ix_conversations_status_updated", "status", "updated_at"),
        # The staff queue: a handoff state, oldest waiting first.
        Index("ix_conversations_handoff_since", "handoff", "handoff_since", "conversation_id"),
        Index("ix_conversations_stage_created", "stage", "created_at", "conversation_id"),
        Index(
            "ix_conversations_name_trgm",
            "conversation_name",
            postgresql_using="gin",
            postgresql_ops={"conversation_name": "gin_trgm_ops"},
            info={"only_dialect": "postgresql"},
        ),
    )


class Message(Base):
    __tablename__ = "messages"

    conversation_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("conversations.conversation_id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    token_count: Mapped[int] = mapped_column(Integer)
    usage: Mapped[dict[str, Any] | None]
    # A streamed reply stored as far as it came when its client went away.
    incomplete: Mapped[bool] = mapped_column(default=False, server_default=false())
    # The conversation files (files.py) a user message referred to, as ID strings.
    file_ids: Mapped[list[str] | None] = mapped_column(JSON)


class ConversationFile(Base):
    """A file uploaded into a conversation; its bytes are in the archive store at `location`."""

    __tablename__ = "conversation_files"

    file_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    conversation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("conversations.conversation_id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # The object's key, relative to ARCHIVE_URL, like Conversation.s3_file_location.
    location: Mapped[str] = mapped_column(String(1024))
    # What the file costs in the context budget when a turn sends it (files.py says how it is estimated).
    token_estimate: Mapped[int] = mapped_column(Integer)
    uploaded_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.key_id"))
    uploaded_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_conversation_files_conversation", "conversation_id", "uploaded_at", "file_id"),)


class Transition(Base):
    """One move of a conversation's handoff state or dialog stage: who, when, why."""

    __tablename__ = "conversation_transitions"

    transition_id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    conversation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("conversations.conversation_id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # "handoff" or "stage"
    from_state: Mapped[str | None] = mapped_column(String(64))
    to_state: Mapped[str | None] = mapped_column(String(64))
    # The key that made it, or None for an automatic trigger (`actor` says which).
    key_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.key_id"))
    actor: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_conversation_transitions_conversation", "conversation_id", "transition_id"),)


class KnowledgeDocument(Base):
    """A document of the knowledge base; its text lives in its passages."""

    __tablename__ = "knowledge_documents"

    document_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    title: Mapped[str] = mapped_column(String(300))
    source_url: Mapped[str | None] = mapped_column(String(2048))
    content_type: Mapped[str] = mapped_column(String(32))  # text, markdown, html or pdf
    # Of the extracted text: the same document is loaded once.
    sha256: Mapped[str] = mapped_column(String(64))
    char_count: Mapped[int] = mapped_column(Integer)
    passage_count: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.key_id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        Index("ix_knowledge_documents_created", "created_at", "document_id"),
        Index("ix_knowledge_documents_sha256", "sha256", unique=True),
    )


class KnowledgePassage(Base):
    """A piece of a document, the unit that is searched and cited.

    Its full-text index is made by migration 0008 only and not described
    here: a `search_vector` tsvector column with a GIN index on PostgreSQL,
    the FTS5 table `knowledge_fts` on SQLite.
    """

    __tablename__ = "knowledge_passages"

    passage_id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    document_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("knowledge_documents.document_id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)

    __table_args__ = (Index("ix_knowledge_passages_document", "document_id", "position"),)


class AuditEvent(Base):
    """Who read what, when: every staff read of a conversation or search."""

    __tablename__ = "audit_events"

    event_id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    # None for actions taken from the command line (delete-user), not with a key.
    key_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.key_id"))
    action: Mapped[str] = mapped_column(String(32))
    conversation_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    detail: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        Index("ix_audit_events_conversation", "conversation_id", "created_at"),
        Index("ix_audit_events_key", "key_id", "created_at"),
        # Retention deletes by age (audit-prune).
        Index("ix_audit_events_created", "created_at"),
    )


class IdempotencyRecord(Base):
    """A POST sent with an Idempotency-Key, and its response once it succeeded."""

    __tablename__ = "idempotency_keys"

    # The lineage_id of the key that sent it: a retry sent with the key it was rotated to finds it,
    # also while the first request still runs.
    key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.key_id", ondelete="CASCADE"), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # While the first request runs, retries get 409 until then; a request
    # whose worker died is taken over after it.
    locked_until: Mapped[datetime]
    expires_at: Mapped[datetime]

    __table_args__ = (Index("ix_idempotency_keys_expires_at", "expires_at"),)


# ---------------------------------------------------------------- engine


def make_engine(
    url: str,
    pool_size: int = default("DB_POOL_SIZE"),
    max_overflow: int = default("DB_MAX_OVERFLOW"),
    pool_timeout: float = default("DB_POOL_TIMEOUT"),
) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, json_deserializer=loads_json)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # A turn holds a connection only for its two short statements, never
    # during the model call, so a small pool serves many turns in flight.
    parsed = make_url(url)
    connect_args = {}
    if parsed.get_backend_name() == "postgresql":
        connect_args = {name: value for name, value in CONNECT_PARAMETERS.items() if name not in parsed.query}
    engine = create_engine(
        url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=pool_timeout, json_deserializer=loads_json,
        connect_args=connect_args,
    )
    event.listen(engine.pool, "connect", _note_idle_since)
    event.listen(engine.pool, "checkin", _note_idle_since)
    event.listen(engine.pool, "checkout", functools.partial(_ping_if_idle, engine.dialect))
    return engine


def loads_json(text: str | bytes) -> Any:
    """JSON columns, decoded by orjson: several times faster than json.

    orjson reads an integer beyond 64 bits as a float, so a text with a run
    of 20 digits (any such integer has one) goes to json, as does what
    orjson refuses (NaN, for one).
    """
    if (_TWENTY_DIGITS if isinstance(text, str) else _TWENTY_DIGITS_BYTES).search(text):
        return json.loads(text)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _note_idle_since(_dbapi_connection: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dialect: Any, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Replace a pooled connection that a database restart closed while it sat idle.

    Only connections idle for PING_IDLE_SECONDS are pinged, so under load
    none is (SQLAlchemy's `pool_pre_ping` pings on every checkout: two of a
    turn's four round trips). A connection closed within that time fails on
    its first statement: SQLAlchemy then replaces every older connection of
    the pool, the request answers 503, and a turn's claim is retried once on
    a fresh connection (`claim_turn`).
    """
    if time.monotonic() - record.info.get("idle_since", 0.0) < PING_IDLE_SECONDS:
        return
    try:
        dialect.do_ping(dbapi_connection)
    except dialect.loaded_dbapi.Error as exc:
        if dialect.is_disconnect(exc, dbapi_connection, None):
            raise DisconnectionError("the pooled connection was closed") from exc  # the pool connects anew
        raise


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def init_app(app: Flask) -> None:
    """Create the engine from config, register the session teardown and CLI."""
    config = app.config
    engine = make_engine(config["DATABASE_URL"], config["DB_POOL_SIZE"], config["DB_MAX_OVERFLOW"], config["DB_POOL_TIMEOUT"])
    app.extensions["parley.engine"] = engine
    app.extensions["parley.sessions"] = sessionmaker(engine, expire_on_commit=False)
    app.teardown_appcontext(_close_session)
    app.cli.add_command(db_upgrade_command)
    app.cli.add_command(db_check_command)


def get_engine() -> Engine:
    return current_app.extensions["parley.engine"]


def get_session() -> Session:
    """The session of the current request (or CLI command), opened on first use.

    Until the schema has once been seen at the latest revision, each first
    use checks it, so that an unmigrated database is reported as such
    (`DatabaseNotMigrated`) rather than as a failing query.
    """
    if "db_session" not in g:
        if not current_app.extensions.get("parley.schema_current"):
            require_current_schema(get_engine())
            current_app.extensions["parley.schema_current"] = True
        g.db_session = current_app.extensions["parley.sessions"]()
    return g.db_session


def rollback_session() -> None:
    """Roll back the current request's session, if it has one (opening it may be what failed)."""
    session = g.get("db_session")
    if session is not None:
        session.rollback()


def _close_session(_exc: BaseException | None = None) -> None:
    session = g.pop("db_session", None)
    if session is None:
        return
    try:
        session.close()
    except SQLAlchemyError as exc:  # the connection broke after the request's last statement: its answer stands
        session.invalidate()
        log.warning("a database connection was lost before its session closed: %s", exc.__class__.__name__)


def ping() -> None:
    with get_engine().connect() as connection:
        connection.execute(text("SELECT 1"))


# ---------------------------------------------------------------- migrations


def alembic_config(url: str) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


class DatabaseNotMigrated(click.ClickException):
    """The schema is not at the revision this code needs.

    A ClickException, so that every CLI command reports it in one line; the
    API answers it with 503 `database_not_migrated`.
    """

    def __init__(self, current: tuple[str, ...], expected: tuple[str, ...]) -> None:
        have, need = ", ".join(current) or "none (empty database)", ", ".join(expected)
        if set(current) - set(_known_revisions()):
            message = (f"the database schema is at revision {have}, which this release does not know "
                       f"(it needs {need}); run the release that migrated it")
        else:
            message = f"the database schema is at revision {have} but this release needs {need}: run `parley db-upgrade`"
        super().__init__(message)


@functools.cache
def _script_directory() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS_DIR))


def head_revisions() -> tuple[str, ...]:
    return tuple(sorted(_script_directory().get_heads()))


def _known_revisions() -> set[str]:
    return {script.revision for script in _script_directory().walk_revisions()}


def current_revisions(engine: Engine) -> tuple[str, ...]:
    with engine.connect() as connection:
        return tuple(sorted(MigrationContext.configure(connection).get_current_heads()))


def require_current_schema(engine: Engine) -> None:
    """Raise `DatabaseNotMigrated` unless the schema is at the latest revision."""
    current = current_revisions(engine)
    if current != head_revisions():
        raise DatabaseNotMigrated(current, head_revisions())


def upgrade_database(url: str, revision: str = "head") -> list[str]:
    """Apply the pending revisions; returns them, oldest first, as `id (description)`."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        before = current_revisions(engine)
        alembic_command.upgrade(alembic_config(url), revision)
        after = current_revisions(engine)
    finally:
        engine.dispose()
    applied = []
    for head in after:
        for script in _script_directory().iterate_revisions(head, before[0] if before else "base"):
            if script.revision not in before:
                applied.append(f"{script.revision} ({script.doc})")
    return applied[::-1]


def upgrade_embedded_database(url: str) -> None:
    """Upgrade a SQLite database, one process at a time (gunicorn starts several)."""
    lock_path = Path(url.removeprefix("sqlite:///") + ".migrate.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        upgrade_database(url)


def check_database(url: str) -> None:
    """Raise if the models and the applied migrations disagree."""
    alembic_command.check(alembic_config(url))


@click.command("db-upgrade")
@with_appcontext
def db_upgrade_command() -> None:
    """Apply all database migrations."""
    applied = upgrade_database(current_app.config["DATABASE_URL"])
    head = ", ".join(head_revisions())
    if applied:
        click.echo(f"Applied {len(applied)} revision(s): " + "; ".join(applied) + f". Database is now at {head}.")
    else:
        click.echo(f"Database is up to date (revision {head}); nothing applied.")


@click.command("db-check")
@with_appcontext
def db_check_command() -> None:
    """Fail if the models and the migrations disagree."""
    require_current_schema(get_engine())  # alembic's own complaint would be a traceback
    try:
        check_database(current_app.config["DATABASE_URL"])
    except AlembicCommandError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("Models and migrations agree.")


# ---------------------------------------------------------------- queries


def get_conversation(session: Session, conversation_id: uuid.UUID) -> Conversation | None:
    return session.get(Conversation, conversation_id)


def lock_conversation(session: Session, conversation_id: uuid.UUID) -> Conversation | None:
    """Load a conversation holding a write lock on it until commit or rollback.

    A no-op UPDATE rather than SELECT ... FOR UPDATE, because SQLite ignores
    FOR UPDATE; the UPDATE takes PostgreSQL's row lock and SQLite's write lock.
    """
    session.execute(
        update(Conversation)
        .where(Conversation.conversation_id == conversation_id)
        .values(updated_at=Conversation.updated_at)
        .execution_options(synchronize_session=False)
    )
    return session.get(Conversation, conversation_id, populate_existing=True)


# The turn's statements, built once: a turn runs them on every request, and
# a prebuilt statement skips SQLAlchemy's construction and cache-key work
# (measured: about a third of the service's CPU per turn). Core statements
# on the tables, because the turn needs none of the ORM's bookkeeping.
_conversations = Conversation.__table__
_messages = Message.__table__
_CLAIM_TURN = (
    update(_conversations)
    .where(
        _conversations.c.conversation_id == bindparam("cid"),
        _conversations.c.status == Status.ACTIVE.value,
        or_(
            _conversations.c.turn_lease_expires_at.is_(None),
            _conversations.c.turn_lease_expires_at <= bindparam("now"),
            _conversations.c.turn_lease_id == bindparam("lease"),  # a retried claim (claim_turn)
        ),
    )
    .values(turn_lease_id=bindparam("lease"), turn_lease_expires_at=bindparam("lease_until"))
    .returning(
        _conversations.c.system_prompt,
        _conversations.c.message_count,
        _conversations.c.token_count,
        _conversations.c.handoff,
        _conversations.c.user_message_count,
        _conversations.c.variables,
        _conversations.c.knowledge,
    )
)
_CLAIM_OWN_TURN = _CLAIM_TURN.where(_conversations.c.owner_key_id == bindparam("owner"))
_FINISH_TURN = (
    update(_conversations)
    .where(
        _conversations.c.conversation_id == bindparam("cid"),
        _conversations.c.turn_lease_id == bindparam("lease"),
        _conversations.c.status == Status.ACTIVE.value,
    )
    .values(
        message_count=_conversations.c.message_count + bindparam("add_messages"),
        token_count=_conversations.c.token_count + bindparam("add_tokens"),
        input_tokens=_conversations.c.input_tokens + bindparam("add_input"),
        output_tokens=_conversations.c.output_tokens + bindparam("add_output"),
        user_message_count=_conversations.c.user_message_count + bindparam("add_user"),
        updated_at=bindparam("now"),
        turn_lease_id=None,
        turn_lease_expires_at=None,
    )
    .returning(_conversations.c.message_count)
)
_RELEASE_TURN = (
    update(_conversations)
    .where(_conversations.c.conversation_id == bindparam("cid"), _conversations.c.turn_lease_id == bindparam("lease"))
    .values(turn_lease_id=None, turn_lease_expires_at=None)
)
_TAIL = (
    select(_messages.c.seq, _messages.c.role, _messages.c.content, _messages.c.token_count)
    .where(_messages.c.conversation_id == bindparam("cid"))
    .order_by(_messages.c.seq.desc())
    .limit(bindparam("page", type_=Integer))
)
_TAIL_BEFORE = _TAIL.where(_messages.c.seq < bindparam("before"))


def _with_tail(claim: Any) -> Any:
    """PostgreSQL: `claim` (an UPDATE ... RETURNING) and the first page of the tail, in one statement.

    One row, the claimed columns and `tail`: up to a page of (seq, role,
    content, token_count) after seq `after`, newest first, as one JSON
    array (decoded once, not row by row). The page is sized as `_page_size`
    sizes it, from the claimed row; no row when the claim fails.
    """
    claimed = claim.cte("claimed")
    divide = operators.custom_op("/", return_type=Integer)  # PostgreSQL's integer division, as `//` in Python
    average = func.greatest(divide(claimed.c.token_count, func.greatest(claimed.c.message_count, 1)), 1)
    page = select(func.greatest(divide(bindparam("budget", type_=Integer), average) + 2, MIN_TAIL_PAGE)).scalar_subquery()
    # Only the messages after `after`: the seq a worker's cached tail ends at (context_cache.py), or 0.
    newest = _TAIL.where(_messages.c.seq > bindparam("after")).limit(page).subquery("newest")
    row = func.json_build_array(newest.c.seq, newest.c.role, newest.c.content, newest.c.token_count)
    # As text, not json: its only numbers are seqs and token counts (64-bit at
    # most), so `claim_turn` decodes it with orjson alone, without the scan
    # `loads_json` makes for longer integers (a tenth of a turn's CPU).
    tail = cast(select(func.json_agg(aggregate_order_by(row, newest.c.seq.desc()))).scalar_subquery(), Text)
    # The claim commits without waiting for its WAL flush (for this statement's
    # transaction only): a lease lost in a database crash frees the conversation
    # early, and the turn's store, which does wait, then finds it gone (409).
    asynchronous = func.set_config("synchronous_commit", "off", True)
    return select(claimed, tail.label("tail"), asynchronous.label("asynchronous_commit"))


_CLAIM_WITH_TAIL_PG = _with_tail(_CLAIM_TURN)
_CLAIM_OWN_WITH_TAIL_PG = _with_tail(_CLAIM_OWN_TURN)
_MESSAGE_COLUMNS = ("seq", "role", "content", "created_at", "token_count", "usage", "incomplete", "file_ids")


# Executed with a list of rows: with RETURNING, SQLAlchemy sends them as one
# multi-row INSERT ("insertmanyvalues") from a cached compilation. A prebuilt
# multi-row VALUES has no cache key and was compiled on every turn; psycopg's
# executemany pipeline (without RETURNING) cost more CPU than this.
_INSERT_MESSAGES = insert(_messages).returning(_messages.c.seq)


def claim_turn(
    session: Session,
    conversation_id: uuid.UUID,
    owner_key_id: uuid.UUID | None,
    lease_id: uuid.UUID,
    lease_seconds: float,
    token_budget: int,
    max_messages: int | None = None,
    tails: TailCache | None = None,
) -> tuple[Any, list[MemoryMessage]] | None:
    """Take the turn lease of an active conversation and read its context's tail.

    The claiming UPDATE checks ownership (when `owner_key_id` is given),
    status and that no live lease is held. Returns the columns a turn needs
    and the tail (see `load_context_tail`), or None when any check fails.

    On PostgreSQL the claim and the tail's first page are one statement (see
    `_CLAIM_WITH_TAIL_PG`); on SQLite, two. On PostgreSQL, with `tails`,
    the statement reads only the messages after the cached tail's end, and
    the tail read is cached for the conversation's next turn.
    """
    now = utcnow()
    parameters = {"cid": conversation_id, "now": now, "lease": lease_id, "lease_until": now + timedelta(seconds=lease_seconds)}
    if owner_key_id is not None:
        parameters["owner"] = owner_key_id
    if session.get_bind().dialect.name != "postgresql":
        claimed = session.execute(_CLAIM_TURN if owner_key_id is None else _CLAIM_OWN_TURN, parameters).one_or_none()
        if claimed is None:
            return None
        return claimed, load_context_tail(session, conversation_id, claimed.message_count, claimed.token_count,
                                          token_budget, max_messages)
    statement = _CLAIM_WITH_TAIL_PG if owner_key_id is None else _CLAIM_OWN_WITH_TAIL_PG
    cached = tails.get(conversation_id, token_budget, max_messages) if tails is not None else None
    parameters["budget"], parameters["after"] = token_budget, cached.last_seq if cached else 0
    alone = session.connection().get_execution_options().get("isolation_level") == "AUTOCOMMIT"
    try:
        claimed = _execute_on_driver(session, statement, parameters)
    except DBAPIError as exc:
        if not (alone and exc.connection_invalidated):
            raise
        # The pooled connection was closed (a database restart): once more on a
        # fresh one. The claim may have committed before the connection broke;
        # it matches its own lease, so claiming again is safe. (In autocommit,
        # nothing else of the request is rolled back.)
        session.rollback()
        commit_each_statement(session)
        claimed = _execute_on_driver(session, statement, parameters)
    if not claimed:
        return None
    claimed = claimed[0]
    rows = orjson.loads(claimed.tail) if claimed.tail else []
    page_size = _page_size(claimed.message_count, claimed.token_count, token_budget)
    # The tail was read with the statement's snapshot, taken before the UPDATE
    # waited for any turn that held the row: if that turn stored messages, the
    # newest seq read falls short of message_count. Then read it again.
    budgets = token_budget, max_messages
    if (rows[0][0] if rows else cached.last_seq if cached else 0) != claimed.message_count:
        tail = load_context_tail(session, conversation_id, claimed.message_count, claimed.token_count, *budgets)
    elif cached is not None and len(rows) < page_size:  # all that came after the cached tail
        tail = cached.extended([MemoryMessage(role, content, count, seq) for seq, role, content, count in reversed(rows)])
        budgets = cached.token_budget, cached.max_messages
    else:  # a page as full as an unfiltered read's first page
        tail = _walk_back(session, conversation_id, rows, page_size, *budgets)
    if tails is not None and (tail or not claimed.message_count):
        # Up to the tail's own end: a staff message stored since the claim may be in a tail read again.
        tails.put(conversation_id, CachedTail(tuple(tail), tail[-1].seq if tail else 0, *budgets))
    return claimed, tail


def finish_turn(
    session: Session, conversation_id: uuid.UUID, lease_id: uuid.UUID, messages: list[MemoryMessage], usage: dict[str, int]
) -> int | None:
    """Store a turn's messages and release its lease; the caller commits.

    The database assigns the sequence numbers: one UPDATE claims them while
    checking that the lease is still ours, then one INSERT writes the
    messages (on PostgreSQL, both in one statement). Returns the last seq,
    or None when the lease was lost.
    """
    now = utcnow()
    parameters = {
        "cid": conversation_id,
        "lease": lease_id,
        "add_messages": len(messages),
        "add_tokens": sum(m.token_count for m in messages),
        "add_input": usage.get("input_tokens", 0),
        "add_output": usage.get("output_tokens", 0),
        "add_user": sum(m.role == USER for m in messages),
        "now": now,
    }
    if session.get_bind().dialect.name == "postgresql":
        for n, message in enumerate(messages):
            message.created_at = message.created_at or now
            parameters |= {f"{column}_{n}": getattr(message, column) for column in _STORED_COLUMNS}
        statement = _finish_and_store_pg(len(messages))
        alone = session.connection().get_execution_options().get("isolation_level") == "AUTOCOMMIT"
        try:
            seqs = [row.seq for row in _execute_on_driver(session, statement, parameters)]
        except DBAPIError as exc:
            if not (alone and exc.connection_invalidated):
                raise
            # The connection broke (a database restart, a network cut) after the statement was
            # sent: it may have committed all the same, and a 503 would make the client send the
            # turn again. Once more on a fresh connection: it stores the turn if the first did not
            # (the lease is still ours); if it finds the lease released, look for the messages.
            session.rollback()
            commit_each_statement(session)
            seqs = [row.seq for row in _execute_on_driver(session, statement, parameters)] or _stored_seqs(
                session, conversation_id, messages
            )
        if not seqs:
            return None
        for message, seq in zip(messages, sorted(seqs), strict=True):
            message.seq = seq
        return max(seqs)
    last_seq = session.execute(_FINISH_TURN, parameters).scalar_one_or_none()
    if last_seq is None:
        return None
    _insert_numbered(session, conversation_id, messages, last_seq, now)
    return last_seq


_STORED_COLUMNS = ("role", "content", "created_at", "token_count", "usage", "incomplete", "file_ids")
_FIND_STORED = select(_messages.c.seq).where(
    _messages.c.conversation_id == bindparam("cid"),
    _messages.c.role == bindparam("role"),
    _messages.c.created_at == bindparam("created_at"),
    _messages.c.content == bindparam("content"),
)


def _stored_seqs(session: Session, conversation_id: uuid.UUID, messages: list[MemoryMessage]) -> list[int]:
    """The seqs `messages` were stored at by a store whose answer was lost, or none when they were not.

    A turn's messages are stored together at consecutive seqs; the first is
    known by its own role, time and words.
    """
    first = messages[0]
    found = session.execute(
        _FIND_STORED,
        {"cid": conversation_id, "role": first.role, "created_at": first.created_at, "content": first.content},
    ).scalars().first()
    return [] if found is None else [found + n for n in range(len(messages))]


@functools.cache
def _finish_and_store_pg(count: int) -> Any:
    """PostgreSQL: `_FINISH_TURN` and the INSERT of its `count` messages, in one statement.

    The messages take the seqs up to the message_count the UPDATE returns;
    when the lease is lost the UPDATE returns no row and nothing is inserted.
    """
    finished = _FINISH_TURN.cte("finished")
    rows = [
        select(
            bindparam("cid", type_=Uuid),
            finished.c.message_count - (count - 1 - n),
            *(bindparam(f"{column}_{n}", type_=_messages.c[column].type) for column in _STORED_COLUMNS),
        )
        for n in range(count)
    ]
    columns = ["conversation_id", "seq", *_STORED_COLUMNS]
    return insert(_messages).from_select(columns, union_all(*rows)).returning(_messages.c.seq)


@dataclass(frozen=True)
class _DriverStatement:
    sql: str  # in psycopg's parameter style
    constants: dict[str, Any]  # the values of the parameters the statement itself fixes
    processors: dict[str, Callable[[Any], Any]]  # by parameter: its type's conversion (JSON, timestamps)


@functools.lru_cache(maxsize=64)
def _for_driver(statement: Any, dialect: Dialect) -> _DriverStatement:
    compiled = statement.compile(dialect=dialect)
    constants = {name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required}
    processors = {
        name: processor
        for name, bind in compiled.binds.items()
        if (processor := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
    }
    return _DriverStatement(compiled.string, constants, processors)


def _execute_on_driver(session: Session, statement: Any, parameters: dict[str, Any]) -> list[Any]:
    """PostgreSQL: run a prebuilt statement on the session's psycopg connection; its rows as named tuples.

    For the turn's two statements (`claim_turn`, `finish_turn`): SQLAlchemy's
    execution layer (cache key, parameter and result objects) cost as much
    CPU as psycopg's own work on them; without it the hot path served 6 to
    21% more turns/s (bench/hot_path.py, README). The statement is compiled
    once, its parameters get the conversions their types declare, and its
    result columns need none on psycopg (JSON is decoded by the
    connection's own `loads_json`).
    A driver error goes through SQLAlchemy's own handling, as in its
    `execute`: wrapped as `DBAPIError`, and a broken connection invalidated
    with the pool's older ones.
    """
    connection = session.connection()
    prepared = _for_driver(statement, connection.dialect)
    values = prepared.constants | parameters
    for name, process in prepared.processors.items():
        values[name] = process(values[name])
    cursor = connection.connection.driver_connection.cursor(row_factory=namedtuple_row)
    try:
        cursor.execute(prepared.sql, values)
        return cursor.fetchall()
    except psycopg.Error as exc:
        # SQLAlchemy's own handler, as its `execute` calls it (a private method of
        # the pinned release; the database-restart tests in test_database.py and
        # test_observability.py fail without it). It raises.
        connection._handle_dbapi_exception(exc, prepared.sql, values, cursor, None)
        raise  # not reached
    finally:
        cursor.close()


def commit_each_statement(session: Session) -> None:
    """On PostgreSQL, run the session's next transaction in autocommit mode.

    For work that is one statement, such as a turn's claim or its store
    (`claim_turn`, `finish_turn`): each statement commits on its own, which
    saves the BEGIN and COMMIT round trips. Does nothing on SQLite, where
    those are more than one statement, or when a transaction is open.
    """
    if not session.in_transaction() and session.get_bind().dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


_APPEND = (
    update(_conversations)
    .where(_conversations.c.conversation_id == bindparam("cid"), _conversations.c.status == Status.ACTIVE.value)
    .values(
        message_count=_conversations.c.message_count + bindparam("add_messages"),
        token_count=_conversations.c.token_count + bindparam("add_tokens"),
        updated_at=bindparam("now"),
    )
    .returning(_conversations.c.message_count)
)


def append_messages(session: Session, conversation_id: uuid.UUID, messages: list[MemoryMessage]) -> int | None:
    """Store messages outside a turn (a staff member's); the caller commits.

    Numbered by the same increment as a turn's, so the two never collide.
    Returns the last seq, or None when the conversation is not active.
    """
    now = utcnow()
    parameters = {"cid": conversation_id, "now": now, "add_messages": len(messages),
                  "add_tokens": sum(m.token_count for m in messages)}
    last_seq = session.execute(_APPEND, parameters).scalar_one_or_none()
    if last_seq is not None:
        _insert_numbered(session, conversation_id, messages, last_seq, now)
    return last_seq


def _insert_numbered(
    session: Session, conversation_id: uuid.UUID, messages: list[MemoryMessage], last_seq: int, now: datetime
) -> None:
    rows = []
    for n, message in enumerate(messages):
        message.seq = last_seq - len(messages) + 1 + n
        message.created_at = message.created_at or now
        rows.append({"conversation_id": conversation_id} | {column: getattr(message, column) for column in _MESSAGE_COLUMNS})
    session.execute(_INSERT_MESSAGES, rows)


def release_turn(session: Session, conversation_id: uuid.UUID, lease_id: uuid.UUID) -> None:
    """Give the lease back without storing anything (the turn failed); the caller commits."""
    session.execute(_RELEASE_TURN, {"cid": conversation_id, "lease": lease_id})


def load_context_tail(
    session: Session,
    conversation_id: uuid.UUID,
    message_count: int,
    token_count: int,
    token_budget: int,
    max_messages: int | None = None,
) -> list[MemoryMessage]:
    """The newest messages, oldest first, until they fill `token_budget`.

    Walks back over the (conversation_id, seq) primary key, so the cost
    depends on the budget, never on the length of the log. The first page is
    sized from the conversation's average message size, so one query
    usually suffices. Only the columns the context needs are read.
    """
    page_size = _page_size(message_count, token_count, token_budget)
    page = session.execute(_TAIL, {"cid": conversation_id, "page": page_size}).all()
    return _walk_back(session, conversation_id, page, page_size, token_budget, max_messages)


def _page_size(message_count: int, token_count: int, token_budget: int) -> int:
    average = max(token_count // max(message_count, 1), 1)
    return max(token_budget // average + 2, MIN_TAIL_PAGE)


def _walk_back(
    session: Session, conversation_id: uuid.UUID, page: list, page_size: int, token_budget: int, max_messages: int | None
) -> list[MemoryMessage]:
    """The tail from its first page of (seq, role, content, token_count) rows, newest first, reading on as needed."""
    messages: list[MemoryMessage] = []
    tokens = 0
    while True:
        for seq, role, content, count in page:
            messages.append(MemoryMessage(role, content, count, seq))
            tokens += count
        full = tokens >= token_budget or (max_messages is not None and len(messages) >= max_messages)
        if len(page) < page_size or full:
            break
        page = session.execute(_TAIL_BEFORE, {"cid": conversation_id, "page": page_size, "before": messages[-1].seq}).all()
    messages.reverse()
    return messages


def list_messages(session: Session, conversation_id: uuid.UUID, after_seq: int | None = None) -> list[Message]:
    """The log in order; with `after_seq`, only the newer messages (a range scan of the primary key)."""
    query = select(Message).where(Message.conversation_id == conversation_id)
    if after_seq is not None:
        query = query.where(Message.seq > after_seq)
    return list(session.scalars(query.order_by(Message.seq)))


_CUSTOM_PLANS = text("SET LOCAL plan_cache_mode = force_custom_plan")


def plan_for_these_values(session: Session) -> None:
    """Have PostgreSQL plan this transaction's statements for their own values.

    psycopg prepares a statement it has run 5 times, and PostgreSQL may then
    reuse one generic plan; for `name ILIKE $1` that plan cannot use the
    trigram index (measured: 10x slower). Searches call this; the turn's
    statements keep their cached plans.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_CUSTOM_PLANS)


def find_conversations(
    session: Session, filters: dict[str, Any], after: tuple[datetime, uuid.UUID] | None, limit: int
) -> list[Conversation]:
    """Conversations matching `filters`, newest first, after a cursor position.

    Ordered by (created_at, conversation_id) so that a page boundary stays
    put while new conversations arrive: they sort before every cursor.
    """
    plan_for_these_values(session)
    query = select(Conversation)
    if filters.get("owner_key_id"):
        query = query.where(Conversation.owner_key_id == filters["owner_key_id"])
    if filters.get("user_id"):
        query = query.where(Conversation.user_id == filters["user_id"])
    if filters.get("status"):
        query = query.where(Conversation.status == filters["status"])
    if filters.get("created_from"):
        query = query.where(Conversation.created_at >= filters["created_from"])
    if filters.get("created_to"):
        query = query.where(Conversation.created_at < filters["created_to"])
    if filters.get("ended_from"):
        query = query.where(Conversation.ended_at >= filters["ended_from"])
    if filters.get("ended_to"):
        query = query.where(Conversation.ended_at < filters["ended_to"])
    if filters.get("stage"):
        query = query.where(Conversation.stage == filters["stage"])
    if filters.get("handoff"):
        query = query.where(Conversation.handoff == filters["handoff"])
    if filters.get("name"):
        pattern = "%" + filters["name"].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        query = query.where(Conversation.conversation_name.ilike(pattern, escape="\\"))
    position = None if after is None else tuple_(literal(after[0], UTCDateTime()), literal(after[1], Uuid()))
    if filters.get("handoff"):
        # A queue: the conversation waiting longest in that state first.
        if position is not None:
            query = query.where(tuple_(Conversation.handoff_since, Conversation.conversation_id) > position)
        order = (Conversation.handoff_since.asc(), Conversation.conversation_id.asc())
        return list(session.scalars(query.order_by(*order).limit(limit)))
    if position is not None:
        query = query.where(tuple_(Conversation.created_at, Conversation.conversation_id) < position)
    order = (Conversation.created_at.desc(), Conversation.conversation_id.desc())
    return list(session.scalars(query.order_by(*order).limit(limit)))


def record_audit(
    session: Session,
    key: ApiKey,
    action: str,
    conversation_id: uuid.UUID | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Write an audit event and commit it, before the audited data is returned."""
    session.add(AuditEvent(key_id=key.key_id, action=action, conversation_id=conversation_id, detail=detail))
    session.commit()


def add_transition(
    conversation: Conversation, kind: str, to_state: str | None, key: Any | None, actor: str, reason: str | None
) -> None:
    """Move the conversation's handoff state (only as HANDOFF_TRANSITIONS allows) or stage,
    and keep the move; the caller commits."""
    from_state = conversation.handoff if kind == "handoff" else conversation.stage
    if kind == "handoff":
        check_handoff(from_state, to_state)
    now = utcnow()
    if kind == "handoff":
        conversation.handoff = to_state
        conversation.handoff_since = now
    else:
        conversation.stage = to_state
    conversation.updated_at = now
    conversation.transitions.append(
        Transition(kind=kind, from_state=from_state, to_state=to_state, key_id=key.key_id if key else None,
                   actor=actor, reason=reason, created_at=now)
    )


def add_audit(
    session: Session, key: Any, action: str, conversation_id: uuid.UUID | None = None, detail: dict[str, Any] | None = None
) -> None:
    """An audit event committed with the staff action it records (not before, as a read's is)."""
    session.add(AuditEvent(key_id=key.key_id, action=action, conversation_id=conversation_id, detail=detail))
