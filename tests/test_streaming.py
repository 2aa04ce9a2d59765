"""POST /chat as server-sent events: real SDKs against the fake model server's streams."""
from __future__ import annotations

import json
import time

import pytest

from tests.fake_model_server import _bedrock_chunk

PROVIDERS = ["anthropic", "bedrock", "openai"]


def parse_events(raw: bytes | str) -> list[tuple[str, dict | str]]:
    """(event, data) for each event, and ("comment", text) for each comment line."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    parsed: list[tuple[str, dict | str]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        if block.startswith(":"):
            parsed.append(("comment", block[1:].strip()))
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        parsed.append((fields["event"], json.loads(fields["data"])))
    return parsed


def open_chat(client) -> str:
    created = client.post("/new_chat", json={"user_id": "user-1", "conversation_name": "streamed"})
    assert created.status_code == 201, created.json
    return created.json["conversation_id"]


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_echo_streams_word_by_word_and_stores_the_turn(client):
    conversation_id = open_chat(client)

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "one two three", "stream": True})

    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    events = parse_events(response.data)
    deltas = [data["text"] for name, data in events if name == "delta"]
    assert len(deltas) > 5
    assert events[-1][0] == "done"
    done = events[-1][1]
    assert done["reply"] == "".join(deltas) and done["reply"].endswith("You said: one two three")
    assert done["seq"] == 2 and done["model"] == "echo" and done["incomplete"] is False
    assert set(done["usage"]) == {"input_tokens", "output_tokens"}
    assert done["context"]["messages_sent"] == 1 and done["context"]["messages_dropped"] == 0
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"]
    assert [(m["role"], m["content"], m["incomplete"]) for m in log] == [
        ("user", "one two three", False),
        ("assistant", done["reply"], False),
    ]


def test_accept_header_asks_for_a_stream_and_plain_requests_stay_json(client):
    conversation_id = open_chat(client)

    streamed = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi"}, headers={"Accept": "text/event-stream"})
    streamed_events = parse_events(streamed.data)  # read to its end: the turn is done
    plain = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi again"})

    assert streamed.mimetype == "text/event-stream"
    assert streamed_events[-1][1]["seq"] == 2
    assert plain.mimetype == "application/json" and plain.json["seq"] == 4


@pytest.mark.parametrize(("accept", "streamed"), [
    ("text/event-stream; charset=utf-8", True),
    ("text/event-stream;charset=UTF-8;q=0.9, application/json;q=0.5", True),
    ("application/json; charset=utf-8, text/event-stream;q=0.5", False),
    ("application/json", False),
    ("*/*", False),
])
def test_media_type_parameters_do_not_change_which_answer_is_wanted(client, accept, streamed):
    conversation_id = open_chat(client)

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi"}, headers={"Accept": accept})

    assert response.mimetype == ("text/event-stream" if streamed else "application/json")
    assert response.status_code == 200 and response.get_data()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_each_provider_streams_through_its_sdk(provider_app, fake_model, provider):
    client = provider_app(provider)
    conversation_id = open_chat(client)

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "tell me a story", "stream": True})

    events = parse_events(response.data)
    deltas = [data["text"] for name, data in events if name == "delta"]
    assert deltas == ["reply ", "to: ", "tell ", "me ", "a ", "story"]
    name, done = events[-1]
    assert name == "done" and done["reply"] == "reply to: tell me a story" and done["seq"] == 2
    assert done["usage"]["input_tokens"] > 0 and done["usage"]["output_tokens"] > 0
    upstream = fake_model.requests[-1]
    if provider == "bedrock":
        assert upstream.path.endswith("/invoke-with-response-stream")
    else:
        assert upstream.body["stream"] is True
    assert fake_model.streams_completed == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_provider_failing_mid_stream_ends_with_one_error_event_and_stores_nothing(provider_app, fake_model, provider):
    client = provider_app(provider)
    conversation_id = open_chat(client)
    fake_model.fail_stream_next(after_frames=5)

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "go on then", "stream": True})

    events = parse_events(response.data)
    names = [name for name, _ in events]
    assert "delta" in names and names[-1] == "error" and "done" not in names
    # The fake fails Anthropic with an overloaded_error event, OpenAI with a server_error chunk, Bedrock by cutting the stream.
    expected = {"anthropic": "model_unavailable", "openai": "model_error", "bedrock": "model_error"}[provider]
    error = events[-1][1]
    assert (error["error"], error["retryable"]) == (expected, True) and error["message"]
    detail = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert detail["messages"] == [] and detail["message_count"] == 0
    # The lease was released: the next turn works.
    again = client.post("/chat", json={"conversation_id": conversation_id, "message": "go on then"})
    assert again.status_code == 200 and again.json["seq"] == 2


FIRST_EVENT_FAILURES = [("anthropic", None, "model_unavailable"), ("openai", None, "model_error"),
                        ("bedrock", "throttlingException", "model_unavailable")]


@pytest.mark.parametrize(("provider", "bedrock_exception", "_error"), FIRST_EVENT_FAILURES)
def test_a_stream_failing_in_its_first_event_is_started_again_with_heartbeats_meanwhile(
    provider_app, fake_model, provider, bedrock_exception, _error
):
    client = provider_app(provider, LLM_MAX_RETRIES=1, STREAM_HEARTBEAT_SECONDS=0.05)
    conversation_id = open_chat(client)
    fake_model.fail_stream_next(after_frames=0, bedrock_exception=bedrock_exception)
    fake_model.latency = 0.4  # each request's; the second one's passes while the client's stream is open

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "go on then", "stream": True})

    events = parse_events(response.data)
    assert events[0][0] == "comment" and [name for name, _ in events if name not in ("delta", "comment")] == ["done"]
    assert events[-1][1]["reply"] == "".join(data["text"] for name, data in events if name == "delta") == "reply to: go on then"
    assert len(fake_model.requests) == 2


@pytest.mark.parametrize(("provider", "bedrock_exception", "error"), FIRST_EVENT_FAILURES)
def test_a_stream_failing_in_its_first_event_past_the_retries_ends_with_its_error(
    provider_app, fake_model, provider, bedrock_exception, error
):
    client = provider_app(provider)  # LLM_MAX_RETRIES=0
    conversation_id = open_chat(client)
    fake_model.fail_stream_next(after_frames=0, bedrock_exception=bedrock_exception)

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "go on then", "stream": True})

    events = parse_events(response.data)
    assert response.status_code == 200 and [name for name, _ in events] == ["error"]
    assert (events[0][1]["error"], events[0][1]["retryable"]) == (error, True)
    assert len(fake_model.requests) == 1
    assert client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"] == []
    assert client.post("/chat", json={"conversation_id": conversation_id, "message": "again"}).status_code == 200


# The frames a stream sends before its reply says anything: Anthropic's (and Bedrock's)
# message_start, content_block_start and ping; OpenAI's chunk with the role.
PREAMBLE_FRAMES = {"anthropic": 3, "openai": 1, "bedrock": 3}


@pytest.mark.parametrize(("provider", "bedrock_exception", "_error"), FIRST_EVENT_FAILURES)
def test_a_stream_failing_after_its_preamble_before_any_words_is_started_again(
    provider_app, fake_model, provider, bedrock_exception, _error
):
    client = provider_app(provider, LLM_MAX_RETRIES=1)
    conversation_id = open_chat(client)
    fake_model.fail_stream_next(after_frames=PREAMBLE_FRAMES[provider], bedrock_exception=bedrock_exception)

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "go on then", "stream": True})

    events = parse_events(response.data)
    assert [name for name, _ in events if name not in ("delta", "comment")] == ["done"]
    assert events[-1][1]["reply"] == "".join(data["text"] for name, data in events if name == "delta") == "reply to: go on then"
    assert len(fake_model.requests) == 2


@pytest.mark.parametrize(("provider", "bedrock_exception", "_error"), FIRST_EVENT_FAILURES)
def test_a_stream_whose_new_start_is_refused_ends_with_the_providers_retry_after(
    provider_app, fake_model, provider, bedrock_exception, _error
):
    """Started again after its preamble, the stream meets a 429 with Retry-After: the `error` event passes it on."""
    client = provider_app(provider, LLM_MAX_RETRIES=1)
    conversation_id = open_chat(client)
    fake_model.fail_stream_next(after_frames=PREAMBLE_FRAMES[provider], bedrock_exception=bedrock_exception)
    fake_model.fail_next(429, headers={"retry-after": "7"}, skip=1)

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "go on then", "stream": True})

    events = parse_events(response.data)
    assert [name for name, _ in events if name != "comment"] == ["error"]
    assert events[-1][1] == {"error": "model_unavailable", "message": events[-1][1]["message"], "retryable": True, "retry_after": 7}
    assert len(fake_model.requests) == 2
    assert client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"] == []


@pytest.mark.parametrize(("provider", "bedrock_exception", "error"), FIRST_EVENT_FAILURES)
def test_a_stream_failing_after_its_first_words_is_not_started_again(provider_app, fake_model, provider, bedrock_exception, error):
    """The client has the reply's first words: a second reply would not follow on from them."""
    client = provider_app(provider, LLM_MAX_RETRIES=1)
    conversation_id = open_chat(client)
    fake_model.fail_stream_next(after_frames=PREAMBLE_FRAMES[provider] + 1, bedrock_exception=bedrock_exception)

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "go on then", "stream": True})

    events = parse_events(response.data)
    assert [name for name, _ in events if name != "comment"] == ["delta", "error"]
    assert (events[-1][1]["error"], events[-1][1]["retryable"]) == (error, True)
    assert len(fake_model.requests) == 1
    assert client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"] == []


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_stream_that_ends_before_its_first_event_is_started_again(provider_app, fake_model, provider):
    client = provider_app(provider, LLM_MAX_RETRIES=1)
    conversation_id = open_chat(client)
    fake_model.answer_raw_next(b"", content_type="application/vnd.amazon.eventstream" if provider == "bedrock" else "text/event-stream")

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "go on then", "stream": True})

    events = parse_events(response.data)
    assert events[-1][0] == "done" and events[-1][1]["reply"] == "reply to: go on then"
    assert len(fake_model.requests) == 2


