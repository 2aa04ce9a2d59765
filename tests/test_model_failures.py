"""Model failures: bounded retries, one total deadline, the documented 5xx, a consistent conversation.

The real SDKs talk to the local fake model server, which injects the faults.
"""
from __future__ import annotations

import json
import time
from email.utils import formatdate

import pytest

PROVIDERS = ["anthropic", "bedrock", "openai"]


def _conversation(client) -> str:
    return client.post("/new_chat", json={"user_id": "u-1"}).json["conversation_id"]


def _say(client, conversation_id: str, message: str = "hi"):
    return client.post("/chat", json={"conversation_id": conversation_id, "message": message})


def _log(client, conversation_id: str) -> list[dict]:
    return client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"]


def _last_event(streamed) -> str:
    """The last server-sent event of a streamed answer, as its text."""
    return streamed.get_data(as_text=True).strip().split("\n\n")[-1]


def _assert_retryable_failure(client, conversation_id: str, failed, fake_model, status: int, error: str) -> None:
    """`failed` is a retryable `status` after two attempts, and the turn left nothing stored."""
    assert failed.status_code == status
    assert failed.json["error"] == error
    assert failed.json["retryable"] is True
    assert len(fake_model.requests) == 2
    assert _log(client, conversation_id) == []


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("upstream_status", [429, 500, 529])
def test_passing_failures_are_retried_and_the_turn_succeeds(provider_app, fake_model, provider, upstream_status):
    client = provider_app(provider, LLM_MAX_RETRIES=2)
    conversation_id = _conversation(client)
    fake_model.fail_next(upstream_status, count=2, headers={"retry-after": "0"})

    response = _say(client, conversation_id)

    assert response.status_code == 200
    assert len(fake_model.requests) == 3
    assert [m["role"] for m in _log(client, conversation_id)] == ["user", "assistant"]


def test_a_connection_reset_is_retried(provider_app, fake_model):
    client = provider_app("anthropic", LLM_MAX_RETRIES=1)
    conversation_id = _conversation(client)
    fake_model.drop_next()

    response = _say(client, conversation_id)

    assert response.status_code == 200
    assert len(fake_model.requests) == 2


@pytest.mark.parametrize("provider", PROVIDERS)
def test_connection_resets_past_the_last_retry_are_a_retryable_503(provider_app, fake_model, provider):
    client = provider_app(provider, LLM_MAX_RETRIES=1)
    conversation_id = _conversation(client)
    fake_model.drop_next(count=2)

    failed = _say(client, conversation_id)

    _assert_retryable_failure(client, conversation_id, failed, fake_model, 503, "model_unavailable")
    assert _say(client, conversation_id).status_code == 200


def test_an_attempt_that_times_out_is_retried(provider_app, fake_model):
    client = provider_app("anthropic", LLM_TIMEOUT_SECONDS=1, LLM_TOTAL_TIMEOUT_SECONDS=20, LLM_MAX_RETRIES=1)
    conversation_id = _conversation(client)
    fake_model.delay_next(5)  # the first attempt's read times out after 1 s; the second is answered at once

    started = time.monotonic()
    response = _say(client, conversation_id)

    assert response.status_code == 200
    assert len(fake_model.requests) == 2
    assert time.monotonic() - started < 4.5
    assert [m["role"] for m in _log(client, conversation_id)] == ["user", "assistant"]


def test_attempts_that_all_time_out_are_a_retryable_504(provider_app, fake_model):
    client = provider_app("openai", LLM_TIMEOUT_SECONDS=1, LLM_TOTAL_TIMEOUT_SECONDS=20, LLM_MAX_RETRIES=1)
    conversation_id = _conversation(client)
    fake_model.delay_next(5, count=2)

    failed = _say(client, conversation_id)

    _assert_retryable_failure(client, conversation_id, failed, fake_model, 504, "model_timeout")


