"""A local, stdlib-only fake of the model provider HTTP APIs, for tests.

It speaks enough of the real wire protocols that the official SDKs work against it
unmodified (point their ``base_url`` at :attr:`FakeModelServer.base_url`):

* Anthropic Messages API: ``POST /v1/messages`` (JSON, or server-sent events when the
  body has ``"stream": true``).
* AWS Bedrock runtime as used by ``anthropic.AnthropicBedrock``:
  ``POST /model/{model_id}/invoke`` (JSON) and
  ``POST /model/{model_id}/invoke-with-response-stream`` (AWS event-stream framing).
  Signatures are not checked.
* OpenAI Chat Completions: ``POST /v1/chat/completions`` (JSON, or SSE chunks ending in
  ``data: [DONE]``; ``stream_options.include_usage`` adds a final usage chunk).

The reply is deterministic: ``"reply to: " + <text of the last user message>`` (text
blocks are concatenated), unless :attr:`FakeModelServer.reply_override` is set.
:meth:`FakeModelServer.tool_use_next` makes the next reply call a tool instead (an
Anthropic ``tool_use`` block with ``stop_reason: "tool_use"``, or OpenAI ``tool_calls``
with ``finish_reason: "tool_calls"``; streamed, the call's arguments arrive in pieces:
``input_json_delta`` events or ``tool_calls`` deltas). Every
request is recorded, and errors and delays can be injected per request::

    with FakeModelServer() as server:
        client = anthropic.Anthropic(api_key="test", base_url=server.base_url)
        server.fail_next(529)
        ...
        assert server.requests[-1].body["model"] == "claude-x"

The server only ever binds to 127.0.0.1 and logs nothing.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import struct
import sys
import threading
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import unquote

import orjson

HOST = "127.0.0.1"

_BEDROCK_PATH = re.compile(r"/model/(?P<model>[^/]+)/(?P<action>invoke|invoke-with-response-stream)")
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_OPENAI_ERROR_TYPES = {401: ("invalid_request_error", "invalid_api_key"), 429: ("requests", "rate_limit_exceeded")}
_EVENT_STREAM_HEADERS = {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}

Json = dict[str, Any]


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received. Header names are lower-cased; ``path`` excludes the query."""

    path: str
    headers: dict[str, str]
    body: Json
    query: str = ""


@dataclass(frozen=True)
class _Fault:
    status: int
    body: Json | None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None  # sent as it is, with headers["content-type"]
    length: int | None = None  # the Content-Length declared for `raw`: a longer one cuts the body short


@dataclass(frozen=True)
class _Reply:
    model: str
    text: str
    input_tokens: int
    output_tokens: int


