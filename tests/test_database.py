"""Schema, migrations, the tail query, concurrency and database faults."""
from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import create_engine, event, select, text

from auth import create_key, rotate_key
from conversation_memory import MemoryMessage
from database_utils import (
    MIN_TAIL_PAGE,
    PING_IDLE_SECONDS,
    ApiKey,
    append_messages,
    claim_turn,
    finish_turn,
    get_conversation,
    get_session,
    load_context_tail,
    make_engine,
    upgrade_database,
)
from main import create_app
from tests.conftest import client_with_key
from tests.factories import seed_conversation
from tests.postgres import admin_url, temporary_database
from tests.seaweed import free_ports


def test_models_and_migrations_agree(runner):
    result = runner.invoke(args=["db-check"])
    assert result.exit_code == 0, result.output
    assert "agree" in result.output


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database(request, tmp_path):
    """The URL of a database with no schema yet, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lineage.db'}"
        return
    with temporary_database(admin_url()) as url:
        yield url


def test_migration_0010_starts_a_lineage_per_key_and_keeps_the_records_where_they_answer(empty_database):
    """Before 0010 a rotation moved the kept answers to the new key: each record already sits under its lineage."""
    upgrade_database(empty_database, "0009")
    keys = sa.table("api_keys", sa.column("key_id", sa.Uuid), sa.column("name"), sa.column("role"), sa.column("key_hash"),
                    sa.column("prefix"), sa.column("created_at", sa.DateTime(timezone=True)), sa.column("lineage_id", sa.Uuid))
    records = sa.table("idempotency_keys", sa.column("key_id", sa.Uuid), sa.column("idempotency_key"),
                       sa.column("fingerprint"), sa.column("created_at", sa.DateTime(timezone=True)),
                       sa.column("locked_until", sa.DateTime(timezone=True)), sa.column("expires_at", sa.DateTime(timezone=True)))
    old, new = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(timezone.utc)
    engine = create_engine(empty_database)
    try:
        with engine.begin() as connection:
            connection.execute(sa.insert(keys), [
                {"key_id": key, "name": name, "role": "client", "key_hash": key.hex * 2, "prefix": "prly_x", "created_at": at}
                for key, name, at in [(old, "before", now - timedelta(days=1)), (new, "rotated to", now)]])
            connection.execute(sa.insert(records), {"key_id": new, "idempotency_key": "pay-1", "fingerprint": "f" * 64,
                                                    "created_at": now, "locked_until": now, "expires_at": now + timedelta(days=1)})
        upgrade_database(empty_database)
        with engine.connect() as connection:
            lineages = dict(connection.execute(sa.select(keys.c.key_id, keys.c.lineage_id)).all())
            kept = connection.execute(sa.select(records.c.key_id, records.c.idempotency_key)).all()
    finally:
        engine.dispose()

    assert lineages == {old: old, new: new}
    assert kept == [(new, "pay-1")]


def test_a_rotation_after_0010_keeps_the_lineage_of_the_first_key(app, runner):
    with app.app_context():
        first, _ = create_key(get_session(), "client", "first")
        second = rotate_key(get_session(), first.key_id)[0]
        third = rotate_key(get_session(), second.key_id)[0]
        lineages = {key.key_id: key.lineage_id for key in get_session().scalars(select(ApiKey))}

    assert lineages[first.key_id] == lineages[second.key_id] == lineages[third.key_id] == first.key_id


def test_db_upgrade_command_is_repeatable(runner):
    for _ in range(2):
        result = runner.invoke(args=["db-upgrade"])
        assert result.exit_code == 0, result.output
        assert "up to date" in result.output


def _seed(app, messages: int) -> uuid.UUID:
    """A conversation of `messages` messages owned by client A's key."""
    with app.app_context():
        session = get_session()
        owner = session.scalar(select(ApiKey.key_id).where(ApiKey.name == "client_a"))
        return seed_conversation(session, messages, owner_key_id=owner)


def test_tail_query_reads_only_what_the_budget_needs(app, keys):
    conversation_id = _seed(app, 2_000)

    with app.app_context():
        session = get_session()
        conversation = get_conversation(session, conversation_id)
        rows = load_context_tail(session, conversation_id, conversation.message_count, conversation.token_count, 500)

    # 10 seeded messages of 50 tokens fill the budget; one query of the smallest page
    assert [row.seq for row in rows] == list(range(2_000 - MIN_TAIL_PAGE + 1, 2_001))


