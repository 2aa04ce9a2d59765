"""Conversation states, archive-idle, reconcile, retention, erasure, and archive faults.

Faults are real: a socket that accepts and never answers (hung S3), a
SeaweedFS server stopped mid-batch, and `kill -9` of a job between its S3
write and its commit.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from sqlalchemy import create_engine, delete, event, select, text, update
from sqlalchemy.orm import Session

from archiving import ENDING_LEASE, archive_conversations, archive_document, archive_idle, delete_user, end_conversation
from auth import authenticate
from conversations import message_dict
from database_utils import AuditEvent, Conversation, ConversationFile, Message, get_session, utcnow
from errors import NotFound
from main import create_app
from s3_utils import (
    REQUEST_TIMEOUTS,
    ChecksumMismatch,
    archive_key,
    conversation_id_of,
    encode_document,
    read_document,
    write_document,
)
from states import Status, moves_into
from tests.conftest import BACKENDS, client_with_key
from tests.factories import seed_conversation
from tests.seaweed import SeaweedS3

ROOT = Path(__file__).resolve().parent.parent


def test_a_status_moves_only_forward_through_ending():
    assert moves_into(Status.ENDING) == (Status.ACTIVE,)
    assert moves_into(Status.ENDED) == (Status.ENDING,)
    assert moves_into(Status.ACTIVE) == ()


def _talk(client, turns: int = 2, user_id: str = "u-life") -> str:
    conversation_id = client.post("/new_chat", json={"user_id": user_id}).json["conversation_id"]
    for turn in range(turns):
        assert client.post("/chat", json={"conversation_id": conversation_id, "message": f"message {turn}"}).status_code == 200
    return conversation_id


def _row(app, conversation_id) -> Conversation:
    with app.app_context():
        return get_session().get(Conversation, uuid.UUID(str(conversation_id)))


def _execute(app, statement) -> None:
    with app.app_context():
        session = get_session()
        session.execute(statement)
        session.commit()


def _make_idle(app, *conversation_ids, minutes: int = 120) -> None:
    ids = [uuid.UUID(str(c)) for c in conversation_ids]
    _execute(
        app,
        update(Conversation).where(Conversation.conversation_id.in_(ids)).values(updated_at=utcnow() - timedelta(minutes=minutes)),
    )


def _live_messages(app, conversation_id) -> list[dict]:
    with app.app_context():
        query = select(Message).where(Message.conversation_id == uuid.UUID(str(conversation_id))).order_by(Message.seq)
        return [message_dict(row) for row in get_session().scalars(query)]


def _objects(app, conversation_id) -> list[str]:
    """Every archive key that belongs to this conversation, under any dt=."""
    archive = app.extensions["parley.background_archive"]
    return [item.key for item in archive.list() if conversation_id_of(item.key) == uuid.UUID(str(conversation_id))]


def _assert_archived_once(app, conversation_id, messages: list[dict]) -> None:
    """The invariant: ended, exactly one object, at the recorded key, holding exactly these messages."""
    row = _row(app, conversation_id)
    assert row.status == Status.ENDED
    assert _objects(app, conversation_id) == [row.s3_file_location]
    document = read_document(app.extensions["parley.background_archive"], row.s3_file_location, row.archive_sha256)
    assert document["messages"] == messages


def _run_cli(app, *args: str):
    result = app.test_cli_runner().invoke(args=list(args))
    return result


# ---------------------------------------------------------------- states


def test_end_chat_goes_through_ending_to_ended(app, client):
    conversation_id = _talk(client)
    messages = _live_messages(app, conversation_id)

    ended = client.post("/end_chat", json={"conversation_id": conversation_id})
    again = client.post("/end_chat", json={"conversation_id": conversation_id})

    assert ended.status_code == 200 and ended.json["status"] == "ended"
    assert again.status_code == 200 and again.json == ended.json
    day = datetime.fromisoformat(ended.json["ended_at"]).strftime("%Y-%m-%d")
    assert ended.json["s3_file_location"] == f"conversations/dt={day}/{conversation_id}.json"
    assert _row(app, conversation_id).claimed_until is None
    _assert_archived_once(app, conversation_id, messages)
    assert _live_messages(app, conversation_id) == []  # LIVE_RETENTION_DAYS=0: removed at once
    read = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert read["messages"] == messages and read["status"] == "ended"


def test_live_retention_keeps_messages_until_retention_runs(app, client):
    app.config["LIVE_RETENTION_DAYS"] = 2
    conversation_id = _talk(client)
    messages = _live_messages(app, conversation_id)
    client.post("/end_chat", json={"conversation_id": conversation_id})
    assert _live_messages(app, conversation_id) == messages

    fresh = _run_cli(app, "retention")
    _execute(app, update(Conversation).values(ended_at=utcnow() - timedelta(days=3)))
    expired = _run_cli(app, "retention")

    assert fresh.exit_code == 0 and "deleted 0 live messages" in fresh.output
    assert expired.exit_code == 0 and f"deleted {len(messages)} live messages" in expired.output
    assert _live_messages(app, conversation_id) == []
    assert client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"] == messages


def test_archive_retention_drops_old_objects_and_rows(app, client):
    app.config["ARCHIVE_RETENTION_DAYS"] = 30
    old, recent = _talk(client), _talk(client)
    for conversation_id in (old, recent):
        client.post("/end_chat", json={"conversation_id": conversation_id})
    _execute(app, update(Conversation).where(Conversation.conversation_id == uuid.UUID(old)).values(ended_at=utcnow() - timedelta(days=31)))

    result = _run_cli(app, "retention")

    assert result.exit_code == 0 and "dropped 1 archived conversations" in result.output
    assert _row(app, old) is None and _objects(app, old) == []
    assert _row(app, recent).status == Status.ENDED and len(_objects(app, recent)) == 1


def test_archive_location_is_relative_so_the_archive_can_move(app, app_config, client, keys, backend, tmp_path):
    conversation_id = _talk(client)
    messages = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"]
    client.post("/end_chat", json={"conversation_id": conversation_id})
    key = _row(app, conversation_id).s3_file_location
    source = app.extensions["parley.background_archive"]
    if backend == "postgres":
        bucket = app_config["ARCHIVE_URL"].removeprefix("s3://").partition("/")[0]
        moved_url = f"s3://{bucket}/moved-{uuid.uuid4().hex}"
    else:
        moved_url = (tmp_path / "moved-archive").as_uri()
    moved_app = create_app({**app_config, "ARCHIVE_URL": moved_url})
    moved_app.extensions["parley.background_archive"].put(key, source.get(key))

    read = client_with_key(moved_app, keys["client_a"]).get("/get_conversation", query_string={"conversation_id": conversation_id})

    assert read.status_code == 200 and read.json["messages"] == messages


def test_a_changed_object_fails_its_checksum_on_read(app, client):
    conversation_id = _talk(client)
    client.post("/end_chat", json={"conversation_id": conversation_id})
    row = _row(app, conversation_id)
    archive = app.extensions["parley.background_archive"]
    document = read_document(archive, row.s3_file_location)
    document["messages"][0]["content"] = "rewritten by someone"
    archive.put(row.s3_file_location, encode_document(document))

    response = client.get("/get_conversation", query_string={"conversation_id": conversation_id})

    assert response.status_code == 503 and response.json["error"] == "archive_unavailable"


@pytest.mark.parametrize("backend", ["postgres"])
def test_s3_holds_the_recorded_checksum_of_each_object_and_refuses_a_body_that_misses_it(app, client):
    """The archive sends its SHA-256 as the upload's checksum: S3 verifies it and keeps it."""
    conversation_id = _talk(client)
    client.post("/end_chat", json={"conversation_id": conversation_id})
    row = _row(app, conversation_id)
    archive = app.extensions["parley.background_archive"]
    full_key = f"{archive.prefix}/{row.s3_file_location}"

    head = archive.client.head_object(Bucket=archive.bucket, Key=full_key, ChecksumMode="ENABLED")
    wrong = base64.b64encode(hashlib.sha256(b"something else").digest()).decode()
    with pytest.raises(ClientError) as refused:
        archive.client.put_object(Bucket=archive.bucket, Key=full_key, Body=b"{}", ChecksumSHA256=wrong)

    assert base64.b64decode(head["ChecksumSHA256"]).hex() == row.archive_sha256
    assert refused.value.response["Error"]["Code"] == "BadDigest"
    assert read_document(archive, row.s3_file_location, row.archive_sha256)["conversation"]["conversation_id"] == conversation_id


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_read_checks_the_recorded_checksum_once_and_botocore_adds_none(app, client):
    """An object replaced with a self-consistent one (its own metadata and S3 checksum) still fails the
    database's checksum; botocore is not asked to hash what Parley hashes anyway."""
    conversation_id = _talk(client)
    client.post("/end_chat", json={"conversation_id": conversation_id})
    row = _row(app, conversation_id)
    archive = app.extensions["parley.background_archive"]
    document = read_document(archive, row.s3_file_location, row.archive_sha256)
    document["messages"][0]["content"] = "rewritten"
    archive.put(row.s3_file_location, json.dumps(document).encode())

    with pytest.raises(ChecksumMismatch, match="recorded"):
        archive.get(row.s3_file_location, row.archive_sha256)
    assert json.loads(archive.get(row.s3_file_location))["messages"][0]["content"] == "rewritten"
    assert archive.client.meta.config.response_checksum_validation == "when_required"