@pytest.mark.parametrize(
    ("exception", "error", "retryable"),
    [
        ("throttlingException", "model_unavailable", True),
        ("serviceUnavailableException", "model_unavailable", True),
        ("internalServerException", "model_error", True),
        ("modelStreamErrorException", "model_error", True),
        ("modelTimeoutException", "model_timeout", True),
        ("validationException", "model_error", False),
    ],
)
def test_a_bedrock_exception_mid_stream_says_whether_to_retry(provider_app, fake_model, exception, error, retryable):
    """Bedrock fails inside a stream with an exception message; its type says what a plain call's status would."""
    client = provider_app("bedrock")
    conversation_id = open_chat(client)
    fake_model.fail_stream_next(after_frames=3, bedrock_exception=exception)

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "go on then", "stream": True})

    events = parse_events(response.data)
    assert [name for name, _ in events][-1] == "error"
    assert (events[-1][1]["error"], events[-1][1]["retryable"]) == (error, retryable)
    assert error == "model_unavailable" or exception in events[-1][1]["message"]
    assert client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"] == []
    assert client.post("/chat", json={"conversation_id": conversation_id, "message": "again"}).status_code == 200


def test_a_bedrock_exception_of_a_type_parley_does_not_know_says_so(provider_app, fake_model):
    client = provider_app("bedrock")
    conversation_id = open_chat(client)
    fake_model.fail_stream_next(after_frames=3, bedrock_exception="quotaSurpriseException")

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "go on then", "stream": True})

    assert parse_events(response.data)[-1] == ("error", {
        "error": "model_error", "retryable": False,
        "message": "the bedrock model failed (upstream error of a type Parley does not know)",
    })


