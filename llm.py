"""Model providers behind one small interface.

`LLM_PROVIDER` picks one of:
- `anthropic`: Claude through `anthropic.Anthropic`;
- `bedrock`: Claude on AWS Bedrock through `anthropic.AnthropicBedrock`;
- `openai`: any OpenAI-compatible Chat Completions endpoint;
- `echo`: an offline stand-in that repeats the user's message and says it is
  not a real model (the default when no API key is configured).

Credentials and endpoints come from each SDK's own environment variables
(`ANTHROPIC_API_KEY`, `ANTHROPIC_BASE_URL`, `OPENAI_API_KEY`,
`OPENAI_BASE_URL`, `AWS_*`), exactly as the SDKs document them.

Failures: Parley retries 408, 409, 429, 500, 502, 503, 504, 529, connection
errors and timeouts itself (the SDKs' own retries are off, because they wait for any
`Retry-After` without a cap), with backoff, at most `LLM_MAX_RETRIES` times,
and every call has one total deadline, `LLM_TOTAL_TIMEOUT_SECONDS`, that
covers the retries, the waits and a reply that arrives slowly.

The SDKs are imported when a provider first needs them: importing
`anthropic` and `openai` takes seconds (about 4 and 2 on a slow 2-core
machine), which a `parley` command or the echo model should not pay.
"""
from __future__ import annotations

import contextvars
import functools
import json
import logging
import math
import os
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import httpx2
import orjson
from botocore.eventstream import ParserError as EventStreamError
from botocore.exceptions import BotoCoreError

from config import ConfigError
from conversation_memory import MESSAGE_OVERHEAD_TOKENS, USER, estimate_tokens

if TYPE_CHECKING:
    import anthropic
    import openai

log = logging.getLogger("parley")

ECHO_LABEL = "[echo model: not a real LLM, no API key configured]"
ECHO_CHOSEN_LABEL = "[echo model: not a real LLM, chosen with LLM_PROVIDER=echo]"

# Provider statuses worth another attempt: rate limited, server errors, overloaded, and the
# errors a CDN in front of the provider (Cloudflare's 520 to 524) gives for an origin that failed.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 8.0
RETRY_AFTER_MAX_PASSED_ON = 86_400.0  # a provider's Retry-After beyond a day is passed on as a day
# How often a process looks for model replies still being read past their deadline.
DEADLINE_CHECK_SECONDS = 0.25
# Connection pools per process that the model's requests are spread over (DeadlineTransport).
POOL_SHARDS = 16
# The echo model's pause between streamed words.
ECHO_WORD_SECONDS = 0.03

# The tool offered to the model (HANDOFF_TOOL) to hand the conversation to a person.
REQUEST_HUMAN = "request_human"
_REQUEST_HUMAN_DESCRIPTION = (
    "Hand this conversation to a human support agent. Use it when the user asks for a person, "
    "or when you cannot help and a person should take over. The user is told a person will answer."
)
_REQUEST_HUMAN_INPUT = {
    "type": "object",
    "properties": {"reason": {"type": "string", "description": "Why a human is needed, for the support agent."}},
    "required": ["reason"],
}
DEFAULT_HANDOFF_REASON = "the model asked for a human"

# When the model call in progress must be over (time.monotonic()), if any.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("parley_model_deadline", default=None)
T = TypeVar("T")


@dataclass(frozen=True)
class ModelReply:
    text: str
    model: str
    input_tokens: int
    output_tokens: int
    stop_reason: str | None = None
    # True when the stream stopped before the model finished (the client went away).
    incomplete: bool = False
    # Set when the model called the request_human tool: hand off instead of answering.
    handoff_reason: str | None = None

    @property
    def usage(self) -> dict[str, int]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}


