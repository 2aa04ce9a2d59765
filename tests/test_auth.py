"""Keys, roles, ownership, audit and rate limits."""
from __future__ import annotations

import io
import logging
import signal
import subprocess
import threading
import time
import uuid
from datetime import timedelta

import pytest
import redis
from sqlalchemy import event, select
from sqlalchemy.orm import Session

import main
from auth import create_key, revoke_key
from database_utils import ApiKey, AuditEvent, get_session, utcnow
from main import create_app
from tests.conftest import client_with_key

SECRET_TEXT = "client A's private message"
CALLERS = ["no key", "bad key", "revoked key", "expired key", "client_a", "client_b", "staff", "admin"]
UNAUTHENTICATED = {"no key", "bad key", "revoked key", "expired key"}

# route -> (method, path, request options from the world) and who gets what
ROUTES = {
    "new_chat": ("POST", "/new_chat", lambda w: {"json": {"user_id": "matrix"}}),
    "chat": ("POST", "/chat", lambda w: {"json": {"conversation_id": w["conversation_id"], "message": "hello"}}),
    "end_chat": ("POST", "/end_chat", lambda w: {"json": {"conversation_id": w["conversation_id"]}}),
    "get_conversation": ("GET", "/get_conversation", lambda w: {"query_string": {"conversation_id": w["conversation_id"]}}),
    "search": ("GET", "/conversations", lambda w: {"query_string": {"user_id": "user-of-a"}}),
    "audit": ("GET", "/audit", lambda w: {}),
    "keys_create": ("POST", "/keys", lambda w: {"json": {"role": "client", "name": "new"}}),
    "keys_list": ("GET", "/keys", lambda w: {}),
    "keys_revoke": ("POST", "/keys/revoke", lambda w: {"json": {"key_id": w["client_b_key_id"]}}),
    "request_human": ("POST", "/conversations/{cid}/handoff", lambda w: {"json": {"reason": "matrix"}}),
    # The conversation is with the bot: a staff key passes authorization and meets the state machine.
    "claim_conversation": ("POST", "/conversations/{cid}/claim", lambda w: {}),
    "write_staff_message": ("POST", "/conversations/{cid}/staff_messages", lambda w: {"json": {"message": "hi"}}),
    "release_conversation": ("POST", "/conversations/{cid}/release", lambda w: {}),
    "set_stage": ("PUT", "/conversations/{cid}/stage", lambda w: {"json": {"stage": "matrix"}}),
    "list_variables": ("GET", "/conversations/{cid}/variables", lambda w: {}),
    "patch_variables": ("PATCH", "/conversations/{cid}/variables", lambda w: {"json": {"tier": 2}}),
    "read_variable": ("GET", "/conversations/{cid}/variables/plan", lambda w: {}),
    "put_variable": ("PUT", "/conversations/{cid}/variables/plan", lambda w: {"json": {"value": "silver"}}),
    "remove_variable": ("DELETE", "/conversations/{cid}/variables/plan", lambda w: {}),
    "knowledge_add": ("POST", "/knowledge/documents", lambda w: {"json": {"title": "matrix", "text": "matrix text"}}),
    "knowledge_list": ("GET", "/knowledge/documents", lambda w: {}),
    "knowledge_delete": ("DELETE", f"/knowledge/documents/{uuid.uuid4()}", lambda w: {}),
    "staff_page": ("GET", "/staff", lambda w: {}),
    "healthz": ("GET", "/healthz", lambda w: {}),
    "readyz": ("GET", "/readyz", lambda w: {}),
    "index": ("GET", "/", lambda w: {}),
}
ALLOWED = {
    "new_chat": {"client_a": 201, "client_b": 201},
    "chat": {"client_a": 200, "client_b": 404},
    "end_chat": {"client_a": 200, "client_b": 404},
    "get_conversation": {"client_a": 200, "client_b": 404, "staff": 200},
    # A client lists only its own conversations (B's list is empty; checked below).
    "search": {"client_a": 200, "client_b": 200, "staff": 200},
    "audit": {"admin": 200},
    "keys_create": {"admin": 201},
    "keys_list": {"admin": 200},
    "keys_revoke": {"admin": 200},
    "request_human": {"client_a": 200, "client_b": 404, "staff": 200},
    "claim_conversation": {"staff": 409},
    "write_staff_message": {"staff": 409},
    "release_conversation": {"staff": 409},
    "set_stage": {"client_a": 200, "client_b": 404, "staff": 200},
    "list_variables": {"client_a": 200, "client_b": 404, "staff": 200},
    "patch_variables": {"client_a": 200, "client_b": 404},
    "read_variable": {"client_a": 200, "client_b": 404, "staff": 200},
    "put_variable": {"client_a": 200, "client_b": 404},
    "remove_variable": {"client_a": 204, "client_b": 404},
    "knowledge_add": {"staff": 201, "admin": 201},
    "knowledge_list": {"staff": 200, "admin": 200},
    "knowledge_delete": {"staff": 404, "admin": 404},
}
PUBLIC = {"healthz", "readyz", "index", "staff_page"}


