"""Staff search over 100,000 conversations in PostgreSQL: plans and timings.

For each kind of lookup it prints the plan PostgreSQL picks by itself, the
median time of the page query with the indexes, and the same query with
index scans switched off (the baseline, measured in the same run): the ratio
is what the indexes buy.

    python -m bench.staff_search [--conversations 100000] [--repeat 30]
"""
from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.orm import Session
from tqdm import tqdm

from database_utils import find_conversations, make_engine, upgrade_database
from tests.factories import seed_conversations
from tests.postgres import admin_url, temporary_database

PAGE = 51  # a page of 50 plus one to know whether there is a next page
CASES: dict[str, dict[str, Any]] = {
    "newest first, no filter": {},
    "by user": {"user_id": "user-42"},
    "by status": {"status": "ended"},
    "by created date range": {
        "created_from": datetime(2025, 6, 1, tzinfo=timezone.utc),
        "created_to": datetime(2025, 6, 2, tzinfo=timezone.utc),
    },
    "by name text": {"name": "warranty question #4999"},
    "user + status": {"user_id": "user-42", "status": "active"},
}


def _time(session, filters: dict[str, Any], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        find_conversations(session, filters, None, PAGE)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def _plan(session, filters: dict[str, Any]) -> str:
    captured: list[tuple[str, Any]] = []
    connection = session.connection()

    def capture(conn, cursor, statement, parameters, context, executemany) -> None:
        captured.append((statement, parameters))

    event.listen(connection, "before_cursor_execute", capture)
    find_conversations(session, filters, None, PAGE)
    event.remove(connection, "before_cursor_execute", capture)
    statement, parameters = captured[-1]
    rows = connection.exec_driver_sql("EXPLAIN " + statement, parameters)
    return "\n".join("      " + row[0] for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    with temporary_database(admin_url(), prefix="parley_bench") as url:
        upgrade_database(url)
        engine = make_engine(url)  # as the app makes it: custom plans, so SET enable_* applies
        with Session(engine) as session:
            for start in tqdm(range(0, args.conversations, 10_000), desc="seeding", unit="10k rows"):
                seed_conversations(session, min(10_000, args.conversations - start), offset=start)
            session.execute(text("ANALYZE conversations"))
            session.commit()
            print(f"\nStaff search, {args.conversations:,} conversations, page of {PAGE - 1}, median of {args.repeat}")
            print(f"{'lookup':<26}{'indexed ms':>12}{'no-index ms':>13}{'ratio':>8}")
            plans = {}
            for name, filters in CASES.items():
                indexed = _time(session, filters, args.repeat)
                plans[name] = _plan(session, filters)
                session.execute(text("SET enable_indexscan = off"))
                session.execute(text("SET enable_bitmapscan = off"))
                session.execute(text("SET enable_indexonlyscan = off"))
                baseline = _time(session, filters, args.repeat)
                session.execute(text("RESET ALL"))
                print(f"{name:<26}{indexed:>12.2f}{baseline:>13.2f}{baseline / indexed:>7.1f}x")
            print("\nPlans chosen with indexes on:")
            for name, plan in plans.items():
                print(f"  {name}:\n{plan}")
        engine.dispose()


if __name__ == "__main__":
    main()