class ModelError(Exception):
    """The provider failed; `status` is the HTTP status Parley answers with.

    `retryable` says whether the same request may succeed later, and
    `retry_after` passes on the provider's `Retry-After`, in seconds.
    """

    def __init__(self, status: int, error: str, message: str, retryable: bool = False, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass
class Attempts:
    """One model call's deadline and the retries it has made, shared by a stream's restarts.

    Setting `stopped` ends a wait before a retry, which then retries no more.
    """

    deadline: float
    retries: int = 0
    stopped: threading.Event | None = None


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int
    total_seconds: float
    retry_after_cap: float

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RetryPolicy:
        return cls(config["LLM_MAX_RETRIES"], config["LLM_TOTAL_TIMEOUT_SECONDS"], config["LLM_RETRY_AFTER_MAX_SECONDS"])

    def start(self) -> Attempts:
        return Attempts(time.monotonic() + self.total_seconds)

    def call(self, attempt: Callable[[], T], sdk: Any, provider: str, attempts: Attempts | None = None) -> T:
        """Run `attempt` under the total deadline, retrying what may succeed later."""
        attempts = attempts or self.start()
        token = _deadline.set(attempts.deadline)
        try:
            while True:
                try:
                    return attempt()
                except sdk.APIError as exc:
                    error = _provider_error(exc, sdk, provider, time.monotonic() >= attempts.deadline)
                    self.wait_or_raise(error, _retry_after_seconds(exc), attempts, exc)
                except httpx2.HTTPError as exc:
                    # Only a stream's error answer gets here: the SDKs read its body after the
                    # request, outside their own handling, so a body cut short escapes them.
                    error = _connection_error(exc, provider, time.monotonic() >= attempts.deadline)
                    self.wait_or_raise(error, None, attempts, exc)
                except (BotoCoreError, RuntimeError) as exc:
                    error = _signing_error(exc, provider)
                    if error is None:
                        raise
                    self.wait_or_raise(error, None, attempts, exc)
        finally:
            _deadline.reset(token)

    def wait_or_raise(self, error: ModelError, asked: float | None, attempts: Attempts, cause: Exception | None) -> None:
        """Wait before the next try (the provider's `asked` wait, capped, or a backoff), or raise
        `error`: it is not retryable, the retries are spent, the wait would pass the deadline, or
        the call was stopped."""
        if not error.retryable or attempts.retries >= self.max_retries:
            raise error from cause
        # A wait of 0 is the backoff too, as the SDKs take it; the cap bounds the provider's wait only.
        wait = min(asked, self.retry_after_cap) if asked else _backoff(attempts.retries)
        # A provider asking for longer than the deadline leaves is answered at
        # once with its Retry-After: retrying sooner than asked, under the cap,
        # would only spend the turn's time on refusals.
        if time.monotonic() + max(wait, asked or 0.0) >= attempts.deadline:
            raise error from cause
        attempts.retries += 1
        if attempts.stopped is None:
            time.sleep(wait)
        elif attempts.stopped.wait(wait):
            raise error from cause


class DeadlineTransport(httpx2.BaseTransport):
    """Holds each request to the deadline of the model call it belongs to.

    The SDKs' timeouts apply per read, so a reply that trickles in a byte at
    a time never times out; here the read timeout shrinks to the time left,
    and the body stops with a timeout once the deadline has passed.

    The connections are split over `shards` pools (fewer when the limit is
    smaller), which share the limits exactly. Each request goes to the pool
    with the most connections free, so it waits for one only when every pool
    is full (taken in turn, a pool could be full while others stood idle).
    httpcore's pool walks every
    one of its connections each time a request starts or ends
    (pydantic/httpx2#1169), so with hundreds of replies in flight one pool
    spent an eighth of a worker's CPU on that bookkeeping (measured with
    py-spy at 200 turns in flight per worker).
    """

    def __init__(self, limits: httpx2.Limits, shards: int = POOL_SHARDS) -> None:
        shards = max(1, min(shards, limits.max_connections))
        # One TLS context for all: each loads the system's CA certificates (about 25 ms).
        tls = httpx2.create_ssl_context()
        self._pools = [
            httpx2.HTTPTransport(verify=tls, limits=httpx2.Limits(
                max_connections=_share(limits.max_connections, shards, n),
                max_keepalive_connections=_share(limits.max_keepalive_connections, shards, n),
            ))
            for n in range(shards)
        ]
        # Each pool's connections not in use by a request (from its start until its body is closed).
        self._free = [_share(limits.max_connections, shards, n) for n in range(shards)]
        self._lock = threading.Lock()  # guards `_free`; never held while waiting

    def close(self) -> None:
        for pool in self._pools:
            pool.close()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        deadline = _deadline.get()
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise httpx2.ConnectTimeout("the model call's total deadline has passed", request=request)
            timeouts = request.extensions.get("timeout") or {}
            request.extensions["timeout"] = {name: min(value or left, left) for name, value in timeouts.items()} or {
                name: left for name in ("connect", "read", "write", "pool")
            }
        with self._lock:
            shard = max(range(len(self._free)), key=self._free.__getitem__)
            self._free[shard] -= 1
        try:
            response = self._pools[shard].handle_request(request)
        except BaseException:
            self._done(shard)
            raise
        response.stream = _PoolShare(response.stream, functools.partial(self._done, shard))
        if deadline is not None:
            response.stream = _DeadlineStream(response.stream, deadline, request, response.extensions.get("network_stream"))
        return response

    def _done(self, shard: int) -> None:
        with self._lock:
            self._free[shard] += 1


def _share(total: int, shards: int, n: int) -> int:
    """Pool `n`'s part of `total`, so that the parts add up to it."""
    return total // shards + (n < total % shards)


class _PoolShare(httpx2.SyncByteStream):
    """A response's body that tells its pool, once, when it is closed (its connection given back)."""

    def __init__(self, stream: httpx2.SyncByteStream, done: Callable[[], None]) -> None:
        self._stream = stream
        self._done: Callable[[], None] | None = done

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._stream)

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            done, self._done = self._done, None
            if done is not None:
                done()


class _DeadlineStream(httpx2.SyncByteStream):
    """A response's body, stopped at the deadline.

    Each read waits at most the read timeout the request started with, so a
    read that begins shortly before the deadline could wait past it. While
    the body is read, `_WATCH` stops such a read soon after the deadline by
    shutting the connection down.
    """

    def __init__(self, stream: httpx2.SyncByteStream, deadline: float, request: httpx2.Request, network: Any) -> None:
        self._stream = stream
        self.deadline = deadline
        self._request = request
        self._network = network  # httpcore's stream of the connection, if it says
        self._cut = False

    def __iter__(self) -> Iterator[bytes]:
        _WATCH.add(self)
        try:
            for chunk in self._stream:
                if time.monotonic() > self.deadline:
                    raise httpx2.ReadTimeout("the model call's total deadline has passed", request=self._request)
                yield chunk
            if self._cut:  # a body that ends when its connection closes reads the cut as its end
                raise httpx2.ReadTimeout("the model call's total deadline has passed", request=self._request)
        except httpx2.TransportError as exc:
            if self._cut:
                raise httpx2.ReadTimeout("the model call's total deadline has passed", request=self._request) from exc
            raise
        finally:
            _WATCH.discard(self)

    def cut_off(self) -> None:
        """Stop the read under way (called by `_WATCH`, on its thread, while this body is read)."""
        if self._network is None:
            return
        self._cut = True
        connection = self._network.get_extra_info("socket")
        try:
            # On a duplicate of its descriptor: a TLS socket's own shutdown would drop its TLS state under the read.
            with socket.socket(fileno=os.dup(connection.fileno())) as duplicate:
                duplicate.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):  # closed meanwhile, or not a socket
            pass

    def close(self) -> None:
        _WATCH.discard(self)
        self._stream.close()


