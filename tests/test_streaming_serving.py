"""Streamed replies through the production server (gunicorn, gevent workers), over real sockets."""
from __future__ import annotations

import http.client
import json

from tests.test_serving import serve  # noqa: F401 - the fixture that starts gunicorn
from tests.test_streaming import wait_for


def open_stream(server, conversation_id: str, message: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"conversation_id": conversation_id, "message": message})
    headers = {"Authorization": f"Bearer {server.key}", "Content-Type": "application/json", "Accept": "text/event-stream"}
    connection.request("POST", "/chat", body=body, headers=headers)
    return connection, connection.getresponse()


def test_a_client_that_disconnects_stops_the_upstream_stream_at_once(serve, fake_model):  # noqa: F811
    server = serve()
    conversation_id = server.new_chat()
    fake_model.reply_override = " ".join(f"word{n}" for n in range(300))
    fake_model.stream_interval = 0.05

    connection, response = open_stream(server, conversation_id, "a long story")
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    assert response.getheader("Cache-Control") == "no-cache" and response.getheader("X-Accel-Buffering") == "no"
    deltas = 0
    while deltas < 3:
        line = response.readline()
        assert line, "the stream ended before three deltas"
        deltas += line.startswith(b"event: delta")
    connection.sock.close()  # the client goes away mid-stream
    response.close()

    assert wait_for(lambda: fake_model.streams_closed_early == 1, seconds=20)
    assert fake_model.streams_completed == 0 and fake_model.early_close_frames[0] < 60  # of 300-odd frames
    status, detail, _ = server.request("GET", f"/get_conversation?conversation_id={conversation_id}")
    assert status == 200
    reply = detail["messages"][-1]
    assert reply["role"] == "assistant" and reply["incomplete"] is True
    assert reply["content"].startswith("word0 word1 word2") and len(reply["content"]) < len(fake_model.reply_override)
    fake_model.stream_interval = 0.0
    assert server.chat(conversation_id, "and now?") == 200  # the lease was released


def test_heartbeats_keep_a_silent_stream_open(serve, fake_model):  # noqa: F811
    server = serve(STREAM_HEARTBEAT_SECONDS="0.2")
    conversation_id = server.new_chat()
    fake_model.stream_interval = 0.6

    connection, response = open_stream(server, conversation_id, "take your time")
    raw = response.read().decode()
    connection.close()

    assert ": heartbeat\n\n" in raw
    assert raw.rstrip().splitlines()[-2] == "event: done"