def _expected(route: str, caller: str) -> int:
    if route in PUBLIC:
        return 200
    if caller in UNAUTHENTICATED:
        return 401
    return ALLOWED[route].get(caller, 403)


@pytest.fixture
def world(app, keys):
    """Client A's conversation with a private message, plus unusable keys."""
    conversation_id = client_with_key(app, keys["client_a"]).post("/new_chat", json={"user_id": "user-of-a"}).json[
        "conversation_id"
    ]
    client_with_key(app, keys["client_a"]).post("/chat", json={"conversation_id": conversation_id, "message": SECRET_TEXT})
    client_with_key(app, keys["client_a"]).put(f"/conversations/{conversation_id}/variables/plan", json={"value": "gold"})
    with app.app_context():
        session = get_session()
        revoked, revoked_secret = create_key(session, "client", "revoked")
        revoke_key(session, revoked.key_id)
        _, expired_secret = create_key(session, "client", "expired", expires_at=utcnow() - timedelta(seconds=1))
        client_b_key_id = session.scalar(select(ApiKey.key_id).where(ApiKey.name == "client_b"))
    secrets = {**keys, "no key": None, "bad key": "prly_not-a-real-key", "revoked key": revoked_secret, "expired key": expired_secret}
    return {"conversation_id": conversation_id, "client_b_key_id": str(client_b_key_id), "secrets": secrets}


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("route", list(ROUTES))
def test_authorization_matrix(app, world, route, caller):
    method, path, options = ROUTES[route]
    path = path.format(cid=world["conversation_id"])
    client = client_with_key(app, world["secrets"][caller])

    response = client.open(path, method=method, **options(world))

    assert response.status_code == _expected(route, caller), response.get_data(as_text=True)
    body = response.get_data(as_text=True)
    if caller not in ("client_a", "staff"):
        assert SECRET_TEXT not in body and "user-of-a" not in body
    if response.status_code >= 400:
        assert set(response.json) >= {"error", "message"}



def test_staff_reads_are_audited_and_client_reads_are_not(app, client, staff_client):
    conversation_id = client.post("/new_chat", json={"user_id": "audited"}).json["conversation_id"]

    client.get("/get_conversation", query_string={"conversation_id": conversation_id})
    staff_client.get("/get_conversation", query_string={"conversation_id": conversation_id})
    staff_client.get("/conversations", query_string={"user_id": "audited"})

    with app.app_context():
        events = get_session().scalars(select(AuditEvent).order_by(AuditEvent.event_id)).all()
        staff_key = get_session().scalar(select(ApiKey).where(ApiKey.name == "staff"))
    assert [(e.action, e.key_id) for e in events] == [("read_conversation", staff_key.key_id), ("search_conversations", staff_key.key_id)]
    assert events[0].conversation_id == uuid.UUID(conversation_id)
    assert events[1].detail == {"user_id": "audited", "limit": 50}
    assert events[0].created_at <= utcnow()


