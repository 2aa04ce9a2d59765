"""Idempotency-Key on POST /new_chat, /chat and /end_chat (Stripe's semantics)."""
from __future__ import annotations

import io
import threading
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, func, select, text, update

import idempotency
from auth import authenticate, rotate_key
from config import load_config
from database_utils import Conversation, IdempotencyRecord, get_session, utcnow
from errors import IdempotencyClaimLost
from idempotency import Claim, body_defaults, claim, fingerprint
from main import create_app
from schemas import NewChatRequest
from tests.conftest import client_with_key


def _conversation(client) -> str:
    return client.post("/new_chat", json={"user_id": "u-1"}).json["conversation_id"]


def _post(client, path: str, body: dict, key: str | None):
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post(path, json=body, headers=headers)


def test_a_retried_turn_returns_the_first_response_without_calling_the_model_again(provider_app, fake_model):
    client = provider_app("anthropic")
    conversation_id = _conversation(client)
    body = {"conversation_id": conversation_id, "message": "charge my card once"}

    first = _post(client, "/chat", body, "turn-1")
    retry = _post(client, "/chat", body, "turn-1")

    assert first.status_code == retry.status_code == 200
    assert retry.data == first.data  # the same bytes, not only the same JSON
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert len([r for r in fake_model.requests if r.path == "/v1/messages"]) == 1
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert log["message_count"] == 2


def test_a_retried_new_chat_opens_one_conversation(app, client):
    body = {"user_id": "once", "conversation_name": "Only one"}

    first = _post(client, "/new_chat", body, "open-1")
    retry = _post(client, "/new_chat", body, "open-1")

    assert first.status_code == retry.status_code == 201
    assert retry.json["conversation_id"] == first.json["conversation_id"]
    with app.app_context():
        count = get_session().scalar(select(func.count()).select_from(Conversation).where(Conversation.user_id == "once"))
    assert count == 1


def test_a_retried_end_chat_returns_the_first_response(client):
    conversation_id = _conversation(client)
    body = {"conversation_id": conversation_id}

    first = _post(client, "/end_chat", body, "end-1")
    retry = _post(client, "/end_chat", body, "end-1")

    assert first.status_code == retry.status_code == 200
    assert retry.json == first.json
    assert retry.headers["Idempotent-Replayed"] == "true"


def test_the_same_key_with_another_body_or_route_is_422(client):
    conversation_id = _conversation(client)
    _post(client, "/chat", {"conversation_id": conversation_id, "message": "a"}, "k-1")

    other_body = _post(client, "/chat", {"conversation_id": conversation_id, "message": "b"}, "k-1")
    other_route = _post(client, "/end_chat", {"conversation_id": conversation_id}, "k-1")

    assert other_body.status_code == other_route.status_code == 422
    assert other_body.json["error"] == "idempotency_key_reused"
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert log["message_count"] == 2


def test_key_order_in_the_body_does_not_make_another_request(client):
    conversation_id = _conversation(client)
    first = client.post("/chat", data=f'{{"conversation_id": "{conversation_id}", "message": "x"}}',
                        headers={"Idempotency-Key": "order", "Content-Type": "application/json"})
    retry = client.post("/chat", data=f'{{"message": "x", "conversation_id": "{conversation_id}"}}',
                        headers={"Idempotency-Key": "order", "Content-Type": "application/json"})

    assert retry.status_code == 200 and retry.json == first.json


def test_a_field_sent_with_its_default_is_the_same_request_as_the_field_left_out(provider_app, fake_model):
    client = provider_app("anthropic")
    conversation_id = _conversation(client)
    body = {"conversation_id": conversation_id, "message": "once"}

    first = _post(client, "/chat", body, "defaults")
    spelled_out = _post(client, "/chat", {**body, "stream": False, "file_ids": []}, "defaults")
    streamed = _post(client, "/chat", {**body, "stream": True}, "defaults")

    assert spelled_out.status_code == 200 and spelled_out.data == first.data
    assert spelled_out.headers["Idempotent-Replayed"] == "true"
    assert streamed.status_code == 422 and streamed.json["error"] == "idempotency_key_reused"
    assert len([r for r in fake_model.requests if r.path == "/v1/messages"]) == 1