def test_a_late_writer_leaves_an_archived_conversation_whole(app, client):
    """A writer that reads a conversation after another archived it and deleted its live messages
    (two /end_chat at once, or a request and a job) writes nothing over the whole document."""
    conversation_id = _talk(client, turns=2)
    messages = _live_messages(app, conversation_id)
    assert client.post("/end_chat", json={"conversation_id": conversation_id}).status_code == 200

    with app.app_context():
        session = get_session()
        late = archive_conversations(
            session, app.extensions["parley.archive"], app.config, [session.get(Conversation, uuid.UUID(conversation_id))]
        )

    assert late.superseded == [uuid.UUID(conversation_id)] and late.failed == [] and late.archived == []
    _assert_archived_once(app, conversation_id, messages)


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_reconcile_that_meets_a_conversation_ended_meanwhile_does_not_count_it_failed(app, client):
    """The row is claimed as `ending`, then /end_chat records it before reconcile reads it."""
    conversation_id = _talk(client, turns=2)
    messages = _live_messages(app, conversation_id)
    _execute(app, update(Conversation).where(Conversation.conversation_id == uuid.UUID(conversation_id)).values(
        status=Status.ENDING, ended_at=utcnow(), claimed_until=None))
    with app.app_context():
        session = get_session()
        ending = session.get(Conversation, uuid.UUID(conversation_id))
        assert client.post("/end_chat", json={"conversation_id": conversation_id}).status_code == 200
        late = archive_conversations(session, app.extensions["parley.archive"], app.config, [ending])

    assert (late.archived, late.failed, late.superseded) == ([], [], [uuid.UUID(conversation_id)])
    _assert_archived_once(app, conversation_id, messages)


