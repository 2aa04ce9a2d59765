"""A client listing its own conversations (`GET /conversations` with a client
key) in PostgreSQL: the index of revision 0005 against the one it replaced.

Each client key owns an equal share of the conversations. The page query is
timed (median) with `ix_conversations_owner_created` (owner, created_at, id),
then, in the same run, with only the single-column `ix_conversations_owner`
that revision 0002 made (the baseline): the ratio is what 0005 buys.

    python -m bench.client_list [--conversations 100000] [--keys 20] [--repeat 30]
"""
from __future__ import annotations

import argparse
import statistics
import time
import uuid
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session
from tqdm import tqdm

from database_utils import ApiKey, Conversation, find_conversations, make_engine, upgrade_database
from tests.factories import seed_conversations
from tests.postgres import admin_url, temporary_database

PAGE = 51  # a page of 50 plus one to know whether there is a next page


def _time(session: Session, filters: dict[str, Any], after: Any, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        find_conversations(session, filters, after, PAGE)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def _cases(session: Session, owner: uuid.UUID, deep: int) -> dict[str, tuple[dict[str, Any], Any]]:
    position = session.execute(
        select(Conversation.created_at, Conversation.conversation_id)
        .where(Conversation.owner_key_id == owner)
        .order_by(Conversation.created_at.desc(), Conversation.conversation_id.desc())
        .offset(deep * (PAGE - 1))
        .limit(1)
    ).one()
    return {
        "first page": ({"owner_key_id": owner}, None),
        f"page {deep + 1} (cursor)": ({"owner_key_id": owner}, (position[0], position[1])),
        "first page, ended only": ({"owner_key_id": owner, "status": "ended"}, None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    with temporary_database(admin_url(), prefix="parley_bench") as url:
        upgrade_database(url)
        engine = make_engine(url)
        with Session(engine) as session:
            keys = [uuid.uuid4() for _ in range(args.keys)]
            session.execute(insert(ApiKey), [
                {"key_id": key, "lineage_id": key, "name": f"client {n}", "role": "client", "key_hash": key.hex * 2,
                 "prefix": "prly_bench"}
                for n, key in enumerate(keys)
            ])
            for start in tqdm(range(0, args.conversations, 10_000), desc="seeding", unit="10k rows"):
                seed_conversations(session, min(10_000, args.conversations - start), offset=start)
            # Conversation i belongs to key i % keys, spread over the whole time range.
            session.execute(text(
                "UPDATE conversations SET owner_key_id = (CAST(:keys AS uuid[]))[1 + (('x' || substr(conversation_id::text, 25, 12))::bit(48)::bigint % :n)]"
            ), {"keys": [str(key) for key in keys], "n": args.keys})
            session.execute(text("ANALYZE conversations"))
            session.commit()
            owner = keys[len(keys) // 2]
            cases = _cases(session, owner, deep=min(40, args.conversations // args.keys // (PAGE - 1) // 2))
            indexed = {name: _time(session, filters, after, args.repeat) for name, (filters, after) in cases.items()}
            # The baseline: the index revision 0002 had, instead of 0005's.
            session.execute(text("CREATE INDEX ix_conversations_owner ON conversations (owner_key_id)"))
            session.execute(text("DROP INDEX ix_conversations_owner_created"))
            session.execute(text("ANALYZE conversations"))
            baseline = {name: _time(session, filters, after, args.repeat) for name, (filters, after) in cases.items()}
            session.rollback()
            share = args.conversations // args.keys
            print(f"\nA client's own list, {args.conversations:,} conversations, {args.keys} client keys "
                  f"(~{share:,} each), page of {PAGE - 1}, median of {args.repeat}")
            print(f"{'lookup':<26}{'0005 index ms':>15}{'0002 index ms':>15}{'ratio':>8}")
            for name in cases:
                print(f"{name:<26}{indexed[name]:>15.2f}{baseline[name]:>15.2f}{baseline[name] / indexed[name]:>7.1f}x")
        engine.dispose()


if __name__ == "__main__":
    main()