def test_no_body_an_empty_one_and_one_of_defaults_are_the_same_release(client, staff_client):
    conversation_id = _conversation(client)
    assert client.post(f"/conversations/{conversation_id}/handoff", json={"reason": "a person, please"}).status_code == 200
    assert staff_client.post(f"/conversations/{conversation_id}/claim").status_code == 200
    headers = {"Idempotency-Key": "release-1"}

    first = staff_client.post(f"/conversations/{conversation_id}/release", headers=headers)
    empty = staff_client.post(f"/conversations/{conversation_id}/release", json={}, headers=headers)
    null_note = staff_client.post(f"/conversations/{conversation_id}/release", json={"note": None}, headers=headers)
    with_note = staff_client.post(f"/conversations/{conversation_id}/release", json={"note": "done"}, headers=headers)

    assert first.status_code == 200
    assert [(r.status_code, r.headers.get("Idempotent-Replayed")) for r in (empty, null_note)] == [(200, "true")] * 2
    assert with_note.status_code == 422


def test_a_default_is_matched_by_type_as_well_as_value():
    defaults = {"stream": False}

    assert fingerprint("POST", "/chat", {"stream": False}, defaults) == fingerprint("POST", "/chat", {}, defaults)
    assert fingerprint("POST", "/chat", {"stream": 0}, defaults) != fingerprint("POST", "/chat", {}, defaults)


def _first_turn_running(client, fake_model, body: dict, key: str) -> tuple[threading.Thread, dict]:
    """Send a /chat whose model call takes 1.5 s, in the background; return once the model has it.
    Its response is `results["first"]` once the thread has ended."""
    fake_model.delay_next(1.5)
    results: dict = {}
    thread = threading.Thread(target=lambda: results.setdefault("first", _post(client, "/chat", body, key)))
    thread.start()
    deadline = time.monotonic() + 10
    while fake_model.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    return thread, results


def test_a_retry_while_the_first_request_runs_is_409(provider_app, fake_model):
    client = provider_app("anthropic")
    conversation_id = _conversation(client)
    body = {"conversation_id": conversation_id, "message": "slow"}
    thread, results = _first_turn_running(client, fake_model, body, "slow-1")

    during = _post(client, "/chat", body, "slow-1")
    thread.join()
    after = _post(client, "/chat", body, "slow-1")

    assert during.status_code == 409
    assert during.json["error"] == "request_in_progress"
    assert "is still running" in during.json["message"]  # met its running claim, not three lost races ("contended")
    assert during.headers["Retry-After"] == "1"
    assert results["first"].status_code == 200
    assert after.json == results["first"].json


def test_a_retry_with_the_key_rotated_to_while_the_first_runs_is_409_then_the_first_answer(provider_app, fake_model, keys):
    """The Idempotency-Key belongs to the key's lineage: the rotation does not start it afresh."""
    client = provider_app("anthropic")
    conversation_id = _conversation(client)
    body = {"conversation_id": conversation_id, "message": "pay once"}
    thread, results = _first_turn_running(client, fake_model, body, "rotating")
    with client.application.app_context():
        old = authenticate(get_session(), f"Bearer {keys['client_a']}")
        rotated = client_with_key(client.application, rotate_key(get_session(), old.key_id)[1])

    during = _post(rotated, "/chat", body, "rotating")
    thread.join()
    after = _post(rotated, "/chat", body, "rotating")

    assert (during.status_code, during.json["error"]) == (409, "request_in_progress")
    assert results["first"].status_code == 200
    assert (after.status_code, after.json, after.headers["Idempotent-Replayed"]) == (200, results["first"].json, "true")
    assert len([r for r in fake_model.requests if r.path == "/v1/messages"]) == 1
    assert [role for _, role, _ in _stored(rotated, conversation_id)] == ["user", "assistant"]