class _DeadlineWatch:
    """The bodies being read, and one thread a process that stops those past their deadline.

    It looks every `DEADLINE_CHECK_SECONDS`: a timer per call cost a thread
    each (about 0.37 ms of CPU a call without gevent, `python -m bench.model_call`).
    The lock guards the set and the cuts, and is never held while waiting (see releases.py).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reading: set[_DeadlineStream] = set()
        self._watched_by: int | None = None  # the process whose thread runs (a forked one starts its own)

    def add(self, body: _DeadlineStream) -> None:
        with self._lock:
            self._reading.add(body)
            start, self._watched_by = self._watched_by != os.getpid(), os.getpid()
        if start:
            try:
                threading.Thread(target=self._run, name="parley-model-deadlines", daemon=True).start()
            except RuntimeError:  # at interpreter shutdown: the next body tries again
                self._watched_by = None

    def discard(self, body: _DeadlineStream) -> None:
        with self._lock:
            self._reading.discard(body)

    def _run(self) -> None:
        while True:
            time.sleep(DEADLINE_CHECK_SECONDS)
            now = time.monotonic()
            with self._lock:  # held while cutting: a body that ends meanwhile gives its connection back after
                for body in [body for body in self._reading if body.deadline <= now]:
                    self._reading.discard(body)
                    body.cut_off()


_WATCH = _DeadlineWatch()


class ChatModel(Protocol):
    provider: str
    model: str

    def reply(self, system: str | None, messages: list[dict[str, str]], offer_human: bool = False) -> ModelReply: ...

    def stream(self, system: str | None, messages: list[dict[str, str]], offer_human: bool = False) -> ReplyStream: ...


class ReplyStream:
    """A reply as the provider streams it.

    Iterating yields the text deltas; `reply` holds the whole reply once the
    iteration ended normally (with `handoff_reason` set when the model called
    the request_human tool). `close()` stops the upstream request at once
    (from any thread or greenlet), and `partial_reply()` is what came so far.
    Errors are `ModelError`s, mid-stream too.
    """

    def __init__(self, provider: str, model: str, input_tokens: int = 0) -> None:
        self.provider = provider
        self.model = model
        self.input_tokens = input_tokens
        self.output_tokens = 0
        self.stop_reason: str | None = None
        self.parts: list[str] = []
        self.reply: ModelReply | None = None
        self.closed = False
        # Each tool call so far, [its name, the pieces of its arguments], and the latest call of each block (or call) index.
        self._tool_calls: list[list[Any]] = []
        self._call_at: dict[Any, list[Any]] = {}

    def __iter__(self) -> Iterator[str]:
        try:
            for text in self._deltas():
                if self.closed:
                    return
                if text:
                    self.parts.append(text)
                    yield text
        except ModelError:
            raise
        except Exception as exc:
            if self.closed:
                return  # closed under the reader's feet: the end the caller asked for
            raise _stream_error(exc, self.provider) from exc
        if not self.closed:
            handoff = self._handoff_reason()
            text = _storable_reply("".join(self.parts), self.provider, may_be_empty=handoff is not None)
            self.reply = self._whole(text, incomplete=False, handoff_reason=handoff)

    def partial_reply(self) -> ModelReply | None:
        """What the model said before the stream stopped, or None if nothing.

        A reply that had begun to call request_human is a handoff all the
        same (with the reason if its arguments came whole), words or none.
        """
        text = "".join(self.parts).replace("\x00", "")
        handoff = self._handoff_reason()
        if handoff is not None:
            return self._whole(text, incomplete=True, handoff_reason=handoff)
        return self._whole(text, incomplete=True) if text.strip() else None

    def close(self) -> None:
        self.closed = True
        self._close_upstream()

    def _whole(self, text: str, incomplete: bool, handoff_reason: str | None = None) -> ModelReply:
        output_tokens = self.output_tokens or estimate_tokens(text)
        return ModelReply(text, self.model, self.input_tokens, output_tokens, self.stop_reason, incomplete, handoff_reason)

    def _deltas(self) -> Iterator[str]:
        raise NotImplementedError

    def _tool_call(self, index: Any, name: str | None, arguments: Any) -> None:
        """A piece of a tool call: its name, and its arguments' JSON piece by piece (in any order).

        Another name at the same index begins another call: servers that send
        no index at all put every call under `None`.
        """
        call = self._call_at.get(index)
        if call is None or (name and call[0] not in (None, name)):
            call = self._call_at[index] = [None, []]
            self._tool_calls.append(call)
        if name:
            call[0] = name
        if arguments:
            call[1].append(arguments)

    def _handoff_reason(self) -> str | None:
        """The reason of the first request_human call, if the model made one."""
        pieces = next((pieces for name, pieces in self._tool_calls if name == REQUEST_HUMAN), None)
        if pieces is None:
            return None
        # JSON text in pieces, or (from some compatible servers) the object itself.
        whole = pieces[0] if len(pieces) == 1 else "".join(piece for piece in pieces if isinstance(piece, str))
        return _reason(_arguments(whole))

    def _close_upstream(self) -> None:
        """Close the provider's connection."""


