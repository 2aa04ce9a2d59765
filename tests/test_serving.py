"""The production server: gunicorn with the repository's config, as the README runs it.

Each test starts `gunicorn -c gunicorn.conf.py "main:create_app()"` in a
subprocess, against the test database, with the model provider pointed at
the local fake model server.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from auth import create_key
from config import load_config
from database_utils import Conversation, get_session, list_messages
from main import create_app
from tests.pdfs import pdf_with_text
from tests.seaweed import free_ports

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = str(Path(sys.executable).parent / "gunicorn")


class Server:
    """A running gunicorn, its port, its log, and a client key."""

    def __init__(self, process: subprocess.Popen, port: int, log: Path, key: str) -> None:
        self.process, self.port, self.log, self.key = process, port, log, key

    def request(self, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            payload = json.dumps(body) if body is not None else None
            sent = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json", **(headers or {})}
            connection.request(method, path, body=payload, headers=sent)
            response = connection.getresponse()
            raw = response.read()
            data = json.loads(raw) if response.getheader("Content-Type", "").startswith("application/json") else {"text": raw.decode()}
            return response.status, data, dict(response.getheaders())
        finally:
            connection.close()

    def new_chat(self) -> str:
        return self.request("POST", "/new_chat", {"user_id": "serving"})[1]["conversation_id"]

    def chat(self, conversation_id: str, message: str) -> int:
        return self.request("POST", "/chat", {"conversation_id": conversation_id, "message": message})[0]


@pytest.fixture
def serve(app_config, fake_model, tmp_path) -> Iterator:
    """Start gunicorn with the production command and the given environment."""
    started: list[subprocess.Popen] = []

    def start(**env: str) -> Server:
        with create_app(app_config).app_context():
            key = create_key(get_session(), "client", "serving")[1]
        port = free_ports(1)[0]
        log = tmp_path / f"gunicorn-{port}.log"
        environment = {
            **os.environ,
            "DATABASE_URL": app_config["DATABASE_URL"],
            "ARCHIVE_URL": app_config["ARCHIVE_URL"],
            "S3_ENDPOINT_URL": app_config.get("S3_ENDPOINT_URL") or "",
            "LLM_PROVIDER": "anthropic",
            "ANTHROPIC_API_KEY": "sk-ant-test",
            "ANTHROPIC_BASE_URL": fake_model.base_url,
            "RATELIMIT_ENABLED": "false",
            "RATE_LIMIT": "100000 per minute",
            "PORT": str(port),
            "BIND": f"127.0.0.1:{port}",
            "WEB_CONCURRENCY": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / f"metrics-{port}"),
            **env,
        }
        handle = open(log, "wb")  # noqa: SIM115 - kept open for the server's life
        process = subprocess.Popen(
            [GUNICORN, "-c", "gunicorn.conf.py", "main:create_app()"], cwd=ROOT, env=environment, stdout=handle, stderr=handle
        )
        handle.close()
        started.append(process)
        server = Server(process, port, log, key)
        deadline = time.monotonic() + 60
        while True:
            try:
                if server.request("GET", "/healthz")[0] == 200:
                    return server
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.parametrize(("backend", "clients"), [("postgres", 60), ("embedded", 20)])
def test_one_worker_carries_many_turns_waiting_on_the_model_at_once(serve, fake_model, clients):
    """`make run` (the embedded default) serves concurrent turns the same way as production."""
    server = serve()

    statuses = _turns_at_once(server, fake_model, clients)

    assert statuses == [200] * clients
    assert fake_model.peak_in_flight == clients  # all waited on the model together, in one worker


def test_worker_connections_on_the_command_line_size_the_model_pool_too(serve, fake_model):
    """WORKER_CONNECTIONS says 16, the command line 24: 24 turns wait on the model together."""
    clients = 24
    server = serve(WORKER_CONNECTIONS="16", GUNICORN_CMD_ARGS=f"--worker-connections {clients}")

    statuses = _turns_at_once(server, fake_model, clients)

    assert statuses == [200] * clients
    assert fake_model.peak_in_flight == clients


def test_a_sync_worker_serves_too(serve):
    """WORKER_CLASS=sync (allowed, though not for production): its workers boot and answer a turn."""
    server = serve(WORKER_CLASS="sync")

    conversation_id = server.new_chat()

    assert server.chat(conversation_id, "hello") == 200


def _turns_at_once(server: Server, fake_model, clients: int) -> list[int]:
    """`clients` turns, each on its own conversation, sent together to a model that answers
    once all of them wait on it (or after 30 s, when they cannot all be carried at once)."""
    conversations = [server.new_chat() for _ in range(clients)]
    deadline = time.monotonic() + 10
    while fake_model.in_flight and time.monotonic() < deadline:  # requests of earlier tests leaving
        time.sleep(0.05)
    fake_model.peak_in_flight = 0
    fake_model.gather(clients, within=30)
    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(lambda c: server.chat(c, "hello"), conversations))


@pytest.mark.parametrize("backend", ["postgres"])
@pytest.mark.parametrize("preload", [False, True], ids=["", "preload"])
def test_metrics_add_up_across_workers(serve, preload):
    server = serve(WEB_CONCURRENCY="2", GUNICORN_CMD_ARGS="--preload" if preload else "")
    # Each worker adds its pool (DB_POOL_SIZE) once it has loaded the app: wait for both.
    pool, deadline = 0.0, time.monotonic() + 60
    while pool < 2 * load_config()["DB_POOL_SIZE"] and time.monotonic() < deadline:
        pool = _sample(server.request("GET", "/metrics")[1]["text"], "parley_db_pool_size ")
        time.sleep(0.2)
    for _ in range(30):
        server.new_chat()

    status, page, _ = server.request("GET", "/metrics")
    counted = _sample(page["text"], "parley_http_requests_total{", 'route="/new_chat"')

    assert status == 200
    assert pool == 2 * load_config()["DB_POOL_SIZE"]  # the two live workers' pools, summed
    assert counted == 30


@pytest.mark.parametrize("backend", ["embedded"])
def test_metrics_read_while_a_worker_makes_its_sample_file_are_answered(serve, tmp_path):
    """A worker starting makes its file empty, then sizes it: a scrape between the two is still a 200."""
    server = serve()
    server.chat(server.new_chat(), "hi")
    (tmp_path / f"metrics-{server.port}" / "counter_999999.db").write_bytes(b"")

    status, body, _ = server.request("GET", "/metrics")

    assert status == 200, body
    assert 'parley_http_requests_total{method="POST",route="/chat",status="200"} 1.0' in body["text"].splitlines()


@pytest.mark.parametrize("backend", ["postgres"])
@pytest.mark.parametrize("preload", [False, True], ids=["", "preload"])
def test_readyz_answers_at_once_on_a_gevent_worker(serve, preload):
    """With --preload the app is made in the master, before gevent patches the worker: the
    checks' threads must still be the worker's greenlets, not block its loop."""
    server = serve(GUNICORN_CMD_ARGS="--preload" if preload else "")
    timings = []
    for _ in range(3):
        started = time.monotonic()
        status, body, _ = server.request("GET", "/readyz")
        timings.append((status, body.get("checks"), time.monotonic() - started < 2))

    assert timings == [(200, {"database": "ok", "archive": "ok"}, True)] * 3
    assert "WORKER TIMEOUT" not in server.log.read_text()


@pytest.mark.parametrize("backend", ["postgres"])
@pytest.mark.parametrize("preload", [False, True], ids=["", "preload"])
def test_a_statement_waiting_on_a_lock_lets_the_worker_go_on_serving(serve, app_config, preload):
    """psycopg picks how it waits when it is imported: with --preload that is in the master, before
    gevent patches the worker, and a wait that blocked the whole worker would stall every turn."""
    server = serve(GUNICORN_CMD_ARGS="--preload" if preload else "")
    conversation_id = server.new_chat()
    engine = create_engine(app_config["DATABASE_URL"])
    holder, monitor = engine.connect(), engine.connect()
    holder.execute(text("SELECT 1 FROM conversations WHERE conversation_id = :c FOR UPDATE"), {"c": uuid.UUID(conversation_id)})
    waiting: list[int] = []
    turn = threading.Thread(target=lambda: waiting.append(server.chat(conversation_id, "hi")))
    turn.start()
    try:
        deadline = time.monotonic() + 30
        while not monitor.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                       "AND datname = current_database()")).scalar():
            monitor.rollback()  # statistics are a snapshot per transaction
            assert time.monotonic() < deadline, "the turn never waited on the lock"
            time.sleep(0.05)
        started = time.monotonic()
        status = server.request("GET", "/healthz")[0]
        took = time.monotonic() - started
    finally:
        holder.rollback()
        turn.join(60)
        holder.close()
        monitor.close()
        engine.dispose()

    assert (status, took < 1) == (200, True), took
    assert waiting == [200]


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_large_pdf_is_parsed_while_the_worker_goes_on_serving(serve, app_config):
    """Seconds of CPU in pypdf run on a native thread: the gevent worker answers meanwhile."""
    server = serve()
    with create_app(app_config).app_context():
        staff_key = create_key(get_session(), "staff", "knowledge loader")[1]
    document = pdf_with_text(*[f"page {n} of the returns guide " * 3 for n in range(6000)])
    uploaded = {}
    loader = threading.Thread(target=lambda: uploaded.setdefault("answer", _upload_pdf(server, staff_key, document)))
    loader.start()
    waits = []
    while loader.is_alive():
        started = time.monotonic()
        assert server.request("GET", "/healthz")[0] == 200
        waits.append(time.monotonic() - started)
        time.sleep(0.02)
    loader.join()
    broken = _upload_pdf(server, staff_key, b"%PDF-1.4 broken")

    assert uploaded["answer"][0] == 201, uploaded
    assert uploaded["answer"][1]["passage_count"] > 100
    assert len(waits) > 10  # the parse took a while: long enough to have been blocking
    assert max(waits) < 1.0, sorted(waits)[-5:]  # without the thread: one wait of the whole parse (2.8 s here)
    # A refused PDF is one log line, as elsewhere: no traceback printed from gevent's thread pool.
    assert broken[0] == 400 and broken[1]["error"] == "invalid_document"
    assert "Traceback" not in server.log.read_text()


def _upload_pdf(server: Server, key: str, document: bytes) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="guide.pdf"\r\n'
            f"Content-Type: application/pdf\r\n\r\n").encode() + document + f"\r\n--{boundary}--\r\n".encode()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        connection.request("POST", "/knowledge/documents", body=body, headers={
            "Authorization": f"Bearer {key}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _sample(exposition: str, prefix: str, *labels: str) -> float:
    """The sum of the samples whose line starts with `prefix` and has every label."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line.startswith(prefix) and all(label in line for label in labels)
    )


