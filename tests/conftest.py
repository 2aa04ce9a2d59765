"""Shared fixtures: real PostgreSQL, a real S3 server, a fake model server.

Every API test runs on both backends Parley supports:
- `postgres`: PostgreSQL (TEST_DATABASE_URL, default the local server; a
  fresh database per run) with the archive in SeaweedFS over the S3 API;
- `embedded`: the no-setup default, SQLite file plus a local archive folder.
"""
from __future__ import annotations

import gc
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import boto3
import flask
import pytest
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from auth import create_key
from database_utils import get_session, upgrade_database
from main import create_app
from tests.fake_model_server import FakeModelServer
from tests.postgres import admin_url, temporary_database
from tests.seaweed import SeaweedS3

BACKENDS = ["postgres", "embedded"]
# Requests the OpenAPI fuzzer sent, by operation; reported at the end of the run.
FUZZ_CASES: Counter[str] = Counter()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if FUZZ_CASES:
        terminalreporter.write_sep("-", f"OpenAPI fuzzing: {sum(FUZZ_CASES.values())} generated requests")
        for operation, count in sorted(FUZZ_CASES.items()):
            terminalreporter.write_line(f"{count:>6}  {operation}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """A streamed response whose body was never closed keeps its request context pushed (Flask's
    `stream_with_context`) until the garbage collector finalizes it. That may happen inside a later
    test, where popping it resets that test's contexts (seen once in CI: a CLI command then ran
    against another test's app). So it is finalized right after the test that left it, while
    that test's app is still there."""
    yield
    if flask.has_request_context():
        gc.collect()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database created for this run on the test PostgreSQL server, dropped after."""
    with temporary_database(admin_url()) as url:
        upgrade_database(url)
        yield url


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop the run with instructions, rather than skip, when there is no PostgreSQL."""
    # The commands run here in-process would tune the run's own garbage collector (config.GC_THRESHOLD).
    os.environ["GC_TUNING"] = "off"
    server = admin_url()
    engine = create_engine(server)
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        pytest.exit(
            f"The tests need PostgreSQL and could not reach {make_url(server).render_as_string(hide_password=True)} "
            f"({exc.orig.__class__.__name__}). Start it, or set TEST_DATABASE_URL to a server where this user "
            "may create databases, e.g. postgresql+psycopg://user:pass@host:5432/postgres",
            returncode=3,
        )
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    with SeaweedS3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_bucket(s3_server: SeaweedS3) -> str:
    bucket = "parley-test"
    s3_server.client().create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(autouse=True)
def _aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """SeaweedFS accepts any credentials; never let real ones leak into tests."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "parley-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "parley-test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def model_server() -> Iterator[FakeModelServer]:
    with FakeModelServer() as server:
        yield server


@pytest.fixture
def fake_model(model_server: FakeModelServer) -> Iterator[FakeModelServer]:
    model_server.reset()
    yield model_server
    model_server.reset()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def app_config(backend: str, request: pytest.FixtureRequest, tmp_path) -> dict:
    """Settings for an app on `backend`, isolated from every other test."""
    # Rate limits have their own tests; elsewhere they would only add noise.
    config = {"LLM_PROVIDER": "echo", "LLM_MODEL": "echo", "TESTING": True, "RATELIMIT_ENABLED": False}
    if backend == "postgres":
        bucket = request.getfixturevalue("s3_bucket")
        s3 = request.getfixturevalue("s3_server")
        config["DATABASE_URL"] = request.getfixturevalue("clean_postgres")
        config["ARCHIVE_URL"] = f"s3://{bucket}/{uuid.uuid4().hex}"
        config["S3_ENDPOINT_URL"] = s3.endpoint_url
    else:
        shutil.copyfile(request.getfixturevalue("migrated_sqlite"), tmp_path / "parley.db")
        config["DATABASE_URL"] = f"sqlite:///{tmp_path / 'parley.db'}"
        config["ARCHIVE_URL"] = (tmp_path / "archive").as_uri()
    return config


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded database at the latest revision, copied for each test instead of migrating one each time."""
    path = tmp_path_factory.mktemp("embedded") / "parley.db"
    upgrade_database(f"sqlite:///{path}")
    return path


@pytest.fixture
def clean_postgres(postgres_url: str) -> Iterator[str]:
    yield postgres_url
    engine = create_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE audit_events, messages, conversations, api_keys, knowledge_documents CASCADE"))
    engine.dispose()


@pytest.fixture
def app(app_config: dict):
    app = create_app(app_config)
    yield app
    app.extensions["parley.engine"].dispose()


KEY_HOLDERS = {"client_a": "client", "client_b": "client", "staff": "staff", "admin": "admin"}


@pytest.fixture
def keys(app) -> dict[str, str]:
    """Secrets of one key per role (two clients), in the test's database."""
    with app.app_context():
        session = get_session()
        return {holder: create_key(session, role, holder)[1] for holder, role in KEY_HOLDERS.items()}


def client_with_key(app, secret: str | None) -> FlaskClient:
    """A test client that sends `secret` as its bearer key on every request."""
    client = app.test_client()
    if secret is not None:
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {secret}"
    return client


@pytest.fixture
def client(app, keys) -> FlaskClient:
    """Client A, the usual caller of the conversation routes."""
    return client_with_key(app, keys["client_a"])


@pytest.fixture
def staff_client(app, keys) -> FlaskClient:
    return client_with_key(app, keys["staff"])


@pytest.fixture
def admin_client(app, keys) -> FlaskClient:
    return client_with_key(app, keys["admin"])


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def provider_app(app_config, keys, fake_model, monkeypatch):
    """A client of an app whose provider talks to the fake model server, set up via each SDK's env vars."""
    apps = []

    def build(provider: str, **overrides):
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_model.base_url)
        monkeypatch.setenv("ANTHROPIC_BEDROCK_BASE_URL", fake_model.base_url)
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test")
        monkeypatch.setenv("OPENAI_BASE_URL", f"{fake_model.base_url}/v1")
        config = {**app_config, "LLM_PROVIDER": provider, "LLM_MODEL": f"{provider}-test-model", "LLM_MAX_RETRIES": 0}
        app = create_app({**config, **overrides})
        apps.append(app)
        return client_with_key(app, keys["client_a"])

    yield build
    for app in apps:
        app.extensions["parley.engine"].dispose()


@pytest.fixture
def fresh_boto3_session(monkeypatch):
    """boto3's default session keeps the credentials it found first; start a new one."""
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path, fresh_boto3_session):
    """No credentials anywhere botocore looks, and no instance metadata lookups."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
