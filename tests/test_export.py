"""Batch export: read back with DuckDB and pyarrow and compared with the database, row for row."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
import pytest
from pyarrow import fs
from sqlalchemy import select, update

from archiving import archive_idle
from database_utils import AuditEvent, Conversation, Message, get_session
from main import create_app
from s3_utils import read_document
from tests.factories import seed_conversation

ROOT = Path(__file__).resolve().parent.parent
DAY1 = datetime(2026, 11, 2, 12, tzinfo=timezone.utc)
DAY2 = datetime(2026, 11, 4, 9, tzinfo=timezone.utc)
RANGE = ["--since", "2026-11-01", "--until", "2026-11-30"]


def _archive_on(app, day: datetime, ids: list) -> None:
    """End `ids` with archive-idle as if it ran on `day`, so their objects land under that dt=."""
    with app.app_context():
        session = get_session()
        session.execute(
            update(Conversation)
            .where(Conversation.conversation_id.in_([uuid.UUID(str(c)) for c in ids]))
            .values(updated_at=day - timedelta(hours=2))
        )
        session.commit()
        report = archive_idle(session, app.extensions["parley.background_archive"], app.config, now=day)
    assert report.archived == len(ids)


@pytest.fixture
def archived(app, client) -> dict[str, datetime]:
    """Nine conversations of three users, archived on two days; live messages kept to compare with."""
    app.config["LIVE_RETENTION_DAYS"] = 3650
    days: dict[str, datetime] = {}
    for n in range(9):
        conversation_id = client.post("/new_chat", json={"user_id": f"user-{n % 3}", "conversation_name": f"c{n}"}).json["conversation_id"]
        for turn in range(1 + n % 3):
            client.post("/chat", json={"conversation_id": conversation_id, "message": f"ünïcode {n}/{turn}"})
        days[conversation_id] = DAY1 if n < 5 else DAY2
    for day in (DAY1, DAY2):
        _archive_on(app, day, [c for c, d in days.items() if d == day])
    return days


def _database_rows(app, user_id: str | None = None) -> list[tuple]:
    with app.app_context():
        query = (
            select(Conversation.conversation_id, Conversation.user_id, Message.seq, Message.role, Message.content, Conversation.ended_at)
            .join(Message, Message.conversation_id == Conversation.conversation_id)
            .order_by(Conversation.conversation_id, Message.seq)
        )
        if user_id:
            query = query.where(Conversation.user_id == user_id)
        return [(str(c), u, s, r, t, e.strftime("%Y-%m-%d")) for c, u, s, r, t, e in get_session().execute(query)]


def _export(runner, out, *options: str):
    return runner.invoke(args=["export", *RANGE, "--out", str(out), *options])


def _manifest(out: Path) -> dict:
    return json.loads((out / "_manifest.json").read_text())


def test_parquet_export_matches_the_database_in_duckdb_and_pyarrow(app, runner, archived, tmp_path):
    out = tmp_path / "parquet"
    expected = _database_rows(app)

    result = _export(runner, out, "--format", "parquet", "--workers", "4")

    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith(f"export: 9 conversations, {len(expected)} messages, 2 files")
    rows = duckdb.sql(
        f"SELECT conversation_id, user_id, seq, role, content, CAST(dt AS VARCHAR) "
        f"FROM read_parquet('{out}/**/*.parquet', hive_partitioning = true) ORDER BY conversation_id, seq"
    ).fetchall()
    assert rows == expected
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == len(expected)
    assert {str(day) for day in table["dt"].to_pylist()} == {"2026-11-02", "2026-11-04"}
    manifest = _manifest(out)
    assert manifest["status"] == "complete" and manifest["arguments"]["format"] == "parquet"
    assert manifest["totals"] == {"files": 2, "conversations": 9, "messages": len(expected), "bytes": manifest["totals"]["bytes"]}
    for entry in manifest["files"]:
        assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]


def test_jsonl_export_holds_the_archive_documents_and_listing_gives_the_same(app, runner, archived, tmp_path):
    archive = app.extensions["parley.background_archive"]
    with app.app_context():
        rows = get_session().execute(
            select(Conversation.s3_file_location, Conversation.archive_sha256)
            .where(Conversation.user_id == "user-1")
            .order_by(Conversation.ended_at, Conversation.conversation_id)
        ).all()
    documents = [read_document(archive, key, sha) for key, sha in rows]

    from_database = _export(runner, tmp_path / "db", "--format", "jsonl", "--user-id", "user-1")
    from_listing = _export(runner, tmp_path / "listing", "--format", "jsonl", "--user-id", "user-1", "--from-listing")

    assert from_database.exit_code == 0 and from_listing.exit_code == 0, from_database.output + from_listing.output
    files = sorted((tmp_path / "db").glob("dt=*/*.jsonl"))
    lines = [json.loads(line) for path in files for line in path.read_text().splitlines()]
    assert lines == documents
    count = duckdb.sql(f"SELECT count(*) FROM read_json('{tmp_path / 'db'}/*/*.jsonl', format = 'newline_delimited')").fetchall()
    assert count == [(3,)]
    assert [f["sha256"] for f in _manifest(tmp_path / "db")["files"]] == [
        f["sha256"] for f in _manifest(tmp_path / "listing")["files"]
    ]


@pytest.mark.parametrize("backend", ["postgres"])
def test_export_to_an_s3_prefix(app, runner, archived, s3_server, s3_bucket):
    prefix = f"exports-{uuid.uuid4().hex}"

    result = _export(runner, f"s3://{s3_bucket}/{prefix}", "--format", "parquet")

    assert result.exit_code == 0, result.output
    host = s3_server.endpoint_url.removeprefix("http://")
    s3 = fs.S3FileSystem(
        access_key="parley-test", secret_key="parley-test", endpoint_override=host, scheme="http", region="us-east-1"
    )
    table = ds.dataset(f"{s3_bucket}/{prefix}", filesystem=s3, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == len(_database_rows(app))
    manifest = json.loads(s3_server.client().get_object(Bucket=s3_bucket, Key=f"{prefix}/_manifest.json")["Body"].read())
    assert manifest["status"] == "complete" and manifest["totals"]["conversations"] == 9


@pytest.mark.parametrize("backend", ["postgres"])
def test_export_killed_with_9_resumes_without_duplicates(app, app_config, runner, tmp_path):
    app.config["LIVE_RETENTION_DAYS"] = 3650
    with app.app_context():
        ids = [seed_conversation(get_session(), 10, user_id=f"user-{n % 7}") for n in range(120)]
    _archive_on(app, DAY1, ids)
    out = tmp_path / "resumable"
    options = ["--format", "parquet", "--part-mb", "0.002", "--workers", "2"]
    env = {
        **os.environ,
        "DATABASE_URL": app_config["DATABASE_URL"],
        "ARCHIVE_URL": app_config["ARCHIVE_URL"],
        "S3_ENDPOINT_URL": app_config["S3_ENDPOINT_URL"],
        "LLM_PROVIDER": "echo",
    }
    job = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "main", "export", *RANGE, "--out", str(out), *options],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out.joinpath("_manifest.json").exists() and len(_manifest(out)["files"]) >= 5):
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGKILL)
    assert job.wait(10) == -signal.SIGKILL
    interrupted = _manifest(out)
    assert interrupted["status"] == "running" and 5 <= len(interrupted["files"]) < 120

    result = _export(runner, out, *options)

    assert result.exit_code == 0, result.output
    manifest = _manifest(out)
    assert manifest["status"] == "complete" and manifest["totals"]["conversations"] == 120
    published = sorted(p.relative_to(out).as_posix() for p in out.glob("dt=*/*.parquet"))
    assert published == sorted(f["path"] for f in manifest["files"])
    [(total, distinct)] = duckdb.sql(
        f"SELECT count(*), count(DISTINCT (conversation_id, seq)) FROM read_parquet('{out}/**/*.parquet', hive_partitioning = true)"
    ).fetchall()
    assert total == distinct == 1_200


@pytest.mark.parametrize("backend", ["embedded"])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--since", "2026-11-05", "--until", "2026-11-01", "--format", "jsonl"], "must not be before --since"),
        (["--since", "2026-11-01", "--until", "2026-11-05", "--format", "csv"], "'csv' is not one of"),
        (["--since", "2026-11-01", "--until", "2026-11-05", "--format", "jsonl", "--status", "active"], "'active' is not"),
        (["--since", "yesterday", "--until", "2026-11-05", "--format", "jsonl"], "does not match the format"),
    ],
)
def test_export_refuses_bad_arguments(runner, tmp_path, options, message):
    result = runner.invoke(args=["export", "--out", str(tmp_path / "x"), *options])

    assert result.exit_code == 2 and message in result.output


@pytest.mark.parametrize("backend", ["embedded"])
def test_export_refuses_an_out_holding_another_export(runner, archived, tmp_path):
    assert _export(runner, tmp_path / "out", "--format", "jsonl").exit_code == 0

    again = _export(runner, tmp_path / "out", "--format", "jsonl")
    other = _export(runner, tmp_path / "out", "--format", "parquet")

    assert again.exit_code == 0 and again.output.startswith("export: 9 conversations")
    assert other.exit_code == 1 and "made with other arguments" in other.output


@pytest.mark.parametrize("backend", ["embedded"])
def test_duckdb_queries_the_archive_in_place(app, app_config, archived):
    """The query the README gives, over the archive folder's JSON documents."""
    root = app_config["ARCHIVE_URL"].removeprefix("file://")
    expected = _database_rows(app)

    per_day = duckdb.sql(
        f"SELECT CAST(dt AS VARCHAR) AS day, count(*) AS conversations, sum(len(messages)) AS messages "
        f"FROM read_json('{root}/conversations/*/*.json', hive_partitioning = true) GROUP BY day ORDER BY day"
    ).fetchall()

    assert per_day == [
        (day, len({row[0] for row in expected if row[5] == day}), sum(1 for row in expected if row[5] == day))
        for day in ("2026-11-02", "2026-11-04")
    ]