def test_retries_without_a_retry_after_until_the_provider_answers(provider_app, fake_model):
    """The backoff's wait itself is measured in test_the_retry_after_cap_does_not_shorten_the_backoff."""
    client = provider_app("anthropic", LLM_MAX_RETRIES=2)
    conversation_id = _conversation(client)
    fake_model.fail_next(529, count=2)

    response = _say(client, conversation_id)

    assert response.status_code == 200
    assert len(fake_model.requests) == 3


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    ("upstream_status", "status", "error"),
    [(429, 503, "model_unavailable"), (503, 503, "model_unavailable"), (529, 503, "model_unavailable"), (500, 502, "model_error")],
)
def test_exhausted_retries_answer_a_retryable_5xx_with_the_providers_retry_after(
    provider_app, fake_model, provider, upstream_status, status, error
):
    client = provider_app(provider, LLM_MAX_RETRIES=1)
    conversation_id = _conversation(client)
    fake_model.fail_next(upstream_status, count=2, headers={"retry-after": "1"})

    failed = _say(client, conversation_id)

    _assert_retryable_failure(client, conversation_id, failed, fake_model, status, error)
    assert failed.headers["Retry-After"] == "1"
    # The lease was given back: the next turn works at once.
    assert _say(client, conversation_id).status_code == 200


def test_a_retry_after_of_zero_is_passed_on_as_zero(provider_app, fake_model):
    client = provider_app("anthropic", LLM_MAX_RETRIES=1)
    conversation_id = _conversation(client)
    fake_model.fail_next(429, count=2, headers={"retry-after": "0"})

    failed = _say(client, conversation_id)

    assert failed.status_code == 503 and failed.json["retryable"] is True
    assert failed.headers["Retry-After"] == "0"
    assert len(fake_model.requests) == 2


def test_bedrock_without_aws_credentials_is_a_retryable_503_kept_like_other_model_errors(
    provider_app, fake_model, no_aws_credentials, request
):
    from anthropic.lib.aws._auth import _get_session  # the SDK keeps one boto3 session per region and keys

    _get_session.cache_clear()
    request.addfinalizer(_get_session.cache_clear)
    client = provider_app("bedrock", LLM_MAX_RETRIES=1)
    conversation_id = _conversation(client)
    body = {"conversation_id": conversation_id, "message": "hi"}

    failed = client.post("/chat", json=body, headers={"Idempotency-Key": "unsigned"})
    replayed = client.post("/chat", json=body, headers={"Idempotency-Key": "unsigned"})

    assert failed.status_code == 503 and failed.json["error"] == "model_unavailable"
    assert failed.json["retryable"] is True and "AWS credentials" in failed.json["message"]
    assert replayed.status_code == 503 and replayed.headers["Idempotent-Replayed"] == "true"
    assert fake_model.requests == []  # nothing unsigned was sent
    assert _log(client, conversation_id) == []


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_a_providers_own_timeout_is_a_504(provider_app, fake_model, provider):
    client = provider_app(provider)
    conversation_id = _conversation(client)
    fake_model.fail_next(504)

    failed = _say(client, conversation_id)

    assert failed.status_code == 504 and failed.json["error"] == "model_timeout"
    assert failed.json["retryable"] is True
    assert _say(client, conversation_id).status_code == 200


@pytest.mark.parametrize("upstream_status", [400, 401, 404])
def test_a_request_the_provider_refuses_is_not_retried(provider_app, fake_model, upstream_status):
    """Not retried, and a wait the provider sent is not passed on: the same request would fail again."""
    client = provider_app("openai", LLM_MAX_RETRIES=2)
    conversation_id = _conversation(client)
    fake_model.fail_next(upstream_status, headers={"retry-after": "5"})

    failed = _say(client, conversation_id)

    assert failed.status_code == 502
    assert failed.json["retryable"] is False
    assert "Retry-After" not in failed.headers
    assert len(fake_model.requests) == 1


def test_a_retry_after_past_the_deadline_is_passed_on_instead_of_waited_for(provider_app, fake_model):
    client = provider_app("anthropic", LLM_MAX_RETRIES=3, LLM_TOTAL_TIMEOUT_SECONDS=3, LLM_RETRY_AFTER_MAX_SECONDS=60)
    conversation_id = _conversation(client)
    fake_model.fail_next(429, count=4, headers={"retry-after": "15"})

    started = time.monotonic()
    failed = _say(client, conversation_id)
    waited = time.monotonic() - started

    assert failed.status_code == 503
    assert failed.headers["Retry-After"] == "15"
    assert failed.json["retryable"] is True
    assert len(fake_model.requests) == 1
    assert waited < 3  # not the 15 s the provider asked for


