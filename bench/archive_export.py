"""Archive and export throughput against SeaweedFS, and export memory at two archive sizes.

Seeds PostgreSQL with conversations of 10 to 60 messages (a fixed random
seed), then measures in one run, each against a baseline measured in the
same run with the same number of workers:

- archive-idle (conversations/s) against bare parallel `put_object` of the
  same documents;
- export to Parquet and to JSONL (conversations/s) against a bare parallel
  `get_object` loop over the same keys;
- the export's peak memory (max RSS of a `flask export` process) over the
  first `--small` conversations (one end date) against all of them (two).

    python -m bench.archive_export [--conversations 20000] [--small 2000] [--workers 8]
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
from botocore.config import Config as BotoConfig
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from archiving import archive_document, archive_idle
from config import tune_garbage_collector
from database_utils import Conversation, Message, make_engine, upgrade_database
from export import ExportRequest, export_conversations
from s3_utils import BACKGROUND_TIMEOUTS, encode_document, make_archive
from tests.postgres import admin_url, temporary_database
from tests.seaweed import SeaweedS3

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "bench-archive"
SMALL_DAY = datetime(2026, 1, 10, 12, tzinfo=timezone.utc)
LARGE_DAY = datetime(2026, 1, 11, 12, tzinfo=timezone.utc)
WORDS = "the router light blinks red after the update and the billing page shows an old plan again".split()
SETTINGS = {"SESSION_IDLE_MINUTES": 60, "LIVE_RETENTION_DAYS": 0}


def seed(engine, count: int, small: int) -> int:
    """`count` idle conversations, the first `small` idle before SMALL_DAY; returns the message count."""
    rng = random.Random(20261129)
    conversations, messages = [], []
    for n in range(count):
        conversation_id, day = uuid.uuid4(), SMALL_DAY if n < small else LARGE_DAY
        start, size = day - timedelta(hours=3), rng.randint(10, 60)
        tokens = 0
        for seq in range(1, size + 1):
            content = " ".join(rng.choices(WORDS, k=rng.randint(10, 120)))
            usage = '{"input_tokens": 120, "output_tokens": 80}' if seq % 2 == 0 else None
            role = "user" if seq % 2 else "assistant"
            messages.append((conversation_id, seq, role, content, start + timedelta(seconds=seq), len(content) // 3 + 4, usage))
            tokens += len(content) // 3 + 4
        conversations.append(
            (conversation_id, f"user-{n % 500}", f"bench {n}", "active", start, day - timedelta(hours=2), size, tokens, 0, 0, "{}")
        )
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cursor:
            columns = (
                "conversation_id, user_id, conversation_name, status, created_at, updated_at, "
                "message_count, token_count, input_tokens, output_tokens, metadata"
            )
            with cursor.copy(f"COPY conversations ({columns}) FROM STDIN") as copy:
                for row in conversations:
                    copy.write_row(row)
            with cursor.copy("COPY messages (conversation_id, seq, role, content, created_at, token_count, usage) FROM STDIN") as copy:
                for row in messages:
                    copy.write_row(row)
            cursor.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
    return len(messages)


def documents(sessions) -> list[tuple[str, bytes]]:
    """The documents archive-idle will write, made up front for the put_object baseline."""
    session = sessions()
    found: dict[uuid.UUID, list] = {}
    columns = (Message.conversation_id, Message.seq, Message.role, Message.content, Message.created_at, Message.token_count, Message.usage, Message.incomplete, Message.file_ids)
    for row in session.execute(select(*columns).order_by(Message.conversation_id, Message.seq)):
        found.setdefault(row.conversation_id, []).append(row)
    bodies = []
    for conversation in session.scalars(select(Conversation)):
        conversation.ended_at = LARGE_DAY
        bodies.append((f"baseline/{conversation.conversation_id}.json", encode_document(archive_document(conversation, found[conversation.conversation_id]))))
    session.rollback()
    session.close()
    return bodies


def bare_client(endpoint: str, workers: int):
    return boto3.client(
        "s3", endpoint_url=endpoint, config=BotoConfig(max_pool_connections=workers, retries={"total_max_attempts": 4, "mode": "standard"})
    )


def timed(function, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def cpu_timed(function, *args) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) of one call."""
    cpu = time.process_time()
    seconds, _ = timed(function, *args)
    return seconds, time.process_time() - cpu