class _SDKStream(ReplyStream):
    """A stream of SDK events (`anthropic.Stream` or `openai.Stream`)."""

    def __init__(self, provider: str, model: str, events: Any, read: Callable[[ReplyStream, Any], str | None]) -> None:
        super().__init__(provider, model)
        self._events = events
        self._read = read

    def _deltas(self) -> Iterator[str]:
        finished = False
        try:
            for event in self._events:
                text = self._read(self, event)
                if text is None:
                    finished = True
                else:
                    yield text
        except _UNREADABLE_STREAM as exc:
            raise _unreadable(self.provider) from exc
        if not finished and self.stop_reason is None and not self.closed:
            raise ModelError(502, "model_error", f"the {self.provider} model's stream ended before the reply was complete", retryable=True)

    def _close_upstream(self) -> None:
        self._events.close()


class _Restartable:
    """A provider's stream (`anthropic.Stream`, `openai.Stream`), started again when it fails before its reply begins.

    A provider may fail a stream it has begun with 200 in its first events
    (Anthropic's `overloaded_error`, Bedrock's `throttlingException`), or end
    it with none. Until an event says something (`preamble(event)` is false:
    the reply's first words, a tool call, or its end), nothing has reached
    the client (the response sends its heartbeats meanwhile), and the events
    passed on only set what the next stream's set again. So the stream is
    started again like a request that failed with the status the error's type
    stands for (an early end or a broken connection as a dropped one), within
    the retries and the deadline of the request that started it. A failure
    after that ends the stream.
    """

    def __init__(self, stream: Any, start: Callable[[], Any], policy: RetryPolicy, attempts: Attempts, sdk: Any,
                 provider: str, preamble: Callable[[Any], bool]) -> None:
        self._stream = stream
        self._start = start
        self._policy = policy
        self._attempts = attempts
        self._sdk = sdk
        self._provider = provider
        self._preamble = preamble
        self._stopped = attempts.stopped = threading.Event()

    def __iter__(self) -> Iterator[Any]:
        while True:
            said, asked = False, None  # whether an event that says something was passed on
            try:
                for event in self._stream:
                    said = said or not self._preamble(event)
                    yield event
            except self._sdk.APIError as exc:
                if said:
                    raise
                cause, error, asked = exc, _provider_error(exc, self._sdk, self._provider), _retry_after_seconds(exc)
            except httpx2.TransportError as exc:  # the connection broke, or a read waited LLM_TIMEOUT_SECONDS
                if said:
                    raise
                cause, error = exc, _stream_error(exc, self._provider)
            else:
                if said:
                    return
                cause = None  # Parley's own finding
                error = ModelError(502, "model_error", f"the {self._provider} model's stream ended before its reply began", retryable=True)
            self._close_quietly()
            if self._stopped.is_set():  # closed under the reader's feet: not a failure
                return
            self._policy.wait_or_raise(error, asked, self._attempts, cause)
            self._stream = self._policy.call(self._start, self._sdk, self._provider, self._attempts)
            if self._stopped.is_set():  # while it started
                self._close_quietly()
                return

    def close(self) -> None:
        """Stop, from another thread too: at once while waiting to start again, and no more starts."""
        self._stopped.set()
        self._stream.close()

    def _close_quietly(self) -> None:
        """Close a stream that failed; an error closing it would only hide why it failed."""
        try:
            self._stream.close()
        except Exception as exc:
            log.debug("closing the provider's stream: %s", exc.__class__.__name__)


def _anthropic_preamble(event: Any) -> bool:
    """A Messages event that comes before the reply says anything."""
    return event.type in ("message_start", "ping") or (event.type == "content_block_start" and event.content_block.type == "text")


def _read_anthropic_event(stream: ReplyStream, event: Any) -> str | None:
    """Text of a Messages stream event ("" for bookkeeping), None at message_stop."""
    if event.type == "message_start":
        stream.model = _text(event.message.model or stream.model)
        stream.input_tokens = _count(event.message.usage.input_tokens)
    elif event.type == "content_block_delta" and event.delta.type == "text_delta":
        return _text(event.delta.text)
    elif event.type == "content_block_start" and event.content_block.type == "tool_use":
        stream._tool_call(event.index, event.content_block.name, None)
    elif event.type == "content_block_delta" and event.delta.type == "input_json_delta":
        stream._tool_call(event.index, None, event.delta.partial_json)
    elif event.type == "message_delta":
        stream.output_tokens = _count(event.usage.output_tokens)
        stream.stop_reason = _text(event.delta.stop_reason, may_be_none=True)
    elif event.type == "message_stop":
        return None
    return ""


def _openai_preamble(chunk: Any) -> bool:
    """A Chat Completions chunk that comes before the reply says anything (the role's, a filter's)."""
    if chunk.usage is not None:  # the usage chunk, the last
        return False
    if not chunk.choices:  # a content filter's
        return True
    choice = chunk.choices[0]
    return not (choice.delta.content or choice.delta.tool_calls or choice.finish_reason)


def _read_openai_chunk(stream: ReplyStream, chunk: Any) -> str | None:
    """Text of a Chat Completions chunk; None once the usage chunk (the last) or a finish arrived."""
    stream.model = _text(chunk.model or stream.model)
    if chunk.usage is not None:
        stream.input_tokens = _count(chunk.usage.prompt_tokens)
        stream.output_tokens = _count(chunk.usage.completion_tokens)
    if not chunk.choices:
        return None if chunk.usage is not None else ""
    choice = chunk.choices[0]
    if choice.finish_reason is not None:
        stream.stop_reason = _text(choice.finish_reason)
    for call in choice.delta.tool_calls or []:
        if call.function is not None:
            stream._tool_call(call.index, call.function.name, call.function.arguments)
    return _text(choice.delta.content or "")


