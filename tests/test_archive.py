"""The archive: key layout, document contents in SeaweedFS, faults and path safety."""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from main import create_app
from s3_utils import (
    SCHEMA_VERSION,
    ArchiveError,
    ChecksumMismatch,
    FileArchive,
    S3Archive,
    archive_key,
    make_archive,
    read_document,
    sha256_hex,
    write_document,
)


def _finished_conversation(client, turns: int = 2, **body) -> str:
    conversation_id = client.post("/new_chat", json={"user_id": "u-arch", **body}).json["conversation_id"]
    for turn in range(turns):
        client.post("/chat", json={"conversation_id": conversation_id, "message": f"message {turn}"})
    return conversation_id


@pytest.mark.parametrize("backend", ["postgres"])
def test_archived_object_in_s3_holds_exactly_the_stored_messages(client, app, s3_server):
    conversation_id = _finished_conversation(client, turns=3, conversation_name="S3 check", metadata={"k": "v"})
    live = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json

    ended = client.post("/end_chat", json={"conversation_id": conversation_id}).json

    bucket, _, prefix = app.config["ARCHIVE_URL"].removeprefix("s3://").partition("/")
    ended_on = datetime.fromisoformat(ended["ended_at"]).strftime("%Y-%m-%d")
    # stored relative to ARCHIVE_URL, so the archive can move to another bucket
    assert ended["s3_file_location"] == f"conversations/dt={ended_on}/{conversation_id}.json"
    stored = s3_server.client().get_object(Bucket=bucket, Key=f"{prefix}/{ended['s3_file_location']}")
    body = stored["Body"].read()
    assert stored["Metadata"]["sha256"] == sha256_hex(body)
    document = json.loads(body)
    assert document["schema_version"] == SCHEMA_VERSION
    assert document["messages"] == live["messages"]
    assert document["conversation"]["conversation_name"] == "S3 check"
    assert document["conversation"]["metadata"] == {"k": "v"}
    assert document["usage"]["output_tokens"] == live["usage"]["output_tokens"]


@pytest.mark.parametrize("backend", ["embedded"])
def test_file_archive_uses_the_same_layout(client, app_config):
    conversation_id = _finished_conversation(client)

    ended = client.post("/end_chat", json={"conversation_id": conversation_id}).json

    root = Path(app_config["ARCHIVE_URL"].removeprefix("file://"))
    files = list(root.glob(f"conversations/dt=*/{conversation_id}.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["conversation"]["ended_at"] == ended["ended_at"]


@pytest.mark.parametrize("backend", ["embedded"])
def test_unusable_archive_folder_makes_readyz_503(app_config, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    client = create_app({**app_config, "ARCHIVE_URL": (blocker / "archive").as_uri()}).test_client()

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json["checks"]["archive"] == "unavailable"


def test_access_denied_bucket_is_an_archive_error():
    """A fault a real local server does not produce: the bucket refuses writes."""
    with mock_aws():
        archive = S3Archive("no-such-bucket", "prefix")
        with pytest.raises(ArchiveError, match="NoSuchBucket"):
            archive.put("conversations/dt=2026-01-01/x.json", b"{}")


def test_round_trip_through_moto_s3():
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="archive")
        archive = make_archive("s3://archive/some/prefix")
        document = {
            "schema_version": SCHEMA_VERSION,
            "conversation": {"conversation_id": str(uuid.UUID(int=7)), "ended_at": "2026-03-04T05:06:07+00:00"},
            "messages": [{"seq": 1, "role": "user", "content": "ünï"}],
        }

        stored = write_document(archive, document)

        assert stored.key == f"conversations/dt=2026-03-04/{uuid.UUID(int=7)}.json"
        assert read_document(archive, stored.key, stored.sha256) == document
        with pytest.raises(ChecksumMismatch):
            read_document(archive, stored.key, sha256_hex(b"something else"))


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "x/../../y", "", "00000000-0000-0000-0000-00000000000g"])
def test_archive_key_rejects_anything_but_a_uuid(bad_id):
    with pytest.raises(ValueError):
        archive_key(bad_id, datetime.now(timezone.utc))


