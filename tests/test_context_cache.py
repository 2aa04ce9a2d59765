"""Each worker's cached context tails (context_cache.py): what they keep, and that a
turn's context is the same with them as without, whoever stored the messages since."""
from __future__ import annotations

import random
import time
import uuid
import weakref

import pytest
from sqlalchemy import select

from context_cache import CACHE_SECONDS, CachedTail, TailCache
from conversation_memory import ConversationMemory, MemoryMessage, estimate_tokens
from database_utils import (
    ApiKey,
    append_messages,
    claim_turn,
    commit_each_statement,
    finish_turn,
    get_conversation,
    get_session,
    load_context_tail,
)
from main import create_app
from tests.conftest import client_with_key


def _messages(*tokens: int, first_seq: int = 1) -> list[MemoryMessage]:
    return [MemoryMessage("user" if n % 2 == 0 else "assistant", f"m{n}", count, first_seq + n) for n, count in enumerate(tokens)]


def test_an_extended_tail_drops_the_oldest_messages_the_budget_no_longer_needs():
    tail = CachedTail(tuple(_messages(10, 10, 10)), last_seq=3, token_budget=25, max_messages=None)

    extended = tail.extended(_messages(10, 10, first_seq=4))

    # 10 + 10 + 10 = 30 tokens fill 25; a fourth newest message would not be needed
    assert [m.seq for m in extended] == [3, 4, 5]


def test_an_extended_tail_keeps_the_whole_log_while_it_is_under_the_budget():
    tail = CachedTail(tuple(_messages(10)), last_seq=1, token_budget=1000, max_messages=None)

    assert [m.seq for m in tail.extended(_messages(10, 10, first_seq=2))] == [1, 2, 3]


def test_an_extended_tail_keeps_as_many_messages_as_the_cap():
    tail = CachedTail(tuple(_messages(1, 1, 1)), last_seq=3, token_budget=1000, max_messages=2)

    assert [m.seq for m in tail.extended(_messages(1, first_seq=4))] == [3, 4]


@pytest.mark.parametrize(
    ("budget", "cap", "serves"),
    [(100, None, True), (50, 5, True), (101, None, False), (100, 3, True)],
)
def test_a_tail_serves_only_turns_it_holds_enough_for(budget, cap, serves):
    tail = CachedTail((), last_seq=0, token_budget=100, max_messages=None)
    capped = CachedTail((), last_seq=0, token_budget=100, max_messages=4)

    assert tail.serves(budget, cap) is serves
    assert capped.serves(100, None) is False and capped.serves(100, 4) is True and capped.serves(100, 5) is False


def test_the_cache_keeps_the_most_recently_used_and_size_zero_keeps_nothing():
    cache, off = TailCache(2), TailCache(0)
    ids = [uuid.uuid4() for _ in range(3)]
    for conversation_id in ids[:2]:
        cache.put(conversation_id, CachedTail((), 0, 100, None))
        off.put(conversation_id, CachedTail((), 0, 100, None))
    assert cache.get(ids[0], 100, None) is not None  # now the most recently used
    cache.put(ids[2], CachedTail((), 0, 100, None))

    assert cache.get(ids[1], 100, None) is None
    assert cache.get(ids[0], 100, None) is not None and cache.get(ids[2], 100, None) is not None
    assert len(off) == 0 and off.get(ids[0], 100, None) is None


def test_a_tail_leaves_the_cache_after_cache_seconds():
    now = [0.0]
    cache = TailCache(10, seconds=CACHE_SECONDS, timer=lambda: now[0])
    conversation_id = uuid.uuid4()
    cache.put(conversation_id, CachedTail((), 0, 100, None))

    now[0] = CACHE_SECONDS - 1
    assert cache.get(conversation_id, 100, None) is not None
    now[0] = CACHE_SECONDS + 1
    assert cache.get(conversation_id, 100, None) is None and len(cache) == 0


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_cached_claim_gives_the_same_context_as_a_fresh_read_whoever_stored_since(app, keys):
    """Two workers' caches and a staff member take turns on one conversation at random; each claim's
    context must equal the one built from a fresh read of the tail."""
    rng = random.Random(7)
    budget = 300
    workers = [TailCache(100), TailCache(100)]
    with app.app_context():
        session = get_session()
        owner = session.scalar(select(ApiKey.key_id).where(ApiKey.name == "client_a"))
        client = client_with_key(app, keys["client_a"])
        conversation_id = uuid.UUID(client.post("/new_chat", json={"user_id": "u"}).json["conversation_id"])
        hits = 0
        for turn in range(60):
            if rng.random() < 0.15:  # a staff message, stored without a turn lease
                append_messages(session, conversation_id, [_said("staff", rng)])
                session.commit()
                continue
            tails = rng.choice(workers)
            hits += tails.get(conversation_id, budget, None) is not None
            lease = uuid.uuid4()
            commit_each_statement(session)
            claimed, tail = claim_turn(session, conversation_id, owner, lease, 60, budget, tails=tails)
            session.commit()
            conversation = get_conversation(session, conversation_id)
            fresh = load_context_tail(session, conversation_id, conversation.message_count, conversation.token_count, budget)
            session.commit()

            assert [m.seq for m in tail] == list(range(tail[0].seq, claimed.message_count + 1)) if tail else not fresh
            assert _context(tail, claimed.message_count, budget) == _context(fresh, claimed.message_count, budget), turn

            finish_turn(session, conversation_id, lease, [_said("user", rng), _said("assistant", rng)], {})
            session.commit()
    assert hits > 20  # the cache was used, not only filled


def _said(role: str, rng: random.Random) -> MemoryMessage:
    text = "word " * rng.randint(1, 60)
    return MemoryMessage(role, text, estimate_tokens(text))


def _context(tail: list[MemoryMessage], message_count: int, budget: int):
    memory = ConversationMemory(max_tokens=budget, messages=list(tail), earlier_messages=message_count - len(tail))
    memory.update_memory("user", "next")
    return memory.get_current_context()


@pytest.mark.parametrize("backend", ["postgres"])
def test_two_workers_each_see_the_turns_the_other_served(app_config, keys, app):
    """Each app has its own cache, as each gunicorn worker does; turns alternate between them."""
    first, second = app, create_app(app_config)
    clients = [client_with_key(first, keys["client_a"]), client_with_key(second, keys["client_a"])]
    conversation_id = clients[0].post("/new_chat", json={"user_id": "u"}).json["conversation_id"]

    sent = [clients[n % 2].post("/chat", json={"conversation_id": conversation_id, "message": f"turn {n}"}).json
            for n in range(6)]

    # every turn's context holds all earlier exchanges, whichever worker served them
    assert [turn["context"]["messages_sent"] for turn in sent] == [1, 3, 5, 7, 9, 11]
    assert all(len(app.extensions["parley.context_cache"]) == 1 for app in (first, second))
    second.extensions["parley.engine"].dispose()


def test_a_worker_without_turns_frees_its_tails_once_they_are_past_their_time():
    """The cache frees expired tails only when it changes; the sweep frees them in a worker that serves nothing."""
    cache = TailCache(10, seconds=0.2)
    tail = CachedTail((MemoryMessage("user", "an erased conversation's words", 8, 1),), 1, 100, None)
    cache.put(uuid.uuid4(), tail)
    freed = weakref.ref(tail)
    del tail

    deadline = time.monotonic() + 5
    while freed() is not None and time.monotonic() < deadline:
        time.sleep(0.05)

    assert freed() is None