def peak_rss_mib(command: list[str], env: dict[str, str]) -> float:
    """The child's peak resident memory (VmHWM), read until it exits.

    Not the rusage of wait4: on Linux a child's ru_maxrss starts from the
    forking parent's, and this benchmark's parent is large.
    """
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            break
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]))
        time.sleep(0.02)
    if process.wait() != 0:
        raise RuntimeError(f"{' '.join(command)} failed")
    return peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--small", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--archive-only", action="store_true", help="Stop after archive-idle (quicker while tuning it).")
    options = parser.parse_args()
    # As the archive-idle and export commands do; the baselines, in this process too, gain from it alike.
    tune_garbage_collector()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "parley-test")  # SeaweedFS takes these from the environment too
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "parley-test")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    workers, count = options.workers, options.conversations
    with tempfile.TemporaryDirectory() as scratch, SeaweedS3(Path(scratch)) as s3, temporary_database(admin_url(), "parley_bench") as url:
        s3.client().create_bucket(Bucket=BUCKET)
        upgrade_database(url)
        engine = make_engine(url)
        sessions = sessionmaker(engine, expire_on_commit=False)
        seconds, messages = timed(seed, engine, count, options.small)
        print(f"seeded {count} conversations, {messages} messages ({messages / count:.1f} per conversation) in {seconds:.0f} s")

        bodies = documents(sessions)
        print(f"documents: {sum(len(b) for _, b in bodies) / len(bodies) / 1024:.1f} KiB on average")
        client = bare_client(s3.endpoint_url, workers)

        def put(item):
            client.put_object(Bucket=BUCKET, Key=item[0], Body=item[1], ContentType="application/json")

        def put_all(items):
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(put, items))

        put_seconds, put_cpu = cpu_timed(put_all, bodies)
        bodies.clear()
        archive = make_archive(f"s3://{BUCKET}/archive", s3.endpoint_url, BACKGROUND_TIMEOUTS, max_connections=workers)

        def run_archive_idle():
            for day in (SMALL_DAY, LARGE_DAY):
                session = sessions()
                report = archive_idle(session, archive, SETTINGS, now=day, batch_size=200, workers=workers)
                session.close()
                assert report.pending == 0, report.line()

        idle_seconds, idle_cpu = cpu_timed(run_archive_idle)
        put_rate, idle_rate = count / put_seconds, count / idle_seconds
        print(f"bare put_object x{workers}:      {put_rate:8.1f} conversations/s ({put_seconds:.1f} s, {put_cpu / count * 1000:.2f} ms CPU each)")
        print(
            f"archive-idle --workers {workers}:    {idle_rate:8.1f} conversations/s ({idle_seconds:.1f} s, "
            f"{idle_cpu / count * 1000:.2f} ms CPU each)  ratio {idle_rate / put_rate:.2f}x"
        )
        if options.archive_only:
            engine.dispose()
            return

        session = sessions()
        keys = [f"archive/{key}" for key in session.scalars(select(Conversation.s3_file_location))]
        session.close()

        def get(key):
            return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

        def get_all():
            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(get, keys):
                    pass

        get_seconds, _ = timed(get_all)
        get_rate = count / get_seconds
        print(f"bare get_object x{workers}:      {get_rate:8.1f} conversations/s ({get_seconds:.1f} s)")
        for fmt in ("parquet", "jsonl"):
            out = Path(scratch) / f"export-{fmt}"
            request = ExportRequest(SMALL_DAY.date(), LARGE_DAY.date(), fmt, str(out))
            session = sessions()
            export_seconds, manifest = timed(export_conversations, archive, request, session, workers)
            session.close()
            assert manifest["totals"]["conversations"] == count
            rate = count / export_seconds
            size = manifest["totals"]["bytes"] / 2**20
            print(
                f"export --format {fmt:<7} --workers {workers}: {rate:8.1f} conversations/s ({export_seconds:.1f} s, "
                f"{manifest['totals']['files']} files, {size:.0f} MiB)  ratio {rate / get_rate:.2f}x"
            )

        env = {
            **os.environ,
            "DATABASE_URL": url,
            "ARCHIVE_URL": f"s3://{BUCKET}/archive",
            "S3_ENDPOINT_URL": s3.endpoint_url,
            "LLM_PROVIDER": "echo",
        }
        peaks = {}
        for label, until in ((options.small, SMALL_DAY), (count, LARGE_DAY)):
            out = Path(scratch) / f"memory-{label}"
            command = [
                sys.executable, "-m", "flask", "--app", "main", "export", "--since", f"{SMALL_DAY:%Y-%m-%d}",
                "--until", f"{until:%Y-%m-%d}", "--format", "parquet", "--out", str(out), "--workers", str(workers),
            ]  # fmt: skip
            peaks[label] = peak_rss_mib(command, env)
            print(f"peak memory, export of {label:>6} conversations: {peaks[label]:7.1f} MiB")
        print(f"peak memory ratio {count} / {options.small}: {peaks[count] / peaks[options.small]:.2f}x")
        engine.dispose()


if __name__ == "__main__":
    main()