def test_chat_on_long_conversation_reports_dropped_messages(app, client):
    app.config["CONTEXT_MAX_TOKENS"] = 400
    conversation_id = _seed(app, 1_000)

    response = client.post("/chat", json={"conversation_id": str(conversation_id), "message": "still here?"})

    context = response.json["context"]
    assert response.json["seq"] == 1_002
    assert context["messages_sent"] + context["messages_dropped"] == 1_001
    assert context["tokens"] <= 400


@pytest.mark.parametrize("backend", ["postgres"])
def test_tail_query_uses_the_primary_key_index(app, keys):
    """EXPLAIN the statements load_context_tail itself sends, first page and a later one."""
    conversation_id = _seed(app, 3_000)
    with app.app_context():
        session = get_session()
        session.execute(text("ANALYZE messages"))
        connection = session.connection()
        statements = []

        def capture(conn, cursor, statement, parameters, context, executemany):
            statements.append((statement, parameters))

        event.listen(connection, "before_cursor_execute", capture)
        # Totals that overstate the average message (200 tokens; the newest are 50), so the
        # first page falls short of the budget and the walk also runs its `seq < before` query.
        rows = load_context_tail(session, conversation_id, 3_000, 3_000 * 200, token_budget=3 * MIN_TAIL_PAGE * 50)
        event.remove(connection, "before_cursor_execute", capture)
        plans = ["\n".join(row[0] for row in connection.exec_driver_sql("EXPLAIN " + statement, parameters)) for statement, parameters in statements]

    assert len(rows) >= 3 * MIN_TAIL_PAGE
    assert len(statements) >= 2 and any("seq <" in statement for statement, _ in statements)
    for plan in plans:
        assert "Index Scan Backward using messages_pkey" in plan, plan


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_turns_claim_reads_its_tail_by_the_primary_key(app, keys, monkeypatch):
    """EXPLAIN every statement claim_turn sends to psycopg, its claim-and-tail statement included."""
    conversation_id = _seed(app, 3_000)
    sent = []
    execute = psycopg.Cursor.execute

    def record(cursor, query, params=None, **kwargs):
        sent.append((query, params))
        return execute(cursor, query, params, **kwargs)

    with app.app_context():
        session = get_session()
        session.execute(text("ANALYZE messages"))
        # A total that overstates the average message (200 tokens; they are 50), so the first
        # page falls short of the budget and the walk back runs its `seq < before` query too.
        session.execute(text("UPDATE conversations SET token_count = 600000 WHERE conversation_id = :cid"),
                        {"cid": conversation_id})
        session.commit()
        monkeypatch.setattr(psycopg.Cursor, "execute", record)
        claimed, tail = claim_turn(session, conversation_id, None, uuid.uuid4(), 60, 3 * MIN_TAIL_PAGE * 50)
        monkeypatch.undo()
        cursor = session.connection().connection.driver_connection.cursor()
        plans = {query: "\n".join(row[0] for row in cursor.execute("EXPLAIN " + query, params)) for query, params in sent}

    assert claimed.message_count == 3_000 and tail[-1].seq == 3_000
    assert any("json_agg" in query for query in plans) and any("seq <" in query for query in plans)
    for query, plan in plans.items():
        if "FROM messages" in query:
            assert "Seq Scan on messages" not in plan, (query, plan)
            assert "Index Scan Backward using messages_pkey" in plan, (query, plan)


@pytest.mark.parametrize("backend", ["postgres"])
def test_concurrent_turns_get_distinct_sequence_numbers(app, keys):
    """Turns racing on one conversation: each one answered is stored whole, in order; the others are 409."""
    conversation_id = client_with_key(app, keys["client_a"]).post("/new_chat", json={"user_id": "racer"}).json["conversation_id"]

    def turn(n: int) -> int:
        response = client_with_key(app, keys["client_a"]).post("/chat", json={"conversation_id": conversation_id, "message": f"m{n}"})
        return response.status_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(turn, range(12)))

    log = client_with_key(app, keys["client_a"]).get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    answered = statuses.count(200)
    assert set(statuses) <= {200, 409} and answered >= 1
    assert [m["seq"] for m in log["messages"]] == list(range(1, 2 * answered + 1))
    assert log["message_count"] == 2 * answered
    # every stored reply sits right after the user message it answers
    pairs = zip(log["messages"][::2], log["messages"][1::2], strict=True)
    assert all(reply["content"].endswith(question["content"]) for question, reply in pairs)


