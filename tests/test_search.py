"""Staff lookup: filters, newest-first cursor pages, validation, index use."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest
from sqlalchemy import event, select, text, update

from database_utils import ApiKey, Conversation, find_conversations, get_session
from tests.factories import seed_conversations


def _open(client, user_id: str, name: str | None = None) -> str:
    return client.post("/new_chat", json={"user_id": user_id, "conversation_name": name}).json["conversation_id"]


def _ids(response) -> list[str]:
    return [c["conversation_id"] for c in response.json["conversations"]]


def test_filters_select_the_right_conversations_newest_first(client, staff_client):
    router = [_open(client, "ann", "Router keeps dropping"), _open(client, "ann", "router 100% down")]
    billing = _open(client, "bob", "Billing question")
    client.post("/end_chat", json={"conversation_id": billing})

    assert _ids(staff_client.get("/conversations", query_string={"user_id": "ann"})) == router[::-1]
    assert _ids(staff_client.get("/conversations", query_string={"status": "ended"})) == [billing]
    assert _ids(staff_client.get("/conversations", query_string={"name": "ROUTER"})) == router[::-1]
    assert _ids(staff_client.get("/conversations", query_string={"name": "100%"})) == [router[1]]
    assert _ids(staff_client.get("/conversations", query_string={"name": "_"})) == []
    assert _ids(staff_client.get("/conversations", query_string={"user_id": "ann", "status": "ended"})) == []
    assert _ids(staff_client.get("/conversations")) == [billing, *router[::-1]]


def test_date_ranges_filter_created_and_ended(app, client, staff_client):
    ids = [_open(client, "dates") for _ in range(3)]
    with app.app_context():
        session = get_session()
        for day, conversation_id in enumerate(ids, start=1):
            session.execute(
                update(Conversation)
                .where(Conversation.conversation_id == uuid.UUID(conversation_id))
                .values(created_at=datetime(2026, 3, day, 12, tzinfo=timezone.utc))
            )
        session.commit()
    client.post("/end_chat", json={"conversation_id": ids[0]})

    window = {"created_from": "2026-03-02T00:00:00Z", "created_to": "2026-03-03T00:00:00Z"}
    assert _ids(staff_client.get("/conversations", query_string=window)) == [ids[1]]
    ended_today = {"ended_from": "2026-01-01T00:00:00+00:00"}
    assert _ids(staff_client.get("/conversations", query_string=ended_today)) == [ids[0]]


def test_cursor_pages_stay_correct_while_new_conversations_arrive(client, staff_client):
    first_seven = [_open(client, "pager") for _ in range(7)][::-1]  # newest first

    page1 = staff_client.get("/conversations", query_string={"user_id": "pager", "limit": 3})
    arrivals = [_open(client, "pager") for _ in range(2)]
    page2 = staff_client.get("/conversations", query_string={"user_id": "pager", "limit": 3, "cursor": page1.json["next_cursor"]})
    page3 = staff_client.get("/conversations", query_string={"user_id": "pager", "limit": 3, "cursor": page2.json["next_cursor"]})

    assert _ids(page1) + _ids(page2) + _ids(page3) == first_seven
    assert page3.json["next_cursor"] is None
    fresh = staff_client.get("/conversations", query_string={"user_id": "pager", "limit": 2})
    assert _ids(fresh) == arrivals[::-1]


@pytest.mark.parametrize(
    "query",
    [
        {"cursor": "not-base64!"},
        {"cursor": "bm90IGpzb24"},
        {"limit": 0},
        {"limit": 101},
        {"status": "archived"},
        {"created_from": "2026-01-01T00:00:00"},  # no offset: ambiguous
        {"created_from": "yesterday"},
        {"user_id": "a b"},
    ],
)
def test_bad_search_parameters_are_400(staff_client, query):
    response = staff_client.get("/conversations", query_string=query)
    assert response.status_code == 400
    assert response.json["error"] in ("invalid_request", "bad_request")


@pytest.mark.parametrize("backend", ["postgres"])
@pytest.mark.parametrize(
    ("filters", "index"),
    [
        ({}, "ix_conversations_created"),
        ({"user_id": "user-42"}, "ix_conversations_user_created"),
        # a status a quarter or a fifth of the rows have: the status filter's own index, read in order
        ({"status": "ended"}, "ix_conversations_status_created"),
        ({"status": "ending"}, "ix_conversations_status_created"),
        ({"name": "warranty question #1999"}, "ix_conversations_name_trgm"),
        ({"created_to": datetime(2025, 2, 1, tzinfo=timezone.utc)}, "ix_conversations_created"),
        ({"ended_from": datetime(2025, 1, 10, tzinfo=timezone.utc), "ended_to": datetime(2025, 1, 11, tzinfo=timezone.utc)},
         "ix_conversations_ended_at"),
        # a client's own list (50 rows of client A's key, whose ID is filled in below)
        ({"owner_key_id": "client"}, "ix_conversations_owner_created"),
    ],
)
def test_search_queries_use_an_index(app, keys, filters, index):
    with app.app_context():
        session = get_session()
        seed_conversations(session, 10_000, users=500)
        owner = session.scalar(select(ApiKey.key_id).where(ApiKey.name == "client_a"))
        session.execute(update(Conversation).where(Conversation.conversation_id.in_([uuid.UUID(int=i) for i in range(2, 10_001, 5)]))
                        .values(status="ending"))
        session.execute(update(Conversation).where(Conversation.conversation_id.in_([uuid.UUID(int=i) for i in range(30, 80)]))
                        .values(owner_key_id=owner))
        session.execute(text("ANALYZE conversations"))
        if filters.get("owner_key_id"):
            filters = {**filters, "owner_key_id": owner}
        statements = []
        connection = session.connection()
        # At this size a table scan can be as cheap; forbid it to prove an index serves the query.
        # bench/staff_search.py shows the plans the planner picks by itself at 100,000 rows.
        connection.exec_driver_sql("SET LOCAL enable_seqscan = off")

        def capture(conn, cursor, statement, parameters, context, executemany):
            statements.append((statement, parameters))

        event.listen(connection, "before_cursor_execute", capture)
        rows = find_conversations(session, filters, None, 51)
        event.remove(connection, "before_cursor_execute", capture)
        statement, parameters = statements[-1]
        plan = "\n".join(row[0] for row in connection.exec_driver_sql("EXPLAIN " + statement, parameters))

    assert rows
    assert index in plan and "Seq Scan" not in plan, plan


@pytest.mark.parametrize(
    "query",
    [{"created_from": "0001-01-01T00:00:00+01:00"}, {"ended_to": "9999-12-31T23:59:59-01:00"}],
)
def test_dates_at_the_edge_of_the_calendar_are_400(staff_client, query):
    assert staff_client.get("/conversations", query_string=query).status_code == 400


@pytest.mark.parametrize(
    "forged",
    [
        ["0001-01-01T00:00:00+01:00", str(uuid.uuid4())],  # a date that overflows in UTC
        ["2026-01-01T00:00:00+00:00", 123],  # an ID that is not a string
        ["2026-01-01T00:00:00+00:00", ["x"]],
        [20260101, str(uuid.uuid4())],
    ],
)
def test_forged_cursor_is_400(staff_client, forged):
    import base64
    import json

    cursor = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")

    response = staff_client.get("/conversations", query_string={"cursor": cursor})

    assert response.status_code == 400
    assert response.get_json()["message"] == "cursor is not one this service returned"