class _EchoStream(ReplyStream):
    def __init__(self, reply: ModelReply) -> None:
        super().__init__("echo", reply.model, reply.input_tokens)
        self._text = reply.text
        self.output_tokens = reply.output_tokens
        self.stop_reason = reply.stop_reason

    def _deltas(self) -> Iterator[str]:
        for n, word in enumerate(re.findall(r"\S+\s*", self._text)):
            if n:
                time.sleep(ECHO_WORD_SECONDS)  # paced like a model, so a page shows it arriving
            yield word


class AnthropicModel:
    """Claude via the Messages API, direct or on Bedrock."""

    def __init__(self, client: anthropic.Anthropic | anthropic.AnthropicBedrock, provider: str, config: Mapping[str, Any]) -> None:
        import anthropic  # imported only by the processes that use it (see make_model)

        self.sdk = anthropic
        self.client = client
        self.provider = provider
        self.model = config["LLM_MODEL"]
        self.max_tokens = config["LLM_MAX_TOKENS"]
        self.temperature = config["LLM_TEMPERATURE"]
        self.retries = RetryPolicy.from_config(config)

    def reply(self, system: str | None, messages: list[dict[str, str]], offer_human: bool = False) -> ModelReply:
        body = self._body(system, messages, offer_human)
        message = self.retries.call(lambda: self._create(body, stream=False), self.sdk, self.provider)
        try:
            return self._read(_decoded(message))
        except _UNREADABLE as exc:
            raise _unreadable(self.provider) from exc

    def _read(self, message: dict[str, Any]) -> ModelReply:
        """A Message as the API sent it (JSON; see `_create`)."""
        blocks = message["content"]
        text = "".join(block["text"] for block in blocks if block["type"] == "text")
        handoff = next(
            (_reason(block.get("input")) for block in blocks if block["type"] == "tool_use" and block.get("name") == REQUEST_HUMAN),
            None,
        )
        usage = message["usage"]
        return ModelReply(
            text=_storable_reply(text, self.provider, handoff is not None),
            handoff_reason=handoff,
            model=_text(message.get("model") or self.model),
            input_tokens=_count(usage["input_tokens"]),
            output_tokens=_count(usage["output_tokens"]),
            stop_reason=_text(message.get("stop_reason"), may_be_none=True),
        )

    def stream(self, system: str | None, messages: list[dict[str, str]], offer_human: bool = False) -> ReplyStream:
        """Messages streaming; failures before the reply begins are retried like `reply`'s."""
        body = self._body(system, messages, offer_human)
        attempts = self.retries.start()
        start = functools.partial(self._create, body, stream=True)
        events = self.retries.call(start, self.sdk, self.provider, attempts)
        restartable = _Restartable(events, start, self.retries, attempts, self.sdk, self.provider, _anthropic_preamble)
        return _SDKStream(self.provider, self.model, restartable, _read_anthropic_event)

    def _body(self, system: str | None, messages: list[dict[str, str]], offer_human: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens, "messages": messages}
        if system:
            body["system"] = system
        if offer_human:
            body["tools"] = [{"name": REQUEST_HUMAN, "description": _REQUEST_HUMAN_DESCRIPTION, "input_schema": _REQUEST_HUMAN_INPUT}]
        if self.temperature is not None:
            # This SDK release has no `temperature` argument (newer Claude
            # models fix it); models that still take one get it in the body.
            body["temperature"] = self.temperature
        return body

    def _create(self, body: dict[str, Any], stream: bool) -> Any:
        """POST /v1/messages: the `Message` as JSON, or the `Stream` of its events.

        The reply is read as JSON: building the SDK's typed `Message` took
        a fifth of a call's CPU (0.2 of 1.0 ms against the fake model
        server), for fields a turn does not use.

        Direct, the body goes out encoded by orjson through the client's
        `post`: `messages.create` copies every message of the context into
        new containers and encodes them with the standard library: 11.5% of
        a worker's py-spy samples with a full context of 600 short messages
        (bench/hot_path.py). The client still does the rest: headers,
        authentication, errors and the typed events of a stream.
        Bedrock's client rewrites the body into its own request, so it is
        given the arguments of `messages.create`.
        """
        if isinstance(self.client, self.sdk.AnthropicBedrock):
            arguments = {name: value for name, value in body.items() if name != "temperature"}
            extra_body = {"temperature": body["temperature"]} if "temperature" in body else None
            if stream:
                return self.client.messages.create(**arguments, stream=True, extra_body=extra_body)
            return self.client.messages.with_raw_response.create(**arguments, extra_body=extra_body).read()
        return self.client.post(
            "/v1/messages",
            content=orjson.dumps({**body, "stream": True} if stream else body),
            cast_to=bytes,
            stream=stream,
            stream_cls=self.sdk.Stream[self.sdk.types.RawMessageStreamEvent],
        )


