"""Human handoff end to end: the state machine, the 202 while a human has the
conversation, staff messages in the model's context, automatic triggers (the
request_human tool through the real SDKs), after_seq, the staff queue, audit."""
from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import event, text

from auth import create_key
from conversation_memory import STAFF_PREFIX
from database_utils import Conversation, add_transition, find_conversations, get_session, utcnow
from states import HANDOFF_TRANSITIONS, Handoff
from tests.conftest import client_with_key
from tests.factories import seed_conversations
from tests.test_streaming import parse_events


def _open(client, **body) -> str:
    response = client.post("/new_chat", json={"user_id": "user-1", **body})
    assert response.status_code == 201, response.json
    return response.json["conversation_id"]


def _chat(client, conversation_id: str, message: str):
    return client.post("/chat", json={"conversation_id": conversation_id, "message": message})


def _handoff(client, conversation_id: str, reason: str = "billing dispute"):
    return client.post(f"/conversations/{conversation_id}/handoff", json={"reason": reason})


def _claim(client, conversation_id: str):
    return client.post(f"/conversations/{conversation_id}/claim")


def _write(client, conversation_id: str, message: str):
    return client.post(f"/conversations/{conversation_id}/staff_messages", json={"message": message})


def _release(client, conversation_id: str, note: str | None = None):
    return client.post(f"/conversations/{conversation_id}/release", json={} if note is None else {"note": note})


def _read(client, conversation_id: str, **query) -> dict:
    response = client.get("/get_conversation", query_string={"conversation_id": conversation_id, **query})
    assert response.status_code == 200, response.json
    return response.json


@pytest.fixture
def anthropic_client(provider_app):
    """Client A of an app whose model is Claude through the anthropic SDK, against the fake server."""
    return provider_app("anthropic")


def test_whole_cycle_bot_needs_human_human_bot(anthropic_client, keys, fake_model):
    client = anthropic_client
    staff = client_with_key(client.application, keys["staff"])
    conversation_id = _open(client, system_prompt="Be brief.")
    assert _chat(client, conversation_id, "Where is my parcel?").status_code == 200

    asked = _handoff(client, conversation_id, "wants a refund")
    assert asked.status_code == 200
    assert (asked.json["handoff"], asked.json["assigned_to"]) == ("needs_human", None)

    fake_model.clear()
    held = _chat(client, conversation_id, "Hello? Anyone?")
    assert held.status_code == 202
    assert held.json == {"conversation_id": conversation_id, "handoff": "needs_human", "seq": 3}

    claimed = _claim(staff, conversation_id)
    assert claimed.status_code == 200 and claimed.json["handoff"] == "human"
    staff_key_id = claimed.json["assigned_to"]
    written = _write(staff, conversation_id, "Hi, I am Sam from support. Refund approved.")
    assert written.status_code == 201
    assert (written.json["seq"], written.json["role"]) == (4, "staff")
    assert _chat(client, conversation_id, "Thank you!").json == {"conversation_id": conversation_id, "handoff": "human", "seq": 5}
    assert fake_model.requests == []  # no model call while a human has the conversation

    released = _release(staff, conversation_id, "refund done")
    assert released.status_code == 200 and (released.json["handoff"], released.json["assigned_to"]) == ("bot", None)
    answered = _chat(client, conversation_id, "One more question")
    # The message held for the human and this one reach the model as one user turn.
    assert answered.status_code == 200 and answered.json["reply"] == "reply to: Thank you!\n\nOne more question"

    log = _read(client, conversation_id)
    assert [(m["seq"], m["role"]) for m in log["messages"]] == [
        (1, "user"), (2, "assistant"), (3, "user"), (4, "staff"), (5, "user"), (6, "user"), (7, "assistant"),
    ]
    moves = [(h["from"], h["to"], h["actor"], h["reason"]) for h in log["handoff_history"]]
    assert moves == [
        ("bot", "needs_human", "client", "wants a refund"),
        ("needs_human", "human", "staff", None),
        ("human", "bot", "staff", "refund done"),
    ]
    assert [h["by"] for h in log["handoff_history"]][1:] == [staff_key_id, staff_key_id]
    assert all(h["at"].endswith("+00:00") for h in log["handoff_history"])