def test_staff_cannot_post_as_the_user(client, staff_client):
    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]

    response = staff_client.post("/chat", json={"conversation_id": conversation_id, "message": "I am the user"})

    assert response.status_code == 403
    assert client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"] == []


def test_admin_key_lifecycle_over_http(app, admin_client):
    created = admin_client.post("/keys", json={"role": "client", "name": "mobile app"})
    new_client = client_with_key(app, created.json["key"])

    assert created.status_code == 201 and created.json["key"].startswith("prly_")
    assert new_client.post("/new_chat", json={"user_id": "u"}).status_code == 201
    listed = admin_client.get("/keys").json["keys"]
    assert created.json["key"] not in str(listed)
    assert {"mobile app"} <= {k["name"] for k in listed}

    revoked = admin_client.post("/keys/revoke", json={"key_id": created.json["key_id"]})

    assert revoked.json["state"] == "revoked"
    assert new_client.post("/new_chat", json={"user_id": "u"}).status_code == 401
    assert admin_client.post("/keys/revoke", json={"key_id": str(uuid.uuid4())}).status_code == 404


@pytest.mark.parametrize(
    "body",
    [{"role": "root", "name": "x"}, {"role": "client", "name": ""}, {"role": "client", "name": "   "},
     {"role": "client", "name": "x", "expires_at": "2020-01-01T00:00:00Z"}],
)
def test_bad_key_requests_are_400(admin_client, body):
    assert admin_client.post("/keys", json=body).status_code == 400


def test_cli_creates_lists_and_revokes_keys(app, runner):
    created = runner.invoke(args=["keys", "create", "--role", "staff", "--name", "support desk"])
    secret = created.stdout.strip().splitlines()[-1]

    assert created.exit_code == 0, created.output
    assert secret.startswith("prly_")
    assert client_with_key(app, secret).get("/conversations").status_code == 200

    listed = runner.invoke(args=["keys", "list"])
    assert "support desk" in listed.output and secret not in listed.output
    key_id = next(line.split()[0] for line in listed.output.splitlines() if "support desk" in line)

    assert runner.invoke(args=["keys", "revoke", key_id]).exit_code == 0
    assert client_with_key(app, secret).get("/conversations").status_code == 401
    assert runner.invoke(args=["keys", "create", "--role", "root", "--name", "x"]).exit_code == 2
    assert runner.invoke(args=["keys", "revoke", str(uuid.uuid4())]).exit_code == 1


def test_every_key_reads_its_own_id_and_role(app, keys, admin_client):
    listed = {key["name"]: key for key in admin_client.get("/keys").json["keys"]}

    for name in ("client_a", "staff", "admin"):
        me = client_with_key(app, keys[name]).get("/keys/me")

        assert me.status_code == 200 and me.json == listed[name]
    assert app.test_client().get("/keys/me").status_code == 401


def test_bootstrap_makes_first_keys_once(app, runner):
    first = runner.invoke(args=["keys", "bootstrap"])
    second = runner.invoke(args=["keys", "bootstrap"])

    printed = [line.split()[-1] for line in first.output.splitlines() if "prly_" in line and "curl" not in line]
    assert len(printed) == 2
    assert client_with_key(app, printed[1]).post("/new_chat", json={"user_id": "me"}).status_code == 201
    assert client_with_key(app, printed[0]).get("/keys").status_code == 200
    assert "prly_" not in second.output


