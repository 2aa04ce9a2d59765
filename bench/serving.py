"""What the serving benchmarks share: a database, a fake model, gunicorn, the load, memory, cores.

Every server is started the way production starts it,
`gunicorn -c gunicorn.conf.py APP`, on 127.0.0.1 ports picked at random.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self
from urllib.parse import urlparse

from auth import create_key
from database_utils import get_session, upgrade_database
from main import create_app
from states import Role
from tests.postgres import admin_url, temporary_database
from tests.seaweed import free_ports

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# A stream straight from the fake Claude server, as Parley's SDK asks for it.
DIRECT_HEADERS = {"x-api-key": "sk-bench", "anthropic-version": "2023-06-01", "Content-Type": "application/json"}


@contextmanager
def database() -> Iterator[str]:
    with temporary_database(admin_url(), prefix="parley_bench") as url:
        upgrade_database(url)
        yield url


def client_key(url: str) -> str:
    app = create_app({"DATABASE_URL": url, "LLM_PROVIDER": "echo", "ARCHIVE_URL": "file:///tmp/parley-bench-archive"})
    with app.app_context():
        secret = create_key(get_session(), Role.CLIENT, "bench")[1]
    app.extensions["parley.engine"].dispose()
    return secret


@contextmanager
def fake_model(latency: float, *options: str) -> Iterator[str]:
    """bench.fake_model in a process of its own; `options` are more of its arguments. Yields its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.fake_model", "--latency", str(latency), *options], cwd=ROOT, stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield process.stdout.readline().strip()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def claude_env(database_url: str, model_url: str) -> dict[str, str]:
    """Parley's settings for the production command, with Claude at the fake model server."""
    return {
        "DATABASE_URL": database_url,
        "ARCHIVE_URL": "file:///tmp/parley-bench-archive",
        "LLM_PROVIDER": "anthropic",
        "LLM_MODEL": "claude-bench",
        "ANTHROPIC_API_KEY": "sk-bench",
        "ANTHROPIC_BASE_URL": model_url,
        "WEB_CONCURRENCY": "2",
    }


def hot_path_setups(database_url: str, model_url: str) -> dict[str, tuple[str, dict[str, str]]]:
    """The hot path's four servers, each an app for gunicorn and its settings: the minimal
    persisting turn (`bench.minimal_app`), the same with one SDK call to Claude at the fake
    model server, Parley with the echo model, and Parley through the anthropic SDK with Claude
    at the fake model server."""
    common = {"DATABASE_URL": database_url, "ARCHIVE_URL": "file:///tmp/parley-bench-archive", "WEB_CONCURRENCY": "2"}
    return {
        "baseline": ("bench.minimal_app:create_app()", common),
        "minimal_sdk": ("bench.minimal_app:create_app()", {**common, "MINIMAL_MODEL_URL": model_url}),
        "echo": ("main:create_app()", {**common, "LLM_PROVIDER": "echo"}),
        "anthropic": (
            "main:create_app()",
            {**common, "LLM_PROVIDER": "anthropic", "ANTHROPIC_API_KEY": "sk-bench", "ANTHROPIC_BASE_URL": model_url},
        ),
    }


@contextmanager
def gunicorn(app: str, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """Start `gunicorn -c gunicorn.conf.py APP`; yields its URL and the master's PID."""
    port = free_ports(1)[0]
    # A rate limit no benchmark reaches; the limiter itself stays on the path.
    environment = {**os.environ, "BIND": f"127.0.0.1:{port}", "RATE_LIMIT": "100000000 per minute", **env}
    log = open(f"/tmp/parley-bench-gunicorn-{port}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen([str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", app], cwd=ROOT, env=environment,
                               stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        # Every worker must have loaded the app: a load that starts while one is still
        # loading opens all its keep-alive connections on the others, for the whole run.
        workers = int(environment.get("WEB_CONCURRENCY", "2"))
        deadline = time.monotonic() + 60
        while Path(log.name).read_bytes().count(b"Worker ready") < workers:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not start; see {log.name}")
            time.sleep(0.1)
        with urllib.request.urlopen(f"{url}/healthz", timeout=10):
            pass
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=200)
        log.close()


