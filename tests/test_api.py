"""The HTTP API end to end, on PostgreSQL + S3 and on the embedded default."""
from __future__ import annotations

import json
import typing
import uuid

import pytest
from sqlalchemy import select

import main
from audit import list_audit_events
from auth import Caller
from conversation_memory import estimate_tokens
from conversations import read_conversation, search_conversations
from database_utils import ApiKey, Conversation, get_session
from llm import ECHO_LABEL
from main import IDEMPOTENT_ROUTES
from schemas import AuditPage, AuditQuery, ConversationDetail, ConversationOut, MessageOut, SearchPage, SearchQuery
from states import Handoff, Role, Status


def _open(client, **body) -> dict:
    response = client.post("/new_chat", json={"user_id": "user-1", **body})
    assert response.status_code == 201, response.json
    return response.json


def _say(client, conversation_id: str, message: str) -> dict:
    response = client.post("/chat", json={"conversation_id": conversation_id, "message": message})
    assert response.status_code == 200, response.json
    return response.json


def test_new_chat_returns_server_made_id(client):
    body = _open(client, conversation_name="Billing", system_prompt="Be kind.", metadata={"channel": "web"})

    assert uuid.UUID(body["conversation_id"]).version == 4
    assert body["user_id"] == "user-1"
    assert body["conversation_name"] == "Billing"
    assert body["status"] == "active"
    assert body["metadata"] == {"channel": "web"}
    assert body["created_at"].endswith("+00:00")


def test_chat_replies_and_stores_both_messages(client):
    conversation_id = _open(client)["conversation_id"]

    first = _say(client, conversation_id, "Hello there")
    second = _say(client, conversation_id, "And again")

    assert first["reply"] == f"{ECHO_LABEL} You said: Hello there"
    assert (first["seq"], second["seq"]) == (2, 4)
    sent_tokens = sum(estimate_tokens(text) for text in ("Hello there", first["reply"], "And again"))
    assert second["context"] == {
        "messages_sent": 3, "messages_dropped": 0, "tokens": sent_tokens, "truncated": False, "missing_variables": []
    }
    assert second["usage"]["input_tokens"] > 0 and second["usage"]["output_tokens"] > 0

    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert [(m["seq"], m["role"], m["content"]) for m in log["messages"]] == [
        (1, "user", "Hello there"),
        (2, "assistant", first["reply"]),
        (3, "user", "And again"),
        (4, "assistant", second["reply"]),
    ]
    assert log["message_count"] == 4
    assert log["messages"][1]["usage"] == first["usage"]
    assert log["usage"]["output_tokens"] == first["usage"]["output_tokens"] + second["usage"]["output_tokens"]


def test_whole_messages_are_stored_even_when_context_is_trimmed(app, client):
    app.config["CONTEXT_MAX_TOKENS"] = 60
    conversation_id = _open(client)["conversation_id"]
    long_message = "word " * 2_000

    reply = _say(client, conversation_id, long_message)

    assert reply["context"]["truncated"] is True
    stored = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert stored["messages"][0]["content"] == long_message


def test_end_chat_archives_and_get_reads_the_same_shape(client):
    conversation_id = _open(client, conversation_name="Archive me")["conversation_id"]
    _say(client, conversation_id, "one")
    _say(client, conversation_id, "two")
    live = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json

    ended = client.post("/end_chat", json={"conversation_id": conversation_id})
    archived = client.get("/get_conversation", query_string={"conversation_id": conversation_id})

    assert ended.status_code == 200
    assert ended.json["status"] == "ended" and ended.json["ended_at"]
    assert ended.json["s3_file_location"].endswith(f"/{conversation_id}.json")
    assert archived.status_code == 200
    assert archived.json["messages"] == live["messages"]
    assert archived.json.keys() == live.keys()
    assert archived.json["status"] == "ended"


def test_end_chat_twice_is_harmless(client):
    conversation_id = _open(client)["conversation_id"]
    _say(client, conversation_id, "hi")

    first = client.post("/end_chat", json={"conversation_id": conversation_id})
    second = client.post("/end_chat", json={"conversation_id": conversation_id})

    assert first.status_code == second.status_code == 200
    assert first.json == second.json


def test_chat_on_ended_conversation_is_409_and_stores_nothing(client):
    conversation_id = _open(client)["conversation_id"]
    _say(client, conversation_id, "hi")
    client.post("/end_chat", json={"conversation_id": conversation_id})

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "still there?"})

    assert response.status_code == 409
    assert response.json["error"] == "conflict"
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert len(log["messages"]) == 2