@pytest.mark.parametrize("backend", ["embedded"])
def test_delete_user_rewrites_named_exports(app, runner, archived, tmp_path):
    for fmt in ("parquet", "jsonl"):
        assert _export(runner, tmp_path / fmt, "--format", fmt).exit_code == 0
    kept = [row for row in _database_rows(app) if row[1] != "user-1"]

    result = runner.invoke(
        args=["delete-user", "user-1", "--export-prefix", str(tmp_path / "parquet"), "--export-prefix", str(tmp_path / "jsonl")]
    )

    assert result.exit_code == 0, result.output
    assert "removed 3 conversations, 3 archive objects, rewrote 4 export files" in result.output
    rows = duckdb.sql(
        f"SELECT conversation_id, user_id, seq, role, content, CAST(dt AS VARCHAR) "
        f"FROM read_parquet('{tmp_path / 'parquet'}/**/*.parquet', hive_partitioning = true) ORDER BY conversation_id, seq"
    ).fetchall()
    assert rows == kept
    users = {json.loads(line)["conversation"]["user_id"] for p in (tmp_path / "jsonl").glob("dt=*/*.jsonl") for line in p.read_text().splitlines()}
    assert users == {"user-0", "user-2"}
    for fmt in ("parquet", "jsonl"):
        manifest = _manifest(tmp_path / fmt)
        assert manifest["totals"]["conversations"] == 6 and manifest["totals"]["messages"] == len(kept)
        for entry in manifest["files"]:
            assert hashlib.sha256((tmp_path / fmt / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]


def _delete_user_events(app) -> list:
    with app.app_context():
        return get_session().scalars(select(AuditEvent).where(AuditEvent.action == "delete_user").order_by(AuditEvent.event_id)).all()


@pytest.mark.parametrize("backend", ["embedded"])
@pytest.mark.parametrize(
    ("manifest", "reason"),
    [
        (None, "has no _manifest.json: not an export"),
        (b'{"arguments": null}', "is not an export's manifest (6 fields are wrong, the first: ('arguments',))"),
        (b"[1, 2]", "is not an export's manifest (1 fields are wrong, the first: ())"),
        (b"{not json", "is not an export's manifest (Expecting property name"),
        (b'{"arguments": {}, "status": "running", "cursor": {}, "files": [], "errors": []}',
         "is not an export's manifest (3 fields are wrong, the first: ('cursor', 'day'))"),
        (b"\xff\xfe\x00", "is not an export's manifest ("),
    ],
)
def test_delete_user_checks_every_export_before_it_erases_anything(app, runner, archived, tmp_path, manifest, reason):
    assert _export(runner, tmp_path / "parquet", "--format", "parquet").exit_code == 0
    other = tmp_path / "other"
    other.mkdir()
    if manifest is not None:
        (other / "_manifest.json").write_bytes(manifest)
    before = _database_rows(app, "user-1")

    result = runner.invoke(args=["delete-user", "user-1", "--export-prefix", str(tmp_path / "parquet"), "--export-prefix", str(other)])

    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    said = result.output.strip()
    assert said.startswith(f"Error: delete-user user-1: --export-prefix {other}: {other}") and reason in said, said
    assert said.endswith("; nothing was erased")
    assert len(before) > 0 and _database_rows(app, "user-1") == before
    assert _delete_user_events(app) == []


@pytest.mark.parametrize("backend", ["embedded"])
@pytest.mark.parametrize("part", ["missing", "garbage"])
def test_delete_user_stopped_after_erasing_rows_is_audited_and_finishes_when_run_again(app, runner, archived, tmp_path, part):
    """The rows are gone when an export fails: the stopped run's audit row counts them, and the export's
    manifest describes every file that was rewritten before the stop."""
    out = tmp_path / "jsonl"
    assert _export(runner, out, "--format", "jsonl", "--part-mb", "0.0001").exit_code == 0
    broken = out / _manifest(out)["files"][-1]["path"]
    kept_aside = broken.read_bytes()
    holding_the_user = [
        entry["path"] for entry in _manifest(out)["files"][:-1]
        if any(json.loads(line)["conversation"]["user_id"] == "user-1" for line in (out / entry["path"]).read_text().splitlines())
    ]
    if part == "missing":
        broken.unlink()
    else:
        broken.write_bytes(b"garbage\n")
    expected = [row for row in _database_rows(app) if row[1] != "user-1"]

    stopped = runner.invoke(args=["delete-user", "user-1", "--export-prefix", str(out)])

    assert stopped.exit_code == 1 and isinstance(stopped.exception, SystemExit), stopped.output
    said = stopped.output.strip()
    assert said.startswith("Error: delete-user user-1 stopped: ") and said.endswith("; run it again to finish"), said
    assert ("could not use" in said and "No such file" in said) if part == "missing" else "is not a part this export wrote" in said
    assert _database_rows(app, "user-1") == []
    assert not (out / ".scratch").exists()  # no copy left behind, with or without the user's rows
    for entry in _manifest(out)["files"][:-1]:  # each rewritten file matches its entry, as each untouched one does
        assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    broken.write_bytes(kept_aside)

    finished = runner.invoke(args=["delete-user", "user-1", "--export-prefix", str(out)])

    assert finished.exit_code == 0 and "removed 0 conversations, 0 archive objects" in finished.output, finished.output
    events = _delete_user_events(app)
    assert [event.detail["conversations"] for event in events] == [3, 0]
    assert events[0].detail["archive_objects"] == 3
    assert len(holding_the_user) > 0 and events[0].detail["export_files"] == len(holding_the_user)
    assert events[0].detail["stopped"] == said.removeprefix("Error: delete-user user-1 stopped: ").removesuffix("; run it again to finish")
    assert "stopped" not in events[1].detail
    manifest = _manifest(out)
    users = set()
    for entry in manifest["files"]:
        lines = (out / entry["path"]).read_text().splitlines()
        assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
        assert entry["conversations"] == len(lines)
        users |= {json.loads(line)["conversation"]["user_id"] for line in lines}
    assert users == {"user-0", "user-2"}
    assert manifest["totals"]["conversations"] == 6 and manifest["totals"]["messages"] == len(expected)


@pytest.mark.parametrize("backend", ["embedded"])
def test_an_unfinished_export_rewritten_by_delete_user_continues_without_overwriting_a_part(app, runner, archived, tmp_path):
    """A part left empty by the erasure stays: the next part of the resumed export gets a new name."""
    out = tmp_path / "jsonl"
    assert _export(runner, out, "--format", "jsonl", "--part-mb", "0.0001").exit_code == 0
    manifest = _manifest(out)
    # As if the run had stopped after its first two parts: the rest are unwritten.
    for entry in manifest["files"][2:]:
        (out / entry["path"]).unlink()
    manifest["files"] = manifest["files"][:2]
    manifest["status"], manifest["cursor"] = "running", {"day": manifest["files"][1]["path"][3:13], "after": _last_id(out, manifest["files"][1])}
    (out / "_manifest.json").write_text(json.dumps(manifest))
    first_user = json.loads((out / manifest["files"][0]["path"]).read_text())["conversation"]["user_id"]
    assert runner.invoke(args=["delete-user", first_user, "--export-prefix", str(out)]).exit_code == 0

    resumed = _export(runner, out, "--format", "jsonl", "--part-mb", "0.0001")

    assert resumed.exit_code == 0, resumed.output
    files = _manifest(out)["files"]
    assert len({entry["path"] for entry in files}) == len(files)
    exported = [json.loads(line)["conversation"]["conversation_id"] for entry in files for line in (out / entry["path"]).read_text().splitlines()]
    assert sorted(exported) == sorted({row[0] for row in _database_rows(app)})
    for entry in files:
        assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]