def open_conversations(url: str, key: str, count: int, user: str = "bench") -> list[str]:
    ids = []
    for _ in range(count):
        request = urllib.request.Request(
            f"{url}/new_chat", data=json.dumps({"user_id": user}).encode(), method="POST",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request) as response:
            ids.append(json.load(response)["conversation_id"])
    return ids


def run_load(
    url: str, key: str, conversations: list[str], seconds: float, names: list[str] | None = None, path: str = "/chat",
    message_bytes: int = 0,
) -> dict:
    """Each conversation gets one client (names label them) posting to `path`, messages padded to
    `message_bytes`; returns the load generator's report."""
    names = names or [f"c{n}" for n in range(len(conversations))]
    plan = {"url": url, "key": key, "seconds": seconds, "path": path, "message_bytes": message_bytes,
            "clients": [{"conversation_id": c, "name": n} for c, n in zip(conversations, names, strict=True)]}
    done = subprocess.run([sys.executable, "-m", "bench.load"], cwd=ROOT, input=json.dumps(plan), capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def summarize(report: dict, warmup: float = 0.0) -> dict:
    """Requests/s, p50/p99 latency (ms) and statuses, leaving out requests started in the warm-up.

    The rate is the sum of each client's own: its 200s over the time from the
    start of its first counted request to the end of its last. A client sends
    its next request as soon as it has the last answer, so this is the rate the
    server sustained. (All requests over the time from the first start to the
    very last reply, as before, let the slowest of the last replies stretch
    every client's time: at 400 clients it read 0.76x to 0.86x where this
    reads 0.88x to 0.97x, and the fake model server alone 0.99x and 1.00x.)
    """
    requests = report["requests"]
    first = min((r["started"] for r in requests), default=0.0)
    counted = [r for r in requests if r["started"] - first >= warmup]
    by_client: dict[str, list[dict]] = defaultdict(list)
    for r in counted:
        by_client[r["client"]].append(r)
    per_second = 0.0
    for own in by_client.values():
        span = max(r["started"] + r["seconds"] for r in own) - min(r["started"] for r in own)
        per_second += sum(1 for r in own if r["status"] == 200) / span if span > 0 else 0.0
    ok = sorted(r["seconds"] for r in counted if r["status"] == 200)
    return {
        "requests": len(counted),
        "per_second": per_second,
        "p50_ms": statistics.median(ok) * 1000 if ok else float("nan"),
        "p99_ms": ok[min(int(len(ok) * 0.99), len(ok) - 1)] * 1000 if ok else float("nan"),
        "statuses": dict(Counter(str(r["status"]) for r in counted)),
    }


# The marks of a delta in each wire format: Parley's events, Anthropic's.
DELTA_MARKS = (b"event: delta\n", b"event: content_block_delta\n")
END_MARKS = {b"event: done\n": "done", b"event: error\n": "error", b"event: message_stop\n": "done"}


def read_stream(url: str, path: str, headers: dict, body: dict) -> dict:
    """Send one streamed request and time each delta's arrival.

    Reads whatever has arrived and counts the deltas in it (cheaper than a
    line at a time, so that a thousand readers in one process keep up).
    """
    target = urlparse(url)
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
    started = time.monotonic()
    deltas: list[float] = []
    ended = "cut"
    status: int | str = 0
    tail = b""
    try:
        connection.request("POST", path, body=json.dumps(body), headers=headers)
        response = connection.getresponse()
        status = response.status
        while chunk := response.read1(65536):
            data = tail + chunk
            cut = data.rfind(b"\n") + 1
            lines, tail = data[:cut], data[cut:]
            at = time.monotonic() - started
            deltas += [at] * sum(lines.count(mark) for mark in DELTA_MARKS)
            for mark, outcome in END_MARKS.items():
                if mark in lines:
                    ended = outcome
    except (OSError, http.client.HTTPException) as exc:
        status = f"error:{exc.__class__.__name__}"
    finally:
        connection.close()
    return {"status": status, "ended": ended, "deltas": deltas, "seconds": time.monotonic() - started}


class _Sampler:
    """Runs `_sample` in a thread for the length of a `with` block; `_stop` is set when the block ends."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        raise NotImplementedError


class WorkerMemory(_Sampler):
    """Samples the resident memory of a gunicorn master's workers until stopped; keeps the peak."""

    def __init__(self, master_pid: int) -> None:
        super().__init__()
        self.master_pid = master_pid
        self.peak_total_mib = 0.0
        self.peak_worker_mib = 0.0

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            sizes = [_rss_mib(pid) for pid in _children(self.master_pid)]
            if sizes:
                self.peak_total_mib = max(self.peak_total_mib, sum(sizes))
                self.peak_worker_mib = max(self.peak_worker_mib, max(sizes))


class ConnectionSplit(_Sampler):
    """How a gunicorn master's workers share the clients' connections, `delay` seconds into a run.

    The workers accept from one listening socket, so which worker takes a
    keep-alive connection is a race, and the hot path's 16 connections stay
    where they landed for the whole run. Read `per_worker` (established
    connections on `port` held by each worker, fewest first) after the block;
    it is sampled once, at `delay` or at the block's end if that comes first.
    """

    def __init__(self, master_pid: int, port: int, delay: float) -> None:
        super().__init__()
        self.master_pid = master_pid
        self.port = port
        self.delay = delay
        self.per_worker: list[int] = []

    def _sample(self) -> None:
        self._stop.wait(self.delay)  # or less, if the block ends sooner
        inodes = _established_inodes(self.port)
        self.per_worker = sorted(len(_socket_inodes(pid) & inodes) for pid in _children(self.master_pid))

    def __str__(self) -> str:
        return "+".join(map(str, self.per_worker)) or "?"


_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


class CoreUse(_Sampler):
    """The cores each group of processes used over `window` seconds, from `delay` seconds in.

    Groups: gunicorn's workers (the master's children), PostgreSQL (all of
    its processes on the machine), the load generator and the fake model
    server. Read `cores` after the block; its end waits for the window's.
    """

    GROUPS = ("workers", "postgres", "load", "fake model")

    def __init__(self, master_pid: int, delay: float, window: float) -> None:
        super().__init__()
        self.master_pid = master_pid
        self.delay = delay
        self.window = window
        self.cores: dict[str, float] = {}

    def _sample(self) -> None:
        time.sleep(self.delay)
        before = self._ticks()
        time.sleep(self.window)
        after = self._ticks()
        self.cores = {group: (after[group] - before[group]) / _TICKS_PER_SECOND / self.window for group in self.GROUPS}

    def _ticks(self) -> dict[str, int]:
        """User and system CPU ticks of each group; a process gone since counts nothing."""
        totals = dict.fromkeys(self.GROUPS, 0)
        for group, pids in self._groups().items():
            for pid in pids:
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                totals[group] += int(fields[11]) + int(fields[12])
        return totals

    def _groups(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {group: [] for group in self.GROUPS}
        groups["workers"] = _children(self.master_pid)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if command.startswith("postgres"):
                groups["postgres"].append(int(entry.name))
            elif "bench.load" in command:
                groups["load"].append(int(entry.name))
            elif "bench.fake_model" in command:
                groups["fake model"].append(int(entry.name))
        return groups


def _established_inodes(port: int) -> set[str]:
    """Socket inodes of the established IPv4 TCP connections whose local port is `port`."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
            inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process `pid` holds open."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