def test_sigterm_lets_a_turn_in_flight_finish_and_stores_it_whole(serve, fake_model, app_config):
    server = serve()
    conversation_id = server.new_chat()
    fake_model.delay_next(2.0)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("status", server.chat(conversation_id, "finish me")))
    thread.start()
    deadline = time.monotonic() + 10
    while fake_model.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)

    server.process.send_signal(signal.SIGTERM)
    thread.join()
    exit_code = server.process.wait(timeout=30)

    assert result["status"] == 200
    assert exit_code == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1)
    with create_app(app_config).app_context():
        session = get_session()
        stored = [(m.seq, m.role, m.content) for m in list_messages(session, uuid.UUID(conversation_id))]
        conversation = session.get(Conversation, uuid.UUID(conversation_id))
        assert stored == [(1, "user", "finish me"), (2, "assistant", "reply to: finish me")]
        assert (conversation.message_count, conversation.turn_lease_id) == (2, None)


def test_a_turn_sent_after_sigterm_on_a_kept_alive_connection_is_refused_not_cut(serve, fake_model, app_config):
    """gunicorn answers a request that began before SIGTERM with keep-alive, then reads the next
    one on that connection and runs it in what is left of the graceful time: a turn begun then
    could be killed half done (found by a probe: a 38 s turn after a 38 s one, 70 s graceful)."""
    server = serve()
    first, second = server.new_chat(), server.new_chat()
    fake_model.delay_next(2.0)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"}
    try:
        connection.request("POST", "/chat", body=json.dumps({"conversation_id": first, "message": "before"}), headers=headers)
        deadline = time.monotonic() + 10
        while fake_model.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        answered = connection.getresponse()
        answered.read()
        connection.request("POST", "/chat", body=json.dumps({"conversation_id": second, "message": "after"}), headers=headers)
        refused = connection.getresponse()
        body = json.loads(refused.read())
    finally:
        connection.close()
    exit_code = server.process.wait(timeout=30)

    assert answered.status == 200
    assert refused.status == 503 and body["error"] == "shutting_down", body
    assert refused.getheader("Retry-After") == "1" and refused.getheader("Connection") == "close"
    assert exit_code == 0
    with create_app(app_config).app_context():
        session = get_session()
        assert [m.content for m in list_messages(session, uuid.UUID(first))] == ["before", "reply to: before"]
        assert list_messages(session, uuid.UUID(second)) == []
        assert session.get(Conversation, uuid.UUID(second)).turn_lease_id is None