def test_a_bedrock_stream_that_cannot_be_decoded_is_a_retryable_model_error(provider_app, fake_model):
    client = provider_app("bedrock")
    conversation_id = open_chat(client)
    garbage = b"\x00\x00\x00\x10garbage-garbage-garbage"
    first = _bedrock_chunk({"type": "message_start", "message": {"model": "m", "usage": {"input_tokens": 1}}})
    unreadable = ("error", {"error": "model_error", "message": "the bedrock model's reply could not be read", "retryable": True})

    for body in (garbage, first + garbage):
        fake_model.answer_raw_next(body, content_type="application/vnd.amazon.eventstream")
        response = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi", "stream": True})
        assert response.status_code == 200 and parse_events(response.data)[-1] == unreadable

    assert client.post("/chat", json={"conversation_id": conversation_id, "message": "again"}).status_code == 200


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_a_client_that_goes_away_stops_the_upstream_stream_and_keeps_the_partial_reply(provider_app, fake_model, provider):
    client = provider_app(provider)
    conversation_id = open_chat(client)
    fake_model.reply_override = " ".join(f"word{n}" for n in range(200))
    fake_model.stream_interval = 0.05

    response = client.post(
        "/chat", json={"conversation_id": conversation_id, "message": "a long one", "stream": True}, buffered=False
    )
    received = ""
    for chunk in response.response:
        received += chunk.decode()
        if received.count("event: delta") >= 3:
            break
    response.close()  # what the WSGI server does when the client disconnects

    assert wait_for(lambda: fake_model.streams_closed_early == 1)
    assert fake_model.streams_completed == 0
    assert fake_model.early_close_frames[0] < 50  # of the 200-odd frames
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"]
    assert [m["role"] for m in log] == ["user", "assistant"]
    partial = log[1]
    assert partial["incomplete"] is True
    assert partial["content"].startswith("word0 word1 word2") and len(partial["content"]) < len(fake_model.reply_override)
    fake_model.stream_interval = 0.0
    after = client.post("/chat", json={"conversation_id": conversation_id, "message": "next"})
    assert after.status_code == 200 and after.json["seq"] == 4