@pytest.mark.parametrize("backend", ["postgres"])
def test_end_chat_answers_404_when_the_user_is_erased_while_it_ends(app, client, keys):
    """`delete-user` between /end_chat's move to `ending` and its read: nothing is written back, and no 500."""
    conversation_id = _talk(client, turns=1, user_id="erase-me")
    archive = app.extensions["parley.archive"]

    def erase(_session) -> None:
        with Session(app.extensions["parley.engine"]) as other:
            delete_user(other, archive, "erase-me")

    with app.app_context():
        session = get_session()
        caller = authenticate(session, f"Bearer {keys['client_a']}")
        event.listen(session, "after_commit", erase, once=True)
        with pytest.raises(NotFound):
            end_conversation(session, archive, app.config, caller, uuid.UUID(conversation_id))

    assert _row(app, conversation_id) is None and _objects(app, conversation_id) == []


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_read_answers_404_when_the_user_is_erased_between_its_two_reads(app, client):
    """`delete-user` after /get_conversation read the conversation's row and before it read the log:
    the log comes back short, the row is read again and is gone: 404, not a 500."""
    conversation_id = _talk(client, turns=1, user_id="erase-me")
    engine, archive = app.extensions["parley.engine"], app.extensions["parley.archive"]

    erased = []

    def erase_before_the_log_is_read(conn, cursor, statement, parameters, context, executemany) -> None:
        if "FROM messages" in statement and not erased:
            erased.append(True)
            with Session(engine) as other:
                delete_user(other, archive, "erase-me")

    event.listen(engine, "before_cursor_execute", erase_before_the_log_is_read)
    try:
        response = client.get("/get_conversation", query_string={"conversation_id": conversation_id})
    finally:
        event.remove(engine, "before_cursor_execute", erase_before_the_log_is_read)

    assert response.status_code == 404 and response.json["error"] == "not_found"
    assert _row(app, conversation_id) is None


def _end_together(caller, conversation_id: str, start: threading.Barrier):
    start.wait()
    return caller.post("/end_chat", json={"conversation_id": conversation_id})