@pytest.mark.parametrize(("port", "url"), [(None, "http://127.0.0.1:8000"), ("18080", "http://127.0.0.1:18080")])
def test_bootstrap_hint_names_the_port_make_run_serves_on(runner, monkeypatch, port, url):
    if port is None:
        monkeypatch.delenv("PORT", raising=False)
    else:
        monkeypatch.setenv("PORT", port)

    printed = runner.invoke(args=["keys", "bootstrap"]).output

    assert f"{url}/new_chat" in printed


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_rate_limit_per_key_answers_429_with_retry_after(app_config, keys, storage):
    prefix = f"parley-test-{uuid.uuid4().hex}"
    config = {**app_config, "RATELIMIT_ENABLED": True, "RATE_LIMIT": "3 per minute", "RATELIMIT_KEY_PREFIX": prefix}
    if storage == "redis":
        config["REDIS_URL"] = "redis://127.0.0.1:6379/0"
    app = create_app(config)
    limited, other = client_with_key(app, keys["client_a"]), client_with_key(app, keys["client_b"])

    statuses = [limited.post("/new_chat", json={"user_id": "u"}).status_code for _ in range(2)]
    document = limited.get("/openapi.json")  # a route outside the API blueprint counts too
    statuses += [document.status_code, limited.get("/conversations").status_code]  # one budget across routes
    blocked = limited.post("/new_chat", json={"user_id": "u"})

    assert statuses == [201, 201, 200, 429]
    assert document.headers["X-RateLimit-Remaining"] == "0"
    assert blocked.json["error"] == "rate_limited"
    assert 0 < int(blocked.headers["Retry-After"]) <= 60
    assert other.post("/new_chat", json={"user_id": "u"}).status_code == 201
    assert all(limited.get("/healthz").status_code == 200 for _ in range(5))
    if storage == "redis":
        stored = redis.Redis.from_url("redis://127.0.0.1:6379/0").keys(f"*{prefix}*")
        assert stored and not any(keys["client_a"].encode() in name for name in stored)


def test_the_rate_limiter_leaves_other_answers_their_own_retry_after(provider_app, fake_model):
    """With the limiter on, as in production: its headers on every answer, its Retry-After only on a 429."""
    client = provider_app("anthropic", RATELIMIT_ENABLED=True, RATE_LIMIT="5 per minute", RATELIMIT_KEY_PREFIX=uuid.uuid4().hex)
    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
    fake_model.delay_next(1.0)
    first = []
    turn = threading.Thread(target=lambda: first.append(client.post("/chat", json={"conversation_id": conversation_id, "message": "a"})))
    turn.start()
    deadline = time.monotonic() + 10
    while fake_model.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    busy = client.post("/chat", json={"conversation_id": conversation_id, "message": "b"})
    turn.join()
    fake_model.fail_next(429, headers={"retry-after": "7"})
    overloaded = client.post("/chat", json={"conversation_id": conversation_id, "message": "c"})
    limited = client.post("/chat", json={"conversation_id": conversation_id, "message": "d"})

    assert first[0].status_code == 200 and "Retry-After" not in first[0].headers
    assert first[0].headers["X-RateLimit-Limit"] == "5"
    assert busy.status_code == 409 and busy.headers["Retry-After"] == "1"
    assert overloaded.status_code == 503 and overloaded.headers["Retry-After"] == "7"
    assert overloaded.headers["X-RateLimit-Remaining"] == "1"  # the new chat, the three turns: 4 of 5
    assert int(first[0].headers["X-RateLimit-Reset"]) > time.time()
    assert limited.status_code == 200 and int(limited.headers["X-RateLimit-Remaining"]) == 0
    blocked = client.post("/chat", json={"conversation_id": conversation_id, "message": "e"})
    assert blocked.status_code == 429 and 0 < int(blocked.headers["Retry-After"]) <= 60


def test_made_up_keys_share_their_address_budget(app_config, keys):
    app = create_app({**app_config, "RATELIMIT_ENABLED": True, "RATE_LIMIT": "3 per minute", "RATELIMIT_KEY_PREFIX": uuid.uuid4().hex})

    statuses = [client_with_key(app, f"prly_guess{n}").get("/keys").status_code for n in range(5)]

    assert statuses == [401, 401, 401, 429, 429]
    assert client_with_key(app, keys["admin"]).get("/keys").status_code == 200


