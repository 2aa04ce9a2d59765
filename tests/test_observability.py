"""Observability and faults: Prometheus metrics, JSON logs with request IDs, database restarts under load."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from database_utils import PING_IDLE_SECONDS
from tests.conftest import client_with_key
from tests.postgres import allow_connections


def _metric(exposition: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus' text format (0 when absent)."""
    for line in exposition.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{key}="{value}"' in line for key, value in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_model_calls_tokens_and_turns(app, client):
    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
    for _ in range(3):
        client.post("/chat", json={"conversation_id": conversation_id, "message": "count me"})
    client.get("/no-such-route")
    client.get("/chat")  # 405: counted under the rule its path matches, not as an unknown path
    client.open("/chat", method="QAXA")  # any method name: one label, so a caller cannot add series

    page = app.test_client().get("/metrics")
    exposition = page.get_data(as_text=True)

    assert page.status_code == 200 and page.headers["Content-Type"] == CONTENT_TYPE_LATEST  # its charset once
    assert _metric(exposition, "parley_http_requests_total", route="/chat", method="POST", status="200") == 3
    assert _metric(exposition, "parley_http_requests_total", route="unmatched", status="404") == 1
    assert _metric(exposition, "parley_http_requests_total", route="/chat", method="GET", status="405") == 1
    assert _metric(exposition, "parley_http_requests_total", route="unmatched", status="405") == 0
    assert _metric(exposition, "parley_http_requests_total", route="/chat", method="other", status="405") == 1
    assert "QAXA" not in exposition
    assert _metric(exposition, "parley_http_request_duration_seconds_count", route="/chat", method="POST") == 3
    assert _metric(exposition, "parley_model_request_duration_seconds_count", provider="echo", outcome="ok") == 3
    assert _metric(exposition, "parley_model_tokens_total", provider="echo", direction="output") > 0
    assert _metric(exposition, "parley_turns_in_flight") == 0
    for gauge in ("parley_turns_in_flight", "parley_db_pool_connections_in_use"):  # present, not just read as 0
        assert any(line.split("{")[0].split(" ")[0] == gauge for line in exposition.splitlines()), gauge


def _in_use(app) -> float:
    return _metric(app.test_client().get("/metrics").get_data(as_text=True), "parley_db_pool_connections_in_use")


@pytest.mark.parametrize("backend", ["postgres"])
def test_the_pool_gauge_counts_the_connections_checked_out(app):
    """A turn holds a connection only for its statements, so a scrape mostly reads 0: hold two here."""
    engine = app.extensions["parley.engine"]

    before = _in_use(app)
    held = [engine.connect(), engine.connect()]
    during = _in_use(app)
    for connection in held:
        connection.close()

    assert during == before + 2
    assert _in_use(app) == before


@pytest.mark.parametrize("backend", ["postgres"])
def test_the_pool_gauge_is_not_lowered_by_connections_that_never_opened(app, postgres_url):
    """A pooled connection found closed is replaced; when the new one cannot be opened, SQLAlchemy
    checks the record in without a checkout event."""
    engine = app.extensions["parley.engine"]

    engine.connect().close()  # one connection in the pool
    before = _in_use(app)
    try:
        allow_connections(postgres_url, False)  # the database goes away
        time.sleep(PING_IDLE_SECONDS + 0.1)  # the pooled connection is pinged at its next checkout
        for _ in range(3):
            with pytest.raises(OperationalError):
                engine.connect()
        during = _in_use(app)
    finally:
        allow_connections(postgres_url, True)
    engine.connect().close()

    assert during == before
    assert _in_use(app) == before


def test_the_pool_gauge_counts_an_invalidated_connection_back_in(app):
    engine = app.extensions["parley.engine"]

    before = _in_use(app)
    connection = engine.connect()
    during = _in_use(app)
    connection.invalidate()  # as a connection the database dropped mid-request is: it goes back at once
    invalidated = _in_use(app)
    connection.close()

    assert (during, invalidated) == (before + 1, before)
    assert _in_use(app) == before


def test_a_streamed_turn_is_in_flight_until_its_stream_ends_and_its_model_time_spans_it(provider_app, fake_model, app):
    client = provider_app("anthropic")
    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
    fake_model.stream_interval = 0.1  # the reply's nine events take about 0.8 s
    metrics_app = client.application.test_client()

    def scrape() -> str:
        return metrics_app.get("/metrics").get_data(as_text=True)

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "a b c", "stream": True},
                           buffered=False)
    chunks = iter(response.response)
    first = next(chunks)
    during = scrape()
    rest = b"".join(chunks)
    response.close()
    after = scrape()

    assert b"event: done" in first + rest
    assert _metric(during, "parley_turns_in_flight") == 1
    assert _metric(after, "parley_turns_in_flight") == 0
    assert _metric(after, "parley_model_request_duration_seconds_count", provider="anthropic", outcome="ok") == 1
    assert _metric(after, "parley_model_request_duration_seconds_sum", provider="anthropic", outcome="ok") > 0.5