@pytest.mark.parametrize("path", ["/chat", "/end_chat"])
def test_unknown_conversation_is_404(client, path):
    body = {"conversation_id": str(uuid.uuid4())}
    if path == "/chat":
        body["message"] = "hi"

    response = client.post(path, json=body)

    assert response.status_code == 404
    assert response.json["error"] == "not_found"


def test_get_unknown_conversation_is_404(client):
    response = client.get("/get_conversation", query_string={"conversation_id": str(uuid.uuid4())})
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/new_chat", {}, "user_id"),
        ("/new_chat", {"user_id": ""}, "user_id"),
        ("/new_chat", {"user_id": "a/../b"}, "user_id"),
        ("/new_chat", {"user_id": "u", "surprise": 1}, "surprise"),
        ("/new_chat", {"user_id": "u", "conversation_name": "x" * 201}, "conversation_name"),
        ("/new_chat", {"user_id": "u", "system_prompt": "a\x00b"}, "system_prompt"),
        ("/new_chat", {"user_id": "u", "metadata": {"k": "a\x00b"}}, "metadata"),
        ("/new_chat", {"user_id": "u", "metadata": "not an object"}, "metadata"),
        ("/chat", {"conversation_id": "not-a-uuid", "message": "hi"}, "conversation_id"),
        ("/chat", {"conversation_id": "../../etc/passwd", "message": "hi"}, "conversation_id"),
        ("/chat", {"conversation_id": str(uuid.UUID(int=1)), "message": ""}, "message"),
        ("/chat", {"conversation_id": str(uuid.UUID(int=1)), "message": "   \n"}, "message"),
        ("/chat", {"conversation_id": str(uuid.UUID(int=1)), "message": 42}, "message"),
        ("/chat", {"conversation_id": str(uuid.UUID(int=1)), "message": "hi", "stream": "yes"}, "stream"),
        ("/chat", {"conversation_id": str(uuid.UUID(int=1)), "message": "hi", "stream": 1}, "stream"),
        ("/new_chat", {"user_id": "u", "knowledge": "yes"}, "knowledge"),
        ("/end_chat", {}, "conversation_id"),
    ],
)
def test_invalid_bodies_are_400_naming_the_field(client, path, body, field):
    response = client.post(path, json=body)

    assert response.status_code == 400
    assert response.json["error"] == "invalid_request"
    assert field in [detail["field"] for detail in response.json["details"]]


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"\xff\xfe\x00garbage",
        b'{"user_id": "\xc3\x28"}',  # invalid UTF-8 inside a string
        b'{"user_id": "u", "conversation_name": "\\ud800"}',  # lone surrogate
        b'{"user_id": "u", "conversation_name": "a\\u0000b"}',  # NUL
        b"[]",
        b"null",
    ],
)
def test_malformed_json_is_400_not_500(client, raw):
    response = client.post("/new_chat", data=raw, content_type="application/json")

    assert response.status_code == 400
    assert set(response.json) >= {"error", "message"}


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        (b'{"user_id": ', "not valid JSON: Expecting value (line 1, column 13)"),
        (b'{"user_id": "\xc3\x28"}', "not valid UTF-8 (byte 13)"),
        (b'{"user_id": "u", "metadata": {"n": ' + b"9" * 5000 + b"}}", "more than 4300 digits"),
        ('{"user_id": "u"}'.encode("utf-16"), "must be JSON in UTF-8"),
        ('{"user_id": "u"}'.encode("utf-16-le"), "must be JSON in UTF-8"),
        ('{"user_id": "u"}'.encode("utf-32"), "must be JSON in UTF-8"),
    ],
    ids=["truncated", "bad-utf8", "5000-digits", "utf16-bom", "utf16le", "utf32"],
)
def test_a_body_that_does_not_parse_is_told_why(client, raw, said):
    response = client.post("/new_chat", data=raw, content_type="application/json")

    assert response.status_code == 400
    assert said in response.json["message"]


def test_a_text_too_long_is_told_in_characters(client):
    response = client.post("/new_chat", json={"user_id": "u", "conversation_name": "n" * 201})

    assert response.status_code == 400
    assert response.json["details"] == [{"field": "conversation_name", "problem": "should have at most 200 characters, not 201"}]


@pytest.mark.parametrize("path", ["/new_chat", "variables"])
def test_a_number_beyond_a_double_is_named_as_such(client, path):
    raw = b'{"user_id": "u", "metadata": {"n": 1e400}}'
    if path == "variables":
        conversation_id = client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"]
        path, raw = f"/conversations/{conversation_id}/variables", b'{"n": 1e400}'

    response = client.open(path, method="PATCH" if "variables" in path else "POST", data=raw, content_type="application/json")

    assert response.status_code == 400 and "beyond a double (1e400)" in response.json["message"]