def test_rate_limits_fall_back_to_memory_when_redis_is_down(app_config, keys):
    from tests.seaweed import free_ports

    config = {**app_config, "RATELIMIT_ENABLED": True, "RATE_LIMIT": "2 per minute", "REDIS_URL": f"redis://127.0.0.1:{free_ports(1)[0]}/0"}
    client = client_with_key(create_app(config), keys["client_a"])

    answers = [client.post("/new_chat", json={"user_id": "u"}) for _ in range(3)]

    assert [answer.status_code for answer in answers] == [201, 201, 429]
    assert 0 < int(answers[-1].headers["Retry-After"]) <= 60 and answers[-1].headers["X-RateLimit-Remaining"] == "0"


def test_a_database_down_while_the_rate_limiter_looks_up_the_key_is_one_503_on_the_address_budget(app_config, keys):
    """The limiter asks for the key first; its lookup's failure is kept, and the route answers it without a second try."""
    from sqlalchemy import event

    from tests.seaweed import free_ports

    down = f"postgresql+psycopg://postgres@127.0.0.1:{free_ports(1)[0]}/parley"
    app = create_app({**app_config, "DATABASE_URL": down, "RATELIMIT_ENABLED": True, "RATE_LIMIT": "2 per minute",
                      "RATELIMIT_KEY_PREFIX": uuid.uuid4().hex})
    attempts = []
    event.listen(app.extensions["parley.engine"], "do_connect", lambda *_: attempts.append(1))
    client = client_with_key(app, keys["client_a"])

    answers = [client.post("/chat", json={"conversation_id": str(uuid.uuid4()), "message": "hi"}) for _ in range(3)]

    assert [(answer.status_code, answer.json["error"]) for answer in answers] == [
        (503, "database_unavailable"), (503, "database_unavailable"), (429, "rate_limited"),
    ]
    assert [answer.headers["X-RateLimit-Remaining"] for answer in answers] == ["1", "0", "0"]
    assert len(attempts) == 3  # one connection attempt per request, the 429's by the limiter


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of the test's own, to stop and kill: its URL and process."""
    from tests.seaweed import free_ports

    port = free_ports(1)[0]
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    store = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            store.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0", server
    server.send_signal(signal.SIGCONT)
    server.kill()
    server.wait(10)


def test_a_429_keeps_a_retry_after_when_redis_stops_after_the_check(app_config, keys, own_redis):
    """Redis answers the limit check, then stops before the answer's headers are written."""
    url, server = own_redis
    app = create_app({**app_config, "RATELIMIT_ENABLED": True, "RATE_LIMIT": "1 per minute", "REDIS_URL": url})

    @app.after_request  # runs before the hooks create_app registered
    def stop_redis_on_a_429(response):
        if response.status_code == 429:
            server.terminate()
            server.wait(10)
        return response

    client = client_with_key(app, keys["client_a"])
    allowed = client.post("/new_chat", json={"user_id": "u"})
    blocked = client.post("/new_chat", json={"user_id": "u"})

    assert allowed.status_code == 201 and allowed.headers["X-RateLimit-Remaining"] == "0"
    assert blocked.status_code == 429 and blocked.json["error"] == "rate_limited"
    assert blocked.headers["Retry-After"] == "60"  # one whole window: no count to say less
    assert "X-RateLimit-Remaining" not in blocked.headers


def test_a_redis_that_stops_answering_holds_requests_half_a_second_at_most(app_config, keys, own_redis):
    url, server = own_redis
    client = client_with_key(create_app({**app_config, "RATELIMIT_ENABLED": True, "RATE_LIMIT": "2 per minute", "REDIS_URL": url}),
                             keys["client_a"])
    assert client.get("/conversations").status_code == 200  # Redis counts this one

    server.send_signal(signal.SIGSTOP)
    timings = []
    for _ in range(3):
        started = time.monotonic()
        timings.append((client.get("/conversations").status_code, time.monotonic() - started))

    assert [status for status, _ in timings] == [200, 200, 429]  # limited from memory meanwhile
    assert timings[0][1] < 3 and all(seconds < 1.5 for _, seconds in timings[1:]), timings