@pytest.mark.parametrize("backend", ["postgres"])
def test_many_end_chats_at_once_archive_the_whole_conversation(app, client, keys):
    for _ in range(4):
        conversation_id = _talk(client, turns=2)
        messages = _live_messages(app, conversation_id)
        callers = [client_with_key(app, keys["client_a"]) for _ in range(8)]
        start = threading.Barrier(len(callers))
        with ThreadPoolExecutor(len(callers)) as pool:
            answers = list(pool.map(functools.partial(_end_together, conversation_id=conversation_id, start=start), callers))
        read = client.get("/get_conversation", query_string={"conversation_id": conversation_id})

        assert {answer.status_code for answer in answers} <= {200, 202}, [answer.json for answer in answers]
        _assert_archived_once(app, conversation_id, messages)
        assert read.status_code == 200 and [m["content"] for m in read.json["messages"]] == [m["content"] for m in messages]


# ---------------------------------------------------------------- archive-idle


def test_archive_idle_ends_only_idle_conversations(app, client):
    idle, busy = _talk(client), _talk(client)
    messages = _live_messages(app, idle)
    _make_idle(app, idle)

    result = _run_cli(app, "archive-idle")

    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("archive-idle: archived 1, left ending 0")
    _assert_archived_once(app, idle, messages)
    assert _row(app, busy).status == "active"


@pytest.mark.parametrize("backend", ["postgres"])
def test_parallel_archive_idle_runs_never_share_a_conversation(app, keys):
    with app.app_context():
        ids = [seed_conversation(get_session(), 10) for _ in range(40)]
    _make_idle(app, *ids)

    def run() -> int:
        with app.app_context():
            return archive_idle(get_session(), app.extensions["parley.background_archive"], app.config, batch_size=3, workers=2).archived

    with ThreadPoolExecutor(3) as pool:
        counts = list(pool.map(lambda _: run(), range(3)))

    assert sum(counts) == 40
    assert all(len(_objects(app, c)) == 1 for c in ids)


# ---------------------------------------------------------------- S3 faults