@pytest.mark.parametrize(
    "location", ["file:///etc/passwd", "file:///tmp/../etc/passwd", "s3://other/key", "/etc/passwd", "conversations/../../x"]
)
def test_file_archive_refuses_locations_outside_its_root(tmp_path, location):
    with pytest.raises(ArchiveError, match="outside the archive"):
        FileArchive(tmp_path / "archive").get(location)


def test_a_file_archive_checks_the_recorded_checksum(tmp_path):
    archive = FileArchive(tmp_path)
    recorded = archive.put("conversations/dt=2026-01-01/a.json", b'{"a": 1}')

    assert archive.get("conversations/dt=2026-01-01/a.json", recorded) == b'{"a": 1}'
    with pytest.raises(ChecksumMismatch, match="recorded"):
        archive.get("conversations/dt=2026-01-01/a.json", sha256_hex(b"something else"))


def test_unknown_schema_version_is_refused(tmp_path):
    archive = FileArchive(tmp_path)
    archive.put("conversations/dt=2026-01-01/a.json", b'{"schema_version": 99}')
    with pytest.raises(ArchiveError, match="schema_version"):
        read_document(archive, "conversations/dt=2026-01-01/a.json")


@pytest.mark.parametrize("url", ["ftp://host/x", "s3://", "bucket/prefix"])
def test_bad_archive_url_is_refused(url):
    with pytest.raises(ValueError, match="ARCHIVE_URL"):
        make_archive(url)


_USAGES = [
    None,
    {"input_tokens": 12, "output_tokens": 7},
    {"input_tokens": 12, "output_tokens": 7, "cache_read_input_tokens": 3},  # extra counts are not archived
    {"input_tokens": "12", "output_tokens": 7.0},  # validated and coerced as the API does
]


@pytest.mark.parametrize("usage", _USAGES)
@pytest.mark.parametrize("incomplete", [False, True])
@pytest.mark.parametrize("file_ids", [None, [], ["9F8E2C56-0B1A-4C8E-9A0E-3C1D2B4A5E6F"]])
def test_archived_messages_have_the_api_shape(usage, incomplete, file_ids):
    """archive-idle builds message dicts without pydantic; they must equal the API's MessageOut."""
    from types import SimpleNamespace

    from archiving import archive_document
    from conversations import message_dict
    from database_utils import Conversation

    when = datetime(2026, 3, 4, 5, 6, 7, 89, tzinfo=timezone.utc)
    conversation = Conversation(
        conversation_id=uuid.uuid4(), user_id="u", status="ending", created_at=when, updated_at=when, ended_at=when,
        message_count=2, token_count=9, input_tokens=1, output_tokens=2, meta={}, handoff="bot", variables={},
    )  # fmt: skip
    rows = [
        SimpleNamespace(
            seq=1, role="user", content="héllo\n", created_at=when, token_count=4, usage=None, incomplete=False, file_ids=file_ids
        ),
        SimpleNamespace(
            seq=2, role="assistant", content="ok", created_at=when, token_count=5, usage=usage, incomplete=incomplete, file_ids=None
        ),
    ]

    document = archive_document(conversation, rows)

    assert document["messages"] == [message_dict(row) for row in rows]
    assert [list(message) for message in document["messages"]] == [list(message_dict(row)) for row in rows]  # same key order


def test_documents_encode_as_compact_json_and_big_integers_still_encode():
    from s3_utils import encode_document

    text = "é \u2028 \x00\x1f\x7f 😀 \"q\" \\ </script> \t\n"
    document = {"conversation": {"metadata": {text: [text, 1, -2**63, True, None, 0.5]}}, "messages": [{"content": text}]}
    huge = {"metadata": {"n": 2**70}}

    assert encode_document(document) == json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    assert json.loads(encode_document(huge)) == huge