def test_a_client_that_goes_away_before_any_text_stores_nothing(client):
    conversation_id = open_chat(client)

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "bye", "stream": True}, buffered=False)
    response.close()

    detail = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert detail["message_count"] == 0 or detail["messages"][-1]["role"] == "assistant"
    assert client.post("/chat", json={"conversation_id": conversation_id, "message": "again"}).status_code == 200


def test_heartbeat_comments_while_the_model_is_silent(provider_app, fake_model):
    client = provider_app("anthropic", STREAM_HEARTBEAT_SECONDS=0.1)
    conversation_id = open_chat(client)
    fake_model.stream_interval = 0.35

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "slowly", "stream": True})

    events = parse_events(response.data)
    assert ("comment", "heartbeat") in events
    assert events[-1][0] == "done"


@pytest.mark.parametrize(
    ("arrange", "status", "error"),
    [
        ("unknown_conversation", 404, "not_found"),
        ("bad_body", 400, "invalid_request"),
        ("no_key", 401, "unauthorized"),
        ("busy", 409, "turn_in_progress"),
        ("provider_down", 503, "model_unavailable"),
        ("rate_limited", 429, "rate_limited"),
        ("key_reused", 422, "idempotency_key_reused"),
    ],
)
def test_errors_before_the_first_byte_are_json(provider_app, fake_model, app, keys, arrange, status, error):
    limits = {"RATELIMIT_ENABLED": True, "RATE_LIMIT": "2 per minute"} if arrange == "rate_limited" else {}
    client = provider_app("anthropic", **limits)
    conversation_id = open_chat(client)
    body = {"conversation_id": conversation_id, "message": "hello", "stream": True}
    headers = {"Accept": "text/event-stream"}
    if arrange == "unknown_conversation":
        body["conversation_id"] = "00000000-0000-4000-8000-000000000000"
    elif arrange == "bad_body":
        body["stream"] = "yes please"
    elif arrange == "no_key":
        client.environ_base.pop("HTTP_AUTHORIZATION")
    elif arrange == "busy":
        fake_model.stream_interval = 0.2
        first = client.post("/chat", json=body, buffered=False)
        next(iter(first.response))
    elif arrange == "provider_down":
        fake_model.fail_next(529)
    elif arrange == "rate_limited":
        client.get("/get_conversation", query_string={"conversation_id": conversation_id})  # the second request of two
    elif arrange == "key_reused":
        headers["Idempotency-Key"] = "used-once"
        client.post("/chat", json={**body, "message": "something else"}, headers=headers).close()

    response = client.post("/chat", json=body, headers=headers)

    assert response.status_code == status
    assert response.mimetype == "application/json"
    assert response.json["error"] == error
    if arrange == "busy":
        first.close()