def _wait_for_model_calls(fake_model, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(fake_model.requests) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def _stored(client, conversation_id: str) -> list[tuple[int, str, str]]:
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    return [(message["seq"], message["role"], message["content"]) for message in log["messages"]]


def test_a_request_that_outlives_its_lock_leaves_the_key_to_the_retry_that_took_it_over(provider_app, fake_model):
    """The first turn's model call outlasts its lock; a retry takes the key and the lease and answers.
    The first then fails on its lost lease: its 409 must not replace the retry's stored 200."""
    client = provider_app("anthropic", TURN_LEASE_SECONDS=1)
    conversation_id = _conversation(client)
    body = {"conversation_id": conversation_id, "message": "slow"}
    fake_model.delay_next(2.5)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", _post(client, "/chat", body, "outlived")))
    first.start()
    _wait_for_model_calls(fake_model, 1)
    time.sleep(1.3)  # the first request's lock and lease have run out

    retry = _post(client, "/chat", body, "outlived")
    first.join()
    again = _post(client, "/chat", body, "outlived")

    assert retry.status_code == 200 and "Idempotent-Replayed" not in retry.headers
    assert results["first"].status_code == 409 and results["first"].json["error"] == "conflict"
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.data == retry.data
    assert len(fake_model.requests) == 2
    assert _stored(client, conversation_id) == [(1, "user", "slow"), (2, "assistant", retry.json["reply"])]


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_turn_whose_lease_came_late_keeps_its_key_while_it_runs(provider_app, fake_model, app_config, request):
    """Reading the turn's file waits 2 s on a table lock after the key was claimed, before the lease is
    taken: the key's lock is renewed with the lease, so a retry while the model answers is 409
    `request_in_progress`, not a take-over of the key that fails both requests."""
    client = provider_app("anthropic", TURN_LEASE_SECONDS=3)
    conversation_id = _conversation(client)
    upload = client.post(f"/conversations/{conversation_id}/files", content_type="multipart/form-data",
                         data={"file": (io.BytesIO(b"two chairs, one table"), "notes.txt")})
    body = {"conversation_id": conversation_id, "message": "held back", "file_ids": [upload.json["file_id"]]}
    engine = create_engine(app_config["DATABASE_URL"])
    request.addfinalizer(engine.dispose)
    fake_model.delay_next(4.0)  # the first turn stores about 6 s after its key: the retry below comes well before
    results = {}
    with engine.connect() as holder:
        holder.execute(text("LOCK TABLE conversation_files IN ACCESS EXCLUSIVE MODE"))
        first = threading.Thread(target=lambda: results.setdefault("first", _post(client, "/chat", body, "held-back")))
        first.start()
        time.sleep(2.0)
        holder.rollback()  # the file is read now, and the lease taken, 2 s after the key
    _wait_for_model_calls(fake_model, 1)
    with client.application.app_context():
        record = get_session().scalars(select(IdempotencyRecord).where(IdempotencyRecord.idempotency_key == "held-back")).one()
    # The key's first lock (3 s from its claim, whenever the claim came) has run out; the renewed one has not.
    time.sleep(max(0.0, (record.created_at + timedelta(seconds=3.4) - utcnow()).total_seconds()))
    assert record.response_status is None and (record.locked_until - record.created_at).total_seconds() > 4  # renewed

    retry = _post(client, "/chat", body, "held-back")
    first.join()

    assert upload.status_code == 201
    assert retry.status_code == 409 and retry.json["error"] == "request_in_progress"
    assert results["first"].status_code == 200
    assert _stored(client, conversation_id) == [(1, "user", "held back"), (2, "assistant", results["first"].json["reply"])]
    assert len(fake_model.requests) == 1


def test_a_stream_that_outlives_its_lock_does_not_drop_the_claim_of_the_retry_that_took_it_over(provider_app, fake_model):
    """The first stream ends after its lock ran out, while the retry that took the key over is still
    running: the first's failure must not release the retry's claim (a third request would run again)."""
    client = provider_app("anthropic", TURN_LEASE_SECONDS=1)
    conversation_id = _conversation(client)
    body = {"conversation_id": conversation_id, "message": "a reply long enough to stream in many pieces", "stream": True}
    fake_model.stream_interval = 0.2
    fake_model.delay_next(0)
    fake_model.delay_next(2.0)  # the retry's model call outlasts the first stream
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", _post(client, "/chat", body, "streamed").get_data(as_text=True)))
    first.start()
    _wait_for_model_calls(fake_model, 1)
    time.sleep(1.3)

    retry = _post(client, "/chat", body, "streamed")
    retry_events = retry.get_data(as_text=True)
    first.join()
    again = _post(client, "/chat", body, "streamed")

    assert "event: error" in results["first"] and '"conflict"' in results["first"]
    assert "event: done" in retry_events
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(fake_model.requests) == 2
    assert [role for _, role, _ in _stored(client, conversation_id)] == ["user", "assistant"]


def test_a_failed_turn_is_replayed_like_a_success_and_changes_nothing(provider_app, fake_model):
    client = provider_app("anthropic")
    conversation_id = _conversation(client)
    body = {"conversation_id": conversation_id, "message": "try again"}
    fake_model.fail_next(400)  # not retried by Parley: one model request

    failed = _post(client, "/chat", body, "failed-once")
    retried = _post(client, "/chat", body, "failed-once")
    fresh = _post(client, "/chat", body, "a-new-key")

    assert failed.status_code == retried.status_code == 502
    assert retried.data == failed.data and failed.json["error"] == "model_error"
    assert retried.headers["Idempotent-Replayed"] == "true"
    assert len(fake_model.requests) == 2  # the failure and the new key's turn; the retry made none
    assert fresh.status_code == 200 and "Idempotent-Replayed" not in fresh.headers
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert [m["content"] for m in log["messages"]] == ["try again", fresh.json["reply"]]


def test_a_request_whose_route_never_began_is_not_kept_so_its_retry_runs(provider_app, fake_model):
    client = provider_app("anthropic")
    conversation_id = _conversation(client)
    slow = {"conversation_id": conversation_id, "message": "slow"}
    body = {"conversation_id": conversation_id, "message": "mine"}
    fake_model.delay_next(1.0)
    results = {}
    thread = threading.Thread(target=lambda: results.setdefault("slow", _post(client, "/chat", slow, None)))
    thread.start()
    deadline = time.monotonic() + 10
    while fake_model.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake_model.in_flight == 1

    busy = _post(client, "/chat", body, "busy-then-free")
    invalid = _post(client, "/chat", {"conversation_id": conversation_id}, "invalid-body")
    thread.join()
    retried = _post(client, "/chat", body, "busy-then-free")
    invalid_again = _post(client, "/chat", {"conversation_id": conversation_id}, "invalid-body")

    assert results["slow"].status_code == 200
    assert busy.status_code == 409 and busy.json["error"] == "turn_in_progress"
    assert retried.status_code == 200 and "Idempotent-Replayed" not in retried.headers
    assert invalid.status_code == invalid_again.status_code == 400
    assert "Idempotent-Replayed" not in invalid_again.headers
    with client.application.app_context():
        kept = get_session().scalars(select(IdempotencyRecord.idempotency_key)).all()
    assert sorted(kept) == ["busy-then-free"]  # its success; the invalid request left no record


@pytest.mark.parametrize(
    ("status", "body", "kept"),
    [
        (502, {"error": "model_error", "retryable": True}, True),
        (503, {"error": "model_unavailable", "retryable": True}, True),
        (503, {"error": "knowledge_unavailable"}, True),
        (404, {"error": "not_found"}, True),
        (409, {"error": "handoff_conflict"}, True),
        (500, {"error": "internal_error"}, True),
        (200, {"conversation_id": "c"}, False),  # a success is stored with its work, by the route
        (400, {"error": "invalid_request"}, False),
        (413, {"error": "payload_too_large"}, False),
        (422, {"error": "unknown_file"}, False),
        (409, {"error": "turn_in_progress"}, False),
        (503, {"error": "database_unavailable"}, False),
        (500, None, False),
        (401, {"error": "unauthorized"}, False),
        (403, {"error": "forbidden"}, False),
        (429, {"error": "rate_limited"}, False),
    ],
)
def test_which_failures_are_kept(status, body, kept):
    assert idempotency.keeps(status, body) is kept


def test_a_claim_refused_to_a_key_revoked_elsewhere_is_not_replayed_to_the_key_rotated_from_it(app_config, keys):
    """This process still caches the staff key that another one revoked: the claim finds it revoked (401)
    after its Idempotency-Key was claimed. The key rotated from it sends the same Idempotency-Key: it runs."""
    app = create_app({**app_config, "AUTH_CACHE_SECONDS": 300})
    client, staff = client_with_key(app, keys["client_a"]), client_with_key(app, keys["staff"])
    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
    assert client.post(f"/conversations/{conversation_id}/handoff", json={"reason": "help"}).status_code == 200
    assert staff.get("/conversations").status_code == 200  # the staff key is cached now
    engine = app.extensions["parley.engine"]
    with engine.begin() as connection:  # as `parley keys revoke` would, in another process
        key_id = connection.execute(text("UPDATE api_keys SET revoked_at = CURRENT_TIMESTAMP WHERE name = 'staff' RETURNING key_id")).scalar_one()
    refused = staff.post(f"/conversations/{conversation_id}/claim", headers={"Idempotency-Key": "claim-1"})
    with app.app_context():
        secret = rotate_key(get_session(), uuid.UUID(str(key_id)))[1]

    retried = client_with_key(app, secret).post(f"/conversations/{conversation_id}/claim", headers={"Idempotency-Key": "claim-1"})

    assert refused.status_code == 401
    assert retried.status_code == 200 and "Idempotent-Replayed" not in retried.headers and retried.json["handoff"] == "human"
    engine.dispose()


def test_keys_are_scoped_to_the_api_key(app, keys):
    client_a, client_b = client_with_key(app, keys["client_a"]), client_with_key(app, keys["client_b"])

    a = _post(client_a, "/new_chat", {"user_id": "a"}, "shared-key")
    b = _post(client_b, "/new_chat", {"user_id": "b"}, "shared-key")

    assert a.status_code == b.status_code == 201
    assert a.json["conversation_id"] != b.json["conversation_id"]


@pytest.mark.parametrize(("path", "body"), [
    ("/new_chat", {"user_id": "\ud800"}),
    ("/chat", {"message": "half a pair: \udfff"}),
])
def test_a_lone_surrogate_under_a_key_is_refused_like_without_one(client, path, body):
    """JSON may escape half a UTF-16 pair; the fingerprint takes it, and the body's validation refuses it."""
    body = {**body, "conversation_id": _conversation(client)} if path == "/chat" else body

    plain = _post(client, path, body, None)
    keyed = _post(client, path, body, "surrogate-1")

    assert plain.status_code == keyed.status_code == 400
    assert plain.json["error"] == keyed.json["error"] == "invalid_request"


@pytest.mark.parametrize("key", ["", "x" * 256, "ключ", "two words", "two,keys"])
def test_a_malformed_key_is_400(client, key):
    response = _post(client, "/new_chat", {"user_id": "u"}, key)

    assert response.status_code == 400
    assert "Idempotency-Key" in response.json["message"]


def test_a_claim_left_by_a_dead_worker_is_taken_over_after_its_lock(app, client, keys):
    app.config["TURN_LEASE_SECONDS"] = 1
    body = {"user_id": "late"}
    with app.app_context():
        session = get_session()
        caller = authenticate(session, f"Bearer {keys['client_a']}")
        # A request that claimed the key and whose worker then died.
        held = claim(session, caller.lineage_id, "orphan", fingerprint("POST", "/new_chat", body, body_defaults(NewChatRequest)), app.config)
        assert isinstance(held, Claim)

    blocked = _post(client, "/new_chat", body, "orphan")
    time.sleep(1.1)
    taken_over = _post(client, "/new_chat", body, "orphan")

    assert blocked.status_code == 409
    assert taken_over.status_code == 201


def test_expired_records_are_purged(app, client, runner):
    app.config["IDEMPOTENCY_TTL_HOURS"] = 0
    _post(client, "/new_chat", {"user_id": "u"}, "gone-soon")

    result = runner.invoke(args=["idempotency-purge"])
    again = _post(client, "/new_chat", {"user_id": "u"}, "gone-soon")

    assert result.exit_code == 0
    assert "Deleted 1 expired idempotency records." in result.output
    assert again.status_code == 201 and "Idempotent-Replayed" not in again.headers
    with app.app_context():
        remaining = get_session().scalar(select(func.count()).select_from(IdempotencyRecord))
    assert remaining == 1


def test_requests_purge_expired_records_at_most_once_per_interval(app, client, monkeypatch):
    app.config["IDEMPOTENCY_TTL_HOURS"] = 0  # every record expires at once

    def records() -> int:
        with app.app_context():
            return get_session().scalar(select(func.count()).select_from(IdempotencyRecord))

    _post(client, "/new_chat", {"user_id": "u"}, "first")  # this process's first purge: nothing to delete yet
    _post(client, "/new_chat", {"user_id": "u"}, "second")  # within the interval: "first" stays
    kept = records()
    monkeypatch.setattr(idempotency, "PURGE_INTERVAL_SECONDS", 0)
    _post(client, "/new_chat", {"user_id": "u"}, "third")  # purges "first" and "second", then stores its own

    assert kept == 2
    assert records() == 1


@pytest.mark.parametrize("hours", [None, 48])
def test_records_are_kept_for_the_configured_time(app, client, hours):
    if hours is not None:
        app.config["IDEMPOTENCY_TTL_HOURS"] = hours
    _post(client, "/new_chat", {"user_id": "u"}, str(uuid.uuid4()))

    with app.app_context():
        record = get_session().scalars(select(IdempotencyRecord)).one()
    kept = record.expires_at - record.created_at

    assert kept.total_seconds() == pytest.approx((hours or 24) * 3600)


def test_records_cannot_be_configured_to_go_before_a_day():
    with pytest.raises(ValueError, match="IDEMPOTENCY_TTL_HOURS must be at least 24"):
        load_config({"IDEMPOTENCY_TTL_HOURS": "12"})
    assert load_config({"IDEMPOTENCY_TTL_HOURS": "48"})["IDEMPOTENCY_TTL_HOURS"] == 48


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_turn_whose_commit_fails_answers_its_retry_at_once(app_config, client, request):
    """The turn and its stored answer commit together; when that commit fails, its error answer is kept."""
    conversation_id = _conversation(client)
    engine = create_engine(app_config["DATABASE_URL"])
    request.addfinalizer(engine.dispose)
    request.addfinalizer(lambda: _drop_refuse_once(engine))
    with engine.begin() as connection:  # the first commit that stores an answer fails, at commit time
        connection.execute(text("CREATE SEQUENCE refuse_once"))
        connection.execute(text(
            "CREATE FUNCTION refuse_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF nextval('refuse_once') = 1 THEN RAISE EXCEPTION 'commit refused'; END IF; RETURN NULL; END $$"
        ))
        connection.execute(text(
            "CREATE CONSTRAINT TRIGGER refuse_once AFTER UPDATE ON idempotency_keys "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_once()"
        ))
    body = {"conversation_id": conversation_id, "message": "commit me"}

    failed = _post(client, "/chat", body, "commit-fails")
    retried = _post(client, "/chat", body, "commit-fails")
    stored = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["message_count"]
    fresh = _post(client, "/chat", body, "a-new-key")

    assert failed.status_code == 500 and failed.json["error"] == "internal_error"
    # Kept like any failure of a route that began (not left locked until TURN_LEASE_SECONDS: 409).
    assert retried.status_code == 500 and retried.headers["Idempotent-Replayed"] == "true"
    assert stored == 0  # nothing of the failed turn
    assert fresh.status_code == 200


def _drop_refuse_once(engine) -> None:
    with engine.begin() as connection:
        connection.execute(text("DROP TRIGGER IF EXISTS refuse_once ON idempotency_keys"))
        connection.execute(text("DROP FUNCTION IF EXISTS refuse_once()"))
        connection.execute(text("DROP SEQUENCE IF EXISTS refuse_once"))


def test_an_expired_record_is_taken_over_before_any_purge(app, client):
    """A key reused after its record expired runs afresh even if no purge has run yet (the purge runs at most every 10 minutes)."""
    app.config["IDEMPOTENCY_TTL_HOURS"] = 0  # every record expires at once
    first = _post(client, "/new_chat", {"user_id": "u"}, "expired-1")  # this process's purge ran before it: none until 10 min later
    again = _post(client, "/new_chat", {"user_id": "u"}, "expired-1")

    assert first.status_code == again.status_code == 201
    assert "Idempotent-Replayed" not in again.headers
    assert again.json["conversation_id"] != first.json["conversation_id"]


def test_the_purge_leaves_records_that_have_not_expired(app, client, runner):
    _post(client, "/new_chat", {"user_id": "u"}, "kept-1")  # kept for 24 h
    app.config["IDEMPOTENCY_TTL_HOURS"] = 0
    _post(client, "/new_chat", {"user_id": "u"}, "gone-1")

    result = runner.invoke(args=["idempotency-purge"])
    retry = _post(client, "/new_chat", {"user_id": "u"}, "kept-1")

    assert "Deleted 1 expired idempotency records." in result.output
    assert retry.status_code == 201 and retry.headers["Idempotent-Replayed"] == "true"


def test_a_renewed_claim_runs_its_lock_from_the_renewal(app, keys):
    """The claim's lock_seconds, from claimed_at, must cover the renewal: a failed request's background release counts on it."""
    with app.app_context():
        session = get_session()
        caller = authenticate(session, f"Bearer {keys['client_a']}")
        held = claim(session, caller.lineage_id, "renewed", "digest", app.config)
        time.sleep(idempotency.RENEW_AFTER_SECONDS + 0.1)
        renewed = idempotency.renew(session, held)

    assert renewed.claimed_at == held.claimed_at
    assert renewed.lock_seconds >= held.lock_seconds + idempotency.RENEW_AFTER_SECONDS


def test_the_answer_of_a_claim_taken_over_is_not_stored(app, keys):
    """save_response is the last guard against a request that outlived its key storing under the retry's record."""
    with app.app_context():
        session = get_session()
        caller = authenticate(session, f"Bearer {keys['client_a']}")
        held = claim(session, caller.lineage_id, "taken-over", "digest", app.config)
        session.execute(update(IdempotencyRecord).where(IdempotencyRecord.idempotency_key == "taken-over")
                        .values(created_at=held.claimed_at + timedelta(seconds=1)))  # a retry's claim now
        session.commit()
        with pytest.raises(IdempotencyClaimLost):
            idempotency.save_response(session, held, 200, {"conversation_id": "c"})
