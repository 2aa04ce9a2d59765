"""Time per /chat turn at 10, 200 and 5,000 messages in one conversation.

PostgreSQL (a throwaway database on TEST_DATABASE_URL's server), the echo
model, requests through Flask's test client. Turns on the two conversations
are interleaved in a shuffled order so machine noise hits all alike, and each conversation is
put back to its size after every timed turn. The tables are ANALYZEd after
seeding, as autovacuum would do on a live database. The 10-message conversation is
the baseline; the figure that matters is the ratio.

For reference it also times what a design without tail loading would pay:
reading the whole 5,000-message log once per turn.

    python -m bench.turn_latency [--turns 200]
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

from sqlalchemy import text
from tqdm import tqdm

from auth import create_key
from database_utils import get_session, list_messages, upgrade_database
from main import create_app
from states import Role
from tests.factories import seed_conversation, truncate_conversation
from tests.postgres import admin_url, temporary_database

# 10 and 5,000 as asked; 200 is about where the default 8,000-token budget
# fills with the seeded 50-token messages, after which nothing should grow.
SIZES = (10, 200, 5_000)


def _summary(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    return statistics.median(ordered) * 1000, ordered[int(len(ordered) * 0.95)] * 1000


def run(turns: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {str(size): [] for size in SIZES}
    timings["full log read at 5000"] = []
    with temporary_database(admin_url(), prefix="parley_bench") as url, tempfile.TemporaryDirectory() as archive:
        upgrade_database(url)
        app = create_app(
            {
                "DATABASE_URL": url,
                "ARCHIVE_URL": f"file://{archive}",
                "LLM_PROVIDER": "echo",
                "LLM_MODEL": "echo",
                "RATELIMIT_ENABLED": False,
            }
        )
        with app.app_context():
            key, secret = create_key(get_session(), Role.CLIENT, "bench")
            ids = {size: seed_conversation(get_session(), size, owner_key_id=key.key_id) for size in SIZES}
            # Give the planner the statistics autovacuum would have gathered.
            get_session().execute(text("ANALYZE"))
            get_session().commit()  # statistics are transactional: uncommitted, they vanish
        client = app.test_client()
        order = list(SIZES)
        shuffler = random.Random(0)
        for turn in tqdm(range(turns), desc="turns", unit="turn"):
            shuffler.shuffle(order)  # no size always runs first or last
            for size in order:
                started = time.perf_counter()
                response = client.post(
                    "/chat",
                    json={"conversation_id": str(ids[size]), "message": f"question {turn}"},
                    headers={"Authorization": f"Bearer {secret}"},
                )
                timings[str(size)].append(time.perf_counter() - started)
                assert response.status_code == 200, response.json
                with app.app_context():
                    truncate_conversation(get_session(), ids[size], size)
        for _ in range(max(turns // 10, 5)):
            with app.app_context():
                started = time.perf_counter()
                list_messages(get_session(), ids[5_000])
                timings["full log read at 5000"].append(time.perf_counter() - started)
        app.extensions["parley.engine"].dispose()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=300)
    args = parser.parse_args()

    timings = run(args.turns)

    print(f"\n/chat turn time, PostgreSQL, echo model, {args.turns} turns each")
    print(f"{'case':<26}{'median ms':>12}{'p95 ms':>10}")
    for case, seconds in timings.items():
        median, p95 = _summary(seconds)
        print(f"{case:<26}{median:>12.2f}{p95:>10.2f}")
    baseline = _summary(timings["10"])[0]
    print(f"ratio 5000/10 (median): {_summary(timings['5000'])[0] / baseline:.2f}x")
    print(f"ratio 5000/200 (median, both past the budget): {_summary(timings['5000'])[0] / _summary(timings['200'])[0]:.2f}x")
    print(f"full-log read at 5000 vs whole turn at 10: {_summary(timings['full log read at 5000'])[0] / baseline:.2f}x")


if __name__ == "__main__":
    main()
