"""What operators expect of the API: the audit log, clients' own conversation
lists, key rotation, proxies, CORS, and the small answers an operator meets
first (`GET /`, 405, 403, dates, archive locations, the echo label)."""
from __future__ import annotations

import re
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import insert, select, update

from database_utils import ApiKey, AuditEvent, Conversation, get_session
from llm import ECHO_CHOSEN_LABEL, ECHO_LABEL
from main import create_app
from tests.conftest import client_with_key

ROOT = Path(__file__).resolve().parent.parent


def _key_id(app, name: str) -> uuid.UUID:
    with app.app_context():
        return get_session().scalar(select(ApiKey.key_id).where(ApiKey.name == name))


# ---------------------------------------------------------------- GET /conversations for clients


def test_a_client_lists_only_its_own_conversations_with_filters_and_cursor(app, keys, client, staff_client):
    mine = [client.post("/new_chat", json={"user_id": "alice", "conversation_name": f"mine {n}"}).json["conversation_id"]
            for n in range(5)]
    client_b = client_with_key(app, keys["client_b"])
    theirs = client_b.post("/new_chat", json={"user_id": "alice", "conversation_name": "theirs"}).json["conversation_id"]
    client.post("/end_chat", json={"conversation_id": mine[0]})

    pages, cursor = [], None
    while True:
        page = client.get("/conversations", query_string={"limit": 2, **({"cursor": cursor} if cursor else {})}).json
        pages.append([row["conversation_id"] for row in page["conversations"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    ended = client.get("/conversations", query_string={"status": "ended", "user_id": "alice"}).json["conversations"]
    b_list = client_b.get("/conversations").json["conversations"]
    staff_list = staff_client.get("/conversations", query_string={"user_id": "alice"}).json["conversations"]

    assert [len(page) for page in pages] == [2, 2, 1]
    assert sum(pages, []) == mine[::-1]
    assert [row["conversation_id"] for row in ended] == [mine[0]]
    assert [row["conversation_id"] for row in b_list] == [theirs]
    assert {row["conversation_id"] for row in staff_list} == {*mine, theirs}
    with app.app_context():
        actions = get_session().scalars(select(AuditEvent.action)).all()
    assert actions == ["search_conversations"]  # the staff search only; clients' own lists are not audited


# ---------------------------------------------------------------- GET /audit


def test_admins_page_through_the_audit_log_with_filters(app, client, staff_client, admin_client):
    conversations = [client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"] for _ in range(3)]
    for conversation_id in conversations:
        staff_client.get("/get_conversation", query_string={"conversation_id": conversation_id})
    staff_client.get("/conversations", query_string={"user_id": "u"})
    staff_id = str(_key_id(app, "staff"))

    seen, cursor = [], None
    while True:
        page = admin_client.get("/audit", query_string={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.json
        seen += page.json["events"]
        cursor = page.json["next_cursor"]
        if cursor is None:
            break
    by_conversation = admin_client.get("/audit", query_string={"conversation_id": conversations[1]}).json["events"]
    searches = admin_client.get("/audit", query_string={"action": "search_conversations", "key_id": staff_id}).json["events"]
    later = datetime.now(timezone.utc) + timedelta(minutes=1)
    none_yet = admin_client.get("/audit", query_string={"created_from": later.isoformat()}).json["events"]

    assert [event["action"] for event in seen] == ["search_conversations"] + ["read_conversation"] * 3
    assert [event["conversation_id"] for event in seen[1:]] == conversations[::-1]
    assert len({event["event_id"] for event in seen}) == 4
    assert {(event["key_id"], event["key_name"], event["key_role"]) for event in seen} == {(staff_id, "staff", "staff")}
    assert [event["conversation_id"] for event in by_conversation] == [conversations[1]]
    assert len(searches) == 1 and searches[0]["detail"] == {"user_id": "u", "limit": 50}
    assert none_yet == []


@pytest.mark.parametrize("query", [{"cursor": "bm90LWF1ZGl0"}, {"cursor": "!!"}, {"limit": 0}, {"key_id": "nope"},
                                   {"created_from": "2026-11-01T00:00:00"}])
def test_bad_audit_queries_are_400(admin_client, query):
    response = admin_client.get("/audit", query_string=query)

    assert response.status_code == 400
    assert set(response.json) >= {"error", "message"}


def test_audit_prune_applies_the_retention_setting(app, staff_client, runner):
    staff_client.get("/conversations")
    staff_id = _key_id(app, "staff")
    old = datetime.now(timezone.utc) - timedelta(days=40)
    with app.app_context():
        session = get_session()
        session.execute(insert(AuditEvent), [{"key_id": staff_id, "action": "read_conversation", "created_at": old}] * 3)
        session.commit()

    unset = runner.invoke(args=["audit-prune"])
    app.config["AUDIT_RETENTION_DAYS"] = 30
    pruned = runner.invoke(args=["audit-prune"])

    assert unset.exit_code == 0 and "AUDIT_RETENTION_DAYS is not set" in unset.output
    assert pruned.exit_code == 0 and "Deleted 3 audit event(s)" in pruned.output
    with app.app_context():
        remaining = get_session().scalars(select(AuditEvent.created_at)).all()
    assert len(remaining) == 1 and remaining[0] > old


# ---------------------------------------------------------------- key rotation


def test_rotating_a_client_key_moves_its_conversations_to_the_new_key(app, keys, client, runner):
    conversations = [client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"] for _ in range(2)]
    client_with_key(app, keys["client_b"]).post("/new_chat", json={"user_id": "other"})
    old_id = _key_id(app, "client_a")

    result = runner.invoke(args=["keys", "rotate", str(old_id), "--name", "client_a 2026-11"])

    new_secret = result.stdout.strip().splitlines()[-1]
    rotated = client_with_key(app, new_secret)
    assert result.exit_code == 0, result.output
    assert "its 2 conversation(s)" in result.output
    assert client.get("/conversations").status_code == 401
    assert [row["conversation_id"] for row in rotated.get("/conversations").json["conversations"]] == conversations[::-1]
    assert rotated.post("/chat", json={"conversation_id": conversations[0], "message": "still mine"}).status_code == 200
    with app.app_context():
        session = get_session()
        new_key = session.scalar(select(ApiKey).where(ApiKey.name == "client_a 2026-11"))
        owners = set(session.scalars(select(Conversation.owner_key_id).where(Conversation.user_id == "u")))
        old_state = session.get(ApiKey, old_id).state(datetime.now(timezone.utc))
    assert new_key.role == "client" and owners == {new_key.key_id} and old_state == "revoked"


def test_a_retry_sent_with_the_rotated_key_is_answered_from_the_first_request(app, keys, client, runner):
    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
    body = {"conversation_id": conversation_id, "message": "pay me once"}
    first = client.post("/chat", json=body, headers={"Idempotency-Key": "pay-1"})
    opened = client.post("/new_chat", json={"user_id": "u"}, headers={"Idempotency-Key": "open-1"})

    result = runner.invoke(args=["keys", "rotate", str(_key_id(app, "client_a"))])

    rotated = client_with_key(app, result.stdout.strip().splitlines()[-1])
    retry = rotated.post("/chat", json=body, headers={"Idempotency-Key": "pay-1"})
    assert (retry.status_code, retry.json) == (200, first.json)
    assert retry.headers["Idempotent-Replayed"] == "true"
    reopened = rotated.post("/new_chat", json={"user_id": "u"}, headers={"Idempotency-Key": "open-1"})
    assert reopened.json == opened.json and reopened.headers["Idempotent-Replayed"] == "true"
    messages = rotated.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["pay me once"]
    assert len(rotated.get("/conversations").json["conversations"]) == 2


def test_a_revoked_key_can_be_rotated_to_give_its_conversations_an_owner(app, keys, client, runner):
    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
    old_id = _key_id(app, "client_a")
    runner.invoke(args=["keys", "revoke", str(old_id)])

    result = runner.invoke(args=["keys", "rotate", str(old_id)])

    rotated = client_with_key(app, result.stdout.strip().splitlines()[-1])
    assert result.exit_code == 0 and "its 1 conversation(s)" in result.output
    assert rotated.get("/get_conversation", query_string={"conversation_id": conversation_id}).status_code == 200


def _claimed_by_staff(client, staff_client) -> str:
    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
    assert client.post(f"/conversations/{conversation_id}/handoff", json={"reason": "a person"}).status_code == 200
    assert staff_client.post(f"/conversations/{conversation_id}/claim").status_code == 200
    return conversation_id


def test_rotating_a_staff_key_moves_its_claimed_conversations_to_the_new_key(app, client, staff_client, runner):
    conversation_id = _claimed_by_staff(client, staff_client)

    result = runner.invoke(args=["keys", "rotate", str(_key_id(app, "staff"))])

    rotated = client_with_key(app, result.stdout.strip().splitlines()[-1])
    assert result.exit_code == 0 and "its 1 conversation(s)" in result.output
    assert rotated.post(f"/conversations/{conversation_id}/staff_messages", json={"message": "still here"}).status_code == 201
    assert rotated.post(f"/conversations/{conversation_id}/release", json={}).status_code == 200


def test_revoking_a_staff_key_puts_its_claimed_conversations_back_in_the_queue(app, client, staff_client, admin_client):
    conversation_id = _claimed_by_staff(client, staff_client)
    ended_id = _claimed_by_staff(client, staff_client)
    client.post("/end_chat", json={"conversation_id": ended_id})
    other_staff = client_with_key(app, admin_client.post("/keys", json={"role": "staff", "name": "second desk"}).json["key"])

    revoked = admin_client.post("/keys/revoke", json={"key_id": str(_key_id(app, "staff"))})

    queue = other_staff.get("/conversations", query_string={"handoff": "needs_human"}).json["conversations"]
    assert revoked.status_code == 200
    assert [row["conversation_id"] for row in queue if row["status"] == "active"] == [conversation_id]
    assert queue[0]["assigned_to"] is None
    assert other_staff.post(f"/conversations/{conversation_id}/claim").status_code == 200
    assert other_staff.post(f"/conversations/{conversation_id}/staff_messages", json={"message": "I can help"}).status_code == 201
    history = other_staff.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["handoff_history"]
    assert [(move["from"], move["to"], move["by"], move["actor"]) for move in history[-2:]] == [
        ("human", "needs_human", None, "key_revoked"), ("needs_human", "human", str(_key_id(app, "second desk")), "staff")]
    ended = other_staff.get("/get_conversation", query_string={"conversation_id": ended_id}).json
    assert ended["status"] == "ended" and ended["handoff"] == "human"  # an ended conversation is left as it ended


def test_a_staff_key_revoked_elsewhere_cannot_claim_while_this_process_still_caches_it(app, client, staff_client):
    """Another worker revoked it: this one's key cache still holds it for AUTH_CACHE_SECONDS."""
    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
    client.post(f"/conversations/{conversation_id}/handoff", json={"reason": "a person"})
    assert staff_client.get("/conversations").status_code == 200  # the key is in this process's cache now
    with app.app_context():
        session = get_session()
        session.execute(update(ApiKey).where(ApiKey.name == "staff").values(revoked_at=datetime.now(timezone.utc)))
        session.commit()

    response = staff_client.post(f"/conversations/{conversation_id}/claim")
    after = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json

    assert response.status_code == 401 and response.json["error"] == "unauthorized"
    assert (after["handoff"], after["assigned_to"]) == ("needs_human", None)


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_claim_racing_a_revocation_waits_for_it_and_leaves_nothing_stuck(app, client, staff_client):
    """A revocation committing while a claim runs: the claim waits on the key's row, then sees it revoked."""
    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
    client.post(f"/conversations/{conversation_id}/handoff", json={"reason": "a person"})
    staff_id = _key_id(app, "staff")
    assert staff_client.get("/conversations").status_code == 200  # cached: the claim's own check must be the one to see it
    revoker = app.extensions["parley.engine"].connect()
    revoker.execute(select(ApiKey).where(ApiKey.key_id == staff_id).with_for_update())  # a revocation under way
    result: dict[str, int] = {}
    claiming = threading.Thread(target=lambda: result.setdefault("status", staff_client.post(
        f"/conversations/{conversation_id}/claim").status_code))
    claiming.start()
    claiming.join(timeout=1.0)
    waited = claiming.is_alive()
    revoker.execute(update(ApiKey).where(ApiKey.key_id == staff_id).values(revoked_at=datetime.now(timezone.utc)))
    revoker.commit()
    revoker.close()
    claiming.join(timeout=30)

    after = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert waited and result["status"] == 401
    assert (after["handoff"], after["assigned_to"]) == ("needs_human", None)


def test_revoking_a_key_again_puts_back_what_it_still_holds(app, client, staff_client, admin_client):
    conversation_id = _claimed_by_staff(client, staff_client)
    with app.app_context():  # revoked without the re-queue (as a claim racing an older release could leave it)
        session = get_session()
        session.execute(update(ApiKey).where(ApiKey.name == "staff").values(revoked_at=datetime.now(timezone.utc)))
        session.commit()

    again = admin_client.post("/keys/revoke", json={"key_id": str(_key_id(app, "staff"))})

    after = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert again.status_code == 200 and (after["handoff"], after["assigned_to"]) == ("needs_human", None)


def test_rotating_an_unknown_key_is_one_line(runner):
    result = runner.invoke(args=["keys", "rotate", str(uuid.uuid4())])

    assert result.exit_code == 1
    assert result.output.startswith("Error:") and result.output.count("\n") == 1 and "does not exist" in result.output


# ---------------------------------------------------------------- proxies and CORS


@pytest.mark.parametrize(("hops", "statuses"), [(0, [401, 401, 429]), (1, [401, 401, 401])])
def test_rate_limits_by_address_use_the_trusted_forwarded_address(app_config, hops, statuses):
    app = create_app({**app_config, "RATELIMIT_ENABLED": True, "RATE_LIMIT": "2 per minute",
                      "RATELIMIT_KEY_PREFIX": uuid.uuid4().hex, "TRUSTED_PROXY_HOPS": hops})
    client = app.test_client()

    seen = [client.get("/keys", headers={"X-Forwarded-For": f"203.0.113.{n}", "X-Forwarded-Proto": "https"},
                       environ_base={"REMOTE_ADDR": "10.0.0.1"}).status_code
            for n in (1, 1, 2)]

    assert seen == statuses


def test_forwarded_proto_is_trusted_through_the_proxy_hops(app_config):
    app = create_app({**app_config, "TRUSTED_PROXY_HOPS": 1})

    @app.get("/scheme-probe")
    def scheme_probe():
        from flask import request

        return {"scheme": request.scheme, "remote_addr": request.remote_addr}

    seen = app.test_client().get("/scheme-probe", headers={"X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https"})

    assert seen.json == {"scheme": "https", "remote_addr": "198.51.100.7"}


PREFLIGHT = {"Origin": "https://chat.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_cors_is_off_by_default(client):
    preflight = client.options("/new_chat", headers=PREFLIGHT)

    assert "Access-Control-Allow-Origin" not in preflight.headers


def test_cors_allows_only_the_listed_origins(app_config, keys):
    app = create_app({**app_config, "CORS_ORIGINS": "https://chat.example, https://admin.example"})
    client = client_with_key(app, keys["client_a"])

    preflight = app.test_client().options("/new_chat", headers=PREFLIGHT)
    actual = client.post("/new_chat", json={"user_id": "u"}, headers={"Origin": "https://chat.example"})
    stranger = client.post("/new_chat", json={"user_id": "u"}, headers={"Origin": "https://evil.example"})

    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://chat.example"
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert actual.status_code == 201 and actual.headers["Access-Control-Allow-Origin"] == "https://chat.example"
    # A page on another origin can read the request ID and a replay's mark, as it can Retry-After.
    exposed = {name.strip().lower() for name in actual.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"x-request-id", "idempotent-replayed", "retry-after"} <= exposed
    assert "Access-Control-Allow-Origin" not in stranger.headers


def test_cors_preflights_do_not_use_up_their_address_budget(app_config):
    app = create_app({**app_config, "CORS_ORIGINS": "https://chat.example", "RATELIMIT_ENABLED": True,
                      "RATE_LIMIT": "2 per minute", "RATELIMIT_KEY_PREFIX": uuid.uuid4().hex})
    browser = app.test_client()

    preflights = [browser.options("/new_chat", headers=PREFLIGHT) for _ in range(5)]
    without_a_key = [browser.post("/new_chat", json={"user_id": "u"}).status_code for _ in range(3)]

    assert [answer.status_code for answer in preflights] == [200] * 5
    assert all(answer.headers["Access-Control-Allow-Origin"] == "https://chat.example" for answer in preflights)
    assert without_a_key == [401, 401, 429]


# ---------------------------------------------------------------- small things


def test_root_points_to_the_api_documentation(client):
    index = client.get("/", headers={"Accept": "application/json"})

    assert index.status_code == 200
    assert index.json["docs"] == "/docs/swagger" and index.json["openapi"] == "/openapi.json"
    assert client.get(index.json["docs"]).status_code == 200
    assert client.get(index.json["openapi"]).status_code == 200


def test_405_names_the_allowed_methods(client):
    response = client.get("/new_chat")

    assert response.status_code == 405
    assert response.json["error"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


def test_readme_error_table_lists_405_and_500():
    readme = (ROOT / "README.md").read_text()

    assert re.search(r"^\| 405 \| `method_not_allowed` \|", readme, re.MULTILINE)
    assert re.search(r"^\| 500 \| `internal_error` \|", readme, re.MULTILINE)


def test_forbidden_says_which_roles_may_call_the_route(admin_client):
    response = admin_client.post("/new_chat", json={"user_id": "u"})

    assert response.status_code == 403
    assert response.json["message"] == "POST /new_chat needs a client key; this key's role is admin"


def test_forbidden_words_an_admin_role_with_an(client):
    response = client.get("/keys")

    assert response.status_code == 403
    assert response.json["message"] == "GET /keys needs an admin key; this key's role is client"


def test_a_date_without_offset_gets_an_example(staff_client):
    response = staff_client.get("/conversations", query_string={"created_from": "2026-11-01T00:00:00"})

    assert response.status_code == 400
    assert "2026-11-01T00:00:00Z" in response.json["message"]


@pytest.mark.parametrize("backend", ["embedded"])
def test_local_archive_location_can_be_pasted_into_a_shell(client):
    conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]

    location = client.post("/end_chat", json={"conversation_id": conversation_id}).json["s3_file_location"]

    root = Path(client.application.config["ARCHIVE_URL"].removeprefix("file://"))
    assert "%" not in location and "/dt=" in location
    assert (root / location).is_file()  # the location is relative to ARCHIVE_URL
    assert client.get("/get_conversation", query_string={"conversation_id": conversation_id}).status_code == 200


@pytest.mark.parametrize("backend", ["embedded"])
def test_echo_label_says_why_it_answers(app_config, keys, monkeypatch):
    monkeypatch.setenv("LLM_PROVIDER", "echo")
    chosen = client_with_key(create_app({k: v for k, v in app_config.items() if k != "LLM_PROVIDER"}), keys["client_a"])
    monkeypatch.delenv("LLM_PROVIDER")
    defaulted = client_with_key(create_app({k: v for k, v in app_config.items() if k != "LLM_PROVIDER"}), keys["client_a"])

    replies = []
    for client in (chosen, defaulted):
        conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
        replies.append(client.post("/chat", json={"conversation_id": conversation_id, "message": "hi"}).json["reply"])

    assert replies[0] == f"{ECHO_CHOSEN_LABEL} You said: hi" and "no API key" not in replies[0]
    assert replies[1] == f"{ECHO_LABEL} You said: hi"
