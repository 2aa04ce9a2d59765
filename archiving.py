"""Ending conversations through explicit states, and the archive's upkeep jobs.

    active --(/end_chat, archive-idle)--> ending --(object written, recorded)--> ended

`ending` is committed before any archive I/O: the conversation is frozen (no
more turns) with its end time fixed, which fixes its object key, and no row
lock or database connection is held while S3 is called. If the write fails
or the process dies, the row stays `ending` with its live messages; writing
it again produces the same bytes under the same key, so archive-idle and
reconcile simply finish it.

The jobs (`flask --app main archive-idle | reconcile | retention | delete-user`)
are plain functions here with thin click commands on top.
"""
from __future__ import annotations

import getpass
import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import with_appcontext
from sqlalchemy import ARRAY, Text, any_, bindparam, cast, delete, func, literal, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from tqdm import tqdm

from auth import Caller
from config import tune_garbage_collector
from conversations import _visible_conversation, conversation_dict, message_dict
from database_utils import (
    AuditEvent,
    Conversation,
    IdempotencyRecord,
    Message,
    Transition,
    get_session,
    loads_json,
    utcnow,
)
from errors import NotFound, TurnInProgress
from files import (
    FILES_PREFIX,
    delete_files,
    files_by_conversation,
    repair_file_objects_without_rows,
    restored_file_rows,
)
from s3_utils import (
    BACKGROUND_TIMEOUTS,
    CONVERSATIONS_PREFIX,
    REQUEST_TIMEOUTS,
    SCHEMA_VERSION,
    Archive,
    ArchiveError,
    ChecksumMismatch,
    ObjectMissing,
    StoredObject,
    archive_key,
    conversation_id_of,
    make_archive,
    parse_document,
    sha256_hex,
    write_document,
)
from states import Status, moves_into

log = logging.getLogger("parley.archive")

BATCH_SIZE = 100
WORKERS = 8
# How long an `ending` row stays claimed by whoever is writing it: a job may
# take BACKGROUND_TIMEOUTS.total for one write, /end_chat REQUEST_TIMEOUTS.total.
ENDING_LEASE = timedelta(seconds=BACKGROUND_TIMEOUTS.total + 30)
REQUEST_LEASE = timedelta(seconds=REQUEST_TIMEOUTS.total + 1)
# `usage` as its JSON text: the driver's JSON decoding of every message cost as much as the rest
# of the row; the writer threads decode it with orjson.
_MESSAGE_COLUMNS = (
    Message.seq, Message.role, Message.content, Message.created_at, Message.token_count,
    cast(Message.usage, Text).label("usage"), Message.incomplete, cast(Message.file_ids, Text).label("file_ids"),
)  # fmt: skip
_MESSAGE_FIELDS = tuple(column.key for column in _MESSAGE_COLUMNS)
_JSON_FIELDS = ("usage", "file_ids")


@dataclass
class BatchResult:
    archived: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    # Archived by another writer meanwhile, who deleted the live messages: nothing left to write.
    superseded: list[uuid.UUID] = field(default_factory=list)


@dataclass(frozen=True)
class Superseded:
    """Why a write was not made: fewer live messages than the conversation's `message_count`."""

    live: int
    expected: int


# ---------------------------------------------------------------- ending one or many


def end_conversation(
    session: Session, archive: Archive, settings: Mapping[str, Any], viewer: Caller, conversation_id: uuid.UUID
) -> Conversation:
    """/end_chat: freeze the conversation as `ending`, then archive it.

    Returns it `ended`, or still `ending` when the archive could not be
    written within the request's bound (archive-idle or reconcile finish
    it). Idempotent: ending an ended conversation returns it unchanged.
    409 `turn_in_progress` while a turn holds the conversation.

    Several requests (or a request and a job) may write the same `ending`
    conversation at once: each writes the same document, and one that reads
    after another has deleted the live messages writes nothing (`Superseded`)
    and answers with the row as the other left it.
    """
    conversation = _visible_conversation(session, viewer, conversation_id, lock=True)
    if conversation.turn_lease_expires_at is not None and conversation.turn_lease_expires_at > utcnow():
        session.rollback()
        raise TurnInProgress(f"a turn on conversation {conversation_id} is in progress; end it when the turn is done")
    if conversation.status in moves_into(Status.ENDING):
        conversation.status = Status.ENDING
        conversation.ended_at = conversation.updated_at = utcnow()
        conversation.claimed_until = conversation.ended_at + REQUEST_LEASE
    session.commit()  # the row lock ends here, before any archive I/O
    if conversation.status == Status.ENDING and not archive_conversations(session, archive, settings, [conversation]).archived:
        # Another writer may have ended it meanwhile, or `delete-user` erased it.
        conversation = session.get(Conversation, conversation_id, populate_existing=True)
        session.commit()
        if conversation is None:
            raise NotFound(f"conversation {conversation_id} does not exist")
    return conversation


