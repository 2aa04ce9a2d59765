"""One turn at a time per conversation: the turn lease, tested in the gap between the model call and the store.

The model here waits (the fake model server delays its answer), so a second
request really arrives while the first turn is between its two halves.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

import releases
from conversation_memory import MemoryMessage
from database_utils import append_messages, claim_turn, get_session
from tests.postgres import allow_connections


def _conversation(client, user_id: str = "u-1") -> str:
    return client.post("/new_chat", json={"user_id": user_id}).json["conversation_id"]


def _say(client, conversation_id: str, message: str):
    return client.post("/chat", json={"conversation_id": conversation_id, "message": message})


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def _in_background(call):
    results = {}
    thread = threading.Thread(target=lambda: results.setdefault("response", call()))
    thread.start()
    return thread, results


def test_a_second_turn_during_a_turn_gets_409_and_then_sees_the_first_exchange(provider_app, fake_model):
    client = provider_app("anthropic")
    conversation_id = _conversation(client)
    fake_model.hold()  # the first turn waits on the model until the others have been answered

    thread, first = _in_background(lambda: _say(client, conversation_id, "first question"))
    _wait_until(lambda: fake_model.in_flight == 1)
    during = _say(client, conversation_id, "second question")
    end_during = client.post("/end_chat", json={"conversation_id": conversation_id})
    read_during = client.get("/get_conversation", query_string={"conversation_id": conversation_id})
    fake_model.let_go()
    thread.join()
    after = _say(client, conversation_id, "second question")

    assert during.status_code == 409
    assert during.json["error"] == "turn_in_progress"
    assert during.headers["Retry-After"] == "1"
    assert end_during.status_code == 409 and end_during.json["error"] == "turn_in_progress"
    assert read_during.status_code == 200 and read_during.json["messages"] == []  # no half turn is visible
    assert first["response"].status_code == 200
    assert after.status_code == 200
    sent = [m["content"] for m in fake_model.requests[-1].body["messages"]]
    assert sent == ["first question", "reply to: first question", "second question"]


def test_other_conversations_are_served_while_one_turn_waits(provider_app, fake_model):
    client = provider_app("anthropic")
    slow, other = _conversation(client), _conversation(client)
    fake_model.gather(2)  # the slow turn waits on the model until the quick one's request comes too

    thread, first = _in_background(lambda: _say(client, slow, "slow"))
    _wait_until(lambda: fake_model.in_flight == 1)
    meanwhile = _say(client, other, "quick")
    thread.join()

    assert meanwhile.status_code == 200
    assert first["response"].status_code == 200
    assert fake_model.peak_in_flight == 2  # the quick turn reached the model while the slow one waited on it


def test_a_lease_left_by_a_dead_worker_expires(provider_app, app, fake_model):
    client = provider_app("anthropic", TURN_LEASE_SECONDS=1)
    conversation_id = _conversation(client)
    with app.app_context():
        session = get_session()
        # What a worker killed mid-turn leaves behind: a lease nobody will release.
        assert claim_turn(session, uuid.UUID(conversation_id), None, uuid.uuid4(), lease_seconds=1, token_budget=1000) is not None
        session.commit()

    blocked = _say(client, conversation_id, "anyone there?")
    time.sleep(1.1)
    after_expiry = _say(client, conversation_id, "anyone there?")

    assert blocked.status_code == 409
    assert after_expiry.status_code == 200
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert [m["seq"] for m in log["messages"]] == [1, 2]


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_lease_and_key_the_database_could_not_take_back_are_given_back_once_it_returns(provider_app, fake_model, postgres_url):
    # The count is the process's: a release an earlier test left would be counted (and tried first).
    _wait_until(lambda: releases.pending() == 0)
    client = provider_app("anthropic", TURN_LEASE_SECONDS=120)
    conversation_id = _conversation(client)
    body, headers = {"conversation_id": conversation_id, "message": "are you there?"}, {"Idempotency-Key": "outage-1"}
    fake_model.delay_next(1.0)

    thread, first = _in_background(lambda: client.post("/chat", json=body, headers=headers))
    _wait_until(lambda: fake_model.in_flight == 1)
    try:
        allow_connections(postgres_url, False)  # the database goes away while the model works
        thread.join(timeout=30)
        kept = releases.pending()
    finally:
        allow_connections(postgres_url, True)
    _wait_until(lambda: releases.pending() == 0)  # within the first retries (1 s, 2 s), not 120 s
    again = client.post("/chat", json=body, headers=headers)

    assert first["response"].status_code == 503 and first["response"].json["error"] == "database_unavailable"
    assert kept == 2  # the conversation's lease and the Idempotency-Key's claim
    assert again.status_code == 200 and "Idempotent-Replayed" not in again.headers  # the same key runs afresh
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert [m["content"] for m in log["messages"]] == ["are you there?", "reply to: are you there?"]


def test_a_turn_that_outlives_its_lease_stores_nothing(provider_app, fake_model):
    client = provider_app("anthropic", TURN_LEASE_SECONDS=1)
    conversation_id = _conversation(client)
    fake_model.delay_next(2.5)

    thread, slow = _in_background(lambda: _say(client, conversation_id, "slow one"))
    _wait_until(lambda: fake_model.in_flight == 1)
    time.sleep(1.2)  # the slow turn's lease has run out
    taker = _say(client, conversation_id, "quick one")
    thread.join()

    assert taker.status_code == 200
    assert slow["response"].status_code == 409
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert [m["content"] for m in log["messages"]] == ["quick one", "reply to: quick one"]


@pytest.mark.parametrize("backend", ["postgres"])
def test_racing_turns_never_answer_from_a_context_missing_the_other_exchange(provider_app, fake_model):
    """Eight clients on one conversation: every reply was generated from the whole log before it."""
    client = provider_app("anthropic")
    conversation_id = _conversation(client)
    fake_model.latency = 0.05
    statuses = []

    def talk(n: int) -> None:
        for turn in range(5):
            statuses.append(_say(client, conversation_id, f"client {n} turn {turn}").status_code)

    threads = [threading.Thread(target=talk, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"]
    answered = statuses.count(200)
    assert set(statuses) <= {200, 409} and answered >= 1
    assert len(log) == 2 * answered
    model_calls = [r for r in fake_model.requests if r.path == "/v1/messages"]
    stored = [m["content"] for m in log]
    # A 409 is answered before the model is called: one model call per answered turn, each of them stored.
    assert len(model_calls) == answered
    assert all(request.body["messages"][-1]["content"] in stored for request in model_calls)
    for request in model_calls:
        sent = [m["content"] for m in request.body["messages"]]
        question = sent[-1]
        if question in stored:  # a stored turn: its context is exactly the log before it
            assert sent == stored[: stored.index(question) + 1]


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_claim_that_waited_for_a_store_reads_the_stored_messages(provider_app, fake_model, postgres_url):
    """PostgreSQL claims the lease and reads the tail in one statement, whose
    snapshot predates a store it waited for: the turn must read the tail again."""
    client = provider_app("anthropic")
    conversation_id = _conversation(client)
    engine = create_engine(postgres_url)
    try:
        with Session(engine) as other, other.begin():
            # A store holding the conversation's row, as a finishing turn does.
            append_messages(other, uuid.UUID(conversation_id), [
                MemoryMessage("user", "asked elsewhere", 3), MemoryMessage("assistant", "answered elsewhere", 3),
            ])
            thread, turn = _in_background(lambda: _say(client, conversation_id, "and now?"))
            _wait_until(lambda: _waiting_on_a_lock(engine))
        thread.join()
    finally:
        engine.dispose()

    assert turn["response"].status_code == 200
    sent = [m["content"] for m in fake_model.requests[-1].body["messages"]]
    assert sent[:2] == ["asked elsewhere", "answered elsewhere"]
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert [m["seq"] for m in log["messages"]] == [1, 2, 3, 4]


def _waiting_on_a_lock(engine) -> bool:
    with engine.connect() as connection:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        return connection.execute(text(query)).scalar_one() > 0


@pytest.mark.parametrize("away", [OperationalError, InterfaceError])
def test_a_release_is_tried_until_it_passes_and_dropped_untried_once_its_lock_has_run_out(caplog, away):
    caplog.set_level(logging.INFO, logger="parley")
    kept = releases.Releases()  # this test's own, apart from the process's
    engine = create_engine("sqlite://")
    tries = {"flaky": 0, "next": 0, "expired": 0}

    def flaky(session: Session) -> None:  # the database is still away at the first pass
        tries["flaky"] += 1
        if tries["flaky"] == 1:
            raise away("UPDATE", {}, Exception("connection refused"))
        session.execute(text("SELECT 1"))

    def counted(name: str):
        return lambda _session: tries.__setitem__(name, tries[name] + 1)

    with Session(engine) as session:
        kept.later("a flaky release", flaky, session, lock_seconds=60)
        kept.later("the next release", counted("next"), session, lock_seconds=60)
        kept.later("a release past its lock", counted("expired"), session, lock_seconds=0)
    _wait_until(lambda: kept.pending() == 0)

    # The first pass stopped at the database being away: the next release waited for the second.
    assert tries == {"flaky": 2, "next": 1, "expired": 0}
    assert "gave back a flaky release once the database took it" in caplog.text
    assert "gave up giving back a release past its lock: it has run out by itself" in caplog.text
    engine.dispose()


def test_a_release_that_fails_for_another_reason_is_dropped_and_the_next_ones_still_run(caplog):
    engine = create_engine("sqlite://")
    ran: list[str] = []

    def broken(_session: Session) -> None:
        ran.append("broken")
        raise RuntimeError("a bug, not an outage")

    kept = releases.Releases()
    with Session(engine) as session:
        kept.later("a broken release", broken, session, lock_seconds=60)
    _wait_until(lambda: kept.pending() == 0 and not kept.running)
    with Session(engine) as session:
        kept.later("a later release", lambda retry: ran.append("later"), session, lock_seconds=60)
    _wait_until(lambda: kept.pending() == 0)

    assert ran == ["broken", "later"]
    assert "could not give back a broken release" in caplog.text
    engine.dispose()
