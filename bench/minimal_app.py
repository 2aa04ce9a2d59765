"""The baseline for the hot-path benchmark: the least a persisting turn can do.

It parses the JSON body and, in one transaction, updates the conversation
row (claiming two sequence numbers) and inserts two message rows, on
Parley's own schema and engine settings. No auth, no model, no context.

    gunicorn -c gunicorn.conf.py "bench.minimal_app:create_app()"
"""
from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone

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

    @app.post("/chat")
    def chat():
        body = request.get_json()
        cid, message, now = uuid.UUID(body["conversation_id"]), body["message"], datetime.now(timezone.utc)
        with engine.begin() as connection:
            last = connection.execute(_CLAIM, {"cid": cid, "now": now}).scalar_one()
            connection.execute(
                _INSERT,
                [
                    {"cid": cid, "seq": last - 1, "role": "user", "content": message, "now": now, "tokens": 1},
                    {"cid": cid, "seq": last, "role": "assistant", "content": "ok: " + message, "now": now, "tokens": 1},
                ],
            )
        return {"conversation_id": str(cid), "reply": "ok: " + message, "seq": last}

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app
