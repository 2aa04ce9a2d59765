"""A conversation's message log and the context window sent to the model.

Pure logic, no I/O: the caller loads messages (usually only the newest ones,
see `database_utils.load_context_tail`) and stores what it appends.

Context rules:
- the system prompt is always sent and counted against the token budget;
- messages are taken newest first in whole exchanges (a user message and the
  replies that follow it), so a user/assistant pair is never split and the
  context never starts with an assistant message;
- taking stops at the first exchange that does not fit, so the context is
  always a contiguous tail of the log;
- a support agent's messages (role `staff`, stored during a human handoff)
  are sent as assistant turns prefixed with `STAFF_PREFIX`, and neighbours
  of the same role are joined, so user and assistant turns keep
  alternating (user messages stored while a human had the conversation
  have no reply of their own);
- when even the newest user message does not fit, it is sent alone, cut in
  the middle to fit the budget (its head and tail kept, a marker saying how
  much was left out). The stored message stays whole. It keeps at least
  `MIN_TRUNCATED_TOKENS`, so a message no longer than that is sent whole.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

USER = "user"
ASSISTANT = "assistant"
STAFF = "staff"
ROLES = (USER, ASSISTANT)
# How a staff message reaches the model: as its own side of the dialog, marked.
STAFF_PREFIX = "[A human support agent wrote this to the user:] "

# Framing tokens the providers add around every message.
MESSAGE_OVERHEAD_TOKENS = 4
# Bytes of UTF-8 per token: conservative for English (~4 chars/token) and
# right for CJK (3 bytes, about one token per character).
BYTES_PER_TOKEN = 3
# A message cut to fit keeps at least this many tokens, even when the system
# prompt alone fills the budget.
MIN_TRUNCATED_TOKENS = 64
TRUNCATION_MARKER = "\n[... {omitted} bytes omitted to fit the context budget ...]\n"


def estimate_tokens(text: str) -> int:
    """Estimate a message's tokens locally, without asking the provider."""
    return -(-len(text.encode("utf-8")) // BYTES_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS


@dataclass(slots=True)
class MemoryMessage:
    """One message of the log. `seq` is None until the database has stored it."""

    role: str
    content: str
    token_count: int
    seq: int | None = None
    created_at: datetime | None = None
    usage: dict[str, int] | None = None
    incomplete: bool = False
    # IDs of the conversation files a user message referred to.
    file_ids: list[str] | None = None
    # The message as a provider takes it, made once (see `sent`).
    _sent: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    def sent(self) -> dict[str, str]:
        """`{"role", "content"}` for a provider; one dict for the message's life, shared and never changed.

        A worker keeps a conversation's tail between turns (context_cache.py)
        and sends the same hundreds of messages on each: making their dicts
        anew every turn took 7% of an echo worker's samples (py-spy).
        """
        if self._sent is None:
            self._sent = {"role": self.role, "content": self.content}
        return self._sent

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["_sent"]
        data["created_at"] = self.created_at.isoformat() if self.created_at else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryMessage:
        created_at = datetime.fromisoformat(data["created_at"]) if data.get("created_at") else None
        return cls(**{**data, "created_at": created_at})


@dataclass(frozen=True)
class ContextWindow:
    """What is sent to the model for one turn."""

    system: str | None
    # Each message's dict may be the log's own (`MemoryMessage.sent`): replace one, never change it.
    messages: list[dict[str, str]]
    token_count: int
    messages_dropped: int
    truncated: bool = False
    # Messages of the log sent: more than `messages` when neighbours were joined.
    log_messages: int | None = None

    @property
    def messages_sent(self) -> int:
        return len(self.messages) if self.log_messages is None else self.log_messages


@dataclass
class ConversationMemory:
    """The ordered log of one conversation plus its context budget.

    `messages` may be only the newest part of the log; `earlier_messages`
    counts the older ones that were not loaded, so drop counts stay right.
    """

    system_prompt: str | None = None
    max_tokens: int = 8000
    max_messages: int | None = None
    messages: list[MemoryMessage] = field(default_factory=list)
    earlier_messages: int = 0

    def update_memory(
        self,
        role: str,
        content: str,
        *,
        created_at: datetime | None = None,
        usage: dict[str, int] | None = None,
    ) -> MemoryMessage:
        """Append a message to the log and return it (its seq is the database's to assign)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        message = MemoryMessage(
            role=role,
            content=content,
            token_count=estimate_tokens(content),
            created_at=created_at or datetime.now(timezone.utc),
            usage=usage,
        )
        self.messages.append(message)
        return message

    @property
    def total_messages(self) -> int:
        return self.earlier_messages + len(self.messages)

    def get_current_context(self) -> ContextWindow:
        """The newest whole exchanges that fit the token and message budgets.

        An exchange is a user message and what follows it up to the next
        one; messages before the first user message cannot open a context.
        """
        system_tokens = estimate_tokens(self.system_prompt) if self.system_prompt else 0
        budget = self.max_tokens - system_tokens
        messages = self.messages
        # Every tail of the log counts no more tokens and messages than a longer one, so the
        # oldest user message whose tail fits opens the context: drop from the front until one
        # does (the log is usually loaded about one budget long, so few are dropped).
        used = sum(message.token_count for message in messages)
        start = 0
        while start < len(messages) and (
            messages[start].role != USER
            or used > budget
            or (self.max_messages is not None and len(messages) - start > self.max_messages)
        ):
            used -= messages[start].token_count
            start += 1
        chosen = messages[start:]
        newest_user = None if chosen else next((m for m in reversed(messages) if m.role == USER), None)
        if newest_user is not None:
            return self._truncated_context(newest_user, budget, system_tokens)
        return ContextWindow(
            system=self.system_prompt,
            messages=_alternating(chosen),
            token_count=system_tokens + used,
            messages_dropped=self.total_messages - len(chosen),
            log_messages=len(chosen),
        )

    def _truncated_context(self, message: MemoryMessage, budget: int, system_tokens: int) -> ContextWindow:
        limit = max(budget, MIN_TRUNCATED_TOKENS)
        if message.token_count <= limit:  # the system prompt left less than the least a message keeps
            content, truncated = message.content, False
        else:
            content, truncated = _cut_middle(message.content, limit), True
        return ContextWindow(
            system=self.system_prompt,
            messages=[{"role": message.role, "content": content}],
            token_count=system_tokens + estimate_tokens(content),
            messages_dropped=self.total_messages - 1,
            truncated=truncated,
        )

    def to_json(self) -> str:
        data = asdict(self)
        data["messages"] = [message.to_dict() for message in self.messages]
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> ConversationMemory:
        data = json.loads(text)
        data["messages"] = [MemoryMessage.from_dict(message) for message in data["messages"]]
        return cls(**data)


def _alternating(messages: list[MemoryMessage]) -> list[dict[str, str]]:
    """Provider messages: staff ones as marked assistant turns, same-role neighbours joined."""
    roles = [message.role for message in messages]
    if set(roles[::2]) <= {USER} and set(roles[1::2]) <= {ASSISTANT}:
        # Already alternating from a user message, as a bot-only conversation is: nothing to join.
        return [message.sent() for message in messages]
    sent: list[dict[str, str]] = []
    last_role = None
    for message in messages:
        role, content = message.role, message.content
        if role == STAFF:
            role, content = ASSISTANT, STAFF_PREFIX + content
        if role == last_role:
            sent[-1]["content"] += "\n\n" + content
        else:
            sent.append({"role": role, "content": content})
            last_role = role
    return sent


def _cut_middle(text: str, max_tokens: int) -> str:
    """Keep the head and tail of `text` so that it estimates to `max_tokens`."""
    raw = text.encode("utf-8")
    marker_bytes = len(TRUNCATION_MARKER.format(omitted=len(raw)).encode("utf-8"))
    keep = max((max_tokens - MESSAGE_OVERHEAD_TOKENS) * BYTES_PER_TOKEN - marker_bytes, 0)
    head = raw[: keep // 2].decode("utf-8", errors="ignore")
    tail = raw[len(raw) - keep // 2 :].decode("utf-8", errors="ignore") if keep >= 2 else ""
    omitted = len(raw) - len(head.encode("utf-8")) - len(tail.encode("utf-8"))
    return head + TRUNCATION_MARKER.format(omitted=omitted) + tail