def test_a_stream_its_client_left_counts_as_cancelled_not_as_a_model_error(provider_app, fake_model):
    client = provider_app("anthropic")
    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
    fake_model.reply_override = " ".join(f"word{n}" for n in range(200))
    fake_model.stream_interval = 0.05

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "long", "stream": True},
                           buffered=False)
    for chunk in response.response:
        if b"event: delta" in chunk:
            break
    response.close()  # what the WSGI server does when the client disconnects
    after = client.application.test_client().get("/metrics").get_data(as_text=True)

    assert _metric(after, "parley_model_request_duration_seconds_count", provider="anthropic", outcome="cancelled") == 1
    assert _metric(after, "parley_model_request_duration_seconds_count", provider="anthropic", outcome="error") == 0
    assert _metric(after, "parley_turns_in_flight") == 0


@pytest.mark.parametrize("made", [False, True], ids=["missing", "made"])
def test_a_parley_command_keeps_its_metrics_out_of_the_servers_directory(tmp_path, made):
    """With the server's PROMETHEUS_MULTIPROC_DIR set (from .env, say), a command neither fails nor adds samples to it."""
    directory = tmp_path / "metrics"
    if made:
        directory.mkdir()
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'parley.db'}", "ARCHIVE_URL": f"file://{tmp_path / 'archive'}",
           "PROMETHEUS_MULTIPROC_DIR": str(directory)}

    result = subprocess.run([str(Path(sys.executable).parent / "parley"), "idempotency-purge"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert (sorted(directory.iterdir()) == []) if made else not directory.exists()


def test_request_ids_are_echoed_or_made_and_logged_as_json(client, capfd):
    sent = client.post("/new_chat", json={"user_id": "u"}, headers={"X-Request-ID": "trace-abc.123"})
    made = client.post("/new_chat", json={"user_id": "u"})
    encoded = client.post("/new_chat", json={"user_id": "u"}, headers={"X-Request-ID": "order-42/a+b=="})
    refused = [
        client.post("/new_chat", json={"user_id": "u"}, headers={"X-Request-ID": sent})
        for sent in ("bad id\twith a tab", "with spaces", "x]: a forged log line", "two,joined")
    ]
    too_long = client.post("/new_chat", json={"user_id": "u"}, headers={"X-Request-ID": "x" * 201})

    assert sent.headers["X-Request-ID"] == "trace-abc.123"
    assert len(made.headers["X-Request-ID"]) == 32
    assert encoded.headers["X-Request-ID"] == "order-42/a+b=="
    assert all(re.fullmatch("[0-9a-f]{32}", response.headers["X-Request-ID"]) for response in refused)
    assert re.fullmatch("[0-9a-f]{32}", too_long.headers["X-Request-ID"])
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    logged = [line for line in lines if line.get("request_id") == "trace-abc.123" and line["message"] == "request"]
    assert len(logged) == 1
    assert (logged[0]["method"], logged[0]["path"], logged[0]["status"]) == ("POST", "/new_chat", 201)


def _logged_by_a_process(tmp_path, then: str, **environ: str) -> str:
    """stderr of a process that builds an app (its logging set up from `environ`), then runs the code `then`."""
    script = (
        "import logging\n"
        "from main import create_app\n"
        f"app = create_app({{'DATABASE_URL': 'sqlite:///{tmp_path / 'p.db'}', 'ARCHIVE_URL': '{(tmp_path / 'a').as_uri()}'}})\n"
        + then
    )
    env = {**os.environ, **environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_the_text_log_format_gives_each_request_its_method_path_status_and_duration(tmp_path):
    logged = _logged_by_a_process(tmp_path, "app.test_client().get('/healthz', headers={'X-Request-ID': 'trace-1'})", LOG_FORMAT="text")

    assert re.search(r" INFO parley\.request \[trace-1\]: request GET /healthz 200 [0-9.]+ ms$", logged, re.MULTILINE), logged


def test_log_level_warning_leaves_out_the_request_lines(tmp_path):
    logged = _logged_by_a_process(
        tmp_path, "app.test_client().get('/healthz')\nlogging.getLogger('parley').warning('still said')", LOG_LEVEL="WARNING"
    )

    assert [json.loads(line)["message"] for line in logged.splitlines()] == ["still said"]


def test_log_level_debug_is_parleys_own_debug_lines_not_the_sdks(tmp_path):
    """The SDKs' debug lines carry whole requests: a conversation, headers."""
    logged = _logged_by_a_process(
        tmp_path,
        "logging.getLogger('anthropic._base_client').debug('Request options: the conversation')\n"
        "logging.getLogger('parley').debug('ours')",
        LOG_LEVEL="debug",
    )

    assert [json.loads(line)["message"] for line in logged.splitlines()] == ["ours"]


@pytest.mark.parametrize("backend", ["postgres"])
def test_database_restarts_under_load_answer_503_never_500_and_lose_nothing(app, keys, postgres_url, capfd):
    """Eight clients chat while every connection of the database is killed, again and again."""
    app.config["TURN_LEASE_SECONDS"] = 2
    client = client_with_key(app, keys["client_a"])
    conversations = [client.post("/new_chat", json={"user_id": f"u{n}"}).json["conversation_id"] for n in range(8)]
    statuses: list[int] = []
    answered = {conversation_id: {200: 0, 503: 0} for conversation_id in conversations}
    stop = threading.Event()

    def chat(conversation_id: str) -> None:
        own = client_with_key(app, keys["client_a"])
        while not stop.is_set():
            status = own.post("/chat", json={"conversation_id": conversation_id, "message": "still there?"}).status_code
            statuses.append(status)
            if status in answered[conversation_id]:
                answered[conversation_id][status] += 1

    killed_busy = []  # connections busy (a statement running or a transaction open) just before each kill

    def restart_repeatedly() -> None:
        admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            for _ in range(12):
                time.sleep(0.25)
                killed_busy.extend(connection.execute(text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND state <> 'idle'"
                )).scalars())
                connection.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ))
        admin.dispose()

    threads = [threading.Thread(target=chat, args=(c,)) for c in conversations]
    for thread in threads:
        thread.start()
    try:
        restart_repeatedly()
    finally:
        stop.set()
    for thread in threads:
        thread.join()

    assert 500 not in statuses
    # The faults did reach requests; a turn's claim and store each try once more on a fresh
    # connection, so most of them (all, in some runs) answer 200 all the same.
    assert killed_busy
    assert set(statuses) <= {200, 503, 409}
    assert statuses.count(200) > 0
    stuck = 0
    for conversation_id in conversations:
        reply = client.post("/chat", json={"conversation_id": conversation_id, "message": "after"})
        if reply.status_code == 409:
            # The documented pending state: a lease whose release met the fault runs out.
            assert reply.json["error"] == "turn_in_progress"
            stuck += 1
            time.sleep(2)
            reply = client.post("/chat", json={"conversation_id": conversation_id, "message": "after"})
        log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
        assert reply.status_code == 200
        assert len(log["messages"]) == log["message_count"]
        roles = [m["role"] for m in log["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        # Every turn answered 200 is stored (the "after" one too); a 503 that met the fault after its
        # store committed may be stored as well, nothing more.
        turns = len(roles) // 2
        ok, failed = answered[conversation_id][200], answered[conversation_id][503]
        assert ok + 1 <= turns <= ok + failed + 1, (conversation_id, ok, failed, turns)
    assert stuck <= 2
    logged = capfd.readouterr().err
    assert "Traceback" not in logged and "INSERT INTO" not in logged and "still there?" not in logged


def test_model_tokens_are_counted_by_direction_and_failed_calls_as_errors(provider_app, fake_model):
    client = provider_app("anthropic")
    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
    replies = [client.post("/chat", json={"conversation_id": conversation_id, "message": f"count me {n}"}).json for n in range(2)]
    fake_model.fail_next(400)  # not retried: one failed model call
    failed = client.post("/chat", json={"conversation_id": conversation_id, "message": "fail"})

    exposition = client.application.test_client().get("/metrics").get_data(as_text=True)

    assert failed.status_code == 502
    for direction in ("input", "output"):
        assert _metric(exposition, "parley_model_tokens_total", provider="anthropic", direction=direction) == sum(
            reply["usage"][f"{direction}_tokens"] for reply in replies)
    assert _metric(exposition, "parley_model_request_duration_seconds_count", provider="anthropic", outcome="ok") == 2
    assert _metric(exposition, "parley_model_request_duration_seconds_count", provider="anthropic", outcome="error") == 1


def test_a_logged_exception_gives_its_type_not_its_message_or_traceback(app, capfd):
    """A traceback can carry SQL with its parameters or a key (logs.py): only the exception's type is logged."""
    import logging

    try:
        raise ValueError("INSERT INTO api_keys VALUES ('prly_not_to_be_logged')")
    except ValueError:
        logging.getLogger("parley").exception("the store failed")
    logged = capfd.readouterr().err

    assert "the store failed (ValueError)" in logged
    assert "Traceback" not in logged and "prly_not_to_be_logged" not in logged