def test_a_staff_message_waits_for_a_turn_begun_before_the_handoff(anthropic_client, keys, fake_model):
    """The model is answering when the conversation is handed off and claimed: the staff message
    is 409 `turn_in_progress` until that turn's message and reply are stored, then follows them."""
    client = anthropic_client
    staff = client_with_key(client.application, keys["staff"])
    conversation_id = _open(client)
    fake_model.delay_next(1.5)
    results = {}
    turn = threading.Thread(target=lambda: results.setdefault("turn", _chat(client, conversation_id, "during")))
    turn.start()
    deadline = time.monotonic() + 10
    while fake_model.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)

    asked, claimed = _handoff(client, conversation_id), _claim(staff, conversation_id)
    during = _write(staff, conversation_id, "Sam here, from support.")
    turn.join()
    after = _write(staff, conversation_id, "Sam here, from support.")

    assert (asked.status_code, claimed.status_code) == (200, 200)
    assert during.status_code == 409 and during.json["error"] == "turn_in_progress"
    assert during.headers["Retry-After"] == "1"
    assert results["turn"].status_code == 200
    assert after.status_code == 201
    log = _read(client, conversation_id)["messages"]
    assert [(m["seq"], m["role"], m["content"]) for m in log] == [
        (1, "user", "during"), (2, "assistant", "reply to: during"), (3, "staff", "Sam here, from support."),
    ]


def test_a_release_waits_for_a_users_message_being_stored_for_staff(app, client, staff_client):
    """A release under a held turn would leave that message with no reply and no one to give one."""
    conversation_id = _open(client)
    _handoff(client, conversation_id)
    _claim(staff_client, conversation_id)
    with app.app_context():  # a user's /chat holds the lease while its message is stored
        session = get_session()
        row = session.get(Conversation, uuid.UUID(conversation_id))
        row.turn_lease_id, row.turn_lease_expires_at = uuid.uuid4(), utcnow() + timedelta(seconds=30)
        session.commit()

    during = _release(staff_client, conversation_id)

    assert during.status_code == 409 and during.json["error"] == "turn_in_progress" and during.headers["Retry-After"] == "1"
    assert _read(client, conversation_id)["handoff"] == "human"


def test_staff_messages_reach_the_model_as_marked_assistant_turns(anthropic_client, keys, fake_model):
    client = anthropic_client
    staff = client_with_key(client.application, keys["staff"])
    conversation_id = _open(client)
    _chat(client, conversation_id, "first")
    _handoff(client, conversation_id)
    _chat(client, conversation_id, "are you there?")
    _claim(staff, conversation_id)
    _write(staff, conversation_id, "Yes, I am here.")
    _write(staff, conversation_id, "Your order ships today.")
    _release(staff, conversation_id)

    assert _chat(client, conversation_id, "great").status_code == 200

    sent = fake_model.requests[-1].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user", "assistant", "user"]
    assert sent[2]["content"] == "are you there?"
    assert sent[3]["content"] == f"{STAFF_PREFIX}Yes, I am here.\n\n{STAFF_PREFIX}Your order ships today."
    assert sent[4]["content"] == "great"


def test_user_messages_held_for_a_human_are_joined_to_keep_turns_alternating(anthropic_client, keys, fake_model):
    client = anthropic_client
    staff = client_with_key(client.application, keys["staff"])
    conversation_id = _open(client)
    _handoff(client, conversation_id)
    _chat(client, conversation_id, "one")
    _claim(staff, conversation_id)
    _release(staff, conversation_id)

    _chat(client, conversation_id, "two")

    assert fake_model.requests[-1].body["messages"] == [{"role": "user", "content": "one\n\ntwo"}]


