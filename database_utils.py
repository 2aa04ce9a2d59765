"""Database models, engine, per-request sessions, queries and the schema CLI.

The same models run on PostgreSQL (production) and SQLite (the embedded
default). The schema is made only by the Alembic revisions in migrations/.
"""
from __future__ import annotations

import fcntl
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from flask import Flask, current_app, g
from flask.cli import with_appcontext
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    Row,
    String,
    Text,
    TypeDecorator,
    Uuid,
    create_engine,
    event,
    literal,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Fewest rows fetched per step when walking back from the newest message.
MIN_TAIL_PAGE = 16

ACTIVE = "active"
ENDING = "ending"  # frozen, being archived: no turns, live messages still readable
ENDED = "ended"

CLIENT = "client"
STAFF = "staff"
ADMIN = "admin"
ROLES = (CLIENT, STAFF, ADMIN)


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
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


class Conversation(Base):
    __tablename__ = "conversations"

    conversation_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner_key_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.key_id", name="fk_conversations_owner_key_id"))
    user_id: Mapped[str] = mapped_column(String(128))
    conversation_name: Mapped[str | None] = mapped_column(String(200))
    system_prompt: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=ACTIVE)
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

    # Staff search reads newest first with a (created_at, conversation_id)
    # cursor; each filter has an index that yields rows in that order.
    __table_args__ = (
        Index("ix_conversations_created", "created_at", "conversation_id"),
        Index("ix_conversations_user_created", "user_id", "created_at", "conversation_id"),
        Index("ix_conversations_status_created", "status", "created_at", "conversation_id"),
        Index("ix_conversations_ended_at", "ended_at"),
        Index("ix_conversations_status_updated", "status", "updated_at"),
        Index("ix_conversations_owner", "owner_key_id"),
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
    )


# ---------------------------------------------------------------- engine


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pre_ping replaces connections that a database restart has closed.
    # psycopg prepares statements it has run 5 times; a generic plan for
    # `name ILIKE $1` cannot use the trigram index (measured: 10x slower
    # staff search), so every execution gets a plan for its own values.
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=10,
        connect_args={"options": "-c plan_cache_mode=force_custom_plan"},
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def init_app(app: Flask) -> None:
    """Create the engine from config, register the session teardown and CLI."""
    engine = make_engine(app.config["DATABASE_URL"])
    app.extensions["parley.engine"] = engine
    app.extensions["parley.sessions"] = sessionmaker(engine, expire_on_commit=False)
    app.teardown_appcontext(_close_session)
    app.cli.add_command(db_upgrade_command)
    app.cli.add_command(db_check_command)


def get_engine() -> Engine:
    return current_app.extensions["parley.engine"]


def get_session() -> Session:
    """The session of the current request (or CLI command), opened on first use."""
    if "db_session" not in g:
        g.db_session = current_app.extensions["parley.sessions"]()
    return g.db_session


def _close_session(_exc: BaseException | None = None) -> None:
    session = g.pop("db_session", None)
    if session is not None:
        session.close()


def ping() -> None:
    with get_engine().connect() as connection:
        connection.execute(text("SELECT 1"))


# ---------------------------------------------------------------- migrations


def alembic_config(url: str) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_database(url: str, revision: str = "head") -> None:
    alembic_command.upgrade(alembic_config(url), revision)


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
    upgrade_database(current_app.config["DATABASE_URL"])
    click.echo("Database is up to date.")


@click.command("db-check")
@with_appcontext
def db_check_command() -> None:
    """Fail if the models and the migrations disagree."""
    check_database(current_app.config["DATABASE_URL"])
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


def load_context_tail(
    session: Session, conversation: Conversation, token_budget: int, max_messages: int | None = None
) -> list[Row]:
    """The newest messages, oldest first, until they fill `token_budget`.

    Walks back over the (conversation_id, seq) primary key, so the cost
    depends on the budget, never on the length of the log. The first page is
    sized from the conversation's average message size, so one query
    usually suffices. Rows carry the columns of `Message`, not ORM objects,
    which keeps the per-row cost low.
    """
    average = max(conversation.token_count // max(conversation.message_count, 1), 1)
    page_size = max(token_budget // average + 2, MIN_TAIL_PAGE)
    columns = select(Message.seq, Message.role, Message.content, Message.created_at, Message.token_count, Message.usage)
    rows: list[Row] = []
    tokens = 0
    before: int | None = None
    while tokens < token_budget and (max_messages is None or len(rows) < max_messages):
        query = columns.where(Message.conversation_id == conversation.conversation_id)
        if before is not None:
            query = query.where(Message.seq < before)
        page = session.execute(query.order_by(Message.seq.desc()).limit(page_size)).all()
        rows.extend(page)
        tokens += sum(row.token_count for row in page)
        if len(page) < page_size:
            break
        before = page[-1].seq
    rows.reverse()
    return rows


def list_messages(session: Session, conversation_id: uuid.UUID) -> list[Message]:
    query = select(Message).where(Message.conversation_id == conversation_id).order_by(Message.seq)
    return list(session.scalars(query))


def reserve_seqs(session: Session, conversation_id: uuid.UUID, count: int, tokens: int, usage: dict[str, int]) -> int | None:
    """Atomically claim the next `count` sequence numbers of an active conversation.

    Returns the last claimed seq, or None when the conversation is not active.
    The single UPDATE also row-locks the conversation until commit, so
    concurrent turns and `end_chat` are serialized on PostgreSQL.
    """
    result = session.execute(
        update(Conversation)
        .where(Conversation.conversation_id == conversation_id, Conversation.status == ACTIVE)
        .values(
            message_count=Conversation.message_count + count,
            token_count=Conversation.token_count + tokens,
            input_tokens=Conversation.input_tokens + usage.get("input_tokens", 0),
            output_tokens=Conversation.output_tokens + usage.get("output_tokens", 0),
            updated_at=utcnow(),
        )
        .returning(Conversation.message_count)
    )
    return result.scalar_one_or_none()


def find_conversations(
    session: Session, filters: dict[str, Any], after: tuple[datetime, uuid.UUID] | None, limit: int
) -> list[Conversation]:
    """Conversations matching `filters`, newest first, after a cursor position.

    Ordered by (created_at, conversation_id) so that a page boundary stays
    put while new conversations arrive: they sort before every cursor.
    """
    query = select(Conversation)
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
    if filters.get("name"):
        pattern = "%" + filters["name"].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        query = query.where(Conversation.conversation_name.ilike(pattern, escape="\\"))
    if after is not None:
        position = tuple_(literal(after[0], UTCDateTime()), literal(after[1], Uuid()))
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
