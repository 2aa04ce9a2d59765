"""Real anthropic and openai SDKs against a local server speaking their wire protocol."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

import llm
from config import load_config
from main import create_app
from tests.conftest import client_with_key
from tests.seaweed import free_ports

SYSTEM = "You are a customer-service agent."


def _conversation(client) -> str:
    response = client.post("/new_chat", json={"user_id": "u-1", "system_prompt": SYSTEM})
    return response.json["conversation_id"]


def _log(client, conversation_id: str) -> list[dict]:
    return client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json["messages"]


def test_anthropic_provider_sends_system_and_history(provider_app, fake_model):
    client = provider_app("anthropic", LLM_MAX_TOKENS=321, LLM_TEMPERATURE=0.2)
    conversation_id = _conversation(client)

    client.post("/chat", json={"conversation_id": conversation_id, "message": "first"})
    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "second"})

    assert response.status_code == 200
    assert response.json["reply"] == "reply to: second"
    request = fake_model.requests[-1]
    assert request.path == "/v1/messages"
    assert "sk-ant-test" in (request.headers.get("x-api-key"), request.headers.get("authorization", "").removeprefix("Bearer "))
    assert request.body["system"] == SYSTEM
    assert request.body["model"] == "anthropic-test-model"
    assert (request.body["max_tokens"], request.body["temperature"]) == (321, 0.2)
    assert [m["content"] for m in request.body["messages"]] == ["first", "reply to: first", "second"]
    assert response.json["usage"]["output_tokens"] > 0


def test_bedrock_provider_signs_requests_and_uses_invoke(provider_app, fake_model):
    client = provider_app("bedrock")
    conversation_id = _conversation(client)

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "hello bedrock"})

    assert response.status_code == 200
    assert response.json["reply"] == "reply to: hello bedrock"
    request = fake_model.requests[-1]
    assert request.path == "/model/bedrock-test-model/invoke"
    assert request.headers["authorization"].startswith("AWS4-HMAC-SHA256")
    assert request.body["system"] == SYSTEM
    assert "anthropic_version" in request.body


def test_openai_provider_puts_system_first(provider_app, fake_model):
    client = provider_app("openai")
    conversation_id = _conversation(client)

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "hello openai"})

    assert response.status_code == 200
    assert response.json["reply"] == "reply to: hello openai"
    request = fake_model.requests[-1]
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-openai-test"
    assert request.body["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "hello openai"},
    ]
    assert response.json["usage"]["input_tokens"] > 0


@pytest.mark.parametrize("provider", ["anthropic", "bedrock", "openai"])
def test_text_beyond_ascii_and_the_temperature_reach_the_provider_as_sent(provider_app, fake_model, provider):
    # Direct requests are encoded by orjson (UTF-8 as is), Bedrock's by the SDK (escaped): both must arrive intact.
    client = provider_app(provider, LLM_TEMPERATURE=0.7)
    conversation_id = _conversation(client)
    message = "Grüße, 中文 ✓ \"quoted\" \\ and an emoji 🚀"

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": message})

    assert response.status_code == 200
    assert response.json["reply"] == f"reply to: {message}"
    request = fake_model.requests[-1]
    assert request.headers["content-type"] == "application/json"
    assert request.body["messages"][-1] == {"role": "user", "content": message}
    assert request.body["temperature"] == 0.7
    assert "stream" not in request.body or request.body["stream"] is False
    assert [m["content"] for m in _log(client, conversation_id)] == [message, f"reply to: {message}"]


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
@pytest.mark.parametrize(
    ("upstream_status", "status", "error"),
    [
        (500, 502, "model_error"),
        (400, 502, "model_error"),
        (401, 502, "model_error"),
        (429, 503, "model_unavailable"),
        (503, 503, "model_unavailable"),
        (529, 503, "model_unavailable"),
    ],
)
def test_provider_errors_map_to_5xx_and_store_nothing(provider_app, fake_model, provider, upstream_status, status, error):
    client = provider_app(provider)
    conversation_id = _conversation(client)
    fake_model.fail_next(upstream_status)

    failed = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi"})
    retried = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi"})

    assert failed.status_code == status
    assert failed.json["error"] == error
    assert "Traceback" not in failed.get_data(as_text=True)
    assert retried.status_code == 200
    assert [(m["seq"], m["role"]) for m in _log(client, conversation_id)] == [(1, "user"), (2, "assistant")]


def test_provider_timeout_is_504(provider_app, fake_model):
    client = provider_app("anthropic", LLM_TIMEOUT_SECONDS=0.5)
    conversation_id = _conversation(client)
    fake_model.delay_next(2)

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi"})

    assert response.status_code == 504
    assert response.json["error"] == "model_timeout"
    assert _log(client, conversation_id) == []


def test_unreachable_provider_is_503(provider_app, keys, monkeypatch):
    app = provider_app("anthropic").application
    monkeypatch.setenv("ANTHROPIC_BASE_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    client = client_with_key(create_app({**app.config, "LLM_PROVIDER": "anthropic"}), keys["client_a"])
    conversation_id = _conversation(client)

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi"})

    assert response.status_code == 503
    assert response.json["error"] == "model_unavailable"


def test_echo_is_default_without_keys(app_config, keys):
    config = {key: value for key, value in app_config.items() if not key.startswith("LLM_")}
    client = client_with_key(create_app(config), keys["client_a"])
    conversation_id = _conversation(client)

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "ping"})

    assert response.json["model"] == "echo"
    assert "not a real LLM" in response.json["reply"]


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_empty_reply_is_502_and_not_stored(provider_app, fake_model, provider, caplog):
    client = provider_app(provider)
    conversation_id = _conversation(client)
    fake_model.reply_override = "   "

    with caplog.at_level(logging.WARNING, logger="parley"):
        response = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi"})

    assert response.status_code == 502
    assert "empty reply" in response.json["message"]
    assert _log(client, conversation_id) == []
    # The operator's line says what was wrong, as the client's answer does (not "NoneType").
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("model provider failed")] == [
        f"model provider failed: model_error (the {provider} model returned an empty reply)"
    ]


def test_nul_in_a_reply_is_removed_before_storing(provider_app, fake_model):
    client = provider_app("anthropic")
    conversation_id = _conversation(client)
    fake_model.reply_override = "split\x00reply"

    response = client.post("/chat", json={"conversation_id": conversation_id, "message": "hi"})

    assert response.status_code == 200
    assert response.json["reply"] == "splitreply"
    assert _log(client, conversation_id)[1]["content"] == "splitreply"


def test_the_model_connection_pool_is_as_large_as_the_connections_a_worker_carries():
    client = llm._http_client({"WORKER_CONNECTIONS": 48, "LLM_TIMEOUT_SECONDS": 5.0})
    pools = client._transport._pools  # DeadlineTransport's shards, each an httpx transport over an httpcore pool

    assert sum(pool._pool._max_connections for pool in pools) == 48


@pytest.mark.parametrize(("provider", "loaded"), [("echo", []), ("anthropic", ["anthropic"]), ("openai", ["openai"])])
def test_a_process_imports_only_the_model_sdk_its_provider_needs(provider, loaded):
    """Each SDK takes seconds to import: a `parley` command or the echo model pays for none."""
    code = (
        "import sys, cli, main, llm; from config import load_config; "
        f"llm.make_model(load_config({{'LLM_PROVIDER': '{provider}', 'LLM_MODEL': 'm'}})); "
        "print(sorted(name for name in ('anthropic', 'openai') if name in sys.modules))"
    )
    env = {**os.environ, "ANTHROPIC_API_KEY": "sk-ant-test", "OPENAI_API_KEY": "sk-test"}
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, env=env,
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr(loaded)


@pytest.mark.parametrize("limit", [5, 20])
def test_the_model_connections_of_a_process_are_as_many_as_worker_connections(fake_model, monkeypatch, limit):
    """The pools the requests are spread over share WORKER_CONNECTIONS exactly (not rounded up to their number)."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_model.base_url)
    model = llm.make_model(load_config({"LLM_PROVIDER": "anthropic", "LLM_MODEL": "claude-test", "WORKER_CONNECTIONS": str(limit)}))
    fake_model.latency = 0.5  # after gathering: the time for requests beyond the limit to arrive too
    fake_model.peak_in_flight = 0
    fake_model.gather(limit, within=10)

    with ThreadPoolExecutor(max_workers=2 * limit) as pool:
        replies = list(pool.map(lambda n: model.reply(None, [{"role": "user", "content": f"hi {n}"}]), range(2 * limit)))

    assert [reply.text for reply in replies] == [f"reply to: hi {n}" for n in range(2 * limit)]
    assert fake_model.peak_in_flight == limit