def test_a_utf8_byte_order_mark_is_ignored(client):
    """RFC 8259 lets a parser ignore one; refusing it would only trouble a client's tools."""
    response = client.post("/new_chat", data="\ufeff" + '{"user_id": "bom"}', content_type="application/json")

    assert response.status_code == 201
    assert response.json["user_id"] == "bom"


@pytest.mark.parametrize("after_seq", ["-1", str(2**31), str(2**63), "1.5", "two"])
def test_an_after_seq_no_message_can_have_is_400(client, after_seq):
    conversation_id = _open(client)["conversation_id"]

    response = client.get("/get_conversation", query_string={"conversation_id": conversation_id, "after_seq": after_seq})

    assert response.status_code == 400
    assert "after_seq" in [detail["field"] for detail in response.json["details"]]


def test_non_json_body_is_400(client):
    response = client.post("/new_chat", data="user_id=u", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 400
    assert "JSON" in response.json["message"]


@pytest.mark.parametrize("coding", ["gzip", "br, gzip", "x-made-up"])
def test_a_compressed_body_is_415_and_nothing_is_stored(client, coding):
    conversation_id = client.post("/new_chat", json={"user_id": "u-1"}).json["conversation_id"]
    body = json.dumps({"conversation_id": conversation_id, "message": "hi"})

    refused = client.post("/chat", data=body, content_type="application/json", headers={"Content-Encoding": coding})
    plain = client.post("/chat", data=body, content_type="application/json", headers={"Content-Encoding": "identity"})

    assert refused.status_code == 415 and refused.json["error"] == "unsupported_media_type"
    assert "uncompressed" in refused.json["message"]
    assert plain.status_code == 200 and plain.json["seq"] == 2  # the refused one stored nothing


def test_a_content_encoding_without_a_body_is_no_matter(client, staff_client):
    conversation_id = client.post("/new_chat", json={"user_id": "u-1"}).json["conversation_id"]
    assert client.post(f"/conversations/{conversation_id}/handoff", json={"reason": "help"}).status_code == 200

    claimed = staff_client.post(f"/conversations/{conversation_id}/claim", headers={"Content-Encoding": "gzip"})

    assert claimed.status_code == 200 and claimed.json["handoff"] == "human"


@pytest.mark.parametrize("authorization", [None, "Bearer prly_not-a-key"])
def test_a_caller_without_a_usable_key_gets_401_whatever_the_body(app, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    for data, content_type in (("{not json", "application/json"), ("user_id=u", "application/x-www-form-urlencoded"),
                               ("x" * (app.config["MAX_CONTENT_LENGTH"] + 1), "application/json")):
        response = app.test_client().post("/new_chat", data=data, content_type=content_type, headers=headers)

        assert response.status_code == 401 and response.json["error"] == "unauthorized", (data[:20], response.json)


def test_a_key_of_the_wrong_role_gets_403_whatever_the_body(client):
    response = client.post("/conversations/00000000-0000-0000-0000-000000000000/claim", data="{not json",
                           content_type="application/json")

    assert response.status_code == 403 and response.json["error"] == "forbidden"


def test_too_long_message_is_413_and_not_stored(app, client):
    app.config["MAX_MESSAGE_CHARS"] = 100
    conversation_id = _open(client)["conversation_id"]

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "x" * 101})

    assert response.status_code == 413
    assert response.json["error"] == "payload_too_large"
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert log["messages"] == []


def test_too_large_body_is_413(client, app):
    response = client.post(
        "/new_chat", data=b'{"user_id":"u","metadata":{"a":"' + b"x" * app.config["MAX_CONTENT_LENGTH"] + b'"}}',
        content_type="application/json",
    )
    assert response.status_code == 413
    assert response.json["error"] == "payload_too_large"


def test_unknown_route_is_json_404(client):
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.json["error"] == "not_found"


def test_health_and_readiness(client):
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json["checks"] == {"database": "ok", "archive": "ok"}


def test_openapi_document_lists_every_route(client):
    document = client.get("/openapi.json").json

    assert document["openapi"].startswith("3.1")
    assert {"/new_chat", "/chat", "/end_chat", "/get_conversation", "/healthz", "/readyz"} <= set(document["paths"])