def _text_of(content: Any) -> str:
    """Text of a message's content: a string, or a list of content blocks/parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(block.get("text", "")) for block in content if isinstance(block, dict) and block.get("type") == "text"
        )
    return ""


def _make_reply(body: Json, model: str, override: str | None) -> _Reply:
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    last_user = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    text = override if override is not None else "reply to: " + _text_of(last_user.get("content"))
    prompt_chars = len(_text_of(body.get("system"))) + sum(len(_text_of(m.get("content"))) for m in messages)
    return _Reply(model, text, max(1, prompt_chars // 4), max(1, len(text) // 4))


def _pieces(text: str) -> list[str]:
    """Split the reply into word-sized deltas so streams arrive in several pieces."""
    return re.findall(r"\S+\s*|\s+", text)


def _anthropic_message(reply: _Reply, *, streaming_start: bool = False) -> Json:
    return {
        "id": f"msg_fake_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": [] if streaming_start else [{"type": "text", "text": reply.text}],
        "stop_reason": None if streaming_start else "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": reply.input_tokens,
            "output_tokens": 1 if streaming_start else reply.output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


@dataclass(frozen=True)
class _ToolUse:
    name: str
    input: Json
    text: str  # words the model says before calling the tool; may be empty


def _anthropic_tool_message(reply: _Reply, tool: _ToolUse) -> Json:
    message = _anthropic_message(reply)
    text = [{"type": "text", "text": tool.text}] if tool.text else []
    use = {"type": "tool_use", "id": f"toolu_fake_{uuid.uuid4().hex[:20]}", "name": tool.name, "input": tool.input}
    return {**message, "content": [*text, use], "stop_reason": "tool_use"}


def _openai_tool_completion(reply: _Reply, tool: _ToolUse) -> Json:
    completion = _openai_completion(reply)
    call = {"id": f"call_fake{uuid.uuid4().hex[:20]}", "type": "function",
            "function": {"name": tool.name, "arguments": json.dumps(tool.input)}}
    message = {"role": "assistant", "content": tool.text or None, "refusal": None, "tool_calls": [call]}
    completion["choices"] = [{"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}]
    return completion


def _anthropic_events(reply: _Reply, tool: _ToolUse | None = None) -> list[Json]:
    """The Messages streaming events, in the order the real API sends them."""
    text = reply.text if tool is None else tool.text
    events: list[Json] = [{"type": "message_start", "message": _anthropic_message(reply, streaming_start=True)}]
    if text or tool is None:
        events += [
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "ping"},
            *(
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
                for piece in _pieces(text)
            ),
            {"type": "content_block_stop", "index": 0},
        ]
    if tool is not None:
        index = 1 if text else 0
        arguments = json.dumps(tool.input)
        use = {"type": "tool_use", "id": f"toolu_fake_{uuid.uuid4().hex[:20]}", "name": tool.name, "input": {}}
        events += [
            {"type": "content_block_start", "index": index, "content_block": use},
            *(
                {"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": piece}}
                for piece in _halves(arguments)
            ),
            {"type": "content_block_stop", "index": index},
        ]
    events += [
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn" if tool is None else "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": reply.output_tokens},
        },
        {"type": "message_stop"},
    ]
    return events


def _halves(text: str) -> list[str]:
    """A tool call's arguments in two pieces, as the APIs stream them."""
    return [text[: len(text) // 2], text[len(text) // 2 :]]


def _event_stream_frame(payload: bytes, headers: dict[str, str] = _EVENT_STREAM_HEADERS) -> bytes:
    """One AWS event-stream message (prelude, CRCs, string headers) carrying ``payload``."""
    encoded = b"".join(
        bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(value)) + value.encode()
        for name, value in headers.items()
    )
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def _bedrock_chunk(event: Json) -> bytes:
    encoded = base64.b64encode(json.dumps(event).encode()).decode()
    return _event_stream_frame(json.dumps({"bytes": encoded}).encode())


def _bedrock_exception(kind: str) -> bytes:
    """Bedrock's failure inside a stream: an exception message (``throttlingException``, ...)."""
    headers = {":exception-type": kind, ":content-type": "application/json", ":message-type": "exception"}
    return _event_stream_frame(json.dumps({"message": f"{kind} (injected mid-stream by FakeModelServer)"}).encode(), headers)


def _openai_completion(reply: _Reply) -> Json:
    return {
        "id": f"chatcmpl-fake{uuid.uuid4().hex[:20]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _openai_usage(reply),
    }


def _openai_usage(reply: _Reply) -> Json:
    return {
        "prompt_tokens": reply.input_tokens,
        "completion_tokens": reply.output_tokens,
        "total_tokens": reply.input_tokens + reply.output_tokens,
    }


def _openai_chunks(reply: _Reply, include_usage: bool, tool: _ToolUse | None = None) -> list[Json]:
    base = {
        "id": f"chatcmpl-fake{uuid.uuid4().hex[:20]}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": reply.model,
    }
    extra = {"usage": None} if include_usage else {}
    deltas: list[tuple[Json, str | None]] = [({"role": "assistant", "content": "", "refusal": None}, None)]
    deltas += [({"content": piece}, None) for piece in _pieces(reply.text if tool is None else tool.text)]
    if tool is not None:
        call = {"index": 0, "id": f"call_fake{uuid.uuid4().hex[:20]}", "type": "function",
                "function": {"name": tool.name, "arguments": ""}}
        deltas.append(({"tool_calls": [call]}, None))
        deltas += [({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, None) for piece in _halves(json.dumps(tool.input))]
    deltas.append(({}, "stop" if tool is None else "tool_calls"))
    chunks = [
        {**base, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": f}], **extra}
        for d, f in deltas
    ]
    if include_usage:
        chunks.append({**base, "choices": [], "usage": _openai_usage(reply)})
    return chunks


def _error_body(provider: str, status: int, message: str) -> Json:
    if provider == "anthropic":
        return {"type": "error", "error": {"type": _ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": message}}
    if provider == "bedrock":
        return {"message": message}
    kind, code = _OPENAI_ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _provider(path: str, headers: dict[str, str]) -> str:
    """Which provider's error shape to answer in: "anthropic", "bedrock" or "openai"."""
    if path.startswith("/model/"):
        return "bedrock"
    if path.startswith("/v1/messages") or "anthropic-version" in headers:
        return "anthropic"
    return "openai"


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 2048  # the default backlog of 5 drops bursts of concurrent clients

    def __init__(self, fake: FakeModelServer, port: int) -> None:
        self.fake = fake
        super().__init__((HOST, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    # A reply goes out in two writes, headers then body. With Nagle's algorithm on, the body
    # waits for the client's delayed ACK of the headers: 40 ms on every request.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        """Stay silent: no per-request lines on stderr."""

    def do_POST(self) -> None:
        fake = self.server.fake
        path, _, query = self.path.partition("?")
        headers = {name.lower(): value for name, value in self.headers.items()}
        body = self._read_json()
        fault, delay, drip = fake._record(RecordedRequest(path, headers, body, query))
        fake._enter()
        try:
            fake._wait_for_the_others()
            if delay:
                fake._interrupted().wait(delay)
            with contextlib.suppress(ConnectionError):  # the client may have gone away, e.g. timed out
                if drip:
                    self._drip(drip, path, headers, body)
                else:
                    self._respond(path, headers, body, fault)
        finally:
            fake._leave()

    do_GET = do_PUT = do_DELETE = do_PATCH = do_POST

    def _read_json(self) -> Json:
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            parsed = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            return {}
        return parsed if isinstance(parsed, dict) else {}

    def _respond(self, path: str, headers: dict[str, str], body: Json, fault: _Fault | None) -> None:
        bedrock = _BEDROCK_PATH.fullmatch(path)
        override = self.server.fake.reply_override
        if fault is not None and fault.status == 0:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # a reset: no answer at all
        elif fault is not None and fault.raw is not None:
            self._start(fault.status, fault.headers["content-type"])
            if fault.length is not None:
                self.send_header("Content-Length", str(fault.length))
            self.end_headers()
            self.wfile.write(fault.raw)  # the body ends when the connection closes
        elif fault is not None:
            message = f"Injected error (HTTP {fault.status}) from FakeModelServer"
            default = _error_body(_provider(path, headers), fault.status, message)
            payload = fault.body if fault.body is not None else default
            self._send_json(fault.status, payload, fault.headers)
        elif self.command == "POST" and bedrock:
            self._bedrock(_make_reply(body, unquote(bedrock["model"]), override), bedrock["action"])
        elif self.command == "POST" and path == "/v1/messages":
            self._anthropic(_make_reply(body, str(body.get("model", "")), override), body)
        elif self.command == "POST" and path == "/v1/chat/completions":
            self._openai(_make_reply(body, str(body.get("model", "")), override), body)
        else:
            message = f"No route for {self.command} {path}"
            self._send_json(404, _error_body(_provider(path, headers), 404, message))

    def _drip(self, bytes_per_second: float, path: str, headers: dict[str, str], body: Json) -> None:
        """A whole, valid reply, sent one byte at a time."""
        reply = _make_reply(body, str(body.get("model", "")), self.server.fake.reply_override)
        data = json.dumps(_openai_completion(reply) if "chat/completions" in path else _anthropic_message(reply)).encode()
        self._start(200, "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.flush()
        for offset in range(len(data)):
            if self.server.fake._interrupted().wait(1 / bytes_per_second):
                return
            self.wfile.write(data[offset : offset + 1])
            self.wfile.flush()

    def _anthropic(self, reply: _Reply, body: Json) -> None:
        if not body.get("stream"):
            tool = self.server.fake._take_tool_use()
            self._send_json(200, _anthropic_message(reply) if tool is None else _anthropic_tool_message(reply, tool))
            return
        tool = self.server.fake._take_tool_use()
        frames = [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in _anthropic_events(reply, tool)]
        error = _error_body("anthropic", 529, "Overloaded (injected mid-stream by FakeModelServer)")
        self._send_stream("text/event-stream; charset=utf-8", frames, f"event: error\ndata: {json.dumps(error)}\n\n".encode())

    def _bedrock(self, reply: _Reply, action: str) -> None:
        if action == "invoke":
            tool = self.server.fake._take_tool_use()
            self._send_json(200, _anthropic_message(reply) if tool is None else _anthropic_tool_message(reply, tool))
            return
        frames = [_bedrock_chunk(event) for event in _anthropic_events(reply, self.server.fake._take_tool_use())]
        self._send_stream("application/vnd.amazon.eventstream", frames, b"")  # a mid-stream fault cuts the stream

    def _openai(self, reply: _Reply, body: Json) -> None:
        if not body.get("stream"):
            tool = self.server.fake._take_tool_use()
            self._send_json(200, _openai_completion(reply) if tool is None else _openai_tool_completion(reply, tool))
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        tool = self.server.fake._take_tool_use()
        frames = [f"data: {json.dumps(chunk)}\n\n".encode() for chunk in _openai_chunks(reply, include_usage, tool)]
        error = _error_body("openai", 500, "Server error (injected mid-stream by FakeModelServer)")
        self._send_stream("text/event-stream; charset=utf-8", [*frames, b"data: [DONE]\n\n"], f"data: {json.dumps(error)}\n\n".encode())

    def _start(self, status: int, content_type: str, extra: dict[str, str] | None = None, keep_alive: bool = False) -> None:
        self.close_connection = not keep_alive
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Connection", "keep-alive" if keep_alive else "close")
        self.send_header("request-id", f"req_fake_{uuid.uuid4().hex[:16]}")
        self.send_header("x-request-id", f"req_fake_{uuid.uuid4().hex[:16]}")
        for name, value in (extra or {}).items():
            self.send_header(name, value)

    def _send_json(self, status: int, payload: Json, extra: dict[str, str] | None = None) -> None:
        data = orjson.dumps(payload)
        self._start(status, "application/json", extra, keep_alive=True)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_stream(self, content_type: str, frames: list[bytes], error_frame: bytes) -> None:
        """Write each frame as it comes, `stream_interval` apart; the body ends when the connection closes.

        A queued mid-stream fault sends `error_frame` (or nothing) after that
        many frames and ends the stream. A client that closes the stream early
        is counted in `streams_closed_early`.
        """
        fake = self.server.fake
        interval, fault_after, exception = fake._take_stream_plan()
        self._start(200, content_type, {"Cache-Control": "no-cache"})
        self.end_headers()
        try:
            for n, frame in enumerate(frames):
                if fault_after is not None and n == fault_after:
                    self.wfile.write(error_frame if exception is None else _bedrock_exception(exception))
                    self.wfile.flush()
                    return
                if n and interval and fake._stopping.wait(interval):
                    return
                self.wfile.write(frame)
                self.wfile.flush()
        except ConnectionError:
            fake._count_early_close(n)
            raise
        fake._count_full_stream()


class FakeModelServer:
    """Fake Anthropic / Bedrock / OpenAI endpoint on ``127.0.0.1`` (a free port unless given)."""

    def __init__(self, port: int = 0, record: bool = True) -> None:
        """`record=False` keeps no requests (`requests` stays empty): for benchmarks, whose
        hundreds of thousands of kept bodies would cost memory and collector time."""
        self.reply_override: str | None = None
        self._record_requests = record
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._faults: deque[_Fault] = deque()
        self._delays: deque[float] = deque()
        self._drips: deque[float] = deque()
        self._stream_faults: deque[tuple[int, str | None]] = deque()
        # Seconds between the frames of a streamed reply.
        self.stream_interval = 0.0
        # Streams the client closed before their end (and how many frames each had been sent), streams sent whole.
        self.streams_closed_early = 0
        self.early_close_frames: list[int] = []
        self.streams_completed = 0
        self._tool_uses: deque[_ToolUse] = deque()
        # Seconds every request waits before its answer, on top of delay_next.
        self.latency = 0.0
        self.in_flight = 0
        self.peak_in_flight = 0
        # Requests in flight wake this; gather() holds requests on it until enough arrive.
        self._arrived = threading.Condition(self._lock)
        self._gathering: tuple[int, float] | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._httpd = _HTTPServer(self, port)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def reset(self) -> None:
        """Back to a fresh state: no recorded requests, pending faults or delays, and no reply override."""
        with self._lock:
            self._requests.clear()
            self._faults.clear()
            self._delays.clear()
            self._drips.clear()
            self._stream_faults.clear()
            self.stream_interval = 0.0
            self.streams_closed_early = 0
            self.early_close_frames = []
            self.streams_completed = 0
            self._tool_uses.clear()
            self.reply_override = None
            self.latency = 0.0
            self._gathering = None
            self._arrived.notify_all()
            # Cut short the waits of requests still held from before, so they leave.
            self._wake.set()
            self._wake = threading.Event()
            self.peak_in_flight = self.in_flight

    def fail_next(
        self, status: int, body: Json | None = None, count: int = 1, headers: dict[str, str] | None = None, skip: int = 0
    ) -> None:
        """Answer the next ``count`` requests with ``status`` and an error body in the provider's shape,
        after ``skip`` requests answered as usual."""
        with self._lock:
            self._faults.extend([None] * skip)
            self._faults.extend(_Fault(status, body, dict(headers or {})) for _ in range(count))

    def answer_raw_next(
        self, raw: bytes, content_type: str = "application/json", status: int = 200, length: int | None = None, count: int = 1
    ) -> None:
        """Answer the next ``count`` requests with `raw` as it is: a body no reply can be read from, say;
        declared `length` bytes long, a body cut short when that is more than `raw`."""
        with self._lock:
            self._faults.extend(_Fault(status, None, {"content-type": content_type}, raw, length) for _ in range(count))

    def drop_next(self, count: int = 1) -> None:
        """Close the connection of the next ``count`` requests without answering."""
        with self._lock:
            self._faults.extend(_Fault(0, None) for _ in range(count))

    def fail_stream_next(self, after_frames: int, bedrock_exception: str | None = None) -> None:
        """Break the next stream after ``after_frames`` frames: an ``error`` event (Anthropic,
        OpenAI) or, on Bedrock, a cut connection, or an exception message of the type
        ``bedrock_exception`` names (``throttlingException``, ...)."""
        with self._lock:
            self._stream_faults.append((after_frames, bedrock_exception))

    def _take_stream_plan(self) -> tuple[float, int | None, str | None]:
        with self._lock:
            fault_after, exception = self._stream_faults.popleft() if self._stream_faults else (None, None)
            return self.stream_interval, fault_after, exception

    def _count_early_close(self, frames_sent: int) -> None:
        with self._lock:
            self.streams_closed_early += 1
            self.early_close_frames.append(frames_sent)

    def _count_full_stream(self) -> None:
        with self._lock:
            self.streams_completed += 1

    def delay_next(self, seconds: float, count: int = 1) -> None:
        """Sleep ``seconds`` before answering each of the next ``count`` requests."""
        with self._lock:
            self._delays.extend(seconds for _ in range(count))

    def gather(self, count: int, within: float = 30.0) -> None:
        """Hold each request until ``count`` are in flight at once, or ``within`` seconds have
        passed; then answer them all, and later requests without holding. A fixed latency
        proves the same only if the client sends them all within it, which a loaded machine
        may not."""
        with self._lock:
            self._gathering = (count, time.monotonic() + within)

    def hold(self, within: float = 30.0) -> None:
        """Hold every request until `let_go()`, or until ``within`` seconds have passed."""
        self.gather(sys.maxsize, within)

    def let_go(self) -> None:
        """Answer the requests held now (by `hold` or `gather`), and later ones without holding."""
        with self._arrived:
            self._gathering = None
            self._arrived.notify_all()

    def _wait_for_the_others(self) -> None:
        with self._arrived:
            if self._gathering is None:
                return
            count, deadline = self._gathering
            self._arrived.wait_for(
                lambda: self._gathering is None or self.in_flight >= count or self._stopping.is_set(),
                timeout=max(0.0, deadline - time.monotonic()),
            )
            self._gathering = None
            self._arrived.notify_all()

    def drip_next(self, bytes_per_second: float, count: int = 1) -> None:
        """Send the next ``count`` replies (JSON) a byte at a time, ``bytes_per_second`` fast."""
        with self._lock:
            self._drips.extend(bytes_per_second for _ in range(count))

    def _interrupted(self) -> threading.Event:
        """What ends an injected wait early: the server stopping, or a reset."""
        with self._lock:
            return self._stopping if self._stopping.is_set() else self._wake

    def tool_use_next(self, name: str, tool_input: Json, text: str = "") -> None:
        """Make the next reply (streamed or not) call tool ``name`` with ``tool_input``, after saying ``text``."""
        with self._lock:
            self._tool_uses.append(_ToolUse(name, dict(tool_input), text))

    def _take_tool_use(self) -> _ToolUse | None:
        with self._lock:
            return self._tool_uses.popleft() if self._tool_uses else None

    def _enter(self) -> None:
        with self._arrived:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            self._arrived.notify_all()

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def start(self) -> None:
        """Serve on a background daemon thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="FakeModelServer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and release the port; cuts injected delays short."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._wake.set()
        with self._arrived:
            self._arrived.notify_all()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> FakeModelServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _record(self, request: RecordedRequest) -> tuple[_Fault | None, float, float]:
        """Record ``request`` and take the fault, delay and drip rate (if any) queued for it."""
        with self._lock:
            if self._record_requests:
                self._requests.append(request)
            fault = self._faults.popleft() if self._faults else None
            delay = (self._delays.popleft() if self._delays else 0.0) + self.latency
            drip = self._drips.popleft() if self._drips else 0.0
        return fault, delay, drip