def test_a_retry_after_past_the_deadline_is_passed_on_even_when_the_cap_is_shorter(provider_app, fake_model):
    client = provider_app("anthropic", LLM_MAX_RETRIES=3, LLM_TOTAL_TIMEOUT_SECONDS=5, LLM_RETRY_AFTER_MAX_SECONDS=0.2)
    conversation_id = _conversation(client)
    fake_model.fail_next(529, count=4, headers={"retry-after": "15"})

    failed = _say(client, conversation_id)

    assert failed.status_code == 503
    assert failed.headers["Retry-After"] == "15"
    assert len(fake_model.requests) == 1  # no retry 0.2 s later, before the 15 s the provider asked for


def test_an_honoured_retry_after_is_capped(provider_app, fake_model):
    client = provider_app("anthropic", LLM_MAX_RETRIES=1, LLM_RETRY_AFTER_MAX_SECONDS=0.2)
    conversation_id = _conversation(client)
    fake_model.fail_next(429, headers={"retry-after": "30"})

    started = time.monotonic()
    response = _say(client, conversation_id)

    assert response.status_code == 200
    assert len(fake_model.requests) == 2
    assert time.monotonic() - started < 5  # waited the 0.2 s cap, not 30 s


def test_the_retry_after_cap_does_not_shorten_the_backoff(provider_app, fake_model):
    client = provider_app("anthropic", LLM_MAX_RETRIES=4, LLM_RETRY_AFTER_MAX_SECONDS=0)
    conversation_id = _conversation(client)
    fake_model.fail_next(500, count=4)  # no Retry-After: the backoff (0.5, 1, 2, 4 s at most, with jitter)

    started = time.monotonic()
    response = _say(client, conversation_id)

    assert response.status_code == 200
    assert len(fake_model.requests) == 5
    # Four waits of full jitter add up to under 0.2 s about once in 60,000 runs; with no wait at all, always.
    assert time.monotonic() - started > 0.2


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_a_reply_that_trickles_in_ends_at_the_total_deadline(provider_app, fake_model, provider):
    client = provider_app(provider, LLM_TIMEOUT_SECONDS=2, LLM_TOTAL_TIMEOUT_SECONDS=2.5, LLM_MAX_RETRIES=2)
    conversation_id = _conversation(client)
    fake_model.drip_next(bytes_per_second=10)  # a whole reply takes over 30 s this way

    started = time.monotonic()
    failed = _say(client, conversation_id)
    waited = time.monotonic() - started

    assert failed.status_code == 504
    assert failed.json["error"] == "model_timeout"
    assert "LLM_TOTAL_TIMEOUT_SECONDS" in failed.json["message"]
    assert waited < 6
    assert _log(client, conversation_id) == []
    assert _say(client, conversation_id).status_code == 200


def test_a_read_waiting_when_the_deadline_passes_is_stopped_at_the_deadline(provider_app, fake_model):
    """Each read may wait the read timeout as it was when the call began (here 2.5 s): a byte comes at 2 s,
    the next read would wait to 4.5 s and the next byte comes at 4 s. The deadline (2.5 s) stops it."""
    client = provider_app("anthropic", LLM_TIMEOUT_SECONDS=4, LLM_TOTAL_TIMEOUT_SECONDS=2.5)
    conversation_id = _conversation(client)
    fake_model.drip_next(bytes_per_second=0.5)

    started = time.monotonic()
    failed = _say(client, conversation_id)
    waited = time.monotonic() - started

    assert failed.status_code == 504 and failed.json["error"] == "model_timeout"
    assert waited < 3.5  # not the 4 s of the second byte
    assert _log(client, conversation_id) == []


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_a_stream_cut_at_the_deadline_ends_as_a_timeout(provider_app, fake_model, provider):
    """The fake's stream ends when its connection closes, so the cut reads as the body's end: still a timeout."""
    client = provider_app(provider, LLM_TIMEOUT_SECONDS=10, LLM_TOTAL_TIMEOUT_SECONDS=1.5)
    conversation_id = _conversation(client)
    fake_model.stream_interval = 1.0

    started = time.monotonic()
    streamed = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi there, how are you", "stream": True})
    last = _last_event(streamed)

    assert time.monotonic() - started < 4
    assert last.startswith("event: error\n"), last
    assert json.loads(last.partition("data: ")[2])["error"] == "model_timeout"


