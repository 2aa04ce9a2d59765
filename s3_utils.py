"""The conversation archive: one versioned JSON document per ended conversation.

`ARCHIVE_URL` picks the store: `s3://bucket/prefix` (AWS S3, or any
S3-compatible server via `S3_ENDPOINT_URL`) or `file:///path` (the embedded
default). Both use the same key layout, partitioned by the UTC date the
conversation ended so that Athena, Spark or DuckDB can prune by date:

    {prefix}/conversations/dt=YYYY-MM-DD/{conversation_id}.json
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

SCHEMA_VERSION = 1
_BOTO_CONFIG = BotoConfig(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})


class ArchiveError(Exception):
    """The archive could not be read or written."""


class Archive(Protocol):
    url: str

    def put(self, key: str, body: bytes) -> str: ...

    def get(self, location: str) -> bytes: ...

    def ping(self) -> None: ...


def archive_key(conversation_id: str, ended_at: datetime) -> str:
    """The key of a conversation's document, below the archive's prefix."""
    # uuid.UUID() both validates the ID and normalises it, so no request
    # string reaches a key or a path unchecked.
    return f"conversations/dt={ended_at:%Y-%m-%d}/{uuid.UUID(conversation_id)}.json"


class S3Archive:
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=_BOTO_CONFIG)

    def _full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, body: bytes) -> str:
        full_key = self._full_key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=full_key, Body=body, ContentType="application/json")
        except (BotoCoreError, ClientError) as exc:
            raise ArchiveError(f"could not write s3://{self.bucket}/{full_key}: {_describe(exc)}") from exc
        return f"s3://{self.bucket}/{full_key}"

    def get(self, location: str) -> bytes:
        if not location.startswith(self.url + "/"):
            raise ArchiveError(f"{location} is outside the archive {self.url}")
        key = location.removeprefix(f"s3://{self.bucket}/")
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise ArchiveError(f"could not read {location}: {_describe(exc)}") from exc

    def ping(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise ArchiveError(f"bucket {self.bucket} is not reachable: {_describe(exc)}") from exc


class FileArchive:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = self.root.as_uri()

    def put(self, key: str, body: bytes) -> str:
        path = self.root / key
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write, flush to disk, then rename: a reader never sees half a
            # document, and the live messages are deleted only after this.
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as handle:
                handle.write(body)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(handle.name, path)
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            raise ArchiveError(f"could not write {path}: {exc.strerror}") from exc
        # Not path.as_uri(): that percent-encodes `dt=` and the location
        # could no longer be pasted into a shell. get() reads both forms.
        return f"file://{path}"

    def get(self, location: str) -> bytes:
        path = Path(unquote(urlparse(location).path)).resolve()
        if location.startswith("file:") and path.is_relative_to(self.root):
            try:
                return path.read_bytes()
            except OSError as exc:
                raise ArchiveError(f"could not read {location}: {exc.strerror}") from exc
        raise ArchiveError(f"{location} is outside the archive {self.url}")

    def ping(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArchiveError(f"{self.root} cannot be created: {exc.strerror}") from exc
        if not os.access(self.root, os.W_OK):
            raise ArchiveError(f"{self.root} is not writable")


def make_archive(archive_url: str, endpoint_url: str | None = None) -> Archive:
    parsed = urlparse(archive_url)
    if parsed.scheme == "s3" and parsed.netloc:
        return S3Archive(parsed.netloc, parsed.path, endpoint_url)
    if parsed.scheme == "file":
        # file://data/archive (relative) and file:///srv/archive (absolute) both work.
        return FileArchive(Path(parsed.netloc + parsed.path))
    raise ValueError(f"ARCHIVE_URL must be s3://bucket/prefix or file:///path, not {archive_url!r}")


def upload_conversation_to_s3(archive: Archive, document: dict[str, Any]) -> str:
    """Write a conversation's archive document and return its location."""
    conversation = document["conversation"]
    key = archive_key(conversation["conversation_id"], datetime.fromisoformat(conversation["ended_at"]))
    body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return archive.put(key, body)


def get_s3_file_content(archive: Archive, location: str) -> dict[str, Any]:
    """Read an archive document back, checking its schema version."""
    document = json.loads(archive.get(location))
    if document.get("schema_version") != SCHEMA_VERSION:
        raise ArchiveError(f"{location} has unknown schema_version {document.get('schema_version')!r}")
    return document


def _describe(exc: BotoCoreError | ClientError) -> str:
    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code", "ClientError")
    return type(exc).__name__
