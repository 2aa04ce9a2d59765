"""Batch export of archived conversations for analysts: JSONL or Parquet, resumable, with a manifest.

    flask --app main export --since DATE --until DATE [--user-id ID] [--status ended]
        --format jsonl|parquet --out PATH|s3://bucket/prefix [--from-listing] [--workers N]

The conversations are taken day by day (UTC end date, both bounds
inclusive) and, within a day, in conversation_id order: from PostgreSQL
metadata, or with `--from-listing` from the archive's `dt=` listing alone.
Objects are read in parallel and checked against their checksums; output is
streamed into part files of about `--part-mb` under `dt=YYYY-MM-DD/`, the
Hive layout analytics engines prune by. A part is published whole (renamed
into place, or uploaded) and only then recorded, with the position after
it, in `_manifest.json`; a run that finds an unfinished manifest for the
same arguments continues after its last published part, and a part number
is a function of that position, so a part published but not yet recorded is
overwritten, never duplicated.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal
from urllib.parse import urlparse

import boto3
import click
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from flask import Flask, current_app
from flask.cli import with_appcontext
from pydantic import BaseModel, ConfigDict, NonNegativeInt, StringConstraints, ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from tqdm import tqdm

from config import tune_garbage_collector
from database_utils import Conversation, get_session, utcnow
from s3_utils import (
    BACKGROUND_TIMEOUTS,
    CONVERSATIONS_PREFIX,
    Archive,
    ArchiveError,
    ArchiveUnavailable,
    archive_key,
    conversation_id_of,
    make_archive,
    parse_document,
)
from schemas import USER_ID_RULE, is_user_id
from states import Status

MANIFEST = "_manifest.json"
FORMATS = ("jsonl", "parquet")
# A part's name in the manifest: what `_publish` writes, and all `delete-user` will rewrite.
PART_PATH = r"^dt=\d{4}-\d{2}-\d{2}/part-\d{5}\.(jsonl|parquet)$"
PART_MB = 128.0
ROW_GROUP_ROWS = 64_000
PAGE = 1_000  # rows of metadata per database query
PARQUET_SCHEMA = pa.schema(
    [
        ("conversation_id", pa.string()),
        ("user_id", pa.string()),
        ("conversation_name", pa.string()),
        ("conversation_created_at", pa.timestamp("us", tz="UTC")),
        ("ended_at", pa.timestamp("us", tz="UTC")),
        ("stage", pa.string()),
        ("variables", pa.string()),  # the session variables, as JSON text
        ("seq", pa.int32()),
        ("role", pa.string()),
        ("content", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("token_count", pa.int32()),
        ("input_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("incomplete", pa.bool_()),
        ("file_ids", pa.list_(pa.string())),  # the conversation files this message referred to
        ("files", pa.string()),  # the conversation's files (the archive document's `files`), as JSON text
    ]
)
_TIMESTAMP_COLUMNS = {field.name for field in PARQUET_SCHEMA if pa.types.is_timestamp(field.type)}


class ExportError(Exception):
    """The export cannot start or continue (another run's output, an unreachable target)."""


class _ManifestFile(BaseModel):
    path: Annotated[str, StringConstraints(pattern=PART_PATH)]
    conversations: NonNegativeInt
    messages: NonNegativeInt
    bytes: NonNegativeInt
    sha256: str


class _Cursor(BaseModel):
    day: str | None
    after: str | None


class _Totals(BaseModel):
    files: NonNegativeInt
    conversations: NonNegativeInt
    messages: NonNegativeInt
    bytes: NonNegativeInt


class _Manifest(BaseModel):
    """What an export's manifest must hold for a run to continue it or `delete-user` to rewrite it."""

    model_config = ConfigDict(extra="allow")
    arguments: dict[str, Any]
    status: Literal["running", "complete"]
    cursor: _Cursor
    files: list[_ManifestFile]
    totals: _Totals
    errors: list[dict[str, Any]]


def _parsed_manifest(raw: bytes, url: str) -> dict[str, Any]:
    """The manifest's JSON, checked for the shape this module writes; else `ExportError`."""
    try:
        manifest = json.loads(raw)
        _Manifest.model_validate(manifest)
    except (ValueError, ValidationError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = f"{exc.error_count()} fields are wrong, the first: {exc.errors()[0]['loc']}" if isinstance(exc, ValidationError) else exc
        raise ExportError(f"{url}/{MANIFEST} is not an export's manifest ({reason})") from None
    return manifest


@dataclass(frozen=True)
class ExportRequest:
    since: date
    until: date
    format: str
    out: str
    user_id: str | None = None
    status: str = Status.ENDED
    from_listing: bool = False

    def arguments(self) -> dict[str, Any]:
        return {**asdict(self), "since": self.since.isoformat(), "until": self.until.isoformat()}


@dataclass(frozen=True)
class _Item:
    day: date
    conversation_id: uuid.UUID
    key: str
    sha256: str | None


# ---------------------------------------------------------------- where the export goes


class _LocalTarget:
    """An export in a folder. Its file system's errors (no permission, no space, a file
    missing that the manifest lists) are `ExportError`s, as the S3 target's are."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def scratch(self) -> Path:
        path = self.root / ".scratch"
        self._io(path.mkdir, parents=True, exist_ok=True)
        return path

    def publish(self, local: Path, name: str) -> None:
        destination = self.root / name
        self._io(destination.parent.mkdir, parents=True, exist_ok=True)
        self._io(os.replace, local, destination)

    def fetch(self, name: str, local: Path) -> None:
        self._io(shutil.copyfile, self.root / name, local)

    def remove(self, name: str) -> None:
        self._io((self.root / name).unlink, missing_ok=True)

    def read_manifest(self) -> dict[str, Any] | None:
        path = self.root / MANIFEST
        return _parsed_manifest(self._io(path.read_bytes), self.url) if path.exists() else None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self._io(self._write_manifest, manifest)

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        scratch = self.scratch() / MANIFEST
        with open(scratch, "w") as handle:
            json.dump(manifest, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(scratch, self.root / MANIFEST)

    def close(self) -> None:
        shutil.rmtree(self.root / ".scratch", ignore_errors=True)

    def _io(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except OSError as exc:
            raise ExportError(f"could not use {self.url}: {exc}") from exc


class _S3Target:
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}"
        config = BotoConfig(
            connect_timeout=BACKGROUND_TIMEOUTS.connect,
            read_timeout=BACKGROUND_TIMEOUTS.read,
            retries={"total_max_attempts": BACKGROUND_TIMEOUTS.attempts, "mode": "standard"},
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        self._scratch = Path(tempfile.mkdtemp(prefix="parley-export-"))

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def scratch(self) -> Path:
        return self._scratch

    def publish(self, local: Path, name: str) -> None:
        self._call(self.client.upload_file, str(local), self.bucket, self._key(name))
        local.unlink()

    def fetch(self, name: str, local: Path) -> None:
        self._call(self.client.download_file, self.bucket, self._key(name), str(local))

    def remove(self, name: str) -> None:
        self._call(self.client.delete_object, Bucket=self.bucket, Key=self._key(name))

    def read_manifest(self) -> dict[str, Any] | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(MANIFEST))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise ExportError(f"could not read {self.url}/{MANIFEST}: {exc}") from exc
        except BotoCoreError as exc:
            raise ExportError(f"could not read {self.url}/{MANIFEST}: {exc}") from exc
        return _parsed_manifest(body, self.url)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        body = json.dumps(manifest, indent=1).encode()
        self._call(self.client.put_object, Bucket=self.bucket, Key=self._key(MANIFEST), Body=body)

    def close(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)

    def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise ExportError(f"could not write to {self.url}: {exc}") from exc


def make_target(out: str, endpoint_url: str | None = None) -> _LocalTarget | _S3Target:
    parsed = urlparse(out)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ExportError(f"{out!r} names no bucket")
        return _S3Target(parsed.netloc, parsed.path, endpoint_url)
    if parsed.scheme in ("", "file"):
        return _LocalTarget(Path(parsed.path if parsed.scheme else out))
    raise ExportError(f"{out!r} is neither a path nor s3://bucket/prefix")


# ---------------------------------------------------------------- what is exported


def _days(since: date, until: date) -> Iterator[date]:
    day = since
    while day <= until:
        yield day
        day += timedelta(days=1)


def _from_database(session: Session, request: ExportRequest, day: date, after: uuid.UUID | None) -> Iterator[_Item]:
    """Ended conversations of one end date, in conversation_id order, a page per short transaction."""
    start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
    while True:
        query = select(Conversation.conversation_id, Conversation.s3_file_location, Conversation.archive_sha256).where(
            Conversation.status == Status.ENDED,
            Conversation.ended_at >= start,
            Conversation.ended_at < start + timedelta(days=1),
            Conversation.s3_file_location.is_not(None),
        )
        if request.user_id is not None:
            query = query.where(Conversation.user_id == request.user_id)
        if after is not None:
            query = query.where(Conversation.conversation_id > after)
        page = session.execute(query.order_by(Conversation.conversation_id).limit(PAGE)).all()
        session.commit()
        for row in page:
            yield _Item(day, row.conversation_id, row.s3_file_location, row.archive_sha256)
        if len(page) < PAGE:
            return
        after = page[-1].conversation_id


def _from_listing(archive: Archive, day: date, after: uuid.UUID | None) -> Iterator[_Item]:
    """Objects under one dt= prefix, in key order; S3 metadata carries their checksums."""
    start_after = archive_key(after, datetime(day.year, day.month, day.day)) if after else None
    for listed in archive.list(f"{CONVERSATIONS_PREFIX}dt={day:%Y-%m-%d}/", start_after):
        conversation_id = conversation_id_of(listed.key)
        if conversation_id is not None:
            yield _Item(day, conversation_id, listed.key, None)


def _count(session: Session | None, request: ExportRequest) -> int | None:
    if session is None:
        return None
    start = datetime(request.since.year, request.since.month, request.since.day, tzinfo=timezone.utc)
    end = datetime(request.until.year, request.until.month, request.until.day, tzinfo=timezone.utc) + timedelta(days=1)
    query = select(Conversation.conversation_id).where(
        Conversation.status == Status.ENDED, Conversation.ended_at >= start, Conversation.ended_at < end
    )
    if request.user_id is not None:
        query = query.where(Conversation.user_id == request.user_id)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    session.commit()
    return total


# ---------------------------------------------------------------- part files


class _Part:
    """One output file being written in the scratch folder."""

    def __init__(self, scratch: Path, fmt: str) -> None:
        self.format = fmt
        self.path = scratch / f"part-{uuid.uuid4().hex}.{fmt}.tmp"
        self.conversations = self.messages = self.input_bytes = 0
        self.last: uuid.UUID | None = None
        self._rows: dict[str, list[Any]] = {name: [] for name in PARQUET_SCHEMA.names}
        self._writer: pq.ParquetWriter | None = None
        self._jsonl: BinaryIO | None = open(self.path, "wb") if fmt == "jsonl" else None  # noqa: SIM115

    def add(self, item: _Item, body: bytes, document: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(body.rstrip(b"\n") + b"\n")
        else:
            self._add_rows(document)
        self.conversations += 1
        self.messages += len(document["messages"])
        self.input_bytes += len(body)
        self.last = item.conversation_id

    def _add_rows(self, document: dict[str, Any]) -> None:
        conversation, rows = document["conversation"], self._rows
        # Timestamps stay ISO 8601 text here; Arrow parses a whole column at once in `_flush_rows`.
        created, ended = conversation["created_at"], conversation["ended_at"]
        variables = json.dumps(conversation.get("variables") or {}, ensure_ascii=False, sort_keys=True)
        files = json.dumps(document.get("files") or [], ensure_ascii=False, sort_keys=True)
        for message in document["messages"]:
            usage = message.get("usage") or {}
            rows["conversation_id"].append(conversation["conversation_id"])
            rows["user_id"].append(conversation["user_id"])
            rows["conversation_name"].append(conversation["conversation_name"])
            rows["conversation_created_at"].append(created)
            rows["ended_at"].append(ended)
            rows["stage"].append(conversation.get("stage"))
            rows["variables"].append(variables)
            rows["seq"].append(message["seq"])
            rows["role"].append(message["role"])
            rows["content"].append(message["content"])
            rows["created_at"].append(message["created_at"])
            rows["token_count"].append(message["token_count"])
            rows["input_tokens"].append(usage.get("input_tokens"))
            rows["output_tokens"].append(usage.get("output_tokens"))
            rows["incomplete"].append(bool(message.get("incomplete")))
            rows["file_ids"].append(message.get("file_ids") or [])
            rows["files"].append(files)
        if len(rows["seq"]) >= ROW_GROUP_ROWS:
            self._flush_rows()

    def _flush_rows(self) -> None:
        if not self._rows["seq"]:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, PARQUET_SCHEMA, compression="zstd")
        columns = {
            name: pa.array(values, pa.string()).cast(PARQUET_SCHEMA.field(name).type) if name in _TIMESTAMP_COLUMNS else values
            for name, values in self._rows.items()
        }
        self._writer.write_table(pa.table(columns, schema=PARQUET_SCHEMA), row_group_size=ROW_GROUP_ROWS)
        self._rows = {name: [] for name in PARQUET_SCHEMA.names}

    def finish(self) -> tuple[int, str]:
        """Close the file; its size and SHA-256."""
        if self._jsonl is not None:
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
            self._jsonl.close()
        else:
            self._flush_rows()
            if self._writer is not None:
                self._writer.close()
        return _size_and_sha(self.path)

    def discard(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._writer is not None:
            self._writer.close()
        self.path.unlink(missing_ok=True)


def _size_and_sha(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return path.stat().st_size, digest.hexdigest()


# ---------------------------------------------------------------- the export


def export_conversations(
    archive: Archive,
    request: ExportRequest,
    session: Session | None = None,
    workers: int = 8,
    part_mb: float = PART_MB,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) an export and return its finished manifest."""
    if request.until < request.since:
        raise ExportError("--until is before --since")
    if request.format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}")
    if not request.from_listing and session is None:
        raise ExportError("a database session is needed unless --from-listing")
    target = make_target(request.out, endpoint_url)
    manifest = _start_manifest(target, request, workers)
    if manifest["status"] == "complete":
        return manifest
    started = time.monotonic()
    total = _count(session, request) if manifest["totals"]["conversations"] == 0 else None
    try:
        with ThreadPoolExecutor(workers) as pool, tqdm(
            total=total, unit="conv", desc="export", disable=None, initial=manifest["totals"]["conversations"]
        ) as bar:
            for day in _days(request.since, request.until):
                if manifest["cursor"]["day"] and day.isoformat() < manifest["cursor"]["day"]:
                    continue
                after = manifest["cursor"]["after"] if manifest["cursor"]["day"] == day.isoformat() else None
                after_id = uuid.UUID(after) if after else None
                items = (
                    _from_listing(archive, day, after_id)
                    if request.from_listing
                    else _from_database(session, request, day, after_id)
                )
                _export_day(target, archive, request, manifest, day, items, pool, workers, part_mb * 2**20, bar)
    finally:
        manifest["seconds"] = manifest.get("seconds", 0.0) + time.monotonic() - started
    manifest["status"] = "complete"
    manifest["finished_at"] = utcnow().isoformat()
    target.write_manifest(manifest)
    target.close()
    return manifest


def _start_manifest(target: Any, request: ExportRequest, workers: int) -> dict[str, Any]:
    found = target.read_manifest()
    if found is not None:
        # Compared without `out`: the same folder may be named another way (relative, a trailing slash).
        if {**found["arguments"], "out": None} != {**request.arguments(), "out": None}:
            raise ExportError(
                f"{target.url} holds an export made with other arguments ({found['arguments']}); use another --out"
            )
        return found
    manifest = {
        "arguments": request.arguments(),
        "workers": workers,
        "status": "running",
        "started_at": utcnow().isoformat(),
        "finished_at": None,
        "cursor": {"day": None, "after": None},
        "files": [],
        "totals": {"files": 0, "conversations": 0, "messages": 0, "bytes": 0},
        "errors": [],
    }
    target.write_manifest(manifest)
    return manifest


def _export_day(
    target: Any,
    archive: Archive,
    request: ExportRequest,
    manifest: dict[str, Any],
    day: date,
    items: Iterator[_Item],
    pool: ThreadPoolExecutor,
    workers: int,
    part_bytes: float,
    bar: tqdm,
) -> None:
    part: _Part | None = None
    try:
        for item, outcome in _read_in_order(archive, items, pool, workers * 4):
            if isinstance(outcome, ArchiveUnavailable):
                # Not this object's fault: stop, and let the next run read it (and all after it) again.
                raise ExportError(f"stopped: {outcome}; run the same command again to continue") from outcome
            if isinstance(outcome, ArchiveError):  # missing, damaged or unreadable as a document: listed, skipped
                # Listed once: a run continued from the last part reads the objects after it again.
                if all(error["key"] != item.key for error in manifest["errors"]):
                    manifest["errors"].append({"key": item.key, "error": str(outcome)})
                continue
            body, document = outcome
            if request.user_id is not None and document["conversation"]["user_id"] != request.user_id:
                continue
            part = part or _Part(target.scratch(), request.format)
            part.add(item, body, document)
            bar.update(1)
            if part.input_bytes >= part_bytes:
                _publish(target, manifest, day, part)
                part = None
        if part is not None:
            _publish(target, manifest, day, part)
            part = None
    finally:
        if part is not None:
            part.discard()


def _read_in_order(
    archive: Archive, items: Iterator[_Item], pool: ThreadPoolExecutor, window: int
) -> Iterator[tuple[_Item, tuple[bytes, dict[str, Any]] | ArchiveError]]:
    """Parallel reads, results in input order, at most `window` in flight (memory stays flat)."""

    def read(item: _Item) -> tuple[bytes, dict[str, Any]] | ArchiveError:
        try:
            body = archive.get(item.key, item.sha256)
            return body, parse_document(body, item.key)
        except ArchiveError as exc:
            return exc

    pending: deque[tuple[_Item, Future]] = deque()
    for item in items:
        pending.append((item, pool.submit(read, item)))
        if len(pending) >= window:
            first, future = pending.popleft()
            yield first, future.result()
    while pending:
        first, future = pending.popleft()
        yield first, future.result()


def _publish(target: Any, manifest: dict[str, Any], day: date, part: _Part) -> None:
    size, sha = part.finish()
    name = f"dt={day:%Y-%m-%d}/part-{len(manifest['files']):05d}.{part.format}"
    target.publish(part.path, name)
    manifest["files"].append(
        {"path": name, "conversations": part.conversations, "messages": part.messages, "bytes": size, "sha256": sha}
    )
    totals = manifest["totals"]
    totals["files"] += 1
    totals["conversations"] += part.conversations
    totals["messages"] += part.messages
    totals["bytes"] += size
    manifest["cursor"] = {"day": day.isoformat(), "after": str(part.last)}
    target.write_manifest(manifest)


def summary_line(manifest: dict[str, Any], out: str) -> str:
    totals, seconds = manifest["totals"], manifest.get("seconds") or 0.0
    rate = totals["conversations"] / seconds if seconds else 0.0
    line = (
        f"export: {totals['conversations']} conversations, {totals['messages']} messages, {totals['files']} files, "
        f"{totals['bytes'] / 2**20:.1f} MiB in {seconds:.1f} s ({rate:.1f} conversations/s) -> {out.rstrip('/')}/{MANIFEST}"
    )
    if manifest["errors"]:
        line += f"; {len(manifest['errors'])} objects could not be read (listed in the manifest)"
    return line


# ---------------------------------------------------------------- erasure in exports


def check_export(out: str, endpoint_url: str | None = None) -> None:
    """Raise `ExportError` unless `out` is an export that can be read (before `delete-user` erases anything)."""
    target = make_target(out, endpoint_url)
    try:
        _manifest(target, out)
    finally:
        target.close()


def _manifest(target: _LocalTarget | _S3Target, out: str) -> dict[str, Any]:
    manifest = target.read_manifest()
    if manifest is None:
        raise ExportError(f"{out} has no {MANIFEST}: not an export")
    return manifest


def erase_user_from_export(out: str, user_id: str, endpoint_url: str | None = None, rewritten: list[str] | None = None) -> int:
    """Rewrite every file of the export at `out` that holds `user_id`'s conversations; return how many changed.

    Each file's manifest entry is written before the file itself: a run that
    stops in between leaves the user's rows in a file whose entry already
    describes it without them, and the next run rewrites that file again. A
    file left with no conversations stays, empty, so no part is renamed and
    a later run of an unfinished export names its next part as before.
    `rewritten` gets each file's path once it is rewritten (for a run that stops).
    """
    target = make_target(out, endpoint_url)
    rewritten = [] if rewritten is None else rewritten
    try:  # the scratch copies go, whatever happens: they may hold the user's rows
        manifest = _manifest(target, out)
        for entry in manifest["files"]:
            local = target.scratch() / f"erase-{uuid.uuid4().hex}"
            target.fetch(entry["path"], local)
            try:
                kept = _without_user(local, entry["path"], user_id)
            except (ValueError, KeyError, TypeError, pa.ArrowException) as exc:
                raise ExportError(f"{out.rstrip('/')}/{entry['path']} is not a part this export wrote ({exc.__class__.__name__}: {exc})") from None
            if kept is None:
                local.unlink()
                continue
            entry["conversations"], entry["messages"] = kept
            entry["bytes"], entry["sha256"] = _size_and_sha(local)
            files = manifest["files"]
            manifest["totals"] = {
                "files": len(files),
                "conversations": sum(f["conversations"] for f in files),
                "messages": sum(f["messages"] for f in files),
                "bytes": sum(f["bytes"] for f in files),
            }
            target.write_manifest(manifest)
            target.publish(local, entry["path"])
            rewritten.append(entry["path"])
    finally:
        target.close()
    return len(rewritten)


def _without_user(local: Path, name: str, user_id: str) -> tuple[int, int] | None:
    """Rewrite `local` without the user's rows: (conversations, messages) left, or None if it had none."""
    if name.endswith(".parquet"):
        table = pq.read_table(local)
        keep = pc.not_equal(table["user_id"], pa.scalar(user_id))
        if pc.all(keep).as_py() is not False:
            return None
        table = table.filter(keep)
        pq.write_table(table, local, compression="zstd")
        return len(pc.unique(table["conversation_id"])), table.num_rows
    lines = local.read_bytes().splitlines()
    kept = [line for line in lines if json.loads(line)["conversation"]["user_id"] != user_id]
    if len(kept) == len(lines):
        return None
    local.write_bytes(b"".join(line + b"\n" for line in kept))
    return len(kept), sum(len(json.loads(line)["messages"]) for line in kept)


# ---------------------------------------------------------------- command


def destination(_context: click.Context | None, _parameter: click.Parameter | None, value: str) -> str:
    """A folder or s3://bucket/prefix given on the command line: not blank, and text (not stray bytes)."""
    if not value.strip():
        raise click.BadParameter("must name a folder or s3://bucket/prefix")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise click.BadParameter(f"{value!r} is not UTF-8 text") from None
    return value


def user_id_parameter(_context: click.Context, _parameter: click.Parameter, value: str | None) -> str | None:
    """A user_id given on the command line, as `/new_chat` takes it."""
    if value is not None and not is_user_id(value):
        raise click.BadParameter(f"{value!r} is not a user_id: they are {USER_ID_RULE}")
    return value


def _last_day(_context: click.Context, _parameter: click.Parameter, value: datetime) -> datetime:
    if value.date() == date.max:  # the export reads up to the day after
        raise click.BadParameter(f"must be before {date.max}")
    return value


def _part_mb(_context: click.Context, _parameter: click.Parameter, value: float) -> float:
    if not math.isfinite(value):
        raise click.BadParameter("must be a number of MiB")
    return value


@click.command("export")
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), required=True, help="First end date (UTC), inclusive.")
@click.option("--until", type=click.DateTime(["%Y-%m-%d"]), required=True, callback=_last_day, help="Last end date (UTC), inclusive.")
@click.option("--user-id", default=None, callback=user_id_parameter, help="Only this user's conversations.")
@click.option("--status", type=click.Choice([Status.ENDED]), default=Status.ENDED, show_default=True, help="Only archived conversations are exported.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True)
@click.option("--out", required=True, callback=destination, help="A folder, or s3://bucket/prefix.")
@click.option("--from-listing", is_flag=True, help="Work from the archive's listing alone, without the database.")
@click.option("--workers", type=click.IntRange(1, 64), default=8, show_default=True, help="Parallel archive reads.")
@click.option("--part-mb", type=click.FloatRange(min=0, min_open=True), default=PART_MB, show_default=True, callback=_part_mb, help="Size of a part file, in MiB of archive documents.")
@with_appcontext
def export_command(
    since: datetime, until: datetime, user_id: str | None, status: str, fmt: str, out: str, from_listing: bool, workers: int, part_mb: float
) -> None:
    """Export archived conversations ended between two dates, as JSONL or Parquet."""
    if until < since:
        raise click.BadParameter("must not be before --since", param_hint="--until")
    config = current_app.config
    tune_garbage_collector(config["GC_TUNING"])
    archive = make_archive(config["ARCHIVE_URL"], config["S3_ENDPOINT_URL"], BACKGROUND_TIMEOUTS, max_connections=workers)
    request = ExportRequest(since.date(), until.date(), fmt, out, user_id, status, from_listing)
    try:
        manifest = export_conversations(
            archive, request, None if from_listing else get_session(), workers, part_mb, config["S3_ENDPOINT_URL"]
        )
    except KeyboardInterrupt:
        click.echo("export interrupted; run the same command again to continue where it stopped", err=True)
        raise SystemExit(130) from None
    except (ExportError, ArchiveError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(summary_line(manifest, out))
    if manifest["errors"]:
        raise SystemExit(1)


def init_app(app: Flask) -> None:
    app.cli.add_command(export_command)