@pytest.mark.parametrize("backend", ["postgres"])
def test_service_recovers_after_database_drops_connections(app, client, postgres_url):
    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        # What a database restart does to the app's pooled connections.
        connection.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        )
    admin.dispose()

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "after restart"})

    assert response.status_code == 200
    assert response.json["seq"] == 2


@pytest.mark.parametrize("backend", ["postgres"])
def test_closed_connections_are_found_on_descriptors_above_1024(app, client, postgres_url):
    """A thousand turns in flight open sockets past select()'s limit of 1024; checking pooled connections must still work."""
    app.extensions["parley.engine"].dispose()
    filler = []
    try:
        while (fd := os.open(os.devnull, os.O_RDONLY)) < 1100:  # the next connections open above descriptor 1100
            filler.append(fd)
        os.close(fd)
        conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
        assert client.post("/chat", json={"conversation_id": conversation_id, "message": "one"}).status_code == 200
        _terminate_other_backends(postgres_url)
        time.sleep(PING_IDLE_SECONDS + 0.2)  # so the checkout pings the closed connection (select() on its descriptor)

        response = client.get("/get_conversation", query_string={"conversation_id": conversation_id})

        assert response.status_code == 200
        assert [m["content"] for m in response.json["messages"]][0] == "one"
        with app.extensions["parley.engine"].connect() as connection:
            assert connection.connection.driver_connection.fileno() > 1024
    finally:
        for fd in filler:
            os.close(fd)


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_connection_closed_while_idle_is_replaced_before_any_route_uses_it(app, client, postgres_url):
    """Past PING_IDLE_SECONDS a pooled connection is pinged on checkout, so even a read that is not retried works."""
    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
    _terminate_other_backends(postgres_url)
    time.sleep(PING_IDLE_SECONDS + 0.2)

    response = client.get("/get_conversation", query_string={"conversation_id": conversation_id})

    assert response.status_code == 200
    assert response.json["conversation_id"] == conversation_id


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_retried_claim_matches_its_own_lease_and_no_other(app, client):
    """A claim whose reply the broken connection lost is claimed again by its own lease, never by another's."""
    conversation_id = uuid.UUID(client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"])
    lease = uuid.uuid4()
    with app.app_context():
        session = get_session()
        first = claim_turn(session, conversation_id, None, lease, lease_seconds=60, token_budget=1000)
        session.commit()
        again = claim_turn(session, conversation_id, None, lease, lease_seconds=60, token_budget=1000)
        session.commit()
        other = claim_turn(session, conversation_id, None, uuid.uuid4(), lease_seconds=60, token_budget=1000)

    assert first is not None and again is not None
    assert other is None


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_turn_stored_on_the_driver_reads_back_as_sqlalchemy_stores_it(app, client):
    """The turn's statements skip SQLAlchemy's execution layer: their values must still get their types' conversions."""
    conversation_id = uuid.UUID(client.post("/new_chat", json={"user_id": "u", "metadata": {"k": "v"}}).json["conversation_id"])
    client.put(f"/conversations/{conversation_id}/variables/city", json={"value": "Zürich"})
    when = datetime(2026, 12, 3, 18, 0, tzinfo=timezone(timedelta(hours=2)))

    def messages() -> list[MemoryMessage]:
        return [
            MemoryMessage("user", "grüße \\ \"quoted\" 🙂", 7, created_at=when, file_ids=["f-1"]),
            MemoryMessage("assistant", "reply", 3, created_at=when, usage={"input_tokens": 7, "output_tokens": 3},
                          incomplete=True),
            MemoryMessage("user", "no files", 2, created_at=when),  # usage and file_ids None: JSON null, as SQLAlchemy stores it
        ]

    lease = uuid.uuid4()
    with app.app_context():
        session = get_session()
        claimed, _tail = claim_turn(session, conversation_id, None, lease, lease_seconds=60, token_budget=1000)
        session.commit()
        assert finish_turn(session, conversation_id, lease, messages(), {"input_tokens": 7, "output_tokens": 3}) == 3
        session.commit()
        assert append_messages(session, conversation_id, messages()) == 6  # SQLAlchemy's own INSERT
        session.commit()
        columns = "role, content, created_at, token_count, usage::text, json_typeof(usage), file_ids::text, json_typeof(file_ids), incomplete"
        rows = session.execute(
            text(f"SELECT {columns} FROM messages WHERE conversation_id = :cid ORDER BY seq"), {"cid": conversation_id}
        ).all()

    assert (claimed.variables, claimed.message_count, claimed.handoff) == ({"city": "Zürich"}, 0, "bot")
    assert rows[:3] == rows[3:]
    assert rows[0].created_at == when and rows[2][5] == "null" and rows[2][7] == "null"


def _terminate_other_backends(url: str) -> None:
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        )
    admin.dispose()


