"""What a client polling for staff messages costs, in PostgreSQL.

`GET /get_conversation?after_seq=N` reads a range of the messages' primary
key (conversation_id, seq); the baseline, measured in the same run, is the
full read a client would otherwise repeat. Then the staff queue
(`GET /conversations?handoff=needs_human`, oldest waiting first) with
`ix_conversations_handoff_since`, against the same query with that index
dropped (the baseline).

    python -m bench.handoff_reads [--messages 5000] [--conversations 100000] [--repeat 30]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.orm import Session
from tqdm import tqdm

from database_utils import find_conversations, list_messages, make_engine, upgrade_database
from tests.factories import seed_conversation, seed_conversations
from tests.postgres import admin_url, temporary_database


def _median_ms(work: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5_000)
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    with temporary_database(admin_url(), prefix="parley_bench") as url:
        upgrade_database(url)
        engine = make_engine(url)
        with Session(engine) as session:
            conversation_id = seed_conversation(session, args.messages)
            for start in tqdm(range(0, args.conversations, 10_000), desc="seeding", unit="10k rows"):
                seed_conversations(session, min(10_000, args.conversations - start), offset=start)
            # One conversation in a hundred waits for a human, at its own time.
            session.execute(text(
                "UPDATE conversations SET handoff = 'needs_human', handoff_since = created_at + interval '1 minute' "
                "WHERE user_id LIKE '%7'"
            ))
            session.execute(text("ANALYZE conversations"))
            session.execute(text("ANALYZE messages"))
            session.commit()

            full = _median_ms(lambda: list_messages(session, conversation_id), args.repeat)
            tail = _median_ms(lambda: list_messages(session, conversation_id, args.messages - 2), args.repeat)
            print(f"log of {args.messages} messages: full read {full:.2f} ms, after_seq (2 new) {tail:.3f} ms, "
                  f"ratio {full / tail:.0f}x")

            queue = {"handoff": "needs_human"}
            indexed = _median_ms(lambda: find_conversations(session, queue, None, 51), args.repeat)
            session.execute(text("DROP INDEX ix_conversations_handoff_since"))
            baseline = _median_ms(lambda: find_conversations(session, queue, None, 51), args.repeat)
            session.rollback()
            print(f"queue page (needs_human, {args.conversations} conversations): indexed {indexed:.3f} ms, "
                  f"without ix_conversations_handoff_since {baseline:.2f} ms, ratio {baseline / indexed:.0f}x")
        engine.dispose()


if __name__ == "__main__":
    main()