@pytest.fixture
def hung_s3():
    """An endpoint that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hung_s3_bounds_end_chat_blocks_no_one_and_reconcile_finishes(app_config, keys, hung_s3, s3_server, s3_bucket):
    """Issue 12 items 4 and 7: the bound, and the object a hung write leaves behind."""
    s3 = {"ARCHIVE_URL": f"s3://{s3_bucket}/{uuid.uuid4().hex}", "S3_ENDPOINT_URL": s3_server.endpoint_url}
    good_app = create_app({**app_config, **s3})
    hung_app = create_app({**app_config, **s3, "S3_ENDPOINT_URL": hung_s3})
    client = client_with_key(good_app, keys["client_a"])
    ending_id, other_id = _talk(client), _talk(client)
    messages = _live_messages(good_app, ending_id)

    def end_on_hung_s3():
        started = time.monotonic()
        response = client_with_key(hung_app, keys["client_a"]).post("/end_chat", json={"conversation_id": ending_id})
        return response, time.monotonic() - started

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(end_on_hung_s3)
        time.sleep(0.5)  # the end is now waiting on S3
        started = time.monotonic()
        other_turn = client.post("/chat", json={"conversation_id": other_id, "message": "still served?"})
        same_turn = client.post("/chat", json={"conversation_id": ending_id, "message": "too late"})
        read = client.get("/get_conversation", query_string={"conversation_id": ending_id})
        others_waited = time.monotonic() - started
        ended, took = pending.result()

    assert ended.status_code == 202 and ended.json["status"] == "ending"
    assert took < REQUEST_TIMEOUTS.total + 2
    assert other_turn.status_code == 200 and same_turn.status_code == 409 and others_waited < 2
    assert read.status_code == 200 and read.json["status"] == "ending" and read.json["messages"] == messages
    # S3 finishes the queued write once it resumes: the same document lands under the same key
    with good_app.app_context():
        session = get_session()
        rows = session.scalars(select(Message).where(Message.conversation_id == uuid.UUID(ending_id)).order_by(Message.seq))
        document = archive_document(session.get(Conversation, uuid.UUID(ending_id)), list(rows))
        write_document(good_app.extensions["parley.background_archive"], document)

    result = _run_cli(good_app, "reconcile")

    assert result.exit_code == 0, result.output
    assert "finished 1 ending" in result.output
    _assert_archived_once(good_app, ending_id, messages)


@pytest.mark.parametrize("backend", ["postgres"])
def test_s3_outage_answers_202_and_archive_idle_finishes_later(app, app_config, keys, client, staff_client, unused_s3_endpoint):
    conversation_id, other_id = _talk(client), _talk(client)
    messages = _live_messages(app, conversation_id)
    broken = client_with_key(create_app({**app_config, "S3_ENDPOINT_URL": unused_s3_endpoint}), keys["client_a"])

    first = broken.post("/end_chat", json={"conversation_id": conversation_id})
    repeated = broken.post("/end_chat", json={"conversation_id": conversation_id})

    assert first.status_code == 202 and first.json["status"] == "ending"
    assert repeated.status_code == 202
    assert client.post("/chat", json={"conversation_id": other_id, "message": "fine"}).status_code == 200
    assert client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"] == messages
    stuck = staff_client.get("/conversations", query_string={"status": "ending"}).json["conversations"]
    assert [c["conversation_id"] for c in stuck] == [conversation_id]
    time.sleep(max(0.0, (_row(app, conversation_id).claimed_until - utcnow()).total_seconds()) + 0.1)

    result = _run_cli(app, "archive-idle")

    assert result.exit_code == 0 and "archived 1" in result.output
    _assert_archived_once(app, conversation_id, messages)


@pytest.fixture
def unused_s3_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.parametrize("backend", ["postgres"])
def test_s3_stopped_mid_batch_then_reconcile_leaves_one_object_per_ended_conversation(app_config, keys, tmp_path):
    (tmp_path / "seaweedfs").mkdir()
    with SeaweedS3(tmp_path / "seaweedfs") as s3:
        s3.client().create_bucket(Bucket="midbatch")
        app = create_app({**app_config, "ARCHIVE_URL": "s3://midbatch/archive", "S3_ENDPOINT_URL": s3.endpoint_url})
        with app.app_context():
            ids = [seed_conversation(get_session(), 20, user_id=f"user-{n}") for n in range(80)]
        _make_idle(app, *ids)
        expected = {c: _live_messages(app, c) for c in ids}

        def run():
            with app.app_context():
                return archive_idle(get_session(), app.extensions["parley.background_archive"], app.config, batch_size=4, workers=2)

        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(run)
            deadline = time.monotonic() + 60
            while len(list(app.extensions["parley.background_archive"].list())) < 12 and time.monotonic() < deadline:
                time.sleep(0.05)
            s3.stop()
            report = job.result()
        assert report.stopped_early and report.archived < len(ids)
        s3.start()

        repaired = _run_cli(app, "reconcile")
        assert repaired.exit_code == 0, repaired.output
        statuses = {c: _row(app, c).status for c in ids}
        assert Status.ENDING not in statuses.values()
        for conversation_id, status in statuses.items():
            if status == Status.ENDED:
                _assert_archived_once(app, conversation_id, expected[conversation_id])
            else:
                assert _objects(app, conversation_id) == [] and _live_messages(app, conversation_id) == expected[conversation_id]

        finished = _run_cli(app, "archive-idle")
        assert finished.exit_code == 0, finished.output
        for conversation_id in ids:
            _assert_archived_once(app, conversation_id, expected[conversation_id])


def _kill_between_write_and_commit(app, app_config, conversation_id) -> None:
    """Run archive-idle in a process and `kill -9` it after its S3 write, before its commit.

    A lock on the conversation's messages holds the job at its commit (it
    deletes them there); the test waits until the object is in S3 and the
    job is blocked on that lock, then kills it.
    """
    env = {
        **os.environ,
        "DATABASE_URL": app_config["DATABASE_URL"],
        "ARCHIVE_URL": app_config["ARCHIVE_URL"],
        "S3_ENDPOINT_URL": app_config["S3_ENDPOINT_URL"],
        "LLM_PROVIDER": "echo",
    }
    engine = create_engine(app_config["DATABASE_URL"])
    holder, monitor = engine.connect(), engine.connect()
    holder.execute(text("SELECT seq FROM messages WHERE conversation_id = :c FOR UPDATE"), {"c": uuid.UUID(conversation_id)})
    job = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "main", "archive-idle"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        blocked = False
        while time.monotonic() < deadline and not blocked:
            time.sleep(0.05)
            waiting = monitor.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()")
            ).scalar()
            monitor.rollback()  # statistics are a snapshot per transaction
            blocked = bool(_objects(app, conversation_id)) and waiting > 0
        activity = monitor.execute(
            text("SELECT state, wait_event_type, wait_event, left(query, 80) FROM pg_stat_activity WHERE datname = current_database()")
        ).all()
        assert blocked, f"the job never reached its commit: objects {_objects(app, conversation_id)}, {activity}"
        os.kill(job.pid, signal.SIGKILL)
        assert job.wait(10) == -signal.SIGKILL
    finally:
        job.kill()
        holder.rollback()
        # The killed job's backend notices only now, and rolls back: wait for it.
        deadline = time.monotonic() + 30
        holder.close()
        while time.monotonic() < deadline and monitor.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"
            )
        ).scalar():
            monitor.rollback()
            time.sleep(0.05)
        monitor.close()
        engine.dispose()


@pytest.mark.parametrize("backend", ["postgres"])
@pytest.mark.parametrize("repair", ["reconcile", "end_chat", "archive-idle two days later"])
def test_kill_9_between_s3_write_and_commit_is_repaired(app, app_config, client, repair):
    """Issue 12 item 7: an `ending` row with its object; repaired once, under the same key, on any day."""
    conversation_id = _talk(client, turns=3)
    messages = _live_messages(app, conversation_id)
    _make_idle(app, conversation_id)

    _kill_between_write_and_commit(app, app_config, conversation_id)

    left = _row(app, conversation_id)
    assert left.status == Status.ENDING and _objects(app, conversation_id) == [archive_key(conversation_id, left.ended_at)]
    if repair == "reconcile":
        result = _run_cli(app, "reconcile")
        assert result.exit_code == 0 and "finished 1 ending" in result.output, result.output
    elif repair == "end_chat":
        assert client.post("/end_chat", json={"conversation_id": conversation_id}).status_code == 200
    else:
        later = utcnow() + timedelta(days=2) + ENDING_LEASE
        with app.app_context():
            report = archive_idle(get_session(), app.extensions["parley.background_archive"], app.config, now=later)
        assert report.archived == 1
    _assert_archived_once(app, conversation_id, messages)
    assert _row(app, conversation_id).s3_file_location == archive_key(conversation_id, left.ended_at)


# ---------------------------------------------------------------- reconcile


def test_reconcile_repairs_every_kind_of_disagreement(app, client):
    app.config["LIVE_RETENTION_DAYS"] = 30  # live messages kept: missing objects can be rewritten
    archive = app.extensions["parley.background_archive"]
    ids = {name: _talk(client) for name in ("orphan", "stale", "active", "missing", "changed", "ending", "fine")}
    expected = {name: _live_messages(app, c) for name, c in ids.items()}
    for name in ("orphan", "stale", "missing", "changed", "fine"):
        assert client.post("/end_chat", json={"conversation_id": ids[name]}).status_code == 200
    rows = {name: _row(app, c) for name, c in ids.items()}
    # a row lost (say, a restore from an older backup) while its object stayed
    _execute(app, delete(Conversation).where(Conversation.conversation_id == uuid.UUID(ids["orphan"])))
    # a stale copy under another day, and an object of a conversation that is still active
    archive.put(archive_key(ids["stale"], datetime(2001, 1, 1, tzinfo=timezone.utc)), archive.get(rows["stale"].s3_file_location))
    archive.put(archive_key(ids["active"], datetime(2001, 1, 1, tzinfo=timezone.utc)), b'{"schema_version": 1}')
    archive.delete(rows["missing"].s3_file_location)
    archive.put(rows["changed"].s3_file_location, b'{"schema_version": 1, "messages": []}')
    _execute(
        app,
        update(Conversation)
        .where(Conversation.conversation_id == uuid.UUID(ids["ending"]))
        .values(status=Status.ENDING, ended_at=utcnow(), claimed_until=utcnow() + timedelta(minutes=1)),
    )

    result = _run_cli(app, "reconcile")

    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == (
        "reconcile: finished 1 ending (failed 0), restored 1 rows from objects without one (and 0 file rows), "
        "removed 2 stale objects and 0 file objects without a row, verified 4 objects, rewrote 2 missing or different, "
        "unrepairable 0"
    )
    for name in ("orphan", "stale", "missing", "changed", "ending", "fine"):
        _assert_archived_once(app, ids[name], expected[name])
    assert _objects(app, ids["active"]) == [] and _row(app, ids["active"]).status == "active"
    restored = _row(app, ids["orphan"])
    assert (restored.user_id, restored.message_count, restored.owner_key_id) == ("u-life", 4, None)


def test_reconcile_restores_file_rows_and_removes_file_objects_left_without_one(app, client):
    app.config["LIVE_RETENTION_DAYS"] = 30  # live messages kept: they name the files they were sent with
    archive = app.extensions["parley.background_archive"]
    ids = {name: _talk(client, turns=1) for name in ("lost", "rows_lost", "ended", "active", "named", "unreadable")}
    uploads = {
        name: client.post(f"/conversations/{ids[name]}/files", content_type="multipart/form-data",
                          data={"file": (io.BytesIO(b"the minutes of the meeting"), "minutes.txt")})
        for name in ("lost", "rows_lost", "named", "unreadable")
    }
    assert [upload.status_code for upload in uploads.values()] == [201] * 4
    sent = {"conversation_id": ids["named"], "message": "summarize", "file_ids": [uploads["named"].json["file_id"]]}
    assert client.post("/chat", json=sent).status_code == 200
    for name in ("lost", "rows_lost", "ended", "named", "unreadable"):
        assert client.post("/end_chat", json={"conversation_id": ids[name]}).status_code == 200
    # rows lost (say, a restore from an older backup) while the objects stayed: a conversation's
    # row with its file rows, and others' file rows only
    for name in ("lost", "rows_lost", "named", "unreadable"):
        _execute(app, delete(ConversationFile).where(ConversationFile.conversation_id == uuid.UUID(ids[name])))
    _execute(app, delete(Conversation).where(Conversation.conversation_id == uuid.UUID(ids["lost"])))
    # a document that no longer lists a file a message was sent with, and one that cannot be read
    named = _row(app, ids["named"])
    document = json.loads(archive.get(named.s3_file_location))
    document["files"] = []
    _execute(app, update(Conversation).where(Conversation.conversation_id == named.conversation_id)
             .values(archive_sha256=archive.put(named.s3_file_location, json.dumps(document).encode())))
    archive.delete(_row(app, ids["unreadable"]).s3_file_location)
    # objects an upload left without a row: in an ended, an active and an erased conversation
    left = {name: f"files/{ids.get(name, uuid.uuid4())}/{uuid.uuid4()}" for name in ("ended", "active", "erased")}
    for key in left.values():
        archive.put(key, b"bytes whose row was never stored", "text/plain")
    archive.put("files/notes-from-an-operator.txt", b"not a file of Parley's", "text/plain")

    result = _run_cli(app, "reconcile")

    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert "restored 1 rows from objects without one (and 2 file rows)" in line, line
    assert "removed 0 stale objects and 2 file objects without a row" in line, line
    assert "rewrote 1 missing or different" in line, line  # the document that could not be read
    listed = {item.key for item in archive.list("files/")}
    assert {upload.json["location"] for upload in uploads.values()} <= listed  # restored, or kept
    assert left["active"] in listed  # an upload may be under way there
    assert left["ended"] not in listed and left["erased"] not in listed
    assert "files/notes-from-an-operator.txt" in listed
    with app.app_context():
        for name in ("lost", "rows_lost"):
            restored = get_session().get(ConversationFile, uuid.UUID(uploads[name].json["file_id"]))
            assert (restored.name, restored.size, restored.sha256, restored.uploaded_by) == (
                "minutes.txt", 26, uploads[name].json["sha256"], None)
    # The next run: the document that could not be read was written again, from the rows, without
    # the file whose row was lost; nothing names that file now, so its object goes.
    assert _run_cli(app, "reconcile").output.strip().splitlines()[-1].startswith(
        "reconcile: finished 0 ending (failed 0), restored 0 rows from objects without one (and 0 file rows), "
        "removed 0 stale objects and 1 file objects without a row")
    listed = {item.key for item in archive.list("files/")}
    assert uploads["named"].json["location"] in listed and uploads["unreadable"].json["location"] not in listed


def test_reconcile_reports_what_it_cannot_repair(app, client):
    conversation_id = _talk(client)
    client.post("/end_chat", json={"conversation_id": conversation_id})
    app.extensions["parley.background_archive"].delete(_row(app, conversation_id).s3_file_location)

    result = _run_cli(app, "reconcile")

    assert result.exit_code == 1
    assert f"unrepairable 1: {conversation_id}" in result.output


@pytest.mark.parametrize("backend", ["postgres"])
def test_reconcile_with_the_archive_away_ends_with_its_line_not_a_traceback(app_config, keys, client, unused_s3_endpoint):
    ending = _talk(client)
    broken = create_app({**app_config, "S3_ENDPOINT_URL": unused_s3_endpoint})
    assert client_with_key(broken, keys["client_a"]).post("/end_chat", json={"conversation_id": ending}).status_code == 202

    result = _run_cli(broken, "reconcile")

    assert result.exit_code == 1 and "Traceback" not in result.output
    summary = result.output.strip().splitlines()[-1]  # after the write failure's log line
    assert summary.startswith("reconcile: finished 0 ending (failed 1)"), result.output
    assert "(stopped: the archive is unavailable: could not list" in summary
    assert _row(broken, ending).status == Status.ENDING  # left for the next run
    broken.extensions["parley.engine"].dispose()


@pytest.mark.parametrize("backend", ["postgres"])
@pytest.mark.parametrize("command", [["retention"], ["delete-user", "u-life"]])
def test_retention_and_erasure_with_the_archive_away_say_so_in_one_line_and_keep_the_rows(
    app_config, keys, client, unused_s3_endpoint, command
):
    conversation_id = _talk(client)
    assert client.post("/end_chat", json={"conversation_id": conversation_id}).status_code == 200
    broken = create_app({**app_config, "S3_ENDPOINT_URL": unused_s3_endpoint, "ARCHIVE_RETENTION_DAYS": 30})
    _execute(broken, update(Conversation).values(ended_at=utcnow() - timedelta(days=31)))

    result = _run_cli(broken, *command)

    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    said = result.output.strip().splitlines()[-1]
    if command == ["retention"]:
        assert said.startswith("retention: deleted 0 live messages of ended conversations, dropped 0 archived conversations")
        assert "(stopped: the archive is unavailable: could not delete" in said
    else:
        assert said.startswith("Error: delete-user u-life stopped: could not delete") and said.endswith("run it again to finish")
    assert _row(broken, conversation_id).status == Status.ENDED  # its object could not be removed: the row stays
    broken.extensions["parley.engine"].dispose()


# ---------------------------------------------------------------- erasure


def test_delete_user_removes_the_stored_answers_of_idempotent_retries(app, client):
    """A retry with the same Idempotency-Key would otherwise replay the erased words (a /chat's reply)."""
    opened = client.post("/new_chat", json={"user_id": "erase-me"}, headers={"Idempotency-Key": "open-1"})
    conversation_id = opened.json["conversation_id"]
    said = {"conversation_id": conversation_id, "message": "my card is 4111 1111 1111 1111"}
    assert client.post("/chat", json=said, headers={"Idempotency-Key": "chat-1"}).status_code == 200
    kept = client.post("/new_chat", json={"user_id": "keep-me"}, headers={"Idempotency-Key": "open-2"})

    assert _run_cli(app, "delete-user", "erase-me").exit_code == 0

    again = client.post("/chat", json=said, headers={"Idempotency-Key": "chat-1"})
    assert again.status_code == 404 and "4111" not in again.get_data(as_text=True)  # ran afresh: the conversation is gone
    assert client.post("/new_chat", json={"user_id": "erase-me"}, headers={"Idempotency-Key": "open-1"}).json[
        "conversation_id"] != conversation_id
    replayed = client.post("/new_chat", json={"user_id": "keep-me"}, headers={"Idempotency-Key": "open-2"})
    assert replayed.headers.get("Idempotent-Replayed") == "true" and replayed.json == kept.json


def test_delete_user_removes_rows_objects_and_is_audited(app, client):
    erased = [_talk(client, user_id="erase-me") for _ in range(3)]
    kept = _talk(client, user_id="keep-me")
    for conversation_id in (*erased[:2], kept):
        client.post("/end_chat", json={"conversation_id": conversation_id})
    kept_messages = client.get("/get_conversation", query_string={"conversation_id": kept}).json["messages"]

    result = _run_cli(app, "delete-user", "erase-me")

    assert result.exit_code == 0, result.output
    assert "removed 3 conversations, 2 archive objects" in result.output
    assert all(_row(app, c) is None and _objects(app, c) == [] for c in erased)
    assert client.get("/get_conversation", query_string={"conversation_id": kept}).json["messages"] == kept_messages
    with app.app_context():
        event = get_session().scalars(select(AuditEvent).where(AuditEvent.action == "delete_user")).one()
    assert event.key_id is None and event.detail["user_id"] == "erase-me" and event.detail["conversations"] == 3
