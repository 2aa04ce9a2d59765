"""Running Parley as an operator: the `parley` command, preparing the archive,
an unmigrated database, and `/readyz` reasons within a time bound."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
import uuid
from pathlib import Path

import pytest

import readiness
from auth import create_key
from config import ConfigError, load_config, turn_lease_seconds
from database_utils import _script_directory, get_session, head_revisions, upgrade_database
from main import create_app
from tests.conftest import client_with_key
from tests.postgres import admin_url, temporary_database
from tests.seaweed import SeaweedS3, free_ports

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the parley command


def test_pyproject_installs_a_parley_command_for_the_flask_cli():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())

    assert project["project"]["scripts"] == {"parley": "cli:main"}
    modules = set(project["tool"]["setuptools"]["py-modules"])
    assert modules == {path.stem for path in ROOT.glob("*.py")} - {"gunicorn.conf"}


def test_parley_command_runs_every_registered_command(tmp_path):
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}", "ARCHIVE_URL": (tmp_path / "a").as_uri(),
           "PYTHONPATH": str(ROOT)}
    parley = [sys.executable, "-c", "import cli; cli.main()"]

    listed = subprocess.run([*parley, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    created = subprocess.run([*parley, "keys", "create", "--role", "client", "--name", "cli"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)

    assert listed.returncode == 0, listed.stderr
    for command in ("archive-prepare", "audit-prune", "db-upgrade", "db-check", "keys", "run", "routes"):
        assert re.search(rf"^\s+{command}\b", listed.stdout, re.MULTILINE), command
    assert created.returncode == 0, created.stderr
    assert re.fullmatch(r"prly_[A-Za-z0-9_\-]{43}\n", created.stdout)


@pytest.mark.parametrize(("command", "url", "said"), [
    (["keys", "list"], "postgresql+psycopg://postgres@127.0.0.1:{port}/parley", "cannot use the database at DATABASE_URL: "),
    (["db-upgrade"], "postgresql+psycopg://postgres@127.0.0.1:{port}/parley", "cannot use the database at DATABASE_URL: "),
    (["keys", "list"], "not a url with s3cret", "DATABASE_URL is not a database URL Parley can use (it cannot be parsed)"),
    (["keys", "list"], "nosuchdb://u@127.0.0.1/p", "DATABASE_URL is not a database URL Parley can use (Can't load plugin"),
])
def test_a_database_the_command_cannot_use_is_one_line_not_a_traceback(tmp_path, command, url, said):
    env = {**os.environ, "DATABASE_URL": url.format(port=free_ports(1)[0]), "ARCHIVE_URL": (tmp_path / "a").as_uri(),
           "PYTHONPATH": str(ROOT)}

    result = subprocess.run([sys.executable, "-c", "import cli; cli.main()", *command], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: {said}") and "Traceback" not in result.stderr and "s3cret" not in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(("setting", "said"), [
    ({"IDEMPOTENCY_TTL_HOURS": "abc"}, "IDEMPOTENCY_TTL_HOURS='abc' is not a valid number"),
    ({"LLM_TOTAL_TIMEOUT_SECONDS": "nan"}, "LLM_TOTAL_TIMEOUT_SECONDS='nan' is not a valid number"),
    ({"DB_POOL_TIMEOUT": "inf"}, "DB_POOL_TIMEOUT='inf' is not a valid number"),
    ({"DB_POOL_SIZE": "0"}, "DB_POOL_SIZE must be at least 1"),
    ({"DB_POOL_SIZE": "-3"}, "DB_POOL_SIZE must be at least 1"),
    ({"DB_MAX_OVERFLOW": "-5"}, "DB_MAX_OVERFLOW must be at least 0"),
    ({"DB_POOL_TIMEOUT": "-1"}, "DB_POOL_TIMEOUT must be at least 0"),
    ({"WORKER_CONNECTIONS": "0"}, "WORKER_CONNECTIONS must be at least 1"),
    ({"LLM_MAX_RETRIES": "-1"}, "LLM_MAX_RETRIES must be at least 0"),
    ({"STREAM_HEARTBEAT_SECONDS": "-1"}, "STREAM_HEARTBEAT_SECONDS must be more than 0"),
    ({"LLM_TOTAL_TIMEOUT_SECONDS": "0"}, "LLM_TOTAL_TIMEOUT_SECONDS must be more than 0"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL must be one of debug, info, warning, error, critical"),
    ({"IDEMPOTENCY_TTL_HOURS": "1"}, "IDEMPOTENCY_TTL_HOURS must be at least 24: clients may retry for a day"),
    ({"LLM_PROVIDER": "nope"}, "LLM_PROVIDER must be one of "),
    ({"ARCHIVE_URL": "http://archive.example/parley"}, "ARCHIVE_URL must be s3://bucket/prefix or file:///path"),
    ({"LLM_PROVIDER": "openai"}, "LLM_PROVIDER=openai: Missing credentials"),
    ({"LLM_PROVIDER": "bedrock"}, "LLM_PROVIDER=bedrock: No AWS region was provided"),
    ({"LLM_PROVIDER": "bedrock", "AWS_PROFILE": "nosuch"}, "LLM_PROVIDER=bedrock: The config profile (nosuch) could not be found"),
])
def test_a_setting_the_command_cannot_use_is_one_line_that_names_it(tmp_path, setting, said):
    unset = ("OPENAI_API_KEY", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE")
    env = {name: value for name, value in os.environ.items() if name not in unset}
    env |= {"DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}", "ARCHIVE_URL": (tmp_path / "a").as_uri(),
            "PYTHONPATH": str(ROOT), "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"), **setting}

    result = subprocess.run([sys.executable, "-c", "import cli; cli.main()", "keys", "list"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: {said}") and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(("name", "value", "said"), [
    ("TURN_LEASE_SECONDS", "-5", "more than 0"),  # a lease already run out: a second turn would take the conversation
    ("TURN_LEASE_SECONDS", "0", "more than 0"),
    ("READYZ_TIMEOUT_SECONDS", "-1", "more than 0"),
    ("LLM_RETRY_AFTER_MAX_SECONDS", "-3", "at least 0"),  # a provider's Retry-After would be a negative sleep
    ("AUTH_CACHE_SECONDS", "-1", "at least 0"),
    ("TRUSTED_PROXY_HOPS", "-1", "at least 0"),
    ("CONTEXT_MAX_TOKENS", "0", "at least 1"),
    ("CONTEXT_MAX_MESSAGES", "0", "at least 1"),
    ("CONTEXT_CACHE_CONVERSATIONS", "-1", "at least 0"),
    ("LLM_MAX_TOKENS", "0", "at least 1"),
    ("MAX_MESSAGE_CHARS", "0", "at least 1"),
    ("MAX_CONTENT_LENGTH", "-1", "at least 1"),
    ("MAX_FILE_BYTES", "0", "at least 1"),
    ("SESSION_IDLE_MINUTES", "0", "at least 1"),
    ("LIVE_RETENTION_DAYS", "-1", "at least 0"),
    ("ARCHIVE_RETENTION_DAYS", "0", "at least 1"),
    ("AUDIT_RETENTION_DAYS", "0", "at least 1"),
    ("HANDOFF_AFTER_MESSAGES", "-1", "at least 0"),
    ("VARIABLES_MAX_COUNT", "-1", "at least 0"),
    ("VARIABLE_MAX_BYTES", "0", "at least 1"),
    ("KNOWLEDGE_MAX_BYTES", "0", "at least 1"),
])
def test_a_number_out_of_its_range_is_refused_at_start(name, value, said):
    with pytest.raises(ConfigError, match=f"^{name} must be {said}$"):
        load_config({name: value})


@pytest.mark.parametrize(("name", "value", "most"), [
    ("LLM_TIMEOUT_SECONDS", "86401", 86_400),
    ("LLM_TOTAL_TIMEOUT_SECONDS", "1e12", 86_400),
    ("TURN_LEASE_SECONDS", "1e12", 86_400),
    ("IDEMPOTENCY_TTL_HOURS", "1e8", 87_600),
    ("SESSION_IDLE_MINUTES", "1000000000000", 5_256_000),
    ("AUDIT_RETENTION_DAYS", "36501", 36_500),
    ("LIVE_RETENTION_DAYS", "3000000", 36_500),
    ("ARCHIVE_RETENTION_DAYS", "3000000", 36_500),
])
def test_a_time_beyond_the_dates_a_database_holds_is_refused_at_start(name, value, most):
    with pytest.raises(ConfigError, match=f"^{name} must be at most {most}$"):
        load_config({name: value})
    assert load_config({name: str(most)})[name] == most


@pytest.mark.parametrize("rate", ["2 per minut", "2/minute;", "two per minute", "per minute"])
def test_a_rate_limit_that_cannot_be_read_is_refused_at_start(rate):
    """flask-limiter would refuse it on every request, and let every request through."""
    with pytest.raises(ConfigError, match=f"^RATE_LIMIT={rate!r} is not a rate"):
        load_config({"RATE_LIMIT": rate})
    assert load_config({"RATE_LIMIT": "10 per second; 1000 per hour"})["RATE_LIMIT"] == "10 per second; 1000 per hour"


@pytest.mark.parametrize(("settings", "said"), [
    ({"LLM_PROVIDER": "anthropic", "LLM_TEMPERATURE": "1.5"}, "LLM_TEMPERATURE must be between 0 and 1 for anthropic"),
    ({"LLM_PROVIDER": "bedrock", "LLM_TEMPERATURE": "-0.1"}, "LLM_TEMPERATURE must be between 0 and 1 for bedrock"),
    ({"LLM_PROVIDER": "openai", "LLM_TEMPERATURE": "2.5"}, "LLM_TEMPERATURE must be between 0 and 2 for openai"),
    ({"KNOWLEDGE_MIN_SCORE": "5"}, r"KNOWLEDGE_MIN_SCORE must be between 0 and 1 \(a passage's score is\)"),
    ({"KNOWLEDGE_MIN_SCORE": "-0.5"}, r"KNOWLEDGE_MIN_SCORE must be between 0 and 1 \(a passage's score is\)"),
])
def test_a_temperature_or_score_out_of_its_range_is_refused_at_start(settings, said):
    with pytest.raises(ConfigError, match=f"^{said}$"):
        load_config(settings)


def test_the_temperatures_and_scores_at_the_ends_of_their_ranges_are_taken():
    assert load_config({"LLM_PROVIDER": "openai", "LLM_TEMPERATURE": "2"})["LLM_TEMPERATURE"] == 2
    assert load_config({"LLM_PROVIDER": "anthropic", "LLM_TEMPERATURE": "0"})["LLM_TEMPERATURE"] == 0
    assert load_config({"LLM_PROVIDER": "echo", "LLM_TEMPERATURE": "7"})["LLM_TEMPERATURE"] == 7
    assert load_config({"KNOWLEDGE_MIN_SCORE": "1"})["KNOWLEDGE_MIN_SCORE"] == 1


def test_the_least_values_are_taken():
    least = {"TURN_LEASE_SECONDS": "0.5", "LLM_RETRY_AFTER_MAX_SECONDS": "0", "AUTH_CACHE_SECONDS": "0",
             "CONTEXT_MAX_MESSAGES": "1", "CONTEXT_CACHE_CONVERSATIONS": "0", "LIVE_RETENTION_DAYS": "0"}

    config = load_config(least)

    assert turn_lease_seconds(config) == 0.5
    assert {name: config[name] for name in least} == {name: float(value) for name, value in least.items()}


@pytest.mark.parametrize("arguments", [
    ["keys", "create", "--role", "client", "--name", "x", "--expires-in-days", "99999999"],
    ["keys", "create", "--role", "client", "--name", ""],
    ["keys", "create", "--role", "client", "--name", "   "],
    ["keys", "create", "--role", "client", "--name", "n" * 101],
    ["keys", "rotate", str(uuid.uuid4()), "--expires-in-days", "99999999"],
])
def test_key_options_the_api_would_refuse_are_usage_errors(runner, arguments):
    result = runner.invoke(args=arguments)

    assert result.exit_code == 2 and "Invalid value" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_make_targets_use_the_venv_and_install_the_command():
    dry_run = subprocess.run(["make", "-n", "-B", "run", "db-upgrade", "archive-prepare"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)

    assert dry_run.returncode == 0, dry_run.stderr
    assert ".venv/bin/pip install --quiet -r requirements.txt -e ." in dry_run.stdout
    for line in (".venv/bin/parley keys bootstrap", '.venv/bin/gunicorn -c gunicorn.conf.py "main:create_app()"',
                 ".venv/bin/parley db-upgrade", ".venv/bin/parley archive-prepare"):
        assert line in dry_run.stdout


@pytest.mark.parametrize("backend", ["embedded"])
def test_second_bootstrap_says_how_to_make_a_key(runner):
    first = runner.invoke(args=["keys", "bootstrap"])
    second = runner.invoke(args=["keys", "bootstrap"])

    assert "prly_" in first.output
    assert second.exit_code == 0
    assert "prly_" not in second.output
    assert "parley keys create --role client --name" in second.output


# ---------------------------------------------------------------- archive-prepare


@pytest.mark.parametrize("backend", ["postgres"])
def test_archive_prepare_creates_the_bucket_and_cleans_up_its_probe(app_config, keys, s3_server):
    bucket = f"fresh-{uuid.uuid4().hex[:12]}"
    app = create_app({**app_config, "ARCHIVE_URL": f"s3://{bucket}/prod"})
    client = client_with_key(app, keys["client_a"])
    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
    before = client.get("/readyz")

    result = app.test_cli_runner().invoke(args=["archive-prepare"])

    assert before.status_code == 503
    assert before.json["reasons"]["archive"]["error"] == "NoSuchBucket"
    assert "archive-prepare" in before.json["reasons"]["archive"]["hint"]
    assert result.exit_code == 0, result.output
    assert f"bucket {bucket} created" in result.output and "is ready" in result.output
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert client.get("/readyz").status_code == 200
    assert client.post("/end_chat", json={"conversation_id": conversation_id}).status_code == 200
    again = app.test_cli_runner().invoke(args=["archive-prepare"])
    assert again.exit_code == 0 and f"bucket {bucket} exists" in again.output


@pytest.mark.parametrize("backend", ["postgres"])
def test_archive_prepare_without_creating_names_the_missing_bucket(app, app_config):
    app.config["ARCHIVE_URL"] = f"s3://absent-{uuid.uuid4().hex[:12]}/p"

    result = app.test_cli_runner().invoke(args=["archive-prepare", "--no-create-bucket"])

    assert result.exit_code == 1
    assert "NoSuchBucket" in _one_error_line(result.output)


@pytest.mark.parametrize("backend", ["postgres"])
def test_missing_credentials_are_named_by_archive_prepare_and_readyz(app_config, no_aws_credentials):
    app = create_app(app_config)

    result = app.test_cli_runner().invoke(args=["archive-prepare"])
    ready = app.test_client().get("/readyz")

    assert result.exit_code == 1
    error = _one_error_line(result.output)
    assert "NoCredentialsError" in error and "AWS_ACCESS_KEY_ID" in error
    assert ready.status_code == 503
    assert ready.json["reasons"]["archive"]["error"] == "NoCredentialsError"
    assert "AWS_ACCESS_KEY_ID" in ready.json["reasons"]["archive"]["hint"]


READER = ("parley-reader", "reader-secret-not-for-logs")


@pytest.fixture(scope="module")
def s3_with_identities(tmp_path_factory):
    """A SeaweedFS that checks credentials: an admin, and a key that may only read."""
    data = tmp_path_factory.mktemp("seaweed-iam")
    config = data / "s3.json"
    config.write_text(json.dumps({"identities": [
        {"name": "admin", "credentials": [{"accessKey": "parley-test", "secretKey": "parley-test"}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        {"name": "reader", "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}], "actions": ["Read", "List"]},
    ]}))
    with SeaweedS3(data, s3_config=config) as server:
        server.client().create_bucket(Bucket="existing")
        yield server


@pytest.mark.parametrize(("bucket", "step"), [("not-there", "create bucket"), ("existing", "write a probe object")])
def test_access_denied_is_named_in_one_line(s3_with_identities, fresh_boto3_session, monkeypatch, tmp_path, bucket, step):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER[1])
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}", "ARCHIVE_URL": f"s3://{bucket}/p",
                      "S3_ENDPOINT_URL": s3_with_identities.endpoint_url})

    result = app.test_cli_runner().invoke(args=["archive-prepare"])

    assert result.exit_code == 1
    error = _one_error_line(result.output)
    assert f"could not {step}" in error and "AccessDenied" in error
    assert READER[1] not in result.output


def test_archive_prepare_on_a_folder(tmp_path):
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}", "ARCHIVE_URL": (tmp_path / "new" / "archive").as_uri()})
    (tmp_path / "blocker").write_text("a file, not a folder")
    blocked = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'q.db'}", "ARCHIVE_URL": (tmp_path / "blocker" / "a").as_uri()})

    ok = app.test_cli_runner().invoke(args=["archive-prepare"])
    failed = blocked.test_cli_runner().invoke(args=["archive-prepare"])

    assert ok.exit_code == 0 and list((tmp_path / "new" / "archive").iterdir()) == []
    assert failed.exit_code == 1
    assert "FileExistsError" in _one_error_line(failed.output) or "NotADirectoryError" in failed.output


# ---------------------------------------------------------------- an unmigrated database


@pytest.fixture
def empty_postgres():
    with temporary_database(admin_url(), prefix="parley_unmigrated") as url:
        yield url


def test_unmigrated_database_is_named_by_api_readyz_and_cli(empty_postgres, tmp_path):
    app = create_app({"DATABASE_URL": empty_postgres, "ARCHIVE_URL": (tmp_path / "a").as_uri(), "LLM_PROVIDER": "echo"})
    client = client_with_key(app, "prly_anything")

    created = client.post("/new_chat", json={"user_id": "u"})
    ready = client.get("/readyz")
    cli = app.test_cli_runner().invoke(args=["keys", "create", "--role", "admin", "--name", "ops"])

    assert created.status_code == 503
    assert created.json["error"] == "database_not_migrated"
    assert "parley db-upgrade" in created.json["message"]
    assert ready.status_code == 503 and ready.json["checks"]["database"] == "unavailable"
    assert ready.json["reasons"]["database"]["error"] == "database_not_migrated"
    assert "parley db-upgrade" in ready.json["reasons"]["database"]["hint"]
    assert cli.exit_code == 1
    assert cli.output.count("\n") == 1 and "parley db-upgrade" in _one_error_line(cli.output)
    assert "SELECT" not in cli.output and "INSERT" not in cli.output

    upgraded = app.test_cli_runner().invoke(args=["db-upgrade"])

    revisions = [script.revision for script in _script_directory().walk_revisions()][::-1]
    assert upgraded.exit_code == 0
    listed = re.fullmatch(r"Applied (\d+) revision\(s\): (.+)\. Database is now at (\w+)\.\n", upgraded.output)
    assert listed, upgraded.output
    assert int(listed[1]) == len(revisions) and listed[3] == head_revisions()[0]
    assert [part.split(" ", 1)[0] for part in listed[2].split("; ")] == revisions
    assert all(re.fullmatch(r"\w+ \(.+\)", part) for part in listed[2].split("; "))
    assert client.get("/readyz").status_code == 200
    with app.app_context():
        secret = create_key(get_session(), "client", "after upgrade")[1]
    assert client_with_key(app, secret).post("/new_chat", json={"user_id": "u"}).status_code == 201


def test_db_check_on_an_unmigrated_database_is_one_line(empty_postgres, tmp_path):
    app = create_app({"DATABASE_URL": empty_postgres, "ARCHIVE_URL": (tmp_path / "a").as_uri()})

    result = app.test_cli_runner().invoke(args=["db-check"])

    assert result.exit_code == 1
    assert "parley db-upgrade" in _one_error_line(result.output)


def test_database_behind_the_code_is_not_migrated(empty_postgres, tmp_path):
    upgrade_database(empty_postgres, "0002")
    app = create_app({"DATABASE_URL": empty_postgres, "ARCHIVE_URL": (tmp_path / "a").as_uri()})

    response = client_with_key(app, "prly_anything").get("/conversations")

    assert response.status_code == 503 and response.json["error"] == "database_not_migrated"
    assert "revision 0002" in response.json["message"] and head_revisions()[0] in response.json["message"]


# ---------------------------------------------------------------- readyz reasons and time bound


@pytest.mark.parametrize("backend", ["postgres"])
def test_readyz_names_the_database_failure_without_secrets(app_config, caplog):
    port = free_ports(1)[0]
    config = {**app_config, "DATABASE_URL": f"postgresql+psycopg://postgres:s3cret@127.0.0.1:{port}/parley"}

    ready = create_app(config).test_client().get("/readyz")

    logged = [r.getMessage() for r in caplog.records if r.name == "parley.readiness"]
    assert len(logged) == 1 and f"port {port} failed" in logged[0], logged  # libpq's own words, for the operator
    assert "s3cret" not in caplog.text

    assert ready.status_code == 503
    assert ready.json["checks"] == {"database": "unavailable", "archive": "ok"}
    assert ready.json["reasons"]["database"]["error"] == "OperationalError"
    assert "DATABASE_URL" in ready.json["reasons"]["database"]["hint"]
    assert "s3cret" not in ready.get_data(as_text=True)


@pytest.mark.parametrize("backend", ["postgres"])
def test_readyz_logs_a_failure_once_with_its_cause_and_logs_the_recovery(app_config, caplog):
    """The hint "see the server log" must point at something: the failure's own message is
    logged when a check starts failing, not again on every probe, and its recovery once."""
    app = create_app(app_config)
    client = app.test_client()
    archive = app.extensions["parley.archive"]
    healthy_ping = archive.ping

    def broken_ping() -> None:
        raise PermissionError("the archive folder is read-only")

    caplog.set_level("INFO", logger="parley.readiness")
    archive.ping = broken_ping
    statuses = [client.get("/readyz").status_code for _ in range(3)]
    archive.ping = healthy_ping
    statuses += [client.get("/readyz").status_code for _ in range(2)]

    assert statuses == [503, 503, 503, 200, 200]
    records = [r for r in caplog.records if r.name == "parley.readiness"]
    assert [r.levelname for r in records] == ["WARNING", "INFO"]
    assert records[0].getMessage() == "readyz: the archive check fails: PermissionError: the archive folder is read-only"
    assert records[1].getMessage() == "readyz: the archive check passes"


def test_readyz_masks_a_password_in_a_url_it_logs():
    failure = ConnectionError("could not reach http://admin:hunter2@127.0.0.1:9/bucket (refused)")

    assert readiness._detail(failure) == "could not reach http://admin:***@127.0.0.1:9/bucket (refused)"


@pytest.mark.parametrize("backend", ["postgres"])
def test_readyz_is_ready_at_once_after_the_database_closed_the_pooled_connections(app, postgres_url):
    """What a database restart does: the probe's pooled connection, used less than PING_IDLE_SECONDS
    ago so not pinged, fails on its first statement. The database is up: the check tries once more on
    a fresh connection and the probe says ready."""
    from sqlalchemy import create_engine, text

    probe = app.test_client()
    assert probe.get("/readyz").status_code == 200
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        killed = connection.execute(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar_one()
    admin.dispose()

    ready = probe.get("/readyz")

    assert killed >= 1
    assert ready.status_code == 200, ready.json
    assert ready.json["checks"] == {"database": "ok", "archive": "ok"}


@pytest.mark.parametrize("backend", ["postgres"])
def test_readyz_answers_within_its_time_bound_when_the_archive_hangs(app_config):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections in the kernel, never answers
    try:
        app = create_app({**app_config, "S3_ENDPOINT_URL": f"http://127.0.0.1:{silent.getsockname()[1]}",
                          "READYZ_TIMEOUT_SECONDS": 0.5})
        started = time.monotonic()
        ready = app.test_client().get("/readyz")
        elapsed = time.monotonic() - started
    finally:
        silent.close()

    assert ready.status_code == 503
    assert elapsed < 3
    assert ready.json["checks"] == {"database": "ok", "archive": "unavailable"}
    assert ready.json["reasons"]["archive"]["error"] == "Timeout"


@pytest.mark.parametrize("backend", ["postgres"])
def test_probes_against_a_hung_archive_wait_on_one_check_and_still_check_the_database(app_config):
    """Probe after probe while the archive hangs: each waits on the one archive check under way
    (they do not pile up), and the database is checked each time."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        app = create_app({**app_config, "S3_ENDPOINT_URL": f"http://127.0.0.1:{silent.getsockname()[1]}",
                          "READYZ_TIMEOUT_SECONDS": 0.5})
        client = app.test_client()
        probes = [client.get("/readyz").json for _ in range(6)]
        archive_checks = [thread for thread in threading.enumerate() if thread.name == "readyz-archive"]
    finally:
        silent.close()

    assert [probe["checks"] for probe in probes] == [{"database": "ok", "archive": "unavailable"}] * 6
    assert len(archive_checks) <= 1  # one check at a time, however many probes