def test_requests_that_meet_redis_going_away_together_are_not_500(app_config, keys, own_redis):
    """Killed under concurrent load: the requests that meet the failure while one switches to the
    in-memory fallback are answered, not failed."""
    url, server = own_redis
    app = create_app({**app_config, "RATELIMIT_ENABLED": True, "RATE_LIMIT": "100000 per minute", "REDIS_URL": url})
    statuses: list[int] = []
    stop = threading.Event()

    def load():
        client = client_with_key(app, keys["client_a"])
        while not stop.is_set():
            statuses.append(client.get("/conversations").status_code)

    workers = [threading.Thread(target=load) for _ in range(8)]
    for worker in workers:
        worker.start()
    time.sleep(0.5)
    server.kill()
    time.sleep(1.0)
    stop.set()
    for worker in workers:
        worker.join(30)

    assert len(statuses) > 50
    assert set(statuses) == {200}, {status: statuses.count(status) for status in set(statuses)}


def test_no_secret_sql_or_traceback_reaches_logs(app, client, keys, caplog):
    caplog.set_level(logging.DEBUG)
    client_with_key(app, "prly_wrong").post("/new_chat", json={"user_id": "u"})
    client.post("/chat", json={"conversation_id": str(uuid.uuid4()), "message": "x"})
    client.post("/new_chat", data=b"{oops", content_type="application/json")

    text = caplog.text
    assert all(secret not in text for secret in keys.values())
    assert "Traceback" not in text and "SELECT" not in text and "INSERT" not in text


def _two_workers(app_config, keys, cache_seconds: float):
    """Two apps on one database stand for two workers; each caches key lookups for AUTH_CACHE_SECONDS."""
    config = {**app_config, "AUTH_CACHE_SECONDS": cache_seconds}
    worker_a, worker_b = create_app(config), create_app(config)
    admin_on_a = client_with_key(worker_a, keys["admin"])
    key_id = next(k["key_id"] for k in admin_on_a.get("/keys").json["keys"] if k["name"] == "client_a")
    return worker_a, worker_b, admin_on_a, key_id


def test_a_key_revoked_by_another_worker_stops_working_within_the_cache_time(app_config, keys):
    worker_a, worker_b, admin_on_a, key_id = _two_workers(app_config, keys, cache_seconds=1)
    client_on_b = client_with_key(worker_b, keys["client_a"])

    assert client_on_b.post("/new_chat", json={"user_id": "u"}).status_code == 201  # now cached on b
    assert admin_on_a.post("/keys/revoke", json={"key_id": key_id}).status_code == 200
    still_cached = client_on_b.post("/new_chat", json={"user_id": "u"}).status_code
    on_the_revoking_worker = client_with_key(worker_a, keys["client_a"]).post("/new_chat", json={"user_id": "u"}).status_code
    time.sleep(1.1)
    after_the_cache_time = client_on_b.post("/new_chat", json={"user_id": "u"}).status_code

    assert on_the_revoking_worker == 401
    assert still_cached == 201  # the documented window
    assert after_the_cache_time == 401
    for worker in (worker_a, worker_b):
        worker.extensions["parley.engine"].dispose()