def test_a_streamed_request_replayed_by_idempotency_key_is_a_short_stream(client):
    conversation_id = open_chat(client)
    body = {"conversation_id": conversation_id, "message": "only once", "stream": True}
    headers = {"Idempotency-Key": "stream-1"}
    first = parse_events(client.post("/chat", json=body, headers=headers).data)[-1][1]

    again = client.post("/chat", json=body, headers=headers)

    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.mimetype == "text/event-stream"
    assert parse_events(again.data) == [("delta", {"text": first["reply"]}), ("done", first)]
    assert client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["message_count"] == 2


def test_a_json_request_replayed_as_a_stream_when_it_asks_by_accept(client):
    conversation_id = open_chat(client)
    body = {"conversation_id": conversation_id, "message": "plain first"}
    headers = {"Idempotency-Key": "plain-1"}
    first = client.post("/chat", json=body, headers=headers).json

    streamed = client.post("/chat", json=body, headers=headers | {"Accept": "text/event-stream"})
    plain = client.post("/chat", json=body, headers=headers)

    assert parse_events(streamed.data) == [("delta", {"text": first["reply"]}), ("done", first)]
    assert plain.json == first


def test_openapi_describes_the_events(client):
    document = client.get("/openapi.json").json
    chat = document["paths"]["/chat"]["post"]
    stream = chat["responses"]["200"]["content"]["text/event-stream"]
    for name in ("delta", "done", "error", "heartbeat"):
        assert name in stream["schema"]["description"]
    assert "stream" in document["components"]["schemas"]["ChatRequest"]["properties"]


def test_a_stream_closed_before_its_first_read_releases_everything(provider_app, fake_model):
    client = provider_app("anthropic")
    conversation_id = open_chat(client)
    fake_model.reply_override = " ".join(f"word{n}" for n in range(100))
    fake_model.stream_interval = 0.05

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi", "stream": True}, buffered=False)
    response.close()

    assert wait_for(lambda: fake_model.streams_closed_early == 1)
    fake_model.stream_interval = 0.0
    assert client.post("/chat", json={"conversation_id": conversation_id, "message": "again"}).status_code == 200


@pytest.mark.parametrize("tool", [False, True], ids=["reply", "handoff"])
def test_a_lone_surrogate_in_a_streamed_delta_is_sent_and_stored_as_a_question_mark(provider_app, fake_model, tool):
    client = provider_app("anthropic")
    conversation_id = open_chat(client)
    events = [
        {"type": "message_start", "message": {"model": "m", "usage": {"input_tokens": 3}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "bad \ud800 text"}},
        *([{"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "name": "request_human"}},
           {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"reason": "x"}'}}]
          if tool else []),
        {"type": "message_delta", "delta": {"stop_reason": "tool_use" if tool else "end_turn"}, "usage": {"output_tokens": 3}},
        {"type": "message_stop"},
    ]
    fake_model.answer_raw_next(b"".join(b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n"
                                        for e in events), content_type="text/event-stream")

    streamed = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi", "stream": True})

    assert streamed.status_code == 200
    events = parse_events(streamed.data)
    assert events[0] == ("delta", {"text": "bad ? text"})
    assert events[-1][0] == ("handoff" if tool else "done")
    messages = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"]
    assert [m["content"] for m in messages] == ["hi", "bad ? text"]
