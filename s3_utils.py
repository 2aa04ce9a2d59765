"""The conversation archive: one versioned JSON document per ended conversation.

`ARCHIVE_URL` picks the store: `s3://bucket/prefix` (AWS S3, or any
S3-compatible server via `S3_ENDPOINT_URL`) or `file:///path` (the embedded
default). Both use the same key layout below the archive root, partitioned by
the UTC date the conversation ended so that Athena, Spark or DuckDB can prune
by date:

    conversations/dt=YYYY-MM-DD/{conversation_id}.json
    files/{conversation_id}/{file_id}        (files.py: uploads, any type)

The end date is fixed when the conversation enters `ending`, before anything
is written, so every retry of the write, on any day, targets the same key.
The database stores keys relative to the root, so the archive can move (a new
bucket, a copy) by changing `ARCHIVE_URL` alone.

Every object carries the SHA-256 of its bytes: as object metadata in S3, and
in the conversation's row for both stores. Reads check it.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import boto3
import orjson
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from config import ConfigError

SCHEMA_VERSION = 1
CONVERSATIONS_PREFIX = "conversations/"
CHECKSUM_METADATA = "sha256"  # x-amz-meta-sha256


@dataclass(frozen=True)
class Timeouts:
    """How long one archive call may wait: per attempt, and attempts in all."""

    connect: float
    read: float
    attempts: int

    @property
    def total(self) -> float:
        """Worst case in seconds: every attempt times out, plus botocore's backoff between attempts.

        Its standard mode waits at most min(2**n, 20) s before retry n, 5 s
        more when the server sends x-amz-retry-after.
        """
        backoff = sum(min(2**n, 20) + 5 for n in range(self.attempts - 1))
        return self.attempts * (self.connect + self.read) + backoff


# /end_chat makes one attempt and answers within REQUEST_TIMEOUTS.total (4 s)
# even when S3 hangs; a conversation whose write failed stays `ending` and
# the background jobs finish it, so a retry here would only make clients wait.
REQUEST_TIMEOUTS = Timeouts(connect=1.0, read=3.0, attempts=1)
# archive-idle, reconcile, retention, delete-user and export may wait longer (at most 162 s).
BACKGROUND_TIMEOUTS = Timeouts(connect=5.0, read=30.0, attempts=4)


class ArchiveError(Exception):
    """The archive could not be read or written, or an object failed its checksum."""


class ObjectMissing(ArchiveError):
    """The archive answered, and the object is not there."""


class ArchiveUnavailable(ArchiveError):
    """The archive did not answer a read (unreachable, timing out, failing or throttling with a
    5xx; a local disk's I/O error): trying later may work. A refusal of one object (access denied,
    archived to cold storage, a key it cannot decrypt; a local file unreadable or a folder) is a
    plain `ArchiveError`: the object's own."""


# S3 answers that say the service, not the object, failed.
_UNAVAILABLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
                                "InternalError"})
# Local file-system errors of the disk or the mount, not of one file.
_UNAVAILABLE_ERRNOS = frozenset({errno.EIO, errno.ENOTCONN, errno.ESTALE, errno.ETIMEDOUT, errno.EHOSTDOWN})


def _read_failure(exc: BotoCoreError | ClientError) -> type[ArchiveError]:
    if isinstance(exc, BotoCoreError):  # no answer: connection refused or broken, a timeout
        return ArchiveUnavailable
    code = _describe(exc)
    if code in ("NoSuchKey", "404"):
        return ObjectMissing
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return ArchiveUnavailable if status >= 500 or code in _UNAVAILABLE_CODES else ArchiveError


class ChecksumMismatch(ArchiveError):
    """The object's bytes do not match the checksum recorded for them."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    sha256: str


@dataclass(frozen=True)
class ListedObject:
    key: str
    size: int


class Archive(Protocol):
    url: str

    def put(self, key: str, body: bytes, content_type: str = "application/json") -> str: ...

    def get(self, key: str, sha256: str | None = None) -> bytes:
        """The object's bytes, checked against `sha256` (the checksum the caller recorded) when given."""
        ...

    def list(self, prefix: str = CONVERSATIONS_PREFIX, start_after: str | None = None) -> Iterator[ListedObject]: ...

    def delete(self, key: str) -> None: ...

    def ping(self) -> None: ...