def test_a_key_revoked_while_a_request_reads_it_is_not_cached_as_usable(app_config, keys):
    """The request's read saw the key usable; the revocation commits and clears the cache before
    the read's answer is kept: it must not be kept, or the key would work for AUTH_CACHE_SECONDS more."""
    worker = create_app({**app_config, "AUTH_CACHE_SECONDS": 60})
    engine = worker.extensions["parley.engine"]
    with Session(engine) as session:
        key_id = session.scalar(select(ApiKey.key_id).where(ApiKey.name == "client_a"))
    revoked = []

    def revoke_after_the_read(_connection, _cursor, statement, *_args):
        if "FROM api_keys" in statement and not revoked:
            revoked.append(True)
            with Session(engine) as session:
                revoke_key(session, key_id)

    event.listen(engine, "after_cursor_execute", revoke_after_the_read)
    try:
        during = client_with_key(worker, keys["client_a"]).post("/new_chat", json={"user_id": "u"}).status_code
    finally:
        event.remove(engine, "after_cursor_execute", revoke_after_the_read)
    after = client_with_key(worker, keys["client_a"]).post("/new_chat", json={"user_id": "u"}).status_code

    assert revoked and during == 201  # authenticated before the revocation committed
    assert after == 401
    engine.dispose()


class _BodyThatLooksAtThePool(io.BytesIO):
    """A request body that notes how many pooled connections are checked out each time it is read."""

    def __init__(self, data: bytes, engine) -> None:
        super().__init__(data)
        self.engine, self.seen = engine, []

    def read(self, size: int | None = -1) -> bytes:
        self.seen.append(self.engine.pool.checkedout())
        return super().read(size)

    def readline(self, size: int | None = -1) -> bytes:
        self.seen.append(self.engine.pool.checkedout())
        return super().readline(size)

    def readinto(self, buffer) -> int:
        self.seen.append(self.engine.pool.checkedout())
        return super().readinto(buffer)


@pytest.mark.parametrize("route", ["new_chat", "upload"])
def test_no_connection_is_held_while_the_body_is_read(app_config, keys, route):
    """A client that sends its body slowly, with a key this worker has not cached, must not hold a
    connection of the pool meanwhile: a few dozen such clients would leave none for anyone else."""
    worker = create_app(app_config)  # nothing cached: the key is read from the database
    engine = worker.extensions["parley.engine"]
    client = client_with_key(worker, keys["client_a"])
    if route == "new_chat":
        path, data, content_type, expected = "/new_chat", b'{"user_id": "slow"}', "application/json", 201
    else:
        conversation_id = client.post("/new_chat", json={"user_id": "slow"}).get_json()["conversation_id"]
        worker.extensions["parley.key_cache"].clear()
        boundary = "parley-test-boundary"
        path, content_type, expected = f"/conversations/{conversation_id}/files", f"multipart/form-data; boundary={boundary}", 201
        data = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="notes.txt"\r\n'
                f"Content-Type: text/plain\r\n\r\nslow notes\r\n--{boundary}--\r\n").encode()
    body = _BodyThatLooksAtThePool(data, engine)

    response = client.post(path, input_stream=body, content_length=len(data),
                           content_type=content_type)

    assert response.status_code == expected, response.get_json()
    assert body.seen and set(body.seen) == {0}
    engine.dispose()


def test_with_the_cache_off_revocation_is_immediate_everywhere(app_config, keys):
    worker_a, worker_b, admin_on_a, key_id = _two_workers(app_config, keys, cache_seconds=0)
    client_on_b = client_with_key(worker_b, keys["client_a"])

    assert client_on_b.post("/new_chat", json={"user_id": "u"}).status_code == 201
    admin_on_a.post("/keys/revoke", json={"key_id": key_id})

    assert client_on_b.post("/new_chat", json={"user_id": "u"}).status_code == 401
    for worker in (worker_a, worker_b):
        worker.extensions["parley.engine"].dispose()


def test_an_api_route_that_declares_no_roles_stops_the_app_from_starting(app_config, monkeypatch):
    """Without @allow a route would answer 500 to every call; the app refuses to start instead."""
    monkeypatch.delitem(main.ROUTE_ROLES, "end_chat")

    with pytest.raises(RuntimeError, match=r"routes that declare no roles \(@allow\): end_chat$"):
        main.create_app(app_config)