class OpenAIModel:
    """Any endpoint that speaks OpenAI's Chat Completions."""

    provider = "openai"

    def __init__(self, client: openai.OpenAI, config: Mapping[str, Any]) -> None:
        import openai  # imported only by the processes that use it (see make_model)

        self.sdk = openai
        self.client = client
        self.model = config["LLM_MODEL"]
        self.max_tokens = config["LLM_MAX_TOKENS"]
        self.temperature = config["LLM_TEMPERATURE"]
        self.retries = RetryPolicy.from_config(config)

    def reply(self, system: str | None, messages: list[dict[str, str]], offer_human: bool = False) -> ModelReply:
        body = self._body(system, messages, offer_human)
        completion = self.retries.call(lambda: self._create(body), self.sdk, self.provider)
        try:
            return self._read(_decoded(completion))
        except _UNREADABLE as exc:
            raise _unreadable(self.provider) from exc

    def _read(self, completion: dict[str, Any]) -> ModelReply:
        """A chat completion as the endpoint sent it (JSON; see `AnthropicModel._create`)."""
        if not completion["choices"]:
            raise ModelError(502, "model_error", "the openai model returned no choices", retryable=True)
        choice = completion["choices"][0]
        message = choice["message"]
        usage = completion.get("usage")
        handoff = next(
            (_reason(_arguments(call["function"].get("arguments"))) for call in message.get("tool_calls") or []
             if call.get("type", "function") == "function" and call["function"].get("name") == REQUEST_HUMAN),
            None,
        )
        return ModelReply(
            text=_storable_reply(message.get("content") or "", self.provider, handoff is not None),
            handoff_reason=handoff,
            model=_text(completion.get("model") or self.model),  # some compatible servers leave it out
            input_tokens=_count(usage["prompt_tokens"]) if usage else 0,
            output_tokens=_count(usage["completion_tokens"]) if usage else 0,
            stop_reason=_text(choice.get("finish_reason"), may_be_none=True),
        )

    def stream(self, system: str | None, messages: list[dict[str, str]], offer_human: bool = False) -> ReplyStream:
        """`stream=True`, asking for the usage chunk at the end."""
        body = {**self._body(system, messages, offer_human), "stream": True, "stream_options": {"include_usage": True}}
        attempts = self.retries.start()
        start = functools.partial(self._create, body)
        chunks = self.retries.call(start, self.sdk, self.provider, attempts)
        restartable = _Restartable(chunks, start, self.retries, attempts, self.sdk, self.provider, _openai_preamble)
        return _SDKStream(self.provider, self.model, restartable, _read_openai_chunk)

    def _body(self, system: str | None, messages: list[dict[str, str]], offer_human: bool) -> dict[str, Any]:
        prompt = ([{"role": "system", "content": system}] if system else []) + _openai_messages(messages)
        # max_tokens rather than max_completion_tokens: most compatible
        # servers (vLLM, Ollama, LiteLLM) only know the former.
        body: dict[str, Any] = {"model": self.model, "messages": prompt, "max_tokens": self.max_tokens}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if offer_human:
            function = {"name": REQUEST_HUMAN, "description": _REQUEST_HUMAN_DESCRIPTION, "parameters": _REQUEST_HUMAN_INPUT}
            body["tools"] = [{"type": "function", "function": function}]
        return body

    def _create(self, body: dict[str, Any]) -> Any:
        """POST /chat/completions, the body encoded by orjson (see `AnthropicModel._create`)."""
        return self.client.post(
            "/chat/completions",
            content=orjson.dumps(body),
            cast_to=bytes,
            stream=bool(body.get("stream")),
            stream_cls=self.sdk.Stream[self.sdk.types.chat.ChatCompletionChunk],
        )


class EchoModel:
    """Offline stand-in: answers with the user's own words, clearly labelled."""

    provider = "echo"
    model = "echo"

    def __init__(self, label: str = ECHO_LABEL) -> None:
        self.label = label

    def reply(self, system: str | None, messages: list[dict[str, str]], offer_human: bool = False) -> ModelReply:
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == USER), "")
        text = f"{self.label} You said: {_said(last_user)}"
        attached = _attachment_labels(last_user)
        if attached:
            text += f" (with {len(attached)} file(s): {', '.join(attached)})"
        # Estimated from the whole prompt's length, not message by message: with a context
        # of 600 short messages that took 9% of a worker's py-spy samples.
        contents = [m["content"] for m in messages]
        try:
            prompt = "".join(contents)
        except TypeError:  # a message with files: its content is blocks
            prompt = "".join(_said(content) for content in contents)
        prompt_tokens = estimate_tokens(prompt) + MESSAGE_OVERHEAD_TOKENS * (len(contents) - 1)
        if system:
            prompt_tokens += estimate_tokens(system)
        return ModelReply(
            text=text,
            model=self.model,
            input_tokens=prompt_tokens,
            output_tokens=estimate_tokens(text),
            stop_reason="end_turn",
        )

    def stream(self, system: str | None, messages: list[dict[str, str]], offer_human: bool = False) -> ReplyStream:
        """The same reply, word by word."""
        return _EchoStream(self.reply(system, messages))


def make_model(config: Mapping[str, Any]) -> ChatModel:
    """Build the configured provider. SDK clients read their own env vars."""
    provider = config["LLM_PROVIDER"]
    if provider == "echo":
        return EchoModel(ECHO_CHOSEN_LABEL if config.get("LLM_PROVIDER_CHOSEN") else ECHO_LABEL)
    if provider == "openai":
        import openai

        client_class, sdk_error = openai.OpenAI, openai.OpenAIError
    elif provider in ("anthropic", "bedrock"):
        import anthropic

        client_class = anthropic.Anthropic if provider == "anthropic" else anthropic.AnthropicBedrock
        sdk_error = anthropic.AnthropicError
    else:
        raise ConfigError(f"unknown LLM_PROVIDER {provider!r}")
    client_options = {"timeout": config["LLM_TIMEOUT_SECONDS"], "max_retries": 0, "http_client": _http_client(config)}
    try:
        client = client_class(**client_options)
        return OpenAIModel(client, config) if provider == "openai" else AnthropicModel(client, provider, config)
    except (sdk_error, BotoCoreError, ValueError) as exc:  # no key, AWS region or profile
        raise ConfigError(f"LLM_PROVIDER={provider}: {exc}") from exc