def test_workers_killed_at_the_graceful_timeout_are_named_in_the_log(serve, fake_model):
    """gunicorn kills the workers left at the graceful timeout with at most "Perhaps out of memory?"; the master says why."""
    server = serve(GRACEFUL_TIMEOUT="1")
    conversation_id = server.new_chat()
    fake_model.delay_next(5.0)
    outcome = []

    def cut_turn() -> None:
        try:
            outcome.append(server.chat(conversation_id, "too slow"))
        except OSError as exc:  # the connection dropped without an answer
            outcome.append(exc.__class__.__name__)

    thread = threading.Thread(target=cut_turn, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while fake_model.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake_model.in_flight == 1

    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=30)
    thread.join(timeout=10)

    assert outcome == ["RemoteDisconnected"]
    log = server.log.read_text()
    assert re.search(r"the graceful timeout \(1 s\) ran out: killing 1 worker\(s\) that had not finished \(pid \d+\); "
                     r"requests still running there are cut", log), log[-2000:]


def test_a_server_whose_turns_finished_in_time_says_nothing_of_killing(serve):
    server = serve(GRACEFUL_TIMEOUT="5")
    assert server.chat(server.new_chat(), "quick") == 200

    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=30)

    assert "ran out" not in server.log.read_text()


def test_a_refused_large_body_does_not_break_the_connection(serve):
    """413 on a keep-alive connection: the next request on it is answered, or the server closes it cleanly."""
    server = serve()
    body = b'{"user_id": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
            head = (
                f"POST /new_chat HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            sender = threading.Thread(target=_send_quietly, args=(connection, head + body))
            sender.start()
            first = _read_response(connection)
            sender.join()
            assert first.startswith(b"HTTP/1.1 413")
            assert b'"payload_too_large"' in first
            closing = b"connection: close" in first.lower()
            _send_quietly(connection, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            second = _read_response(connection)
            assert second.startswith(b"HTTP/1.1 200") or (closing and second == b"")


@pytest.mark.parametrize("backend", ["embedded"])
def test_a_chunked_body_over_the_limit_is_413_and_one_of_the_limit_is_taken(serve):
    """A body sent in chunks has no Content-Length to check up front; it is measured as it is read."""
    server = serve(MAX_CONTENT_LENGTH="2000")
    answers = []
    for size in (2000, 2001, 300 * 1024):
        shell = json.dumps({"user_id": "chunked", "metadata": {"note": ""}}).encode()
        body = shell.replace(b'""', b'"' + b"x" * (size - len(shell)) + b'"')
        assert len(body) == size
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.request("POST", "/new_chat", body=iter([body[: size // 2], body[size // 2 :]]), encode_chunked=True, headers={
            "Authorization": f"Bearer {server.key}", "Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        response = connection.getresponse()
        answers.append((response.status, json.loads(response.read())))
        connection.close()

    (created, opened), *refused = answers
    assert created == 201 and opened["user_id"] == "chunked"
    assert [(status, error["error"]) for status, error in refused] == [(413, "payload_too_large")] * 2
    assert refused[0][1]["message"] == "the request body is larger than 2000 bytes"


@pytest.mark.parametrize("backend", ["embedded"])
def test_a_chunked_body_with_broken_framing_is_a_400_and_the_connection_closes(serve):
    """gunicorn reads the chunks as Parley reads the body: its complaint is the client's error, not a 500."""
    server = serve()
    conversation_id = server.new_chat()
    answers = []
    for route, chunks in [
        ("/new_chat", b"zz\r\nabc\r\n0\r\n\r\n"),  # a chunk size that is not hex
        ("/chat", b"-5\r\nabcde\r\n0\r\n\r\n"),  # a negative one
        ("/end_chat", b"2\r\n{}xx\r\n0\r\n\r\n"),  # more data than its size
    ]:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
            connection.sendall((
                f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.key}\r\n"
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode() + chunks)
            answer = _read_response(connection)
            after = connection.recv(1)  # the server closes: where a next request would start is unknown
        head, _, body = answer.partition(b"\r\n\r\n")
        answers.append((head.split(b" ")[1], json.loads(body)["error"], after))

    assert answers == [(b"400", "bad_request", b"")] * 3
    assert server.chat(conversation_id, "after") == 200


def _send_raw(port: int, head: str, body: bytes, close_after: bool = False) -> tuple[bytes, dict]:
    """Send a request as these bytes (closing the sending side after them, if asked); its status and JSON body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head.encode() + body)
        if close_after:
            connection.shutdown(socket.SHUT_WR)
        answer = _read_response(connection)
    status_line, _, rest = answer.partition(b"\r\n")
    return status_line.split(b" ")[1], json.loads(rest.partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize("backend", ["embedded"])
def test_a_chunked_body_on_a_route_whose_body_is_optional_is_checked_as_json(serve, app_config):
    """/claim and /release take no body or a JSON one; sent in chunks, a body has no Content-Length to say it is there."""
    server = serve()
    conversation_id = server.new_chat()
    assert server.request("POST", f"/conversations/{conversation_id}/handoff", {"reason": "a person, please"})[0] == 200
    with create_app(app_config).app_context():
        staff = create_key(get_session(), "staff", "chunked")[1]

    def chunked(route: str, content_type: str, chunks: bytes) -> tuple[bytes, dict]:
        head = (f"POST /conversations/{conversation_id}/{route} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {staff}\r\n"
                f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        return _send_raw(server.port, head, chunks)

    not_json = chunked("claim", "text/plain", b"10\r\nthis is not json\r\n0\r\n\r\n")
    broken = chunked("claim", "application/json", b"9\r\n{\"note\": \r\n0\r\n\r\n")
    conversation = server.request("GET", f"/get_conversation?conversation_id={conversation_id}", headers={
        "Authorization": f"Bearer {staff}"})[1]
    empty = chunked("claim", "application/json", b"0\r\n\r\n")

    assert [(status, body["error"]) for status, body in (not_json, broken)] == [(b"400", "bad_request")] * 2
    assert conversation["handoff"] == "needs_human"  # neither was taken as a claim
    assert (empty[0], empty[1]["handoff"]) == (b"200", "human")


@pytest.mark.parametrize("backend", ["embedded"])
def test_a_body_cut_short_of_its_content_length_is_refused_and_runs_no_turn(serve, app_config):
    """The server reads a body to the end of the stream: a client gone before all of it was sent is not a request,
    also on /claim, whose body may be left out (here none of it came)."""
    server = serve()
    conversation_id = server.new_chat()
    body = json.dumps({"conversation_id": conversation_id, "message": "hello"}).encode()
    head = (f"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body) + 50}\r\n\r\n")
    handed_off = server.request("POST", f"/conversations/{conversation_id}/handoff", {"reason": "a person, please"})[0]
    with create_app(app_config).app_context():
        staff = create_key(get_session(), "staff", "cut short")[1]
    claim = (f"POST /conversations/{conversation_id}/claim HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {staff}\r\n"
             "Content-Type: application/json\r\nContent-Length: 35\r\n\r\n")

    status, error = _send_raw(server.port, head, body, close_after=True)
    claim_status, claim_error = _send_raw(server.port, claim, b"", close_after=True)
    conversation = server.request("GET", f"/get_conversation?conversation_id={conversation_id}")[1]

    assert (status, error["error"]) == (b"400", "bad_request"), error
    assert "Content-Length" in error["message"]
    assert (handed_off, claim_status, claim_error["error"]) == (200, b"400", "bad_request"), claim_error
    assert conversation["messages"] == [] and conversation["handoff"] == "needs_human"


@pytest.mark.parametrize("backend", ["embedded"])
def test_a_ten_mebibyte_upload_passes_gunicorn_and_one_byte_more_is_413(serve):
    """gunicorn's limit_request_* bound the request line and headers only; the body limit is Parley's."""
    server = serve()
    conversation_id = server.new_chat()
    answers = []
    for size in (10 * 1024 * 1024, 10 * 1024 * 1024 + 1):
        boundary = "parley-test-boundary"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\n'
            f"Content-Type: text/plain\r\n\r\n"
        ).encode() + b"a" * size + f"\r\n--{boundary}--\r\n".encode()
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.request("POST", f"/conversations/{conversation_id}/files", body=body, headers={
            "Authorization": f"Bearer {server.key}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = connection.getresponse()
        answers.append((response.status, json.loads(response.read())))
        connection.close()

    (created, stored), (refused, error) = answers
    assert created == 201 and stored["size"] == 10 * 1024 * 1024, stored
    assert refused == 413 and error["error"] == "payload_too_large"


def test_what_gunicorn_refuses_is_answered_in_json(serve):
    server = serve()

    status, body, headers = server.request("GET", "/get_conversation?conversation_id=" + "a" * 10_000)
    metrics = server.request("GET", "/metrics")[1]["text"]

    server.process.terminate()
    server.process.wait(timeout=30)
    logged = [json.loads(line) for line in server.log.read_text().splitlines()]

    assert status == 414
    assert headers["Content-Type"] == "application/json"
    assert re.fullmatch("[0-9a-f]{32}", headers["X-Request-ID"])
    assert body["error"] == "uri_too_long"
    assert [line["message"] for line in logged if line.get("request_id") == headers["X-Request-ID"]] == [
        "gunicorn answered: 414 URI Too Long"]
    assert 'parley_http_requests_total{method="other",route="unmatched",status="414"} 1.0' in metrics


def test_two_idempotency_keys_on_one_request_are_refused(serve):
    """gunicorn joins the two headers with a comma: Parley refuses the result instead of taking it for one key."""
    server = serve()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"user_id": "two-keys"}).encode()
    connection.putrequest("POST", "/new_chat")
    for name, value in [("Authorization", f"Bearer {server.key}"), ("Content-Type", "application/json"),
                        ("Content-Length", str(len(body))), ("Idempotency-Key", "k1"), ("Idempotency-Key", "k2")]:
        connection.putheader(name, value)
    connection.endheaders(body)
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()

    assert response.status == 400
    assert "Idempotency-Key" in answer["message"]


@pytest.mark.parametrize("settings", [{}, {"GUNICORN_CMD_ARGS": "--preload"}, {"LOG_FORMAT": " "}],
                         ids=["", "preload", "empty LOG_FORMAT"])
def test_log_lines_are_json_with_the_request_id(serve, settings):
    """With --preload, gevent warns in each worker that it patched ssl after the app imported it: a JSON line too.
    An empty LOG_FORMAT is its default, json, for gunicorn's lines as for Parley's."""
    server = serve(**settings)

    _, _, headers = server.request("POST", "/new_chat", {"user_id": "traced"}, {"X-Request-ID": "serving-trace-1"})
    server.process.terminate()
    server.process.wait(timeout=30)
    lines = [json.loads(line) for line in server.log.read_text().splitlines()]  # every line, gunicorn's too

    assert [line["message"] for line in lines if line["name"] == "gunicorn.error"][-1] == "Shutting down: Master"
    assert headers["X-Request-ID"] == "serving-trace-1"
    logged = [line for line in lines if line.get("request_id") == "serving-trace-1" and line["message"] == "request"]
    assert logged and logged[0]["path"] == "/new_chat" and logged[0]["status"] == 201


@pytest.mark.parametrize("backend", ["embedded"])
def test_a_client_that_expects_100_continue_gets_the_413_after_sending_its_body(serve):
    """gunicorn answers `Expect: 100-continue` before Parley sees the request (README, files' limits)."""
    server = serve(MAX_CONTENT_LENGTH="2000")
    body = json.dumps({"user_id": "x" * 3000}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall((
            f"POST /new_chat HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
        ).encode())
        interim = b""
        while b"\r\n\r\n" not in interim:
            interim += connection.recv(65536)
        interim, _, rest = interim.partition(b"\r\n\r\n")
        _send_quietly(connection, body)
        refused = _read_response(connection, rest)
        small = json.dumps({"user_id": "after"}).encode()
        connection.sendall((
            f"POST /new_chat HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(small)}\r\n\r\n"
        ).encode() + small)
        created = _read_response(connection)

    assert interim == b"HTTP/1.1 100 Continue"
    assert refused.startswith(b"HTTP/1.1 413") and b'"payload_too_large"' in refused
    assert created.startswith(b"HTTP/1.1 201") and b'"user_id":"after"' in created


@pytest.mark.parametrize("backend", ["embedded"])
@pytest.mark.parametrize("preload", [False, True], ids=["", "preload"])
def test_the_metrics_directory_the_server_made_goes_when_it_stops(serve, tmp_path, preload):
    """With --preload the app (and prometheus-client) loads in the master, before any server hook runs."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    server = serve(PROMETHEUS_MULTIPROC_DIR="", TMPDIR=str(temporary), GUNICORN_CMD_ARGS="--preload" if preload else "")
    server.new_chat()
    status, body, _ = server.request("GET", "/metrics")
    made = list(temporary.glob("parley-metrics-*"))
    samples = sorted(path.name for path in made[0].iterdir()) if made else []

    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=60)

    assert status == 200 and 'route="/new_chat"' in body["text"]
    assert len(made) == 1 and samples, samples
    assert list(temporary.glob("parley-metrics-*")) == []


@pytest.mark.parametrize("backend", ["embedded"])
@pytest.mark.parametrize("named", [True, False], ids=["named directory", "made directory"])
def test_metrics_work_on_after_an_upgrade_with_usr2(serve, tmp_path, named):
    """gunicorn's upgrade in place: USR2 starts a new master beside the old, then the old one is stopped.

    A named PROMETHEUS_MULTIPROC_DIR is shared by both generations and keeps
    its counts; a directory each master made is its own, and the old one goes
    with the old master.
    """
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    server = serve(**({} if named else {"PROMETHEUS_MULTIPROC_DIR": ""}), TMPDIR=str(temporary))
    for _ in range(3):
        server.new_chat()

    server.process.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 60
    while server.log.read_text().count("Worker ready") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    new_master = int(re.findall(r"Listening at: \S+ \((\d+)\)", server.log.read_text())[-1])
    assert new_master != server.process.pid, server.log.read_text()[-3000:]  # the new master started
    try:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=60)
        server.new_chat()
        status, page, _ = server.request("GET", "/metrics")
    finally:
        os.kill(new_master, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while any(temporary.glob("parley-metrics-*")) and time.monotonic() < deadline:
        time.sleep(0.1)

    assert new_master != server.process.pid
    assert status == 200
    assert _sample(page["text"], "parley_http_requests_total{", 'route="/new_chat"') == (4 if named else 1)
    assert list(temporary.glob("parley-metrics-*")) == []


@pytest.mark.parametrize(("setting", "said"), [
    ({"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY='0' must be a whole number from 1 to 512"),
    ({"WEB_CONCURRENCY": "100000"}, "WEB_CONCURRENCY='100000' must be a whole number from 1 to 512"),
    ({"WORKER_CONNECTIONS": "0"}, "WORKER_CONNECTIONS='0' must be a whole number from 1 to 100000"),
    ({"WORKER_CONNECTIONS": "many"}, "WORKER_CONNECTIONS='many' must be a whole number from 1 to 100000"),
    ({"WORKER_CONNECTIONS": "99999999999999999999"},
     "WORKER_CONNECTIONS='99999999999999999999' must be a whole number from 1 to 100000"),
    ({"BIND": "127.0.0.1:99999"}, "BIND='127.0.0.1:99999': a port must be from 0 to 65535"),
    ({"BIND": "", "PORT": "-1"}, "PORT='-1': a port must be from 0 to 65535"),
    ({"WORKER_TIMEOUT": "1.5"}, "WORKER_TIMEOUT='1.5' must be a whole number of at least 0"),
    ({"GRACEFUL_TIMEOUT": "-1"}, "GRACEFUL_TIMEOUT='-1' must be a whole number of at least 0"),
    ({"KEEPALIVE": "x"}, "KEEPALIVE='x' must be a whole number of at least 0"),
    ({"LLM_TOTAL_TIMEOUT_SECONDS": "nan"}, "LLM_TOTAL_TIMEOUT_SECONDS='nan' is not a valid number"),
])
def test_a_server_setting_it_cannot_use_stops_gunicorn_with_one_line(tmp_path, setting, said):
    environment = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"), **setting}

    done = subprocess.run([GUNICORN, "-c", "gunicorn.conf.py", "--print-config", "main:create_app()"],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)

    assert done.returncode == 1
    assert done.stderr == f"Error: {said}\n"


@pytest.mark.parametrize(("option", "said"), [
    (["-w", "0"], "workers 0 must be from 1 to 512"),
    (["--worker-connections", "0"], "worker_connections 0 must be from 1 to 100000"),
])
def test_a_command_line_value_it_cannot_use_stops_gunicorn_with_one_line(tmp_path, option, said):
    """The command line skips the checks of the environment's values; gunicorn would start with no
    worker, or with workers that fail in a loop."""
    environment = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
                   "BIND": f"127.0.0.1:{free_ports(1)[0]}", "DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}"}

    done = subprocess.run([GUNICORN, "-c", "gunicorn.conf.py", *option, "main:create_app()"],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)

    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == f"Error: {said}"
    assert "Traceback" not in done.stderr and "Booting worker" not in done.stderr


def test_empty_server_settings_are_their_defaults(tmp_path):
    environment = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"), "BIND": "", "PORT": " ",
                   "WORKER_CLASS": "", "LOG_LEVEL": " "}

    done = subprocess.run([GUNICORN, "-c", "gunicorn.conf.py", "--print-config", "main:create_app()"],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert re.search(r"^bind += \['0\.0\.0\.0:8000'\]$", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^worker_class += gevent$", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^loglevel += info$", done.stdout, re.MULTILINE), done.stdout


@pytest.mark.parametrize("option", ["--check-config", "--print-config"])
def test_checking_the_config_leaves_no_metrics_directory(tmp_path, option):
    """These run no server hook: the directory the config made goes when gunicorn exits."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    environment = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": "",
        "TMPDIR": str(temporary),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'parley.db'}",
        "ARCHIVE_URL": f"file://{tmp_path / 'archive'}",
    }
    done = subprocess.run(
        [GUNICORN, "-c", "gunicorn.conf.py", option, "main:create_app()"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert list(temporary.glob("parley-metrics-*")) == []


def _send_quietly(connection: socket.socket, data: bytes) -> None:
    try:
        connection.sendall(data)
    except OSError:
        pass  # the server may answer and close before reading everything


def _read_response(connection: socket.socket, data: bytes = b"") -> bytes:
    """One HTTP response (headers and a Content-Length body; `data` is its start if already read),
    or b"" if the connection closed."""
    try:
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
        while len(rest) < length:
            chunk = connection.recv(65536)
            if not chunk:
                break
            rest += chunk
        return head + b"\r\n\r\n" + rest
    except (ConnectionResetError, TimeoutError):
        return data


def test_a_worker_killed_mid_turn_leaves_no_half_turn_and_its_lease_runs_out(serve, fake_model):
    server = serve(TURN_LEASE_SECONDS="15")
    conversation_id = server.new_chat()
    fake_model.delay_next(30)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("outcome", _chat_or_error(server, conversation_id)))
    thread.start()
    deadline = time.monotonic() + 10
    while not fake_model.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    claimed_at = time.monotonic()
    workers = [int(pid) for pid in Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()]

    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    thread.join()
    _wait_for_health(server)
    exposition = server.request("GET", "/metrics")[1]["text"]
    blocked = server.chat(conversation_id, "are you there?")
    time.sleep(max(15.5 - (time.monotonic() - claimed_at), 0))
    after_lease = server.chat(conversation_id, "are you there?")
    status, log, _ = server.request("GET", f"/get_conversation?conversation_id={conversation_id}")

    assert result["outcome"] == "connection lost"
    # The killed worker's samples left the gauges with it (child_exit): its turn is not in flight any more.
    assert _sample(exposition, "parley_turns_in_flight ") == 0
    assert blocked == 409
    assert after_lease == 200
    assert [m["content"] for m in log["messages"]] == ["are you there?", "reply to: are you there?"]


def _chat_or_error(server: Server, conversation_id: str) -> int | str:
    try:
        return server.chat(conversation_id, "lost in the crash")
    except (OSError, http.client.HTTPException):
        return "connection lost"


def _wait_for_health(server: Server) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if server.request("GET", "/healthz")[0] == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the master did not start a new worker")