@pytest.mark.parametrize(
    ("state", "action", "expected_state"),
    [
        ("bot", "claim", "bot"),
        ("bot", "release", "bot"),
        ("bot", "write", "bot"),
        ("needs_human", "handoff", "needs_human"),
        ("needs_human", "release", "needs_human"),
        ("needs_human", "write", "needs_human"),
        ("human", "handoff", "human"),
        ("human", "claim", "human"),
    ],
)
def test_illegal_transitions_are_409_naming_the_current_state(client, staff_client, state, action, expected_state):
    conversation_id = _open(client)
    if state != "bot":
        _handoff(client, conversation_id)
    if state == "human":
        _claim(staff_client, conversation_id)
    actions = {
        "handoff": lambda: _handoff(staff_client, conversation_id),
        "claim": lambda: _claim(staff_client, conversation_id),
        "release": lambda: _release(staff_client, conversation_id),
        "write": lambda: _write(staff_client, conversation_id, "hello"),
    }

    response = actions[action]()

    assert response.status_code == 409
    assert response.json["error"] == "handoff_conflict"
    assert f"is in handoff state {expected_state}" in response.json["message"]
    assert _read(client, conversation_id)["handoff"] == expected_state


def test_only_the_assigned_staff_member_writes_and_releases(app, client, staff_client):
    with app.app_context():
        other = client_with_key(app, create_key(get_session(), "staff", "other staff")[1])
    conversation_id = _open(client)
    _handoff(client, conversation_id)
    _claim(staff_client, conversation_id)

    for response in (_write(other, conversation_id, "me too"), _release(other, conversation_id)):
        assert response.status_code == 409
        assert "assigned to another staff key" in response.json["message"]
    assert _read(client, conversation_id)["message_count"] == 0


def test_an_ended_conversation_cannot_be_handed_off(client, staff_client):
    conversation_id = _open(client)
    client.post("/end_chat", json={"conversation_id": conversation_id})

    response = _handoff(client, conversation_id)
    by_staff = _handoff(staff_client, conversation_id)

    assert response.status_code == 409 and response.json["message"].endswith("is ended; open a new one")
    assert by_staff.status_code == 409 and "open a new one" not in by_staff.json["message"]  # staff cannot open one