def archive_key(conversation_id: str | uuid.UUID, ended_at: datetime) -> str:
    """The key of a conversation's document, below the archive's root."""
    # uuid.UUID() both validates the ID and normalises it, so no request
    # string reaches a key or a path unchecked.
    return f"{CONVERSATIONS_PREFIX}dt={ended_at:%Y-%m-%d}/{uuid.UUID(str(conversation_id))}.json"


def conversation_id_of(key: str) -> uuid.UUID | None:
    """The conversation a key belongs to, or None for anything that is not a document."""
    name = key.rpartition("/")[2]
    if not (key.startswith(CONVERSATIONS_PREFIX) and name.endswith(".json")):
        return None
    try:
        return uuid.UUID(name.removesuffix(".json"))
    except ValueError:
        return None


def sha256_hex(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _check_recorded(key: str, actual: str, recorded: str) -> None:
    if actual != recorded:
        raise ChecksumMismatch(f"{key} does not match the checksum recorded for it")


def _check_key(key: str, root: str) -> None:
    """Keys are relative and stay below the root: no scheme, no leading slash, no `..`."""
    if not key or "://" in key or key.startswith("/") or ".." in key.split("/"):
        raise ArchiveError(f"{key!r} is outside the archive {root}")


class S3Archive:
    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint_url: str | None = None,
        timeouts: Timeouts = REQUEST_TIMEOUTS,
        max_connections: int = 10,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        config = BotoConfig(
            connect_timeout=timeouts.connect,
            read_timeout=timeouts.read,
            retries={"total_max_attempts": timeouts.attempts, "mode": "standard"},
            max_pool_connections=max_connections,
            # Every read is checked against the SHA-256 Parley recorded (in the
            # object's metadata, and the database's when the caller passes it):
            # botocore's own check of the same bytes would hash them once more.
            response_checksum_validation="when_required",
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=config)

    def _full_key(self, key: str) -> str:
        _check_key(key, self.url)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, body: bytes, content_type: str = "application/json") -> str:
        full_key, digest = self._full_key(key), hashlib.sha256(body).digest()
        checksum = digest.hex()
        try:
            # The same SHA-256 as S3's checksum of the upload: the server verifies
            # it (BadDigest otherwise), and boto3 computes no CRC32 of its own.
            self.client.put_object(
                Bucket=self.bucket,
                Key=full_key,
                Body=body,
                ContentType=content_type,
                Metadata={CHECKSUM_METADATA: checksum},
                ChecksumSHA256=base64.b64encode(digest).decode(),
            )
        except (BotoCoreError, ClientError) as exc:
            raise ArchiveError(f"could not write s3://{self.bucket}/{full_key}: {_describe(exc)}") from exc
        return checksum

    def get(self, key: str, sha256: str | None = None) -> bytes:
        full_key = self._full_key(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=full_key)
            body = response["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise _read_failure(exc)(f"could not read s3://{self.bucket}/{full_key}: {_describe(exc)}") from exc
        stated = response.get("Metadata", {}).get(CHECKSUM_METADATA)
        actual = sha256_hex(body) if stated is not None or sha256 is not None else None  # hashed once for both
        if stated is not None and stated != actual:
            raise ChecksumMismatch(f"s3://{self.bucket}/{full_key} does not match its sha256 metadata")
        if sha256 is not None:
            _check_recorded(key, actual, sha256)
        return body

    def list(self, prefix: str = CONVERSATIONS_PREFIX, start_after: str | None = None) -> Iterator[ListedObject]:
        """Objects below `prefix` in key order, optionally after the key `start_after`."""
        base = f"{self.prefix}/" if self.prefix else ""
        arguments = {"Bucket": self.bucket, "Prefix": base + prefix}
        if start_after:
            arguments["StartAfter"] = base + start_after
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**arguments):
                for item in page.get("Contents", []):
                    yield ListedObject(item["Key"].removeprefix(base), item["Size"])
        except (BotoCoreError, ClientError) as exc:
            raise ArchiveError(f"could not list {self.url}/{prefix}: {_describe(exc)}") from exc

    def delete(self, key: str) -> None:
        full_key = self._full_key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full_key)
        except (BotoCoreError, ClientError) as exc:
            raise ArchiveError(f"could not delete s3://{self.bucket}/{full_key}: {_describe(exc)}") from exc

    def ping(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise ArchiveError(f"bucket {self.bucket} is not reachable: {_describe(exc)}") from exc


class FileArchive:
    """The archive in a local folder. The checksum lives in the database only (no object metadata)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        _check_key(key, self.url)
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ArchiveError(f"{key!r} is outside the archive {self.url}")
        return path

    def put(self, key: str, body: bytes, content_type: str = "application/json") -> str:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write, flush to disk, then rename: a reader never sees half a
            # document, and the live messages are deleted only after this.
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".", suffix=".tmp", delete=False) as handle:
                handle.write(body)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(handle.name, path)
            _fsync_directory(path.parent)
        except OSError as exc:
            raise ArchiveError(f"could not write {path}: {exc.strerror}") from exc
        return sha256_hex(body)

    def get(self, key: str, sha256: str | None = None) -> bytes:
        path = self._path(key)
        try:
            body = path.read_bytes()
        except FileNotFoundError as exc:
            raise ObjectMissing(f"could not read {path}: {exc.strerror}") from exc
        except OSError as exc:
            kind = ArchiveUnavailable if exc.errno in _UNAVAILABLE_ERRNOS else ArchiveError
            raise kind(f"could not read {path}: {exc.strerror}") from exc
        if sha256 is not None:
            _check_recorded(key, sha256_hex(body), sha256)
        return body

    def list(self, prefix: str = CONVERSATIONS_PREFIX, start_after: str | None = None) -> Iterator[ListedObject]:
        """Files below `prefix` in key order (as S3 lists them), skipping unfinished writes."""
        base = self.root / prefix.rstrip("/")
        if not base.is_dir():
            return
        keys = sorted(
            path.relative_to(self.root).as_posix()
            for path in base.rglob("*")
            if path.is_file() and not path.name.startswith(".")
        )
        for key in keys:
            if start_after is None or key > start_after:
                try:
                    size = (self.root / key).stat().st_size
                except FileNotFoundError:  # deleted since the listing was made, as S3 would no longer list it
                    continue
                yield ListedObject(key, size)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise ArchiveError(f"could not delete {path}: {exc.strerror}") from exc

    def ping(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArchiveError(f"{self.root} cannot be created: {exc.strerror}") from exc
        if not os.access(self.root, os.W_OK):
            raise ArchiveError(f"{self.root} is not writable")


def _fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def make_archive(
    archive_url: str,
    endpoint_url: str | None = None,
    timeouts: Timeouts = REQUEST_TIMEOUTS,
    max_connections: int = 10,
) -> Archive:
    parsed = urlparse(archive_url)
    if parsed.scheme == "s3" and parsed.netloc:
        return S3Archive(parsed.netloc, parsed.path, endpoint_url, timeouts, max_connections)
    if parsed.scheme == "file":
        # file://data/archive (relative) and file:///srv/archive (absolute) both work.
        return FileArchive(Path(parsed.netloc + parsed.path))
    raise ConfigError(f"ARCHIVE_URL must be s3://bucket/prefix or file:///path, not {archive_url!r}")


def encode_document(document: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON on one line: the same document always gives the same bytes.

    orjson writes what `json.dumps(ensure_ascii=False, separators=(",", ":"))`
    writes (strings, integers and most floats byte for byte; `1e-7` where
    json writes `1e-07`) about ten times faster, and this runs for every
    archived conversation. An integer beyond 64 bits (possible in metadata)
    is beyond orjson: such a document is written by json instead.
    """
    try:
        return orjson.dumps(document)
    except orjson.JSONEncodeError:
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def write_document(archive: Archive, document: dict[str, Any]) -> StoredObject:
    """Write a conversation's archive document; return its key and checksum."""
    conversation = document["conversation"]
    key = archive_key(conversation["conversation_id"], datetime.fromisoformat(conversation["ended_at"]))
    return StoredObject(key, archive.put(key, encode_document(document)))


def parse_document(body: bytes, key: str) -> dict[str, Any]:
    """A document from its bytes (checksums are checked by `Archive.get`), checked for its schema version."""
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise ArchiveError(f"{key} is not a JSON document") from exc
    if not isinstance(document, dict) or document.get("schema_version") != SCHEMA_VERSION:
        version = document.get("schema_version") if isinstance(document, dict) else None
        raise ArchiveError(f"{key} has unknown schema_version {version!r}")
    return document


def read_document(archive: Archive, key: str, sha256: str | None = None) -> dict[str, Any]:
    """Read an archive document back, checking its checksum and schema version."""
    return parse_document(archive.get(key, sha256), key)


def _describe(exc: BotoCoreError | ClientError) -> str:
    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code", "ClientError")
    return type(exc).__name__