def _http_client(config: Mapping[str, Any]) -> httpx2.Client:
    """One connection pool per process, as large as the turns a worker carries (WORKER_CONNECTIONS)."""
    limits = httpx2.Limits(max_connections=config["WORKER_CONNECTIONS"], max_keepalive_connections=100)
    return httpx2.Client(transport=DeadlineTransport(limits=limits), timeout=config["LLM_TIMEOUT_SECONDS"])


def _said(content: str | list[dict[str, Any]]) -> str:
    """A message's own text: the content, or the last text block (files come before it; files.py)."""
    if isinstance(content, str):
        return content
    return next((block["text"] for block in reversed(content) if block["type"] == "text"), "")


def _attachment_labels(content: str | list[dict[str, Any]]) -> list[str]:
    """What each file block of a message is: its media type, or `text` for an inline text file."""
    if isinstance(content, str):
        return []
    return [block["source"]["media_type"] if block["type"] != "text" else "text" for block in content[:-1]]


def _openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages API content blocks as Chat Completions parts: images as data URLs, text as text.

    files.py refuses the other kinds (PDF) for this provider before the turn starts.
    """
    converted = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [_openai_part(block) for block in content]
        converted.append({"role": message["role"], "content": content})
    return converted


def _openai_part(block: dict[str, Any]) -> dict[str, Any]:
    if block["type"] == "text":
        return {"type": "text", "text": block["text"]}
    if block["type"] == "image":
        source = block["source"]
        return {"type": "image_url", "image_url": {"url": f"data:{source['media_type']};base64,{source['data']}"}}
    raise ValueError(f"the openai provider cannot take a {block['type']} block")


def _reason(tool_input: Any) -> str:
    reason = tool_input.get("reason") if isinstance(tool_input, dict) else None
    return _utf8(reason.replace("\x00", ""))[:1000] if isinstance(reason, str) and reason.strip() else DEFAULT_HANDOFF_REASON


def _arguments(raw: Any) -> Any:
    """A tool call's arguments: JSON text, or (from some compatible servers) already an object."""
    if isinstance(raw, dict):
        return raw
    try:
        return _decoded(raw or "{}")
    except (TypeError, ValueError, RecursionError):
        return {}


def _utf8(text: str) -> str:
    """The text as UTF-8 can carry it: a lone surrogate (`\\ud800` in the JSON) becomes `?`."""
    return text.encode("utf-8", errors="replace").decode("utf-8")


def _storable_reply(text: str, provider: str, may_be_empty: bool = False) -> str:
    """The reply as it can be stored and sent back next turn, or a 502.

    PostgreSQL refuses NUL characters and providers refuse empty assistant
    turns, so an empty reply is a failed turn, not a stored one (unless the
    model handed off instead: then nothing of it is stored).
    """
    text = _utf8(text.replace("\x00", ""))
    if not text.strip() and not may_be_empty:
        raise ModelError(502, "model_error", f"the {provider} model returned an empty reply", retryable=True)
    return text


# What reading a reply that lacks a field, or is not an object at all, raises
# (orjson.JSONDecodeError is a ValueError). The SDKs build their typed stream
# events without validating them either, and decode them with the standard
# library's json, which nesting too deep for it stops with a RecursionError.
_UNREADABLE = (AttributeError, KeyError, TypeError, ValueError, RecursionError)
# A stream's events may also come in a Bedrock event-stream framing that cannot be decoded (a checksum that does not match, ...).
_UNREADABLE_STREAM = (*_UNREADABLE, EventStreamError)
# A token count is below this: the integers a JSON reader holds exactly
# (JavaScript's Number.MAX_SAFE_INTEGER + 1), far inside PostgreSQL's BIGINT.
_MAX_COUNT = 2**53


def _decoded(body: bytes | str) -> Any:
    """A whole reply's JSON. orjson refuses a lone surrogate (`\\ud800`); the standard library reads it."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)  # what it cannot read either is an unreadable reply (_UNREADABLE)


def _text(value: Any, may_be_none: bool = False) -> str | None:
    """A reply's text field as UTF-8 can carry it (see `_utf8`), or TypeError (read as an unreadable reply)."""
    if isinstance(value, str):
        return _utf8(value)
    if value is None and may_be_none:
        return None
    raise TypeError(f"expected text, got {type(value).__name__}")


