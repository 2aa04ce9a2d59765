"""Whole stories on PostgreSQL + SeaweedFS with the real anthropic SDK."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from conversation_memory import estimate_tokens
from main import create_app
from tests.conftest import client_with_key

pytestmark = pytest.mark.parametrize("backend", ["postgres"])

AGENTS = {
    "support": ("You are a customer-service agent for Acme Broadband.", ["My router blinks red.", "I restarted it.", "Still red."]),
    "membership": ("You are a membership adviser for the City Gym.", ["What plans exist?", "Is there a student rate?", "Sign me up."]),
}


@pytest.fixture
def claude_app(app_config, keys, fake_model, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_model.base_url)
    app = create_app({**app_config, "LLM_PROVIDER": "anthropic", "LLM_MODEL": "claude-test", "LLM_MAX_RETRIES": 0})
    yield app
    app.extensions["parley.engine"].dispose()


def test_two_assistants_at_once_are_kept_apart_and_archived_exactly(claude_app, keys, fake_model, s3_server):
    client = client_with_key(claude_app, keys["client_a"])
    ids = {
        name: client.post("/new_chat", json={"user_id": f"user-{name}", "conversation_name": name, "system_prompt": prompt}).json[
            "conversation_id"
        ]
        for name, (prompt, _) in AGENTS.items()
    }

    def converse(name: str) -> None:
        worker = client_with_key(claude_app, keys["client_a"])
        for message in AGENTS[name][1]:
            assert worker.post("/chat", json={"conversation_id": ids[name], "message": message}).status_code == 200

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(converse, AGENTS))

    for name, (prompt, messages) in AGENTS.items():
        sent = [r.body for r in fake_model.requests if r.body.get("system") == prompt]
        assert len(sent) == 3
        assert all(m["content"] in messages or m["content"].startswith("reply to:") for r in sent for m in r["messages"])
        live = client.get("/get_conversation", query_string={"conversation_id": ids[name]}).json
        assert [m["content"] for m in live["messages"][::2]] == messages

        ended = client.post("/end_chat", json={"conversation_id": ids[name]}).json
        bucket, _, prefix = claude_app.config["ARCHIVE_URL"].removeprefix("s3://").partition("/")
        key = f"{prefix}/{ended['s3_file_location']}"
        stored = json.loads(s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read())
        assert stored["messages"] == live["messages"]
        assert stored["conversation"]["system_prompt"] == prompt
        assert client.get("/get_conversation", query_string={"conversation_id": ids[name]}).json["messages"] == live["messages"]


def test_500_turns_stay_within_a_small_budget(claude_app, keys, fake_model):
    budget = 300
    claude_app.config["CONTEXT_MAX_TOKENS"] = budget
    client = client_with_key(claude_app, keys["client_a"])
    system = "You are terse."
    conversation_id = client.post("/new_chat", json={"user_id": "marathon", "system_prompt": system}).json["conversation_id"]

    for turn in range(500):
        response = client.post("/chat", json={"conversation_id": conversation_id, "message": f"turn {turn}: " + "blah " * (turn % 7)})
        assert response.status_code == 200, response.json

    requests = fake_model.requests
    sizes = [estimate_tokens(system) + sum(estimate_tokens(m["content"]) for m in r.body["messages"]) for r in requests]
    counts = [len(r.body["messages"]) for r in requests]
    print(f"\n500 turns, budget {budget}: context tokens {min(sizes)}-{max(sizes)}, messages per request {min(counts)}-{max(counts)}")
    assert len(requests) == 500
    assert all(r.body["messages"][0]["role"] == "user" for r in requests)
    assert max(sizes) <= budget
    assert max(counts) < 100
    log = client.get("/get_conversation", query_string={"conversation_id": conversation_id}).json
    assert len(log["messages"]) == 1_000
    assert log["messages"][-2]["content"].startswith("turn 499:")