def test_roles_and_ownership(client, staff_client, app, keys):
    other_client = client_with_key(app, keys["client_b"])
    conversation_id = _open(client)

    assert _handoff(other_client, conversation_id).status_code == 404
    assert other_client.get(f"/conversations/{conversation_id}/variables").status_code == 404
    assert other_client.put(f"/conversations/{conversation_id}/variables/plan", json={"value": 1}).status_code == 404
    assert other_client.put(f"/conversations/{conversation_id}/stage", json={"stage": "x"}).status_code == 404
    assert other_client.get("/get_conversation", query_string={"conversation_id": conversation_id}).status_code == 404
    assert _handoff(client, str(uuid.uuid4())).status_code == 404
    # Only staff claim, write and release; clients get 403.
    _handoff(client, conversation_id)
    assert _claim(client, conversation_id).status_code == 403
    assert _write(client, conversation_id, "x").status_code == 403
    assert _release(client, conversation_id).status_code == 403
    assert _read(client, conversation_id)["handoff"] == "needs_human"


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_concurrent_claims_exactly_one_wins(app, client, keys):
    conversation_id = _open(client)
    _handoff(client, conversation_id)
    with app.app_context():
        secrets = [create_key(get_session(), "staff", f"staff {n}")[1] for n in range(8)]
    clients = [client_with_key(app, secret) for secret in secrets]
    barrier = threading.Barrier(len(clients))
    statuses: list[int] = []

    def claim(staff) -> None:
        barrier.wait()
        statuses.append(_claim(staff, conversation_id).status_code)

    threads = [threading.Thread(target=claim, args=(staff,)) for staff in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(statuses) == [200] + [409] * 7
    history = _read(client, conversation_id)["handoff_history"]
    assert [h["to"] for h in history] == ["needs_human", "human"]


@pytest.mark.parametrize("message", ["Can I TALK to a   Human please", "i want a real person"])
def test_a_phrase_hands_off_instead_of_answering(anthropic_client, fake_model, message):
    conversation_id = _open(anthropic_client)

    response = _chat(anthropic_client, conversation_id, message)

    assert response.status_code == 202 and response.json["handoff"] == "needs_human"
    assert fake_model.requests == []
    history = _read(anthropic_client, conversation_id)["handoff_history"]
    assert (history[0]["actor"], history[0]["by"]) == ("phrase", None)


def test_phrases_are_configurable(provider_app, fake_model):
    client = provider_app("anthropic", HANDOFF_PHRASES="manager please, supervisor")

    conversation_id = _open(client)

    assert _chat(client, conversation_id, "talk to a human").status_code == 200
    assert _chat(client, conversation_id, "Get me a SUPERVISOR").status_code == 202


def test_past_handoff_after_messages_the_conversation_is_handed_off(provider_app, fake_model):
    client = provider_app("anthropic", HANDOFF_AFTER_MESSAGES=2)
    conversation_id = _open(client)

    statuses = [_chat(client, conversation_id, f"message {n}").status_code for n in range(3)]

    assert statuses == [200, 200, 202]
    assert len(fake_model.requests) == 2
    history = _read(client, conversation_id)["handoff_history"]
    assert history[0]["actor"] == "message_limit" and "HANDOFF_AFTER_MESSAGES=2" in history[0]["reason"]


def test_after_staff_release_a_conversation_past_handoff_after_messages_is_answered_again(provider_app, fake_model, keys):
    client = provider_app("anthropic", HANDOFF_AFTER_MESSAGES=1)
    staff = client_with_key(client.application, keys["staff"])
    conversation_id = _open(client)
    assert [_chat(client, conversation_id, f"message {n}").status_code for n in range(2)] == [200, 202]
    assert _claim(staff, conversation_id).status_code == 200
    assert _write(staff, conversation_id, "Sorted, handing you back.").status_code == 201
    assert _release(staff, conversation_id).status_code == 200

    again = _chat(client, conversation_id, "thanks, one more question")

    assert again.status_code == 200 and again.json["reply"] == "reply to: thanks, one more question"
    conversation = _read(client, conversation_id)
    assert conversation["handoff"] == "bot"
    assert [entry["actor"] for entry in conversation["handoff_history"]] == ["message_limit", "staff", "staff"]


@pytest.mark.parametrize("provider", ["anthropic", "bedrock", "openai"])
def test_the_model_hands_off_with_the_request_human_tool(provider_app, fake_model, provider):
    client = provider_app(provider)
    conversation_id = _open(client)
    fake_model.tool_use_next("request_human", {"reason": "the user disputes a charge"}, text="Let me fetch a colleague.")

    response = _chat(client, conversation_id, "This charge is wrong!")

    assert response.status_code == 202
    assert response.json == {"conversation_id": conversation_id, "handoff": "needs_human", "seq": 2}
    offered = fake_model.requests[-1].body["tools"]
    names = [tool.get("name") or tool["function"]["name"] for tool in offered]
    assert names == ["request_human"]
    log = _read(client, conversation_id)
    assert [(m["role"], m["content"]) for m in log["messages"]] == [
        ("user", "This charge is wrong!"), ("assistant", "Let me fetch a colleague."),
    ]
    assert [(h["actor"], h["reason"]) for h in log["handoff_history"]] == [("model", "the user disputes a charge")]


def _stream(client, conversation_id: str, message: str, **headers):
    return client.post("/chat", json={"conversation_id": conversation_id, "message": message, "stream": True}, headers=headers)


@pytest.mark.parametrize("provider", ["anthropic", "bedrock", "openai"])
def test_a_streamed_turn_hands_off_with_the_request_human_tool(provider_app, fake_model, provider):
    client = provider_app(provider)
    conversation_id = _open(client)
    fake_model.tool_use_next("request_human", {"reason": "the user disputes a charge"}, text="Let me fetch a colleague.")

    streamed = _stream(client, conversation_id, "This charge is wrong!")

    assert streamed.status_code == 200 and streamed.mimetype == "text/event-stream"
    events = parse_events(streamed.data)
    assert {name for name, _ in events[:-1]} == {"delta"}
    assert "".join(data["text"] for _, data in events[:-1]) == "Let me fetch a colleague."
    assert events[-1] == ("handoff", {"conversation_id": conversation_id, "handoff": "needs_human", "seq": 2})
    offered = fake_model.requests[-1].body["tools"]
    assert [tool.get("name") or tool["function"]["name"] for tool in offered] == ["request_human"]
    log = _read(client, conversation_id)
    assert [(m["role"], m["content"]) for m in log["messages"]] == [
        ("user", "This charge is wrong!"), ("assistant", "Let me fetch a colleague."),
    ]
    assert [(h["actor"], h["reason"]) for h in log["handoff_history"]] == [("model", "the user disputes a charge")]
    assert _chat(client, conversation_id, "hello?").status_code == 202
    assert len(fake_model.requests) == 1


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_a_streamed_tool_call_without_words_stores_only_the_user_message(provider_app, fake_model, provider):
    client = provider_app(provider)
    conversation_id = _open(client)
    fake_model.tool_use_next("request_human", {})

    events = parse_events(_stream(client, conversation_id, "help").data)

    assert events == [("handoff", {"conversation_id": conversation_id, "handoff": "needs_human", "seq": 1})]
    log = _read(client, conversation_id)
    assert [m["content"] for m in log["messages"]] == ["help"]
    assert log["handoff_history"][0]["reason"] == "the model asked for a human"


def _chunk(delta: dict, finish: str | None = None) -> dict:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


# How compatible servers have been seen to stream a call: arguments before the name, no index, an object.
STREAMED_CALLS = {
    "arguments before the name": [{"index": 0, "function": {"arguments": '{"reason": '}},
                                  {"index": 0, "id": "call_1", "type": "function",
                                   "function": {"name": "request_human", "arguments": '"a refund"}'}}],
    "no index": [{"index": None, "id": "call_1", "type": "function", "function": {"name": "request_human"}},
                 {"index": None, "function": {"arguments": '{"reason": "a refund"}'}}],
    "no index, then another tool": [{"index": None, "id": "call_1", "type": "function",
                                     "function": {"name": "request_human", "arguments": '{"reason": "a refund"}'}},
                                    {"index": None, "id": "call_2", "type": "function",
                                     "function": {"name": "look_up", "arguments": '{"order": 7}'}}],
    "arguments as an object": [{"index": 0, "id": "call_1", "type": "function",
                                "function": {"name": "request_human", "arguments": {"reason": "a refund"}}}],
    "after another tool": [{"index": 0, "id": "call_0", "type": "function", "function": {"name": "look_up", "arguments": "{}"}},
                           {"index": 1, "id": "call_1", "type": "function",
                            "function": {"name": "request_human", "arguments": '{"reason": "a refund"}'}},
                           {"index": 2, "id": "call_2", "type": "function",
                            "function": {"name": "request_human", "arguments": '{"reason": "a second call"}'}}],
}


@pytest.mark.parametrize("calls", STREAMED_CALLS.values(), ids=STREAMED_CALLS.keys())
def test_a_streamed_call_however_its_pieces_come_hands_off_with_its_reason(provider_app, fake_model, calls):
    client = provider_app("openai")
    conversation_id = _open(client)
    chunks = [_chunk({"role": "assistant", "content": "One moment."}), *(_chunk({"tool_calls": [call]}) for call in calls),
              _chunk({}, "tool_calls")]
    fake_model.answer_raw_next(b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n",
                               content_type="text/event-stream")

    events = parse_events(_stream(client, conversation_id, "refund please").data)

    assert events[-1] == ("handoff", {"conversation_id": conversation_id, "handoff": "needs_human", "seq": 2})
    log = _read(client, conversation_id)
    assert [(h["actor"], h["reason"]) for h in log["handoff_history"]] == [("model", "a refund")]
    assert [m["content"] for m in log["messages"]] == ["refund please", "One moment."]


def test_a_streamed_call_of_another_tool_is_not_a_handoff(provider_app, fake_model):
    client = provider_app("anthropic")
    conversation_id = _open(client)
    fake_model.tool_use_next("look_up_order", {"order": 7}, text="Looking it up.")

    events = parse_events(_stream(client, conversation_id, "where is my order?").data)

    assert events[-1][0] == "done" and events[-1][1]["reply"] == "Looking it up."
    assert _read(client, conversation_id)["handoff"] == "bot"


def test_a_streamed_handoff_retried_with_its_idempotency_key_is_the_held_answer(provider_app, fake_model):
    client = provider_app("anthropic")
    conversation_id = _open(client)
    fake_model.tool_use_next("request_human", {"reason": "a refund"}, text="One moment.")

    first = parse_events(_stream(client, conversation_id, "refund please", **{"Idempotency-Key": "refund-1"}).data)
    retry = _stream(client, conversation_id, "refund please", **{"Idempotency-Key": "refund-1"})

    assert first[-1] == ("handoff", {"conversation_id": conversation_id, "handoff": "needs_human", "seq": 2})
    assert retry.status_code == 202 and retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json == {"conversation_id": conversation_id, "handoff": "needs_human", "seq": 2}
    assert len(fake_model.requests) == 1
    assert len(_read(client, conversation_id)["messages"]) == 2


def test_the_tool_is_not_offered_to_a_streamed_turn_when_switched_off(provider_app, fake_model):
    client = provider_app("anthropic", HANDOFF_TOOL=False)

    events = parse_events(_stream(client, _open(client), "hello").data)

    assert events[-1][0] == "done"
    assert "tools" not in fake_model.requests[-1].body


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_a_reason_with_a_lone_surrogate_is_stored_with_a_question_mark(provider_app, fake_model, provider):
    client = provider_app(provider)
    conversation_id = _open(client)
    reason = "help \\udc00 me"  # the escape as it stands in the JSON: a UTF-16 half with no other
    if provider == "openai":
        arguments = json.dumps(json.dumps({"reason": "R"})).replace("R", reason)
        raw = ('{"model": "m", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", '
               '"content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "request_human", '
               f'"arguments": {arguments}}}}}]}}}}], "usage": {{"prompt_tokens": 3, "completion_tokens": 1}}}}')
    else:
        raw = ('{"model": "m", "content": [{"type": "tool_use", "id": "t1", "name": "request_human", '
               f'"input": {{"reason": "{reason}"}}}}], "stop_reason": "tool_use", "usage": {{"input_tokens": 3, "output_tokens": 1}}}}')
    fake_model.answer_raw_next(raw.encode())

    response = _chat(client, conversation_id, "help")

    assert response.status_code == 202, response.json
    assert _read(client, conversation_id)["handoff_history"][0]["reason"] == "help ? me"


def test_a_compatible_server_that_sends_tool_arguments_as_an_object_hands_off(provider_app, fake_model):
    """OpenAI sends `arguments` as JSON text; some compatible servers send the object itself."""
    client = provider_app("openai")
    conversation_id = _open(client)
    call = {"id": "call_1", "type": "function", "function": {"name": "request_human", "arguments": {"reason": "a refund"}}}
    fake_model.answer_raw_next(json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "openai-test-model",
        "choices": [{"index": 0, "finish_reason": "tool_calls",
                     "message": {"role": "assistant", "content": None, "tool_calls": [call]}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }).encode())

    response = _chat(client, conversation_id, "I want my money back")

    assert response.status_code == 202 and response.json["handoff"] == "needs_human"
    assert _read(client, conversation_id)["handoff_history"][0]["reason"] == "a refund"


def test_a_tool_call_without_words_stores_only_the_user_message(provider_app, fake_model):
    client = provider_app("anthropic")
    conversation_id = _open(client)
    fake_model.tool_use_next("request_human", {})

    response = _chat(client, conversation_id, "help")

    assert response.status_code == 202 and response.json["seq"] == 1
    assert _read(client, conversation_id)["handoff_history"][0]["reason"] == "the model asked for a human"


def test_the_tool_is_not_offered_when_switched_off(provider_app, fake_model):
    client = provider_app("anthropic", HANDOFF_TOOL=False)

    _chat(client, _open(client), "hello")

    assert "tools" not in fake_model.requests[-1].body


def test_after_seq_returns_only_newer_messages_live_and_archived(client, staff_client):
    conversation_id = _open(client)
    _chat(client, conversation_id, "one")
    _handoff(client, conversation_id)
    _claim(staff_client, conversation_id)
    _write(staff_client, conversation_id, "staff here")

    newer = _read(client, conversation_id, after_seq=2)
    assert [(m["seq"], m["role"], m["content"]) for m in newer["messages"]] == [(3, "staff", "staff here")]
    assert _read(client, conversation_id, after_seq=3)["messages"] == []
    assert len(_read(client, conversation_id, after_seq=0)["messages"]) == 3

    _release(staff_client, conversation_id)
    client.post("/end_chat", json={"conversation_id": conversation_id})
    archived = _read(client, conversation_id, after_seq=2)
    assert [m["seq"] for m in archived["messages"]] == [3]
    assert [h["to"] for h in archived["handoff_history"]] == ["needs_human", "human", "bot"]
    assert client.get("/get_conversation", query_string={"conversation_id": conversation_id, "after_seq": -1}).status_code == 400


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_after_seq_reads_a_range_of_the_primary_key(app, client):
    conversation_id = _open(client)
    with app.app_context():
        session = get_session()
        statements = []
        connection = session.connection()
        connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
        event.listen(connection, "before_cursor_execute", lambda *a: statements.append((a[2], a[3])))
        from database_utils import list_messages

        list_messages(session, uuid.UUID(conversation_id), 5)
        statement, parameters = statements[-1]
        plan = "\n".join(row[0] for row in connection.exec_driver_sql("EXPLAIN " + statement, parameters))

    assert "messages_pkey" in plan and "Seq Scan" not in plan, plan


def test_the_queue_lists_needs_human_oldest_waiting_first(client, staff_client):
    first, second, third = (_open(client) for _ in range(3))
    for conversation_id in (second, first, third):
        _handoff(client, conversation_id)
    _claim(staff_client, third)

    queue = staff_client.get("/conversations", query_string={"handoff": "needs_human"})

    assert queue.status_code == 200
    assert [c["conversation_id"] for c in queue.json["conversations"]] == [second, first]
    page = staff_client.get("/conversations", query_string={"handoff": "needs_human", "limit": 1})
    rest = staff_client.get("/conversations", query_string={"handoff": "needs_human", "cursor": page.json["next_cursor"]})
    assert [c["conversation_id"] for c in page.json["conversations"] + rest.json["conversations"]] == [second, first]
    assert staff_client.get("/conversations", query_string={"handoff": "nobody"}).status_code == 400


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
@pytest.mark.parametrize(
    ("filters", "index"),
    [({"handoff": "needs_human"}, "ix_conversations_handoff_since"), ({"stage": "awaiting_confirmation"}, "ix_conversations_stage_created")],
)
def test_queue_and_stage_filters_use_an_index(app, filters, index):
    with app.app_context():
        session = get_session()
        seed_conversations(session, 5_000, users=500)
        session.execute(text("UPDATE conversations SET handoff = 'needs_human', stage = 'awaiting_confirmation' WHERE user_id = 'user-7'"))
        session.execute(text("ANALYZE conversations"))
        statements = []
        connection = session.connection()
        connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
        event.listen(connection, "before_cursor_execute", lambda *a: statements.append((a[2], a[3])))
        rows = find_conversations(session, filters, None, 51)
        statement, parameters = statements[-1]
        plan = "\n".join(row[0] for row in connection.exec_driver_sql("EXPLAIN " + statement, parameters))

    assert len(rows) == 10
    assert index in plan and "Seq Scan" not in plan and "Sort" not in plan, plan


def test_every_staff_action_is_audited(client, staff_client, admin_client):
    conversation_id = _open(client)
    _handoff(staff_client, conversation_id, "customer called")
    _claim(staff_client, conversation_id)
    _write(staff_client, conversation_id, "hello")
    _release(staff_client, conversation_id, "done")
    staff_client.put(f"/conversations/{conversation_id}/stage", json={"stage": "resolved"})
    staff_client.get(f"/conversations/{conversation_id}/variables")

    events = admin_client.get("/audit", query_string={"conversation_id": conversation_id}).json["events"]

    assert [e["action"] for e in reversed(events)] == [
        "handoff", "claim", "staff_message", "release", "set_stage", "read_variables",
    ]
    assert events[-1]["detail"] == {"reason": "customer called"}
    assert all(e["key_role"] == "staff" for e in events)


def test_claim_honours_idempotency_key(client, staff_client):
    conversation_id = _open(client)
    _handoff(client, conversation_id)
    headers = {"Idempotency-Key": "claim-1"}

    first = staff_client.post(f"/conversations/{conversation_id}/claim", headers=headers)
    again = staff_client.post(f"/conversations/{conversation_id}/claim", headers=headers)

    assert (first.status_code, again.status_code) == (200, 200)
    assert again.headers["Idempotent-Replayed"] == "true" and again.json == first.json


def test_handoff_needs_a_reason_and_staff_messages_text(client, staff_client):
    conversation_id = _open(client)

    assert client.post(f"/conversations/{conversation_id}/handoff", json={}).status_code == 400
    assert client.post(f"/conversations/{conversation_id}/handoff", json={"reason": " "}).status_code == 400
    assert client.post("/conversations/not-a-uuid/handoff", json={"reason": "x"}).status_code == 400
    _handoff(client, conversation_id)
    unknown = staff_client.post(f"/conversations/{conversation_id}/claim", json={"bogus_field": 1})
    assert unknown.status_code == 400 and unknown.json["details"][0]["field"] == "bogus_field"
    assert staff_client.post(f"/conversations/{conversation_id}/claim", json={}).status_code == 200
    assert _write(staff_client, conversation_id, "   ").status_code == 400
    assert staff_client.post(f"/conversations/{conversation_id}/release", data="nope", content_type="text/plain").status_code == 400


@pytest.mark.parametrize(("source", "target"), [(s, t) for s in Handoff for t in Handoff])
def test_a_handoff_state_moves_only_as_the_table_allows(source, target):
    conversation = Conversation(handoff=source, transitions=[])

    if target in HANDOFF_TRANSITIONS[source]:
        add_transition(conversation, "handoff", target, None, "staff", None)
        assert conversation.handoff == target
        assert [(t.from_state, t.to_state) for t in conversation.transitions] == [(source, target)]
    else:
        with pytest.raises(ValueError, match="cannot go from"):
            add_transition(conversation, "handoff", target, None, "staff", None)
        assert conversation.handoff == source and conversation.transitions == []
