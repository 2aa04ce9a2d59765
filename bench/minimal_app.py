"""The baseline for the hot-path benchmark: the least a persisting turn can do.

It parses the JSON body and, in one transaction, updates the conversation
row (claiming two sequence numbers) and inserts two message rows, on
Parley's own schema and engine settings. No auth, no model, no context.

    gunicorn -c gunicorn.conf.py "bench.minimal_app:create_app()"

With `MINIMAL_MODEL_URL` set, each turn first asks Claude at that URL through
the anthropic SDK, before the transaction, for the reply it stores: one
message, no context, in the cheapest way Parley knows (`Anthropic.post`, the
body encoded by orjson, the reply read as JSON; see `llm.AnthropicModel`).
That is the least any turn that reaches Claude through the SDK can cost: the
hot path measures it beside Parley's (`bench/hot_path.py`).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

import orjson
from flask import Flask, request
from sqlalchemy import text

from database_utils import make_engine

_CLAIM = text(
    "UPDATE conversations SET message_count = message_count + 2, updated_at = :now "
    "WHERE conversation_id = :cid RETURNING message_count"
)
_INSERT = text(
    "INSERT INTO messages (conversation_id, seq, role, content, created_at, token_count) "
    "VALUES (:cid, :seq, :role, :content, :now, :tokens)"
)


def create_app() -> Flask:
    app = Flask(__name__)
    engine = make_engine(os.environ["DATABASE_URL"])
    answer = _claude(os.environ["MINIMAL_MODEL_URL"]) if os.environ.get("MINIMAL_MODEL_URL") else None

    @app.post("/chat")
    def chat():
        body = request.get_json()
        cid, message = uuid.UUID(body["conversation_id"]), body["message"]
        reply = answer(message) if answer else "ok: " + message
        now = datetime.now(timezone.utc)
        with engine.begin() as connection:
            last = connection.execute(_CLAIM, {"cid": cid, "now": now}).scalar_one()
            connection.execute(
                _INSERT,
                [
                    {"cid": cid, "seq": last - 1, "role": "user", "content": message, "now": now, "tokens": 1},
                    {"cid": cid, "seq": last, "role": "assistant", "content": reply, "now": now, "tokens": 1},
                ],
            )
        return {"conversation_id": str(cid), "reply": reply, "seq": last}

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app


def _claude(base_url: str) -> Callable[[str], str]:
    import anthropic
    import httpx2

    client = anthropic.Anthropic(api_key="sk-bench", base_url=base_url, max_retries=0, http_client=httpx2.Client(timeout=60))

    def answer(message: str) -> str:
        body = {"model": "claude-bench", "max_tokens": 1024, "messages": [{"role": "user", "content": message}]}
        reply = orjson.loads(client.post("/v1/messages", content=orjson.dumps(body), cast_to=bytes))
        return "".join(block["text"] for block in reply["content"] if block["type"] == "text")

    return answer