def archive_document(
    conversation: Conversation, messages: Iterable[Any], files: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """The archive document of an `ending` conversation: the same input always gives the same document.

    `files` are its uploaded files (files.py), as the files API lists them; the bytes stay in their own objects.
    """
    return _document(_summary(conversation), [_message_tuple(row) for row in messages], files)


def _message_tuple(row: Any) -> tuple:
    """A message (an ORM Message, any row with its attributes) as `_read` gives it: JSON columns as JSON text."""
    values = {name: getattr(row, name) for name in _MESSAGE_FIELDS}
    for name in _JSON_FIELDS:
        values[name] = None if values[name] is None else json.dumps(values[name])
    return tuple(values.values())


def _summary(conversation: Conversation) -> dict[str, Any]:
    """The document's `conversation` part: read from the ORM object here, so that workers get plain data."""
    ended_at = conversation.ended_at.isoformat()
    summary = conversation_dict(conversation, history=True)
    summary.update(status=Status.ENDED, ended_at=ended_at, updated_at=ended_at)
    del summary["s3_file_location"]
    return summary


def _document(summary: dict[str, Any], messages: Iterable[tuple], files: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The document from its summary, its messages as tuples of _MESSAGE_COLUMNS, and its files."""
    return {
        "schema_version": SCHEMA_VERSION,
        "conversation": summary,
        "messages": [_message_document(message) for message in messages],
        "files": list(files),
        "usage": summary["usage"] | {"token_count": summary["token_count"]},
    }


def _message_document(message: tuple) -> dict[str, Any]:
    """`message_dict` of a message, built directly: pydantic costs several times more, and this runs for every archived message.

    Usage that is not two plain integer counts, and file references, go
    through `message_dict`, which validates them as the API does (tests
    check the two agree).
    """
    seq, role, content, created_at, token_count, usage_json, incomplete, file_ids_json = message
    usage = None if usage_json is None else loads_json(usage_json)
    plain_usage = usage is None or (
        isinstance(usage, dict) and type(usage.get("input_tokens")) is int and type(usage.get("output_tokens")) is int
    )
    if not plain_usage or file_ids_json not in (None, "null", "[]"):
        file_ids = None if file_ids_json is None else loads_json(file_ids_json)
        fields = dict(zip(_MESSAGE_FIELDS, message, strict=True)) | {"usage": usage, "file_ids": file_ids}
        return message_dict(SimpleNamespace(**fields))
    if usage is not None:
        usage = {"input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"]}
    return {
        "seq": seq,
        "role": role,
        "content": content,
        "created_at": created_at.isoformat(),
        "token_count": token_count,
        "usage": usage,
        "incomplete": bool(incomplete),
        "file_ids": [],
    }


def archive_conversations(
    session: Session,
    archive: Archive,
    settings: Mapping[str, Any],
    conversations: Sequence[Conversation],
    pool: Executor | None = None,
) -> BatchResult:
    """Write the documents of `ending` conversations and record them as ended.

    Reads the messages in one query, commits (so no connection is held
    while writing), writes in parallel on `pool`, then records every
    written object in one transaction. A failed write leaves its row `ending`.
    """
    writes = (pool.map if pool else map)(_try_write, [archive] * len(conversations), *_read(session, conversations))
    return _record_writes(session, settings, conversations, writes)


def _record_writes(
    session: Session, settings: Mapping[str, Any], conversations: Sequence[Conversation], writes: Iterable[Any]
) -> BatchResult:
    result, written = BatchResult(), []
    for conversation, outcome in zip(conversations, writes, strict=True):
        if isinstance(outcome, StoredObject):
            written.append((conversation, outcome))
            result.archived.append(conversation.conversation_id)
        elif isinstance(outcome, Superseded):
            log.info("%s was archived by another writer (%d of %d messages live); not written again",
                     conversation.conversation_id, outcome.live, outcome.expected)
            result.superseded.append(conversation.conversation_id)
        else:
            log.warning("archive write failed, %s stays ending: %s", conversation.conversation_id, outcome)
            result.failed.append(conversation.conversation_id)
    if written:
        _record_archived(session, written, delete_messages=settings["LIVE_RETENTION_DAYS"] <= 0)
    return result


def _read(session: Session, conversations: Sequence[Conversation]) -> tuple[list[dict[str, Any]], list[list[tuple]], list[list[Any]]]:
    """Each conversation's summary, message rows and files, from three queries; commits, so no connection is held afterwards.

    The documents themselves are built by `_try_write`, on the writers'
    threads: the caller's thread stays free to claim and read the next batch.
    """
    ids = [conversation.conversation_id for conversation in conversations]
    query = (
        select(Message.conversation_id, *_MESSAGE_COLUMNS)
        .where(_among(session, Message.conversation_id, ids))
        .order_by(Message.conversation_id, Message.seq)
    )
    messages: dict[uuid.UUID, list[tuple]] = {conversation_id: [] for conversation_id in ids}
    # Core rows, not the ORM's result processing, fetched at once: this runs for every archived message.
    for row in session.connection().execute(query).all():
        messages[row[0]].append(row[1:])
    _load_transitions(session, conversations, ids)
    files = files_by_conversation(session, ids)
    session.commit()
    return (
        [_summary(conversation) for conversation in conversations],
        [messages[conversation_id] for conversation_id in ids],
        [files[conversation_id] for conversation_id in ids],
    )


def _load_transitions(session: Session, conversations: Sequence[Conversation], ids: list[uuid.UUID]) -> None:
    """Every conversation's transitions from one query, instead of one lazy load per document."""
    found: dict[uuid.UUID, list[Transition]] = {conversation_id: [] for conversation_id in ids}
    query = select(Transition).where(_among(session, Transition.conversation_id, ids)).order_by(Transition.transition_id)
    for transition in session.scalars(query):
        found[transition.conversation_id].append(transition)
    for conversation in conversations:
        set_committed_value(conversation, "transitions", found[conversation.conversation_id])


def _among(session: Session, column: Any, ids: list[uuid.UUID]) -> Any:
    """`column IN (ids)`; on PostgreSQL `column = ANY(:ids)` with one array parameter.

    A batch's IN list makes a statement of hundreds of parameters that
    psycopg parses again on every call (its cache keeps short statements
    only) and the server plans again; the array form is one short
    statement, parsed once and prepared.
    """
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(literal(ids, ARRAY(column.type)))
    return column.in_(ids)


def _try_write(
    archive: Archive, summary: dict[str, Any], messages: list[tuple], files: list[dict[str, Any]]
) -> StoredObject | ArchiveError | Superseded:
    if len(messages) != summary["message_count"]:
        # Read after another writer archived it and deleted its live messages: a document of
        # what is left would replace the whole one.
        return Superseded(len(messages), summary["message_count"])
    try:
        return write_document(archive, _document(summary, messages, files))
    except ArchiveError as exc:
        return exc


def _record_archived(
    session: Session, written: list[tuple[Conversation, StoredObject]], delete_messages: bool
) -> None:
    """Mark the written conversations ENDED with their archive location, in one statement.

    A row already ENDED is taken too, and keeps its status: reconcile rewrites
    a lost or damaged archive document from the live messages still kept.
    """
    table = Conversation.__table__
    recordable = (*moves_into(Status.ENDED), Status.ENDED)
    record = (
        table.update()
        # Not IN (...): an expanding parameter cannot run as executemany.
        .where(table.c.conversation_id == bindparam("b_id"), or_(*(table.c.status == status for status in recordable)))
        .values(
            status=Status.ENDED,
            s3_file_location=bindparam("b_key"),
            archive_sha256=bindparam("b_sha"),
            updated_at=table.c.ended_at,
            claimed_until=None,
        )
    )
    session.execute(record, [{"b_id": c.conversation_id, "b_key": s.key, "b_sha": s.sha256} for c, s in written])
    ids = [conversation.conversation_id for conversation, _ in written]
    if delete_messages:
        # No ORM synchronisation: the messages were read as Core rows, none is in the session.
        messages = delete(Message).where(_among(session, Message.conversation_id, ids))
        session.execute(messages.execution_options(synchronize_session=False))
    session.commit()
    for conversation, stored in written:
        for name, value in (("status", Status.ENDED), ("s3_file_location", stored.key), ("archive_sha256", stored.sha256)):
            set_committed_value(conversation, name, value)
        set_committed_value(conversation, "updated_at", conversation.ended_at)
        set_committed_value(conversation, "claimed_until", None)


# ---------------------------------------------------------------- claiming work


def claim_idle(session: Session, idle_before: datetime, now: datetime, limit: int) -> list[Conversation]:
    """Move up to `limit` conversations idle since before `idle_before` to `ending`, claimed for ENDING_LEASE."""
    where = (
        Conversation.status.in_(moves_into(Status.ENDING)),
        Conversation.updated_at < idle_before,
        # A turn in progress does not move updated_at until it completes: never freeze it mid-turn.
        or_(Conversation.turn_lease_expires_at.is_(None), Conversation.turn_lease_expires_at <= now),
    )
    return _claim(session, where, limit, status=Status.ENDING, ended_at=now, updated_at=now, claimed_until=now + ENDING_LEASE)


def claim_ending(session: Session, free_before: datetime, now: datetime, limit: int) -> list[Conversation]:
    """Take over up to `limit` `ending` conversations whose claim ends before `free_before`."""
    where = (
        Conversation.status == Status.ENDING,
        or_(Conversation.claimed_until.is_(None), Conversation.claimed_until < free_before),
    )
    return _claim(session, where, limit, claimed_until=now + ENDING_LEASE)


def _claim(session: Session, where: tuple, limit: int, **values: Any) -> list[Conversation]:
    """Lock rows nobody else holds (SKIP LOCKED), then update them, so parallel jobs never share a row.

    Two statements, not `UPDATE ... WHERE id IN (SELECT ... LIMIT n FOR
    UPDATE SKIP LOCKED)`: PostgreSQL may rescan that subquery for each row
    and claim far more than `limit`. SQLite has no row locks; the
    conditions repeated in the UPDATE keep two claimers apart there.
    """
    chosen = select(Conversation.conversation_id).where(*where).order_by(Conversation.updated_at).limit(limit)
    ids = list(session.scalars(chosen.with_for_update(skip_locked=True)))
    if not ids:
        session.commit()
        return []
    claim = (
        update(Conversation)
        .where(_among(session, Conversation.conversation_id, ids), *where)
        .values(**values)
        .returning(Conversation)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    rows = list(session.scalars(claim))
    session.commit()
    return rows


# ---------------------------------------------------------------- archive-idle


@dataclass
class IdleReport:
    archived: int = 0
    pending: int = 0
    seconds: float = 0.0
    stopped_early: bool = False

    def line(self) -> str:
        rate = self.archived / self.seconds if self.seconds else 0.0
        text = f"archive-idle: archived {self.archived}, left ending {self.pending}, {self.seconds:.1f} s, {rate:.1f} conversations/s"
        return text + (" (stopped: the archive is unavailable)" if self.stopped_early else "")


def archive_idle(
    session: Session,
    archive: Archive,
    settings: Mapping[str, Any],
    now: datetime | None = None,
    batch_size: int = BATCH_SIZE,
    workers: int = WORKERS,
) -> IdleReport:
    """End and archive every conversation idle longer than SESSION_IDLE_MINUTES.

    Also finishes `ending` conversations whose claim has run out (an
    /end_chat that met an S3 outage, a job that was killed). The next batch
    is claimed and read while the previous one is written. Stops when a
    whole batch fails to write: the archive is down, and claiming more
    would only freeze more conversations (what the batch already in
    flight could not write stays `ending`, for a later run).
    """
    now = now or utcnow()
    idle_before = now - timedelta(minutes=settings["SESSION_IDLE_MINUTES"])
    report, started = IdleReport(), time.monotonic()
    total = session.scalar(
        select(func.count()).where(
            ((Conversation.status == Status.ACTIVE) & (Conversation.updated_at < idle_before))
            | ((Conversation.status == Status.ENDING) & or_(Conversation.claimed_until.is_(None), Conversation.claimed_until < now))
        )
    )
    session.commit()
    in_flight: tuple[list[Conversation], list[Future]] | None = None
    ending_left = True  # until a claim finds none: then only idle ones (one query a batch, not two)
    with ThreadPoolExecutor(workers) as pool, tqdm(total=total, unit="conv", desc="archive-idle", disable=None) as bar:
        while True:
            # The next batch is claimed and read while the previous one is being written.
            batch = claim_ending(session, now, now, batch_size) if ending_left else []
            ending_left = bool(batch)
            batch = batch or claim_idle(session, idle_before, now, batch_size)
            submitted = (batch, _submit(pool, archive, *_read(session, batch))) if batch else None
            if in_flight is not None:
                result = _collect(session, settings, *in_flight, report, bar)
                if result.failed and not result.archived:
                    # The archive is down: claim no more. The batch already in flight is recorded too.
                    report.stopped_early = True
                    if submitted is not None:
                        _collect(session, settings, *submitted, report, bar)
                    break
            if submitted is None:
                break
            in_flight = submitted
    report.seconds = time.monotonic() - started
    return report


def _submit(pool: Executor, archive: Archive, *read: list[Any]) -> list[Future]:
    return [pool.submit(_try_write, archive, *one) for one in zip(*read, strict=True)]


def _collect(
    session: Session,
    settings: Mapping[str, Any],
    batch: list[Conversation],
    futures: list[Future],
    report: IdleReport,
    bar: tqdm,
) -> BatchResult:
    result = _record_writes(session, settings, batch, (future.result() for future in futures))
    report.archived += len(result.archived)
    report.pending += len(result.failed)
    bar.update(len(batch))
    return result


# ---------------------------------------------------------------- reconcile


@dataclass
class ReconcileReport:
    ending_finished: int = 0
    ending_failed: int = 0
    rows_restored: int = 0
    file_rows_restored: int = 0
    stale_removed: int = 0
    file_objects_removed: int = 0
    verified: int = 0
    rewritten: int = 0
    unrepairable: list[uuid.UUID] = field(default_factory=list)
    stopped: str | None = None  # why the archive could not be read or written any more

    @property
    def clean(self) -> bool:
        return not self.ending_failed and not self.unrepairable and self.stopped is None

    def line(self) -> str:
        text = (
            f"reconcile: finished {self.ending_finished} ending (failed {self.ending_failed}), "
            f"restored {self.rows_restored} rows from objects without one (and {self.file_rows_restored} file rows), "
            f"removed {self.stale_removed} stale objects and {self.file_objects_removed} file objects without a row, "
            f"verified {self.verified} objects, rewrote {self.rewritten} missing or different, "
            f"unrepairable {len(self.unrepairable)}"
        )
        text += ": " + ", ".join(map(str, self.unrepairable)) if self.unrepairable else ""
        return text + (f" (stopped: the archive is unavailable: {self.stopped})" if self.stopped else "")


def reconcile(
    session: Session,
    archive: Archive,
    settings: Mapping[str, Any],
    batch_size: int = 500,
    workers: int = WORKERS,
) -> ReconcileReport:
    """Make the archive and the database agree, and count what was repaired.

    1. Every `ending` row is finished (written again and recorded), even
       one another process claims: the write is idempotent.
    2. Every object is matched with its row: an object with no row gets its
       row back from the document (the archive is the permanent record); a
       copy under another key than its row's, or of a still active
       conversation, is stale and removed. A restored row gets its file rows
       back from the document too.
    3. Every object below `files/` with no row gets it back from its
       conversation's document when the document lists it; otherwise it is
       removed, unless its conversation is active (an upload may be under
       way), its document cannot be read now, or a live message names it.
    4. Every ended row's object is read and checked against the row's
       checksum; a missing or different one is written again from the live
       messages when they are still kept (LIVE_RETENTION_DAYS), otherwise
       it is reported as unrepairable.
    """
    report = ReconcileReport()
    started = utcnow()
    with ThreadPoolExecutor(workers) as pool:
        # Every `ending` row, claimed or not (writing one twice gives the same
        # object), except those this run has claimed already.
        while batch := claim_ending(session, started + ENDING_LEASE, started, batch_size):
            result = archive_conversations(session, archive, settings, batch, pool)
            report.ending_finished += len(result.archived)
            report.ending_failed += len(result.failed)
            if result.failed and not result.archived:
                break
        try:
            with tqdm(unit="obj", desc="reconcile: objects", disable=None) as bar:
                for keys in _chunks(archive.list(CONVERSATIONS_PREFIX), batch_size):
                    _match_objects(session, archive, keys, report)
                    bar.update(len(keys))
            with tqdm(unit="obj", desc="reconcile: files", disable=None) as bar:
                for keys in _chunks(archive.list(FILES_PREFIX), batch_size):
                    restored, removed = repair_file_objects_without_rows(session, archive, keys)
                    report.file_rows_restored += restored
                    report.file_objects_removed += removed
                    bar.update(len(keys))
            ended = session.scalar(select(func.count()).where(Conversation.status == Status.ENDED))
            session.commit()
            with tqdm(total=ended, unit="conv", desc="reconcile: ended", disable=None) as bar:
                for rows in _ended_pages(session, batch_size):
                    _verify_objects(session, archive, settings, rows, pool, report)
                    bar.update(len(rows))
        except ArchiveError as exc:  # S3 down or failing: what was repaired stands; run it again later
            session.rollback()
            report.stopped = str(exc)
    return report


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _match_objects(session: Session, archive: Archive, listed: list[Any], report: ReconcileReport) -> None:
    by_id = {conversation_id_of(item.key): item.key for item in listed}
    by_id.pop(None, None)
    rows = {
        row.conversation_id: row
        for row in session.execute(
            select(Conversation.conversation_id, Conversation.status, Conversation.s3_file_location).where(
                Conversation.conversation_id.in_(list(by_id))
            )
        )
    }
    session.commit()
    for item in listed:
        conversation_id = conversation_id_of(item.key)
        if conversation_id is None:
            continue
        row = rows.get(conversation_id)
        if row is None:
            rows[conversation_id], files = _restore_row(session, archive, item.key)
            report.rows_restored += 1
            report.file_rows_restored += files
        elif row.status == Status.ACTIVE or (row.status == Status.ENDED and row.s3_file_location != item.key):
            archive.delete(item.key)
            report.stale_removed += 1


def _restore_row(session: Session, archive: Archive, key: str) -> tuple[Conversation, int]:
    """The conversation's row from its document, with its file rows; and how many file rows."""
    body = archive.get(key)
    document = parse_document(body, key)
    summary = document["conversation"]
    conversation = Conversation(
        conversation_id=uuid.UUID(summary["conversation_id"]),
        owner_key_id=None,  # the key that made it is not in the document: staff can read it
        user_id=summary["user_id"],
        conversation_name=summary["conversation_name"],
        system_prompt=summary["system_prompt"],
        status=Status.ENDED,
        s3_file_location=key,
        archive_sha256=sha256_hex(body),
        created_at=datetime.fromisoformat(summary["created_at"]),
        updated_at=datetime.fromisoformat(summary["updated_at"]),
        ended_at=datetime.fromisoformat(summary["ended_at"]),
        message_count=summary["message_count"],
        token_count=summary["token_count"],
        input_tokens=summary["usage"]["input_tokens"],
        output_tokens=summary["usage"]["output_tokens"],
        meta=summary["metadata"],
    )
    session.add(conversation)
    session.flush()
    files = restored_file_rows(conversation.conversation_id, document.get("files") or [])
    session.add_all(files)
    session.commit()
    return conversation, len(files)


def _ended_pages(session: Session, size: int) -> Iterator[list[Any]]:
    """Ended rows with an object, by conversation_id, one page (and one short transaction) at a time."""
    after: uuid.UUID | None = None
    while True:
        query = select(
            Conversation.conversation_id, Conversation.s3_file_location, Conversation.archive_sha256
        ).where(Conversation.status == Status.ENDED, Conversation.s3_file_location.is_not(None))
        if after is not None:
            query = query.where(Conversation.conversation_id > after)
        page = session.execute(query.order_by(Conversation.conversation_id).limit(size)).all()
        session.commit()
        if not page:
            return
        yield page
        after = page[-1].conversation_id


def _verify_objects(
    session: Session, archive: Archive, settings: Mapping[str, Any], rows: list[Any], pool: Executor, report: ReconcileReport
) -> None:
    def check(row: Any) -> ArchiveError | None:
        try:
            parse_document(archive.get(row.s3_file_location, row.archive_sha256), row.s3_file_location)
        except (ObjectMissing, ChecksumMismatch) as exc:
            return exc
        return None

    broken = [row.conversation_id for row, problem in zip(rows, pool.map(check, rows), strict=True) if problem]
    report.verified += len(rows) - len(broken)
    for conversation_id in broken:
        if _rewrite_from_live_messages(session, archive, settings, conversation_id):
            report.rewritten += 1
        else:
            report.unrepairable.append(conversation_id)


def _rewrite_from_live_messages(
    session: Session, archive: Archive, settings: Mapping[str, Any], conversation_id: uuid.UUID
) -> bool:
    conversation = session.get(Conversation, conversation_id, populate_existing=True)
    kept = session.scalar(select(func.count()).where(Message.conversation_id == conversation_id))
    if conversation is None or kept != conversation.message_count:
        session.commit()
        return False
    result = archive_conversations(session, archive, {**settings, "LIVE_RETENTION_DAYS": 1}, [conversation])
    return bool(result.archived)


# ---------------------------------------------------------------- retention and erasure


@dataclass
class RetentionReport:
    messages_deleted: int = 0
    conversations_dropped: int = 0
    stopped: str | None = None  # why the archive could not be written any more

    def line(self) -> str:
        text = (
            f"retention: deleted {self.messages_deleted} live messages of ended conversations, "
            f"dropped {self.conversations_dropped} archived conversations"
        )
        return text + (f" (stopped: the archive is unavailable: {self.stopped})" if self.stopped else "")


def apply_retention(
    session: Session, archive: Archive, settings: Mapping[str, Any], now: datetime | None = None, batch_size: int = 500
) -> RetentionReport:
    """Drop live messages after LIVE_RETENTION_DAYS and whole conversations after ARCHIVE_RETENTION_DAYS."""
    now = now or utcnow()
    report = RetentionReport()
    expired_live = select(Conversation.conversation_id).where(
        Conversation.status == Status.ENDED, Conversation.ended_at < now - timedelta(days=settings["LIVE_RETENTION_DAYS"])
    )
    report.messages_deleted = session.execute(delete(Message).where(Message.conversation_id.in_(expired_live))).rowcount
    session.commit()
    if settings["ARCHIVE_RETENTION_DAYS"] is None:
        return report
    cutoff = now - timedelta(days=settings["ARCHIVE_RETENTION_DAYS"])
    while True:
        rows = session.execute(
            select(Conversation.conversation_id, Conversation.s3_file_location)
            .where(Conversation.status == Status.ENDED, Conversation.ended_at < cutoff)
            .limit(batch_size)
        ).all()
        session.commit()
        if not rows:
            return report
        keys = [row.s3_file_location for row in rows if row.s3_file_location]
        try:
            report.conversations_dropped += _drop(session, archive, [row.conversation_id for row in rows], keys)
        except ArchiveError as exc:  # the rows stay until their objects are gone: the next run goes on
            session.rollback()
            report.stopped = str(exc)
            return report


def _drop(
    session: Session, archive: Archive, ids: Sequence[uuid.UUID], keys: Sequence[str], deleted: list[str] | None = None
) -> int:
    """Delete objects first (documents and uploaded files), then rows: a crash in between
    leaves rows to retry, never an object to resurrect. `deleted` gets each document's
    key once it is gone."""
    for key in keys:
        archive.delete(key)
        if deleted is not None:
            deleted.append(key)
    delete_files(session, archive, ids)
    # Stored answers to Idempotency-Key retries hold the conversations' words too (a /chat's reply).
    answered = IdempotencyRecord.response_body["conversation_id"].as_string()
    session.execute(delete(IdempotencyRecord).where(answered.in_([str(conversation_id) for conversation_id in ids])))
    session.execute(delete(Message).where(Message.conversation_id.in_(ids)))
    session.execute(delete(Conversation).where(Conversation.conversation_id.in_(ids)))
    session.commit()
    return len(ids)


@dataclass
class ErasureReport:
    user_id: str
    conversations: int = 0
    archive_objects: int = 0
    export_files: int = 0

    def line(self) -> str:
        return (
            f"delete-user {self.user_id}: removed {self.conversations} conversations, "
            f"{self.archive_objects} archive objects, rewrote {self.export_files} export files"
        )


class ErasureRefused(Exception):
    """`delete-user` erased nothing: an export it was to rewrite is not one, or cannot be read."""


def delete_user(
    session: Session, archive: Archive, user_id: str, export_targets: Sequence[str] = (), endpoint_url: str | None = None
) -> ErasureReport:
    """Right to erasure: a user's conversations out of the database, the archive and named exports; audited.

    Each export is checked to be one before anything is erased (else
    `ErasureRefused`). A run that stops once it has begun (the archive or an
    export failing, Ctrl-C) is audited too, with what it did and why it
    stopped, and raises: the rows may already be gone, so the run that
    finishes the work would not count them.
    """
    from export import ExportError, check_export, erase_user_from_export

    for target in export_targets:
        try:
            check_export(target, endpoint_url)
        except ExportError as exc:
            raise ErasureRefused(f"--export-prefix {target}: {exc}") from None
    report = ErasureReport(user_id)
    rows = session.execute(
        select(Conversation.conversation_id, Conversation.status, Conversation.s3_file_location, Conversation.ended_at).where(
            Conversation.user_id == user_id
        )
    ).all()
    session.commit()
    # An `ending` row may already have its object; an ended one has its recorded key.
    keys = [
        row.s3_file_location or archive_key(row.conversation_id, row.ended_at)
        for row in rows
        if row.s3_file_location or row.status == Status.ENDING
    ]
    deleted: list[str] = []
    rewritten: list[str] = []
    try:
        report.conversations = _drop(session, archive, [row.conversation_id for row in rows], keys, deleted)
        report.archive_objects = len(deleted)
        for target in export_targets:
            erase_user_from_export(target, user_id, endpoint_url, rewritten)
            report.export_files = len(rewritten)
    except BaseException as exc:
        report.archive_objects, report.export_files = len(deleted), len(rewritten)
        why = str(exc) if isinstance(exc, (ArchiveError, ExportError)) else f"{exc.__class__.__name__}: {exc}".rstrip(": ")
        _audit_stopped(session, report, export_targets, why)
        raise
    _audit_erasure(session, report, export_targets)
    return report


def _audit_stopped(session: Session, report: ErasureReport, export_targets: Sequence[str], why: str) -> None:
    """The audit row of a run that stopped, if the database takes it (it may be what failed)."""
    try:
        session.rollback()
        _audit_erasure(session, report, export_targets, stopped=why)
    except SQLAlchemyError as exc:
        session.rollback()
        log.warning("delete-user %s stopped and could not be audited: %s", report.user_id, exc.__class__.__name__)


def _audit_erasure(session: Session, report: ErasureReport, export_targets: Sequence[str], stopped: str | None = None) -> None:
    detail = {
        "user_id": report.user_id,
        "conversations": report.conversations,
        "archive_objects": report.archive_objects,
        "export_targets": list(export_targets),
        "export_files": report.export_files,
        "operator": getpass.getuser(),
    }
    if stopped is not None:
        detail["stopped"] = stopped
    session.add(AuditEvent(key_id=None, action="delete_user", detail=detail))
    session.commit()


# ---------------------------------------------------------------- commands


def background_archive() -> Archive:
    """The archive client of the jobs: longer timeouts and more connections than a request's."""
    return current_app.extensions["parley.background_archive"]


@click.command("archive-idle")
@click.option("--batch-size", type=click.IntRange(min=1), default=BATCH_SIZE, show_default=True)
@click.option("--workers", type=click.IntRange(min=1, max=64), default=WORKERS, show_default=True, help="Parallel archive writes.")
@with_appcontext
def archive_idle_command(batch_size: int, workers: int) -> None:
    """End and archive conversations idle longer than SESSION_IDLE_MINUTES."""
    tune_garbage_collector(current_app.config["GC_TUNING"])
    report = archive_idle(get_session(), background_archive(), current_app.config, batch_size=batch_size, workers=workers)
    click.echo(report.line())
    if report.stopped_early:
        raise SystemExit(1)


@click.command("reconcile")
@click.option("--workers", type=click.IntRange(min=1, max=64), default=WORKERS, show_default=True, help="Parallel archive reads.")
@with_appcontext
def reconcile_command(workers: int) -> None:
    """Find and repair every disagreement between the database and the archive."""
    tune_garbage_collector(current_app.config["GC_TUNING"])
    report = reconcile(get_session(), background_archive(), current_app.config, workers=workers)
    click.echo(report.line())
    if not report.clean:
        raise SystemExit(1)


@click.command("retention")
@with_appcontext
def retention_command() -> None:
    """Apply LIVE_RETENTION_DAYS and ARCHIVE_RETENTION_DAYS."""
    report = apply_retention(get_session(), background_archive(), current_app.config)
    click.echo(report.line())
    if report.stopped:
        raise SystemExit(1)


def _user_id(context: click.Context, parameter: click.Parameter, value: str) -> str:
    from export import user_id_parameter

    return user_id_parameter(context, parameter, value)


def _exports(context: click.Context, parameter: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    from export import destination

    return tuple(destination(context, parameter, value) for value in values)


@click.command("delete-user")
@click.argument("user_id", callback=_user_id)
@click.option(
    "--export-prefix",
    "export_targets",
    multiple=True,
    callback=_exports,
    help="Also rewrite the export at this PATH or s3://bucket/prefix without the user (repeatable).",
)
@with_appcontext
def delete_user_command(user_id: str, export_targets: tuple[str, ...]) -> None:
    """Remove a user's conversations everywhere (right to erasure); audited."""
    from export import ExportError

    try:
        report = delete_user(
            get_session(), background_archive(), user_id, export_targets, current_app.config["S3_ENDPOINT_URL"]
        )
    except ErasureRefused as exc:
        raise click.ClickException(f"delete-user {user_id}: {exc}; nothing was erased") from None
    except (ArchiveError, ExportError) as exc:
        raise click.ClickException(f"delete-user {user_id} stopped: {exc}; run it again to finish") from None
    click.echo(report.line())


def init_app(app: Flask) -> None:
    app.extensions["parley.background_archive"] = make_archive(
        app.config["ARCHIVE_URL"], app.config["S3_ENDPOINT_URL"], BACKGROUND_TIMEOUTS, max_connections=64
    )
    for command in (archive_idle_command, reconcile_command, retention_command, delete_user_command):
        app.cli.add_command(command)