def _count(value: Any) -> int:
    """A reply's token count (`3.0` from some compatible servers counts as 3), or ValueError (an unreadable reply)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_COUNT:
        return value
    raise ValueError(f"not a token count: {value!r}")


def _unreadable(provider: str) -> ModelError:
    return ModelError(502, "model_error", f"the {provider} model's reply could not be read", retryable=True)


def _stream_error(exc: Exception, provider: str) -> ModelError:
    """A failure while reading a stream, as the status Parley reports in its `error` event."""
    for name in ("anthropic", "openai"):
        sdk = sys.modules.get(name)  # an SDK that was never imported raised nothing
        if sdk is not None and isinstance(exc, sdk.APIConnectionError) and isinstance(exc.__cause__, httpx2.HTTPError):
            exc = exc.__cause__  # openai's stream wraps the transport's error: read as anthropic's, unwrapped
        elif sdk is not None and isinstance(exc, sdk.APIError):
            return _provider_error(exc, sdk, provider)
    if isinstance(exc, httpx2.TimeoutException):  # a read that waited LLM_TIMEOUT_SECONDS, or the total deadline
        message = (f"the {provider} model did not finish in time (LLM_TIMEOUT_SECONDS without a byte, "
                   "or LLM_TOTAL_TIMEOUT_SECONDS in all)")
        return ModelError(504, "model_timeout", message, retryable=True)
    if isinstance(exc, httpx2.HTTPError):
        return ModelError(502, "model_error", f"the {provider} model's stream broke off", retryable=True)
    raise exc


def _connection_error(exc: BaseException | None, provider: str, deadline_passed: bool = False, timed_out: bool = False) -> ModelError:
    """A request that got no whole answer: timed out (504), or its connection failed or broke off (503)."""
    if timed_out or isinstance(exc, httpx2.TimeoutException):
        limit = "within LLM_TOTAL_TIMEOUT_SECONDS" if deadline_passed else "in time"
        return ModelError(504, "model_timeout", f"the {provider} model did not answer {limit}", retryable=True)
    if isinstance(exc, httpx2.ConnectError):
        return ModelError(503, "model_unavailable", f"could not connect to the {provider} model", retryable=True)
    return ModelError(503, "model_unavailable", f"the connection to the {provider} model broke off", retryable=True)


def _provider_error(exc: Exception, sdk: Any, provider: str, deadline_passed: bool = False) -> ModelError:
    """Translate an SDK exception into the status Parley should answer with."""
    if isinstance(exc, sdk.APIConnectionError):  # the SDK's wrapping of the transport's error (a timeout too)
        return _connection_error(exc.__cause__, provider, deadline_passed, isinstance(exc, sdk.APITimeoutError))
    status = getattr(exc, "status_code", None)
    upstream = f"upstream status {status}"
    kind = _error_type(exc) if status in (None, 200) else None
    if kind is not None:  # an error event inside a stream that began with 200: its type tells
        # Bedrock's SDK names a type its service model lacks as "".
        status, upstream = _STATUS_OF_ERROR_TYPE.get(kind, status), f"upstream error {kind or 'of a type Parley does not know'}"
    retry_after = _retry_after_seconds(exc)
    wait = None if retry_after is None else math.ceil(retry_after)
    if status in (429, 503, 529):
        message = f"the {provider} model is unavailable, overloaded or rate limited; retry later"
        return ModelError(503, "model_unavailable", message, retryable=True, retry_after=wait)
    if status == 504:  # the provider's own timeout (a gateway's, `timeout_error`, `modelTimeoutException`)
        return ModelError(504, "model_timeout", f"the {provider} model timed out ({upstream})", retryable=True, retry_after=wait)
    retryable = status in RETRYABLE_STATUSES
    # A wait means nothing on a request that will fail again: it is passed on only with a retry.
    return ModelError(502, "model_error", f"the {provider} model failed ({upstream})", retryable, wait if retryable else None)


def _signing_error(exc: Exception, provider: str) -> ModelError | None:
    """A request that could not be signed (Bedrock: no AWS credentials, or their refresh failed), or None for another error."""
    if isinstance(exc, BotoCoreError) or (isinstance(exc, RuntimeError) and "AWS credentials" in str(exc)):
        message = f"could not sign the request to the {provider} model: its AWS credentials could not be found or refreshed"
        return ModelError(503, "model_unavailable", message, retryable=True)
    return None


# The HTTP status each provider's error type stands for, for an error that
# arrives as a stream event (Anthropic's `error` event, OpenAI's `error` chunk,
# Bedrock's exception message, which the SDK reads as an `error` event).
_STATUS_OF_ERROR_TYPE = {
    "overloaded_error": 529, "rate_limit_error": 429, "api_error": 500, "timeout_error": 504,  # Anthropic
    "server_error": 500, "rate_limit_exceeded": 429, "requests": 429, "tokens": 429,  # OpenAI
    "throttlingException": 429, "serviceUnavailableException": 503, "internalServerException": 500,  # Bedrock
    "modelStreamErrorException": 500, "modelTimeoutException": 504, "modelNotReadyException": 503, "validationException": 400,
}


def _error_type(exc: Exception) -> str | None:
    """The error's type in the provider's body: `{"error": {"type": ...}}`, or the inner object itself."""
    body = getattr(exc, "body", None)
    error = body.get("error", body) if isinstance(body, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    return kind if isinstance(kind, str) else None


def _retry_after_seconds(exc: Exception) -> float | None:
    """The provider's wait: `retry-after-ms` (as the SDKs read it), else Retry-After in seconds or as an HTTP date; or None.

    A header that is not a wait ("nan", "soon", a date no clock holds) counts as none, and the other is read.
    """
    response = getattr(exc, "response", None)
    if response is None:
        return None
    for name, per_second in (("retry-after-ms", 1000), ("retry-after", 1)):
        try:
            wait = _wait(float(response.headers.get(name)) / per_second)
        except (TypeError, ValueError):  # absent, or not a number
            continue
        if wait is not None:
            return wait
    try:  # a date already past means now
        return _wait(max(parsedate_to_datetime(response.headers.get("retry-after")).timestamp() - time.time(), 0.0))
    except (TypeError, ValueError, OverflowError):  # absent, not a date, or a year beyond the clock's
        return None


def _wait(seconds: float) -> float | None:
    """A provider's wait as Parley uses it: none if not a wait ("nan", "inf", "-5"), at most a day."""
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, RETRY_AFTER_MAX_PASSED_ON)


def _backoff(retries: int) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(BACKOFF_BASE_SECONDS * 2**retries, BACKOFF_MAX_SECONDS))