def test_unreachable_database_is_503_without_details(app_config, keys):
    port = free_ports(1)[0]
    config = {**app_config, "DATABASE_URL": f"postgresql+psycopg://postgres:s3cret@127.0.0.1:{port}/parley"}
    client = client_with_key(create_app(config), keys["client_a"])

    created = client.post("/new_chat", json={"user_id": "u"})
    ready = client.get("/readyz")

    assert created.status_code == 503
    assert created.json["error"] == "database_unavailable"
    assert "s3cret" not in created.get_data(as_text=True) and "INSERT" not in created.get_data(as_text=True)
    assert ready.status_code == 503 and ready.json["checks"]["database"].startswith("unavailable")


def test_a_database_that_accepts_but_never_answers_is_503_within_the_connect_timeout(app_config, keys):
    """A host that takes the TCP connection and says nothing (a stuck proxy, a hung server)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        config = {**app_config, "DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{silent.getsockname()[1]}/parley"}
        client = client_with_key(create_app(config), keys["client_a"])
        started = time.monotonic()
        created = client.post("/new_chat", json={"user_id": "u"})
        waited = time.monotonic() - started
    finally:
        silent.close()

    assert created.status_code == 503 and created.json["error"] == "database_unavailable"
    assert waited < 15, waited  # 5 s to connect (psycopg may try twice), not the kernel's minutes


def test_postgresql_connections_give_up_on_a_host_that_went_away_unless_the_url_says_otherwise(postgres_url):
    def parameters(url: str) -> dict[str, str]:
        engine = make_engine(url)
        try:
            with engine.connect() as connection:
                return connection.connection.dbapi_connection.info.get_parameters()
        finally:
            engine.dispose()

    default = parameters(postgres_url)
    named = parameters(postgres_url + ("&" if "?" in postgres_url else "?") + "connect_timeout=7&keepalives_idle=60")

    assert {name: default[name] for name in ("connect_timeout", "tcp_user_timeout", "keepalives", "keepalives_idle")} == {
        "connect_timeout": "5", "tcp_user_timeout": "30000", "keepalives": "1", "keepalives_idle": "30"}
    assert (named["connect_timeout"], named["keepalives_idle"], named["tcp_user_timeout"]) == ("7", "60", "30000")


def test_workers_starting_together_on_a_fresh_sqlite_file_all_come_up(tmp_path):
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    script = f"from main import create_app; create_app({{'DATABASE_URL': {url!r}, 'ARCHIVE_URL': 'file://{tmp_path}/a'}})"
    workers = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE) for _ in range(6)]

    failures = [worker.stderr.read().decode()[-300:] for worker in workers if worker.wait(timeout=120) != 0]

    assert failures == []


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_connection_lost_before_the_session_closes_keeps_the_answer(app, client, postgres_url):
    """The connection dies after the route answered and before teardown rolls back: the answer stands, not a 500."""
    armed = []

    @app.after_request
    def lose_the_connection(response):
        if armed:
            backend = get_session().connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
            admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
            admin.dispose()
            armed.clear()
        return response

    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
    armed.append(True)
    answered = client.get("/get_conversation", query_string={"conversation_id": conversation_id})
    turn = client.post("/chat", json={"conversation_id": conversation_id, "message": "after"})

    assert answered.status_code == 200 and answered.json["conversation_id"] == conversation_id
    assert turn.status_code == 200 and turn.json["seq"] == 2


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_turn_whose_tail_read_fails_after_its_claim_gives_the_lease_back(app, client, postgres_url):
    """The claim committed; the connection dies on the walk back's next page: 503, and the next turn is not 409."""
    conversation_id = _seed(app, 3_000)
    with app.app_context():
        session = get_session()
        # An overstated total (200 tokens a message; they are 50): the first page falls short of the budget.
        session.execute(text("UPDATE conversations SET token_count = 600000 WHERE conversation_id = :cid"),
                        {"cid": conversation_id})
        session.commit()
    killed = []

    def lose_the_connection(connection, _cursor, statement, *_args):
        if "seq <" in statement and not killed:
            killed.append(connection.connection.dbapi_connection.info.backend_pid)
            admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": killed[0]})
            admin.dispose()

    # The key is looked up now, so the turn's request opens no transaction and its claim commits by itself.
    assert client.post("/new_chat", json={"user_id": "u"}).status_code == 201
    engine = app.extensions["parley.engine"]
    event.listen(engine, "before_cursor_execute", lose_the_connection)
    try:
        failed = client.post("/chat", json={"conversation_id": str(conversation_id), "message": "first"})
    finally:
        event.remove(engine, "before_cursor_execute", lose_the_connection)
    turn = client.post("/chat", json={"conversation_id": str(conversation_id), "message": "again"})

    assert killed and failed.status_code == 503 and failed.json["error"] == "database_unavailable"
    assert turn.status_code == 200 and turn.json["seq"] == 3_002