def _last_id(out: Path, entry: dict) -> str:
    return json.loads((out / entry["path"]).read_text().splitlines()[-1])["conversation"]["conversation_id"]


@pytest.mark.parametrize("backend", ["embedded"])
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["delete-user", ""], "'' is not a user_id: they are 1 to 128 letters"),
        (["delete-user", "u*"], "'u*' is not a user_id"),
        (["delete-user", "user-1", "--export-prefix", " "], "must name a folder or s3://bucket/prefix"),
        (["export", *RANGE, "--format", "jsonl", "--out", ""], "must name a folder or s3://bucket/prefix"),
        (["export", *RANGE, "--format", "jsonl", "--out", "x", "--user-id", "%"], "'%' is not a user_id"),
        (["export", "--since", "2026-11-01", "--until", "9999-12-31", "--format", "jsonl", "--out", "x"], "must be before 9999-12-31"),
        (["export", *RANGE, "--format", "jsonl", "--out", "x", "--part-mb", "nan"], "must be a number of MiB"),
        (["export", *RANGE, "--format", "jsonl", "--out", "x", "--part-mb", "inf"], "must be a number of MiB"),
    ],
)
def test_commands_refuse_arguments_that_name_nothing(app, runner, archived, arguments, message, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # where `--out x` (or a blank --out) would write
    before = _database_rows(app)

    result = runner.invoke(args=arguments)

    assert result.exit_code == 2 and message in result.output, result.output
    assert _database_rows(app) == before and _delete_user_events(app) == [] and list(work.iterdir()) == []


@pytest.mark.parametrize("backend", ["embedded"])
def test_an_export_is_continued_from_the_same_folder_named_another_way(runner, archived, tmp_path, monkeypatch):
    assert _export(runner, tmp_path / "out", "--format", "jsonl").exit_code == 0
    monkeypatch.chdir(tmp_path)

    for named in ("out", f"{tmp_path / 'out'}/"):
        again = _export(runner, named, "--format", "jsonl")

        assert again.exit_code == 0 and again.output.startswith("export: 9 conversations"), again.output


@pytest.mark.parametrize("backend", ["postgres"])
def test_an_export_stopped_by_an_archive_outage_is_not_sealed_and_the_next_run_finishes_it(app, app_config, runner, archived, tmp_path):
    """The archive not answering is no object's fault: the export stops unfinished, instead of listing
    every object as unreadable and calling itself complete."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        unused = f"http://127.0.0.1:{probe.getsockname()[1]}"
    away = create_app({**app_config, "S3_ENDPOINT_URL": unused})
    out = tmp_path / "out"

    stopped = away.test_cli_runner().invoke(args=["export", *RANGE, "--format", "jsonl", "--out", str(out)])

    assert stopped.exit_code == 1 and isinstance(stopped.exception, SystemExit), stopped.output
    said = stopped.output.strip().splitlines()[-1]
    assert said.startswith("Error: stopped: could not read s3://") and said.endswith("; run the same command again to continue")
    manifest = _manifest(out)
    assert manifest["status"] == "running" and manifest["errors"] == [] and manifest["files"] == []
    away.extensions["parley.engine"].dispose()

    finished = _export(runner, out, "--format", "jsonl")

    assert finished.exit_code == 0 and finished.output.strip().splitlines()[-1].startswith("export: 9 conversations"), finished.output
    assert _manifest(out)["status"] == "complete"


@pytest.mark.parametrize("backend", ["embedded"])
def test_an_object_that_cannot_be_read_is_listed_once_and_the_export_goes_on(app, app_config, runner, archived, tmp_path):
    """An unreadable object is its own fault, not the archive's (a folder where its file should be):
    listed and skipped, not a stop. A run continued from before it lists it once."""
    with app.app_context():
        last_of_day1 = get_session().scalars(
            select(Conversation.s3_file_location).where(Conversation.ended_at < DAY2).order_by(Conversation.conversation_id.desc())
        ).first()
    path = Path(app_config["ARCHIVE_URL"].removeprefix("file://")) / last_of_day1
    path.unlink()
    path.mkdir()
    out = tmp_path / "out"

    first = _export(runner, out, "--format", "jsonl")

    assert first.exit_code == 1 and "; 1 objects could not be read" in first.output, first.output
    manifest = _manifest(out)
    assert manifest["status"] == "complete" and [error["key"] for error in manifest["errors"]] == [last_of_day1]
    # Continued from the last part of the first day, as after a stop: the object is read and listed again.
    day1_parts = [entry for entry in manifest["files"] if entry["path"].startswith(f"dt={DAY1:%Y-%m-%d}")]
    manifest["status"], manifest["cursor"] = "running", {"day": f"{DAY1:%Y-%m-%d}", "after": _last_id(out, day1_parts[-1])}
    for entry in manifest["files"][len(day1_parts):]:
        (out / entry["path"]).unlink()
    manifest["files"] = day1_parts
    (out / "_manifest.json").write_text(json.dumps(manifest))

    again = _export(runner, out, "--format", "jsonl")

    assert again.exit_code == 1 and [error["key"] for error in _manifest(out)["errors"]] == [last_of_day1], again.output


@pytest.mark.parametrize("backend", ["embedded"])
def test_a_manifest_missing_what_a_run_reads_is_refused_in_one_line(runner, archived, tmp_path):
    out = tmp_path / "out"
    assert _export(runner, out, "--format", "jsonl").exit_code == 0
    manifest = _manifest(out)
    del manifest["totals"]
    (out / "_manifest.json").write_text(json.dumps(manifest))

    result = _export(runner, out, "--format", "jsonl")

    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.strip() == f"Error: {out}/_manifest.json is not an export's manifest (1 fields are wrong, the first: ('totals',))"


@pytest.mark.parametrize("backend", ["embedded"])
def test_an_export_folder_that_cannot_be_made_is_one_line_not_a_traceback(app, runner, archived, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")

    result = _export(runner, tmp_path / "a-file" / "out", "--format", "jsonl")

    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.strip().startswith(f"Error: could not use {tmp_path / 'a-file' / 'out'}: ")


@pytest.mark.parametrize("backend", ["embedded"])
def test_an_object_failing_its_checksum_is_reported_not_exported(app, runner, archived, tmp_path):
    with app.app_context():
        key = get_session().scalars(select(Conversation.s3_file_location).where(Conversation.conversation_name == "c0")).one()
    archive = app.extensions["parley.background_archive"]
    archive.put(key, archive.get(key).replace(b"\\u00fc", b"u").replace("ü".encode(), b"u"))

    result = _export(runner, tmp_path / "out", "--format", "jsonl")

    assert result.exit_code == 1
    assert "export: 8 conversations" in result.output and "1 objects could not be read" in result.output
    assert [error["key"] for error in _manifest(tmp_path / "out")["errors"]] == [key]


def test_exports_carry_the_session_variables_and_stage(app, client, runner, tmp_path):
    app.config["LIVE_RETENTION_DAYS"] = 3650
    conversation_id = client.post("/new_chat", json={"user_id": "with-vars"}).json["conversation_id"]
    client.post("/chat", json={"conversation_id": conversation_id, "message": "hello"})
    assert client.patch(f"/conversations/{conversation_id}/variables", json={"plan": "gold", "seats": 3}).status_code == 200
    assert client.put(f"/conversations/{conversation_id}/stage", json={"stage": "awaiting_confirmation"}).status_code == 200
    _archive_on(app, DAY1, [conversation_id])

    parquet = _export(runner, tmp_path / "parquet", "--format", "parquet")
    jsonl = _export(runner, tmp_path / "jsonl", "--format", "jsonl")

    assert parquet.exit_code == 0 and jsonl.exit_code == 0, parquet.output + jsonl.output
    rows = duckdb.sql(
        f"SELECT DISTINCT variables, stage FROM read_parquet('{tmp_path / 'parquet'}/**/*.parquet', hive_partitioning = true)"
    ).fetchall()
    assert [(json.loads(variables), stage) for variables, stage in rows] == [({"plan": "gold", "seats": 3}, "awaiting_confirmation")]
    line = json.loads(next((tmp_path / "jsonl").glob("dt=*/*.jsonl")).read_text())
    assert line["conversation"]["variables"] == {"plan": "gold", "seats": 3}