def test_openapi_declares_the_idempotency_key_on_every_route_that_honours_it(client):
    document = client.get("/openapi.json").json
    operations = [operation for methods in document["paths"].values() for operation in methods.values()]

    for route in IDEMPOTENT_ROUTES:  # operation IDs are "parley_<endpoint>_<path>_<method>"
        [operation] = [o for o in operations if o["operationId"].startswith(f"parley_{route}_")]
        headers = [parameter["name"] for parameter in operation.get("parameters", []) if parameter["in"] == "header"]
        assert "Idempotency-Key" in headers, route
        assert "422" in operation["responses"], route


def test_openapi_declares_the_headers_responses_carry(client):
    """X-Request-ID on every response, the rate limit's headers wherever a 429 can come, Retry-After
    on the answers that say to come back, Idempotent-Replayed where an Idempotency-Key is honoured."""
    swagger_reads = client.get("/docs/openapi.json").json  # the interactive page's, asked for first
    paths = client.get("/openapi.json").json["paths"]

    assert swagger_reads["paths"] == paths

    chat = paths["/chat"]["post"]["responses"]
    assert set(chat["200"]["headers"]) == {"X-Request-ID", "X-RateLimit-Limit", "X-RateLimit-Remaining",
                                           "X-RateLimit-Reset", "Idempotent-Replayed"}
    for status in ("409", "429", "502", "503", "504"):
        assert chat[status]["headers"]["Retry-After"]["schema"]["type"] == "integer", status
    assert "Idempotent-Replayed" in chat["404"]["headers"]  # a kept answer
    for status in ("400", "401", "403", "413", "422", "429"):  # refused before a key is claimed, or never kept
        assert "Idempotent-Replayed" not in chat[status]["headers"], status
    assert chat["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "Idempotent-Replayed" not in paths["/get_conversation"]["get"]["responses"]["200"]["headers"]
    assert set(paths["/healthz"]["get"]["responses"]["200"]["headers"]) == {"X-Request-ID"}
    assert "400" not in paths["/healthz"]["get"]["responses"]  # no parameters, no body: nothing to refuse
    assert "Retry-After" not in paths["/readyz"]["get"]["responses"]["503"]["headers"]  # a probe's answer, not an error
    [metrics_type] = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert client.get("/metrics").headers["Content-Type"] == metrics_type


def test_the_declared_headers_are_the_ones_sent(app, client):
    """What the document declares for a /chat answer matches what the server sends, first and replayed."""
    paths = client.get("/openapi.json").json["paths"]
    conversation_id = _open(client)["conversation_id"]
    answered = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi"},
                           headers={"Idempotency-Key": "declared"})
    replayed = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi"},
                           headers={"Idempotency-Key": "declared"})

    declared = paths["/chat"]["post"]["responses"]
    sent_headers = {"X-Request-ID", "Idempotent-Replayed", "Retry-After"}  # those with no setting to turn them off
    assert sent_headers & set(replayed.headers.keys()) <= set(declared["200"]["headers"])
    assert sent_headers & set(answered.headers.keys()) == {"X-Request-ID"}
    assert sent_headers & set(replayed.headers.keys()) == {"X-Request-ID", "Idempotent-Replayed"}


def test_each_idempotent_route_names_the_model_its_body_is_read_with():
    """An Idempotency-Key's fingerprint leaves out the fields at that model's defaults."""
    for route, model in IDEMPOTENT_ROUTES.items():
        assert typing.get_type_hints(getattr(main, route))["body"] is model, route


def test_openapi_states_and_roles_are_exactly_the_enums(client):
    document = client.get("/openapi.json").json
    schemas = document["components"]["schemas"]

    for enum in (Status, Handoff, Role):
        assert schemas[enum.__name__]["enum"] == [member.value for member in enum]
    assert schemas["ConversationOut"]["properties"]["status"] == {"$ref": "#/components/schemas/Status"}
    assert schemas["KeyOut"]["properties"]["role"] == {"$ref": "#/components/schemas/Role"}


def test_reads_are_typed_objects_and_the_response_is_their_dump(app, client, staff_client, admin_client, keys):
    conversation_id = _open(client, conversation_name="Typed")["conversation_id"]
    _say(client, conversation_id, "one")
    with app.test_request_context():
        session, archive = get_session(), app.extensions["parley.archive"]
        staff = Caller.of(session.scalar(select(ApiKey).where(ApiKey.role == Role.STAFF)))
        live = read_conversation(session, archive, staff, uuid.UUID(conversation_id))
        page = search_conversations(session, staff, SearchQuery(user_id="user-1"))
        events = list_audit_events(session, AuditQuery(conversation_id=uuid.UUID(conversation_id)))
    assert isinstance(live, ConversationDetail) and [m.role for m in live.messages] == ["user", "assistant"]
    assert isinstance(page, SearchPage) and isinstance(events, AuditPage)
    assert [event.action for event in events.events] == ["read_conversation"]

    fetched = staff_client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert fetched == live.model_dump(mode="json")
    client.post("/end_chat", json={"conversation_id": conversation_id})
    with app.test_request_context():
        session = get_session()
        archived = read_conversation(session, app.extensions["parley.archive"], staff, uuid.UUID(conversation_id))
    assert all(isinstance(message, MessageOut) for message in archived.messages)
    assert archived.messages == live.messages
    listed = staff_client.get("/conversations", query_string={"user_id": "user-1"}).json
    assert listed["conversations"][0] == ConversationOut.of(_stored(app, conversation_id)).model_dump(mode="json")
    audit = admin_client.get("/audit", query_string={"conversation_id": conversation_id}).json
    assert audit["events"][0]["created_at"].endswith("+00:00") and audit["events"][0]["key_role"] == "staff"


