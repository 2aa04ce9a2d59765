"""ConversationMemory: the context window rules, without any I/O."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conversation_memory import (
    ASSISTANT,
    MIN_TRUNCATED_TOKENS,
    STAFF,
    USER,
    ConversationMemory,
    MemoryMessage,
    estimate_tokens,
)


def _memory(turns: int, words: int = 10, **options) -> ConversationMemory:
    memory = ConversationMemory(**options)
    for turn in range(turns):
        memory.update_memory(USER, f"question {turn} " + "word " * words)
        memory.update_memory(ASSISTANT, f"answer {turn} " + "word " * words)
    return memory


def test_update_memory_appends_in_order_with_tokens_and_leaves_seq_to_the_database():
    memory = ConversationMemory()
    first = memory.update_memory(USER, "hello")
    second = memory.update_memory(ASSISTANT, "hi there", usage={"input_tokens": 3, "output_tokens": 2})

    assert memory.messages == [first, second]
    assert [m.seq for m in memory.messages] == [None, None]
    assert first.token_count == estimate_tokens("hello")
    assert second.usage == {"input_tokens": 3, "output_tokens": 2}
    assert first.created_at.tzinfo is not None


def test_update_memory_rejects_unknown_role():
    with pytest.raises(ValueError, match="role"):
        ConversationMemory().update_memory("system", "x")


def test_everything_is_sent_when_it_fits():
    memory = _memory(3, system_prompt="Be brief.")
    memory.update_memory(USER, "last question")

    context = memory.get_current_context()

    assert context.messages_sent == 7
    assert context.messages_dropped == 0
    assert context.system == "Be brief."
    assert context.messages[-1] == {"role": USER, "content": "last question"}


def test_budget_keeps_newest_whole_exchanges():
    memory = _memory(50, max_tokens=200)
    memory.update_memory(USER, "newest")

    context = memory.get_current_context()

    assert context.token_count <= 200
    assert context.messages[0]["role"] == USER
    assert context.messages[-1]["content"] == "newest"
    # whole pairs plus the pending question: an odd count
    assert context.messages_sent % 2 == 1
    assert context.messages_sent + context.messages_dropped == 101


def test_system_prompt_counts_against_budget():
    without = _memory(50, max_tokens=300)
    with_prompt = _memory(50, max_tokens=300, system_prompt="You are a helpful agent. " * 8)
    for memory in (without, with_prompt):
        memory.update_memory(USER, "q")

    assert with_prompt.get_current_context().messages_sent < without.get_current_context().messages_sent
    assert with_prompt.get_current_context().token_count <= 300


def test_message_cap_limits_count_without_splitting_pairs():
    memory = _memory(10, max_messages=4)
    memory.update_memory(USER, "q")

    context = memory.get_current_context()

    assert context.messages_sent == 3
    assert [m["role"] for m in context.messages] == [USER, ASSISTANT, USER]


def test_oversized_message_is_cut_in_the_middle_to_fit():
    memory = _memory(2, max_tokens=100)
    huge = "START " + "x" * 10_000 + " END"
    memory.update_memory(USER, huge)

    context = memory.get_current_context()

    assert context.truncated is True
    assert context.messages_sent == 1
    sent = context.messages[0]["content"]
    assert sent.startswith("START") and sent.endswith("END")
    assert "omitted to fit the context budget" in sent
    assert context.token_count <= 100
    assert memory.messages[-1].content == huge  # the log keeps it whole


def test_oversized_message_still_sent_when_system_prompt_fills_budget():
    memory = ConversationMemory(system_prompt="rules " * 200, max_tokens=50)
    memory.update_memory(USER, "y" * 5_000)

    context = memory.get_current_context()

    assert context.truncated
    assert estimate_tokens(context.messages[0]["content"]) <= MIN_TRUNCATED_TOKENS


def test_leading_assistant_message_is_never_sent_first():
    memory = ConversationMemory()
    memory.update_memory(ASSISTANT, "Welcome! How can I help?")
    memory.update_memory(USER, "hi")

    context = memory.get_current_context()

    assert context.messages == [{"role": USER, "content": "hi"}]
    assert context.messages_dropped == 1


def test_earlier_messages_count_towards_dropped():
    memory = ConversationMemory(earlier_messages=5000)
    memory.update_memory(USER, "q")

    assert memory.total_messages == 5001
    assert memory.get_current_context().messages_dropped == 5000


def test_json_round_trip_is_exact():
    memory = _memory(3, system_prompt="sys", max_tokens=123, max_messages=7)
    memory.update_memory(ASSISTANT, "ünïcødé ✓ 中文", usage={"input_tokens": 1, "output_tokens": 2})
    memory.earlier_messages = 4

    restored = ConversationMemory.from_json(memory.to_json())

    assert restored == memory
    assert restored.to_json() == memory.to_json()


def test_a_context_sends_each_message_once_made_and_the_log_still_round_trips():
    memory = _memory(3)
    first = memory.get_current_context().messages
    memory.update_memory(USER, "one more")
    second = memory.get_current_context().messages

    # The worker's cached tail sends the same messages each turn: their dicts are made once.
    assert [m["content"] for m in second[:-1]] == [m["content"] for m in first]
    assert all(a is b for a, b in zip(first, second[:-1], strict=True))
    assert ConversationMemory.from_json(memory.to_json()) == memory


def test_estimate_counts_multibyte_text_higher():
    assert estimate_tokens("中文" * 100) > estimate_tokens("ab" * 100)


_roles = st.sampled_from([USER, ASSISTANT])
_texts = st.text(min_size=1, max_size=400)


@settings(max_examples=200, deadline=None)
@given(
    log=st.lists(st.tuples(_roles, _texts), max_size=60),
    last=_texts,
    max_tokens=st.integers(min_value=20, max_value=2_000),
    max_messages=st.one_of(st.none(), st.integers(min_value=1, max_value=30)),
    system=st.one_of(st.none(), st.text(max_size=300)),
)
def test_context_invariants_hold_for_any_log(log, last, max_tokens, max_messages, system):
    memory = ConversationMemory(system_prompt=system or None, max_tokens=max_tokens, max_messages=max_messages)
    for role, content in log:
        memory.update_memory(role, content)
    memory.update_memory(USER, last)

    context = memory.get_current_context()
    sent = context.messages
    log_tail = memory.messages[-context.messages_sent:]

    assert sent and sent[0]["role"] == USER
    assert all(a["role"] != b["role"] for a, b in zip(sent, sent[1:], strict=False))  # turns alternate
    assert context.messages_sent + context.messages_dropped == len(memory.messages)
    if context.truncated:
        assert len(sent) == 1 and sent[0]["content"] != last
    else:
        # A contiguous tail of the log, ending with the new message; same-role neighbours joined.
        assert "\n\n".join(m["content"] for m in sent) == "\n\n".join(m.content for m in log_tail)
        assert [m["role"] for m in sent] == [r for n, r in enumerate(m.role for m in log_tail) if n == 0 or r != log_tail[n - 1].role]
        # Over the budget only when the system prompt leaves less than a message keeps, and the new one is sent whole.
        assert context.token_count <= max_tokens or (len(sent) == 1 and estimate_tokens(last) <= MIN_TRUNCATED_TOKENS)
        assert max_messages is None or len(sent) <= max_messages


@settings(max_examples=300, deadline=None)
@given(
    log=st.lists(st.tuples(st.sampled_from([USER, ASSISTANT, STAFF]), st.text(max_size=200)), max_size=40),
    max_tokens=st.integers(min_value=1, max_value=1_500),
    max_messages=st.one_of(st.none(), st.integers(min_value=1, max_value=20)),
    system=st.one_of(st.none(), st.text(min_size=1, max_size=300)),
)
def test_the_context_opens_at_the_oldest_user_message_whose_tail_fits(log, max_tokens, max_messages, system):
    """Whole exchanges as far back as they fit, and no further: checked against every possible start."""
    messages = [MemoryMessage(role, content, estimate_tokens(content)) for role, content in log]
    memory = ConversationMemory(system_prompt=system, max_tokens=max_tokens, max_messages=max_messages, messages=messages)
    budget = max_tokens - (estimate_tokens(system) if system else 0)

    context = memory.get_current_context()

    fitting = [
        start for start, message in enumerate(messages)
        if message.role == USER
        and sum(m.token_count for m in messages[start:]) <= budget
        and (max_messages is None or len(messages) - start <= max_messages)
    ]
    if fitting:
        assert not context.truncated
        assert context.messages_sent == len(messages) - fitting[0]
        assert context.token_count == max_tokens - budget + sum(m.token_count for m in messages[fitting[0]:])
    elif any(message.role == USER for message in messages):
        newest = next(message for message in reversed(messages) if message.role == USER)
        assert context.messages_sent == 1
        assert context.truncated == (newest.token_count > max(budget, MIN_TRUNCATED_TOKENS))
    else:
        assert context.messages == [] and context.messages_dropped == len(messages)


def test_a_short_message_is_sent_once_and_whole_when_the_system_prompt_leaves_little_room():
    memory = ConversationMemory(system_prompt="s" * 276, max_tokens=100)  # leaves 4 tokens
    memory.update_memory(USER, "hello there, this is 34 bytes long")

    context = memory.get_current_context()

    assert context.messages == [{"role": USER, "content": "hello there, this is 34 bytes long"}]
    assert not context.truncated
