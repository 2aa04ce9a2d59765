"""The context tails of recent conversations, kept in each worker between turns.

A turn needs the newest messages of its conversation, up to the context
budget: with the default 8,000 tokens and short messages, hundreds of rows
that the database reads and sends, and the worker decodes, on every turn.
The log of an active conversation only grows: messages are never changed,
and only an ended conversation's are deleted. So each worker keeps the
tail it read last, and the conversation's next turn reads only the messages
stored after it, by whichever worker or staff member (`database_utils.claim_turn`).
The database stays the only source; a miss costs what a turn cost before.

Bounded to CONTEXT_CACHE_CONVERSATIONS conversations per worker, the least
recently used dropped first; 0 turns it off. A tail is not served
`CACHE_SECONDS` after it was read, and each worker sweeps such tails out
of its memory every `SWEEP_SECONDS`, turns or none, so the messages of an
ended or erased conversation do not stay there. PostgreSQL only (the
embedded SQLite serves one machine's tests and demos).
"""
from __future__ import annotations

import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from conversation_memory import MemoryMessage

# How long a tail is kept after it was read.
CACHE_SECONDS = 600.0
# How often a worker frees the tails past CACHE_SECONDS (the cache itself only does when it changes).
SWEEP_SECONDS = 60.0


@dataclass(frozen=True)
class CachedTail:
    """The newest messages of a conversation's log, oldest first, up to `last_seq`.

    Either all of the log, or enough of it for `token_budget` and
    `max_messages`, as `database_utils.load_context_tail` reads it.
    """

    messages: tuple[MemoryMessage, ...]
    last_seq: int
    token_budget: int
    max_messages: int | None

    def serves(self, token_budget: int, max_messages: int | None) -> bool:
        """Whether this tail holds enough for a turn with these budgets."""
        if token_budget > self.token_budget:
            return False
        return self.max_messages is None or (max_messages is not None and max_messages <= self.max_messages)

    def extended(self, newer: list[MemoryMessage]) -> list[MemoryMessage]:
        """This tail and the `newer` messages after it (oldest first), without the oldest ones no longer needed."""
        messages = [*self.messages, *newer]
        tokens = sum(message.token_count for message in messages)
        start = 0
        # Drop the oldest while what is left still fills a budget, as reading back stops once it does.
        while start < len(messages) and (
            tokens - messages[start].token_count >= self.token_budget
            or (self.max_messages is not None and len(messages) - start - 1 >= self.max_messages)
        ):
            tokens -= messages[start].token_count
            start += 1
        return messages[start:]


class TailCache:
    """Conversation ID -> `CachedTail`, least recently used first out, none past `seconds`; size 0 keeps nothing."""

    def __init__(self, size: int, seconds: float = CACHE_SECONDS, timer: Callable[[], float] = time.monotonic) -> None:
        self._entries: TTLCache[uuid.UUID, CachedTail] | None = TTLCache(size, seconds, timer) if size > 0 else None
        self._lock = threading.Lock()
        self._sweep_every = min(seconds, SWEEP_SECONDS)
        self._swept_by: int | None = None  # the process whose sweeper runs (a forked one starts its own)

    def get(self, conversation_id: uuid.UUID, token_budget: int, max_messages: int | None) -> CachedTail | None:
        if self._entries is None:
            return None
        with self._lock:
            tail = self._entries.get(conversation_id)
        return tail if tail is not None and tail.serves(token_budget, max_messages) else None

    def put(self, conversation_id: uuid.UUID, tail: CachedTail) -> None:
        if self._entries is None:
            return
        with self._lock:
            self._entries[conversation_id] = tail
            start_sweeping, self._swept_by = self._swept_by != os.getpid(), os.getpid()
        if start_sweeping:
            sweeper = threading.Thread(target=_sweep, args=(weakref.ref(self), self._sweep_every), name="parley-tail-sweep",
                                       daemon=True)
            try:
                sweeper.start()
            except RuntimeError:  # at interpreter shutdown: the next put tries again
                self._swept_by = None

    def expire(self) -> None:
        """Free the tails past their time."""
        if self._entries is not None:
            with self._lock:
                self._entries.expire()

    def __len__(self) -> int:
        return 0 if self._entries is None else len(self._entries)


def _sweep(cache: weakref.ref[TailCache], every: float) -> None:
    """Every `every` seconds, free the cache's tails past their time; ends with the cache."""
    while True:
        time.sleep(every)
        alive = cache()
        if alive is None:
            return
        alive.expire()
        del alive  # no reference kept while sleeping