def _stored(app, conversation_id: str) -> Conversation:
    with app.app_context():
        return get_session().get(Conversation, uuid.UUID(conversation_id))


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/new_chat", b'{"user_id": "u", "metadata": {"x": NaN}}'),
        ("/new_chat", b'{"user_id": "u", "metadata": {"x": -Infinity}}'),
        ("/new_chat", b"[" * 100_000 + b"]" * 100_000),
        ("/new_chat", b'"{\\"user_id\\": \\"u\\"}"'),  # a JSON string holding JSON
    ],
)
def test_json_the_database_cannot_store_is_400(client, path, raw):
    response = client.post(path, data=raw, content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)[:200]


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_json_nested_deeper_than_64_levels_is_400_everywhere_it_is_stored(client):
    """orjson, which stores JSON columns, stops at 255 levels: the edge refuses far before, with a clear message."""
    deep, deepest_allowed = _nested(256), _nested(63)  # metadata's own object is a level too
    conversation_id = client.post("/new_chat", json={"user_id": "u", "metadata": {"k": deepest_allowed}}).json["conversation_id"]

    refused = [
        client.post("/new_chat", json={"user_id": "u", "metadata": {"k": _nested(64)}}),
        client.post("/new_chat", json={"user_id": "u", "metadata": {"k": deep}}),
        client.put(f"/conversations/{conversation_id}/variables/v", json={"value": deep}),
        client.patch(f"/conversations/{conversation_id}/variables", json={"v": _nested(65)}),
    ]
    kept = client.put(f"/conversations/{conversation_id}/variables/v", json={"value": _nested(64)})

    assert [(answer.status_code, "64 levels" in answer.json["message"]) for answer in refused] == [(400, True)] * 4
    assert kept.status_code == 200
    stored = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert stored["metadata"] == {"k": deepest_allowed} and stored["variables"] == {"v": _nested(64)}


def test_post_to_unknown_route_is_404_whatever_the_body(client):
    assert client.post("/nowhere", data="x", content_type="text/plain").status_code == 404


def test_system_prompt_larger_than_the_budget_is_413(app, client):
    app.config["CONTEXT_MAX_TOKENS"] = 1_000

    response = client.post("/new_chat", json={"user_id": "u", "system_prompt": "rules " * 1_000})

    assert response.status_code == 413
    assert "CONTEXT_MAX_TOKENS" in response.json["message"]


def test_concurrent_end_and_chat_lose_nothing(app, keys):
    """Ends racing each other and turns: the archive always holds every acknowledged message."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import client_with_key

    def act(args):
        action, conversation_id = args
        client = client_with_key(app, keys["client_a"])
        if action == "chat":
            return action, client.post("/chat", json={"conversation_id": conversation_id, "message": "racing"}).status_code
        return action, client.post("/end_chat", json={"conversation_id": conversation_id}).status_code

    owner = client_with_key(app, keys["client_a"])
    ids = [owner.post("/new_chat", json={"user_id": "race"}).json["conversation_id"] for _ in range(8)]
    jobs = [(action, cid) for cid in ids for action in ("chat", "end", "chat", "end", "chat")]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(act, jobs))

    # An end that meets a turn in progress is refused (409 turn_in_progress); repeated now, it ends.
    assert {status for action, status in results if action == "end"} <= {200, 409}
    assert {status for action, status in results if action == "chat"} <= {200, 409}
    acknowledged = sum(1 for action, status in results if action == "chat" and status == 200)
    stored = 0
    for conversation_id in ids:
        assert owner.post("/end_chat", json={"conversation_id": conversation_id}).status_code == 200
        log = owner.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
        assert log["status"] == "ended"
        assert len(log["messages"]) == log["message_count"]
        stored += log["message_count"]
    assert stored == 2 * acknowledged