def test_a_request_waits_for_a_model_connection_only_when_every_pool_is_full(fake_model, monkeypatch):
    """One reply trickling in holds a connection of one of the 16 pools (one connection each):
    the next 16 requests, one after another, go to pools with a connection free."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_model.base_url)
    config = load_config({"LLM_PROVIDER": "anthropic", "LLM_MODEL": "claude-test", "WORKER_CONNECTIONS": "16",
                          "LLM_TIMEOUT_SECONDS": "3", "LLM_MAX_RETRIES": "0"})
    model = llm.make_model(config)
    transport = model.client._client._transport  # the SDK's httpx client's DeadlineTransport
    fake_model.drip_next(40)
    slow = threading.Thread(target=lambda: model.reply(None, [{"role": "user", "content": "slow " * 40}]))
    slow.start()
    deadline = time.monotonic() + 10
    while fake_model.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)

    waits = []
    for n in range(16):
        started = time.monotonic()
        model.reply(None, [{"role": "user", "content": f"hi {n}"}])
        waits.append(time.monotonic() - started)
    with model.client.messages.stream(model="claude-test", max_tokens=10, messages=[{"role": "user", "content": "s"}]) as stream:
        streamed = "".join(stream.text_stream)
    slow.join()

    assert max(waits) < 2  # none waited for the busy pool's one connection (3 s, then a timeout)
    assert streamed == "reply to: s"
    assert transport._free == [1] * 16  # every connection given back, the streamed one too


class _ClientLeaves:
    """SDK stream events, then the client goes away (the stream is closed) before the rest."""

    def __init__(self, events: list) -> None:
        self.events = events
        self.stream = None

    def __iter__(self):
        yield from self.events
        self.stream.close()
        yield SimpleNamespace(type="ping")

    def close(self) -> None:
        pass


def _anthropic_events_until_left(*arguments: str, text: str = "One moment. ") -> llm.ReplyStream:
    events = [
        SimpleNamespace(type="message_start", message=SimpleNamespace(model="m", usage=SimpleNamespace(input_tokens=3))),
        SimpleNamespace(type="content_block_delta", index=0, delta=SimpleNamespace(type="text_delta", text=text)),
        SimpleNamespace(type="content_block_start", index=1, content_block=SimpleNamespace(type="tool_use", name="request_human")),
        *(SimpleNamespace(type="content_block_delta", index=1, delta=SimpleNamespace(type="input_json_delta", partial_json=piece))
          for piece in arguments),
    ]
    source = _ClientLeaves(events)
    stream = llm._SDKStream("anthropic", "m", source, llm._read_anthropic_event)
    source.stream = stream
    assert list(stream) == ([text] if text else [])
    return stream


@pytest.mark.parametrize(("arguments", "reason"), [
    (['{"reason": "a ref'], llm.DEFAULT_HANDOFF_REASON),
    (['{"reason": ', '"a refund"}'], "a refund"),
])
def test_a_stream_left_once_the_request_human_call_began_is_a_handoff(arguments, reason):
    stream = _anthropic_events_until_left(*arguments)

    partial = stream.partial_reply()

    assert stream.reply is None
    assert (partial.text, partial.handoff_reason, partial.incomplete) == ("One moment. ", reason, True)


def test_a_stream_left_before_any_words_or_call_keeps_nothing():
    events = [SimpleNamespace(type="message_start", message=SimpleNamespace(model="m", usage=SimpleNamespace(input_tokens=3)))]
    source = _ClientLeaves(events)
    stream = llm._SDKStream("anthropic", "m", source, llm._read_anthropic_event)
    source.stream = stream

    assert list(stream) == []
    assert stream.partial_reply() is None
    assert _anthropic_events_until_left('{"reason": "x"}', text="").partial_reply().handoff_reason == "x"


def test_tool_arguments_nested_too_deep_read_as_none():
    assert llm._arguments("[" * 100_000 + "]" * 100_000) == {}


def test_closing_a_stream_that_waits_to_start_again_stops_it_at_once(fake_model, monkeypatch):
    """The client left while its stream, failed before its reply began, waits out a Retry-After to start again."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_model.base_url)
    model = llm.make_model(load_config({"LLM_PROVIDER": "anthropic", "LLM_MODEL": "claude-test", "LLM_MAX_RETRIES": "5"}))
    fake_model.fail_stream_next(after_frames=0)
    stream = model.stream(None, [{"role": "user", "content": "hi"}])
    fake_model.fail_next(429, headers={"retry-after": "5"})  # the second start's answer
    reader = threading.Thread(target=_drain, args=(stream,))
    reader.start()
    deadline = time.monotonic() + 10
    while len(fake_model.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # into the 5 s wait

    stream.close()
    reader.join(1.0)

    assert len(fake_model.requests) == 2
    assert not reader.is_alive()
    time.sleep(0.3)
    assert len(fake_model.requests) == 2


def _drain(stream) -> None:
    try:
        for _ in stream:
            pass
    except llm.ModelError:
        pass  # what the stream's reader would put in a queue nobody reads