# ---------------------------------------------------------------- logs


def test_log_files_get_no_colour_codes(tmp_path):
    port = free_ports(1)[0]
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}", "ARCHIVE_URL": (tmp_path / "a").as_uri()}
    log = tmp_path / "server.log"
    with open(log, "wb") as sink:
        server = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "run", "--port", str(port)],
                                  cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            _wait_for_port(port)
            for path in ("/nowhere", "/healthz"):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
                except urllib.error.HTTPError:
                    pass
        finally:
            server.terminate()
            server.wait(timeout=10)

    text = log.read_text()
    assert "GET /nowhere" in text and "404" in text
    assert "\x1b[" not in text


def _one_error_line(output: str) -> str:
    """The CLI's failure: exactly one `Error:` line and no traceback."""
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


def _wait_for_port(port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listened on {port} within {seconds}s")


@pytest.mark.parametrize(("environment", "lease"), [({}, 150), ({"LLM_TOTAL_TIMEOUT_SECONDS": "600"}, 630), ({"TURN_LEASE_SECONDS": "7"}, 7)])
def test_a_turn_lease_outlives_the_models_deadline_by_its_margin(environment, lease):
    assert turn_lease_seconds(load_config(environment)) == lease


def test_a_model_read_timeout_of_zero_is_refused():
    with pytest.raises(ConfigError, match="^LLM_TIMEOUT_SECONDS must be more than 0$"):
        load_config({"LLM_TIMEOUT_SECONDS": "0"})