class _CutAfterTheStore:
    """A TCP proxy to PostgreSQL that, once armed, closes the client's connection right after the
    server answers the message that holds a turn's store: the store committed, its answer is lost
    (a network cut or a failover at the worst moment)."""

    def __init__(self, port: int) -> None:
        self.port, self.armed, self.cut = port, threading.Event(), threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url_port(self) -> int:
        return self.listener.getsockname()[1]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        server = socket.create_connection(("127.0.0.1", self.port))
        storing = False
        watch = selectors.DefaultSelector()
        for end in (client, server):
            watch.register(end, selectors.EVENT_READ)
        try:
            while True:
                ready = {key.fileobj for key, _ in watch.select()}
                if client in ready:
                    data = client.recv(65536)
                    if not data:
                        return
                    storing = storing or (self.armed.is_set() and b"INSERT INTO messages" in data)
                    server.sendall(data)
                if server in ready:
                    data = server.recv(65536)
                    if not data:
                        return
                    if storing:  # the answer to the store: dropped, and the connection with it
                        self.armed.clear()
                        self.cut.set()
                        return
                    client.sendall(data)
        finally:
            watch.close()
            for end in (client, server):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_turn_stored_before_its_connection_broke_is_answered_not_stored_again(app_config, keys, postgres_url):
    """Without this a client was told 503 for a turn the database held, and its resend stored it twice."""
    proxy = _CutAfterTheStore(sa.engine.make_url(postgres_url).port)
    url = sa.engine.make_url(postgres_url).set(port=proxy.url_port).render_as_string(hide_password=False)
    worker = create_app({**app_config, "DATABASE_URL": url})
    client = client_with_key(worker, keys["client_a"])
    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]

    proxy.armed.set()
    answered = client.post("/chat", json={"conversation_id": conversation_id, "message": "only once"})
    after = client.post("/chat", json={"conversation_id": conversation_id, "message": "and then this"})
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"]

    assert proxy.cut.is_set()  # the store's answer was lost
    assert answered.status_code == 200, answered.json
    assert answered.json["seq"] == 2
    assert after.status_code == 200 and after.json["seq"] == 4
    assert [(m["seq"], m["role"]) for m in log] == [(1, "user"), (2, "assistant"), (3, "user"), (4, "assistant")]
    assert log[0]["content"] == "only once"
    worker.extensions["parley.engine"].dispose()
    proxy.listener.close()