def test_a_silent_provider_is_a_504_within_the_total_deadline(provider_app, fake_model):
    client = provider_app("anthropic", LLM_TIMEOUT_SECONDS=30, LLM_TOTAL_TIMEOUT_SECONDS=1.5)
    conversation_id = _conversation(client)
    fake_model.delay_next(10)

    started = time.monotonic()
    failed = _say(client, conversation_id)

    assert failed.status_code == 504
    assert time.monotonic() - started < 5
    assert _log(client, conversation_id) == []


NOT_A_REPLY = {
    "a list": b"[1, 2]",
    "no fields": b'{"type": "message"}',
    "no usage": b'{"id": "msg_1", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "hi"}]}',
    "not JSON": b"<html>gateway</html>",
}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("body", NOT_A_REPLY.values(), ids=NOT_A_REPLY.keys())
def test_a_200_that_is_not_a_reply_is_a_retryable_502(provider_app, fake_model, provider, body):
    client = provider_app(provider, LLM_MAX_RETRIES=2)
    conversation_id = _conversation(client)
    fake_model.answer_raw_next(body)

    failed = _say(client, conversation_id)

    assert failed.status_code == 502, failed.json
    assert (failed.json["error"], failed.json["retryable"]) == ("model_error", True)
    unreadable = f"the {provider} model's reply could not be read"
    assert failed.json["message"] == unreadable or (provider == "openai" and failed.json["message"] == "the openai model returned no choices")
    assert len(fake_model.requests) == 1
    assert _log(client, conversation_id) == []
    assert _say(client, conversation_id).status_code == 200


def _message(**fields):
    return json.dumps({"model": "m", "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
                       "usage": {"input_tokens": 3, "output_tokens": 1}, **fields}).encode()


def _completion(**fields):
    return json.dumps({"model": "m", "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 1}, **fields}).encode()


# Replies that parse as JSON but whose fields are not what they must be.
BAD_FIELDS = {
    "tokens as text": (_message(usage={"input_tokens": "many", "output_tokens": 1}),
                       _completion(usage={"prompt_tokens": "many", "completion_tokens": 1})),
    "negative tokens": (_message(usage={"input_tokens": 3, "output_tokens": -1}),
                        _completion(usage={"prompt_tokens": 3, "completion_tokens": -1})),
    "tokens beyond a count": (_message(usage={"input_tokens": 2**53, "output_tokens": 1}),
                              _completion(usage={"prompt_tokens": 2**53, "completion_tokens": 1})),
    "tokens beyond a count, read as a float": (_message(usage={"input_tokens": 2**64, "output_tokens": 1}),
                                              _completion(usage={"prompt_tokens": 1e300, "completion_tokens": 1})),
    "tokens as a fraction": (_message(usage={"input_tokens": 3.5, "output_tokens": 1}),
                             _completion(usage={"prompt_tokens": 3.5, "completion_tokens": 1})),
    "tokens as a boolean": (_message(usage={"input_tokens": True, "output_tokens": 1}),
                            _completion(usage={"prompt_tokens": True, "completion_tokens": 1})),
    "model not text": (_message(model=7), _completion(model=["m"])),
    "stop reason not text": (_message(stop_reason=["end_turn"]), _completion(choices=[{"message": {"content": "hi"}, "finish_reason": 1}])),
    "blocks not objects": (_message(content=["hi"]), _completion(choices=["hi"])),
}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("bodies", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_a_reply_with_a_field_of_the_wrong_kind_is_a_retryable_502(provider_app, fake_model, provider, bodies):
    client = provider_app(provider, LLM_MAX_RETRIES=2)
    conversation_id = _conversation(client)
    fake_model.answer_raw_next(bodies[1] if provider == "openai" else bodies[0])

    failed = _say(client, conversation_id)

    assert failed.status_code == 502, failed.json
    assert failed.json == {"error": "model_error", "message": f"the {provider} model's reply could not be read", "retryable": True}
    assert _log(client, conversation_id) == []
    assert _say(client, conversation_id).status_code == 200


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_well_formed_reply_read_as_json_gives_its_text_and_usage(provider_app, fake_model, provider):
    client = provider_app(provider)
    conversation_id = _conversation(client)
    body = _completion(usage={"prompt_tokens": 41.0, "completion_tokens": 2**53 - 1}) if provider == "openai" else _message(
        content=[{"type": "text", "text": "one "}, {"type": "thinking", "thinking": "x"}, {"type": "text", "text": "two"}],
        usage={"input_tokens": 41.0, "output_tokens": 2**53 - 1})
    fake_model.answer_raw_next(body)

    answered = _say(client, conversation_id)

    assert answered.status_code == 200, answered.json
    assert answered.json["reply"] == ("hi" if provider == "openai" else "one two")
    assert answered.json["usage"] == {"input_tokens": 41, "output_tokens": 2**53 - 1}
    assert answered.json["model"] == "m"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_reply_without_a_model_name_is_read_as_the_configured_model(provider_app, fake_model, provider):
    client = provider_app(provider)
    conversation_id = _conversation(client)
    fake_model.answer_raw_next(_completion(model=None) if provider == "openai" else _message(model=None))

    answered = _say(client, conversation_id)

    assert answered.status_code == 200, answered.json
    assert answered.json["model"] == client.application.config["LLM_MODEL"]


NOT_AN_EVENT = {
    "anthropic": b'{"type": "message_start", "message": {}}',
    "openai": b'{"object": "chat.completion.chunk", "choices": [{}]}',
    "not JSON": b"<html>gateway</html>",
    "nested too deep": b'{"type": "ping", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.parametrize(("provider", "event"), [("anthropic", NOT_AN_EVENT["anthropic"]), ("openai", NOT_AN_EVENT["openai"]),
                                                 ("anthropic", NOT_AN_EVENT["not JSON"]), ("openai", NOT_AN_EVENT["not JSON"]),
                                                 ("anthropic", NOT_AN_EVENT["nested too deep"]),
                                                 ("openai", NOT_AN_EVENT["nested too deep"])])
def test_a_stream_event_that_is_not_an_event_ends_the_stream_with_a_model_error(provider_app, fake_model, provider, event):
    client = provider_app(provider)
    conversation_id = _conversation(client)
    fake_model.answer_raw_next(b"event: message_start\ndata: " + event + b"\n\n", content_type="text/event-stream")

    streamed = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi", "stream": True})

    assert streamed.status_code == 200
    last = _last_event(streamed)
    assert last.startswith("event: error\n")
    assert json.loads(last.partition("data: ")[2]) == {
        "error": "model_error", "message": f"the {provider} model's reply could not be read", "retryable": True}
    assert _log(client, conversation_id) == []
    assert _say(client, conversation_id).status_code == 200


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_reply_with_a_lone_surrogate_is_stored_with_a_question_mark(provider_app, fake_model, provider):
    client = provider_app(provider)
    conversation_id = _conversation(client)
    text = "bad \\ud800 text"  # the escape as it stands in the JSON: a UTF-16 half with no other
    body = _completion(choices=[{"message": {"content": "X"}, "finish_reason": "stop"}]) if provider == "openai" else _message(
        content=[{"type": "text", "text": "X"}])
    fake_model.answer_raw_next(body.replace(b'"X"', b'"' + text.encode() + b'"'))

    answered = _say(client, conversation_id)

    assert answered.status_code == 200, answered.json
    assert answered.json["reply"] == "bad ? text"
    assert [m["content"] for m in _log(client, conversation_id)] == ["hi", "bad ? text"]


def _events(*events):
    return b"".join(b"event: " + event["type"].encode() + b"\ndata: " + json.dumps(event).encode() + b"\n\n" for event in events)


def _chunks(*chunks):
    return b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n"


def _stream(provider, input_tokens=3, text="hi", stop="end_turn"):
    if provider == "openai":
        return _chunks({"object": "chat.completion.chunk", "model": "m", "choices": [{"index": 0, "delta": {"content": text}}]},
                       {"object": "chat.completion.chunk", "model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": stop}]},
                       {"object": "chat.completion.chunk", "model": "m", "choices": [],
                        "usage": {"prompt_tokens": input_tokens, "completion_tokens": 1}})
    return _events({"type": "message_start", "message": {"model": "m", "usage": {"input_tokens": input_tokens}}},
                   {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
                   {"type": "message_delta", "delta": {"stop_reason": stop}, "usage": {"output_tokens": 1}},
                   {"type": "message_stop"})


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
@pytest.mark.parametrize("field", [{"input_tokens": "many"}, {"input_tokens": -1}, {"text": 5}, {"stop": 1}],
                         ids=["tokens as text", "negative tokens", "text not text", "stop reason not text"])
def test_a_stream_with_a_field_of_the_wrong_kind_ends_with_a_model_error(provider_app, fake_model, provider, field):
    client = provider_app(provider)
    conversation_id = _conversation(client)
    fake_model.answer_raw_next(_stream(provider, **field), content_type="text/event-stream")

    streamed = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi", "stream": True})

    assert streamed.status_code == 200
    last = _last_event(streamed)
    assert last.startswith("event: error\n"), last
    assert json.loads(last.partition("data: ")[2]) == {
        "error": "model_error", "message": f"the {provider} model's reply could not be read", "retryable": True}
    assert _log(client, conversation_id) == []
    fake_model.answer_raw_next(_stream(provider), content_type="text/event-stream")
    streamed = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi", "stream": True})
    assert "event: done" in streamed.get_data(as_text=True)
    assert [message["content"] for message in _log(client, conversation_id)] == ["hi", "hi"]


@pytest.mark.parametrize(
    "retry_after", ["nan", "inf", "-inf", "1e400", "soon", "-5", "-0.5", "Mon, 01 Jan 99999999999 00:00:00 GMT"]
)
def test_a_retry_after_that_is_not_a_wait_counts_as_none(provider_app, fake_model, retry_after):
    client = provider_app("anthropic", LLM_MAX_RETRIES=1)
    conversation_id = _conversation(client)
    fake_model.fail_next(529, count=2, headers={"retry-after": retry_after})

    failed = _say(client, conversation_id)

    assert failed.status_code == 503 and failed.json["error"] == "model_unavailable"
    assert "Retry-After" not in failed.headers
    assert len(fake_model.requests) == 2  # retried after the backoff
    assert _say(client, conversation_id).status_code == 200


@pytest.mark.parametrize("milliseconds", ["abc", "nan", "-1"])
def test_a_retry_after_ms_that_is_not_a_wait_leaves_the_retry_after(provider_app, fake_model, milliseconds):
    client = provider_app("anthropic", LLM_MAX_RETRIES=0)
    conversation_id = _conversation(client)
    fake_model.fail_next(429, headers={"retry-after-ms": milliseconds, "retry-after": "7"})

    failed = _say(client, conversation_id)

    assert failed.status_code == 503 and failed.headers["Retry-After"] == "7"


def test_retry_after_ms_comes_before_retry_after(provider_app, fake_model):
    """As the SDKs read them: the finer wait wins."""
    client = provider_app("anthropic", LLM_MAX_RETRIES=0)
    conversation_id = _conversation(client)
    fake_model.fail_next(429, headers={"retry-after-ms": "2500", "retry-after": "30"})

    failed = _say(client, conversation_id)

    assert failed.status_code == 503 and failed.headers["Retry-After"] == "3"


@pytest.mark.parametrize(("offset", "passed_on", "calls"), [(-3600, "0", 2), (2 * 86_400, "86400", 1)])
def test_a_retry_after_date_counts_from_now(provider_app, fake_model, offset, passed_on, calls):
    """A date already past means now (the backoff is used, 0 is passed on); one two days ahead, a day."""
    client = provider_app("anthropic", LLM_MAX_RETRIES=1)
    conversation_id = _conversation(client)
    fake_model.fail_next(529, count=2, headers={"retry-after": formatdate(time.time() + offset, usegmt=True)})

    failed = _say(client, conversation_id)

    assert failed.status_code == 503 and failed.headers["Retry-After"] == passed_on
    assert len(fake_model.requests) == calls


def test_a_retry_after_beyond_a_day_is_passed_on_as_a_day(provider_app, fake_model):
    client = provider_app("anthropic", LLM_MAX_RETRIES=1)
    conversation_id = _conversation(client)
    fake_model.fail_next(429, headers={"retry-after": "1e300"})

    failed = _say(client, conversation_id)

    assert failed.status_code == 503 and failed.headers["Retry-After"] == "86400"
    assert len(fake_model.requests) == 1  # a day is past the deadline: answered at once


def test_a_stream_that_stalls_names_both_timeouts(provider_app, fake_model):
    """A read that waited LLM_TIMEOUT_SECONDS ends the stream as the total deadline does; the message names both."""
    client = provider_app("anthropic", LLM_TIMEOUT_SECONDS=0.5, LLM_TOTAL_TIMEOUT_SECONDS=30)
    conversation_id = _conversation(client)
    fake_model.stream_interval = 2

    started = time.monotonic()
    streamed = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi", "stream": True})
    last = _last_event(streamed)

    assert time.monotonic() - started < 10
    assert last.startswith("event: error\n"), last
    error = json.loads(last.partition("data: ")[2])
    assert (error["error"], error["retryable"]) == ("model_timeout", True)
    assert "LLM_TIMEOUT_SECONDS without a byte" in error["message"] and "LLM_TOTAL_TIMEOUT_SECONDS" in error["message"]
    assert _log(client, conversation_id) == []


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_streamed_turn_whose_error_body_breaks_off_is_retried(provider_app, fake_model, provider):
    """A stream's error body is read after the request, outside the SDK's own error handling: cut short, it is still a retry."""
    client = provider_app(provider, LLM_MAX_RETRIES=1)
    conversation_id = _conversation(client)
    fake_model.answer_raw_next(b'{"type": "error", "error": {"type": "overlo', status=529, length=200)

    streamed = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi", "stream": True})

    assert streamed.status_code == 200
    assert _last_event(streamed).startswith("event: done\n")
    assert len(fake_model.requests) == 2
    assert [m["role"] for m in _log(client, conversation_id)] == ["user", "assistant"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_streamed_error_bodies_that_break_off_past_the_last_retry_are_a_retryable_503(provider_app, fake_model, provider):
    client = provider_app(provider, LLM_MAX_RETRIES=1)
    conversation_id = _conversation(client)
    fake_model.answer_raw_next(b'{"type": "error", "error": {"type": "overlo', status=529, length=200, count=2)

    failed = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi", "stream": True})

    _assert_retryable_failure(client, conversation_id, failed, fake_model, 503, "model_unavailable")
    assert _say(client, conversation_id).status_code == 200


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_a_stream_whose_connection_breaks_after_its_first_words_ends_as_broken_off(provider_app, fake_model, provider):
    """The same error event from both SDKs, though openai's wraps the transport's error in its own."""
    client = provider_app(provider, LLM_MAX_RETRIES=2)
    conversation_id = _conversation(client)
    whole = _stream(provider)
    fake_model.answer_raw_next(whole[: whole.index(b"\n\n", whole.index(b'"hi"')) + 2], content_type="text/event-stream",
                               length=len(whole))

    streamed = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi", "stream": True})

    last = _last_event(streamed)
    assert last.startswith("event: error\n"), last
    assert json.loads(last.partition("data: ")[2]) == {
        "error": "model_error", "message": f"the {provider} model's stream broke off", "retryable": True}
    assert len(fake_model.requests) == 1


@pytest.mark.parametrize("upstream_status", [408, 409, 502, 503, 504, 520, 521, 522, 523, 524])
def test_the_other_passing_failures_are_retried_too(provider_app, fake_model, upstream_status):
    """The README's list: 408, 409, 429, 500, 502, 503, 504, 520 to 524 (a CDN's) and 529 are retried."""
    client = provider_app("anthropic", LLM_MAX_RETRIES=1)
    conversation_id = _conversation(client)
    fake_model.fail_next(upstream_status, headers={"retry-after": "0"})

    response = _say(client, conversation_id)

    assert response.status_code == 200
    assert len(fake_model.requests) == 2


def test_a_providers_504_passes_on_its_retry_after(provider_app, fake_model):
    client = provider_app("anthropic", LLM_MAX_RETRIES=1)
    conversation_id = _conversation(client)
    fake_model.fail_next(504, count=2, headers={"retry-after": "1"})

    failed = _say(client, conversation_id)

    _assert_retryable_failure(client, conversation_id, failed, fake_model, 504, "model_timeout")
    assert failed.headers["Retry-After"] == "1"


def test_the_backoff_doubles_from_half_a_second_up_to_eight(monkeypatch):
    import llm

    spans = []
    monkeypatch.setattr(llm.random, "uniform", lambda low, high: spans.append((low, high)) or 0.0)
    for retries in range(6):
        llm._backoff(retries)
    assert spans == [(0, 0.5), (0, 1.0), (0, 2.0), (0, 4.0), (0, 8.0), (0, 8.0)]
