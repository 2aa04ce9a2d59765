"""The benchmarks' own arithmetic: how a load generator's report becomes a rate, how cores and connections are counted."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from bench.messages import padded
from bench.serving import ConnectionSplit, CoreUse, summarize


def _client(name: str, cycle: float, until: float, status: int = 200) -> list[dict]:
    """Back-to-back requests of `cycle` seconds each, started until `until`."""
    requests, started = [], 0.0
    while started < until:
        requests.append({"client": name, "status": status, "started": started, "seconds": cycle})
        started += cycle
    return requests


def test_the_rate_is_each_clients_own_summed():
    report = {"requests": _client("fast", 2.0, 20.0) + _client("slow", 4.0, 20.0)}

    assert summarize(report, warmup=4.0)["per_second"] == 1 / 2.0 + 1 / 4.0


def test_one_slow_last_reply_does_not_stretch_the_other_clients_time():
    steady = [request for n in range(9) for request in _client(f"c{n}", 2.0, 20.0)]
    straggler = _client("late", 2.0, 20.0)
    straggler[-1]["seconds"] = 10.0  # its last reply comes 8 s late

    rate = summarize({"requests": steady + straggler}, warmup=4.0)["per_second"]

    assert 9 * 0.5 < rate < 10 * 0.5  # only the late client's own rate drops
    assert summarize({"requests": steady}, warmup=4.0)["per_second"] == 9 * 0.5


def test_refused_requests_take_time_but_add_no_turns():
    report = {"requests": _client("a", 1.0, 10.0) + _client("b", 1.0, 10.0, status=409)}

    summary = summarize(report)

    assert summary["per_second"] == 1.0
    assert summary["statuses"] == {"200": 10, "409": 10}


def test_messages_are_padded_to_the_asked_size():
    assert padded("c1 message 5", 0) == "c1 message 5"
    assert len(padded("c1 message 5", 400)) == 400 and padded("c1 message 5", 400).startswith("c1 message 5 ")


def test_core_use_counts_a_masters_busy_children_as_workers():
    """A child that spins for the whole window is counted: about one core (less if the machine is busy)."""
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 2\nwhile time.time() < end: pass"])
    try:
        with CoreUse(os.getpid(), delay=0.3, window=1.2) as use:
            pass
    finally:
        spinner.wait()

    assert set(use.cores) == set(CoreUse.GROUPS)
    assert 0.4 < use.cores["workers"] < 1.5


# A stand-in for gunicorn's master: for each count it reads, a child that accepts that many
# connections from the listening socket it was given, says so, and holds them.
_MASTER = """
import os, socket, sys, time
listener = socket.socket(fileno=int(sys.argv[1]))
for line in sys.stdin:
    if os.fork() == 0:
        held = [listener.accept()[0] for _ in range(int(line))]
        print("accepted", flush=True)
        while True:
            time.sleep(60)
"""


def test_connection_split_counts_the_connections_each_worker_accepted():
    """Two workers accept 3 and 2 connections from one listening socket."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    master = subprocess.Popen([sys.executable, "-c", _MASTER, str(listener.fileno())], pass_fds=[listener.fileno()],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    clients = []
    try:
        for count in (3, 2):
            master.stdin.write(f"{count}\n")
            master.stdin.flush()
            clients += [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
            assert master.stdout.readline() == "accepted\n"
        with ConnectionSplit(master.pid, port, delay=0.0) as split:
            pass
    finally:
        os.killpg(master.pid, signal.SIGKILL)
        master.wait()
        for client in clients:
            client.close()
        listener.close()

    assert split.per_worker == [2, 3]
    assert str(split) == "2+3"


def test_make_bench_runs_every_benchmark():
    """Every module under bench/ that reports figures is in `make bench` (load generators and servers are parts of them)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    parts = {"fake_model", "load", "stream_load"}  # started by the benchmarks, no figures of their own
    runnable = {path.stem for path in (root / "bench").glob("*.py") if '__name__ == "__main__"' in path.read_text()}
    planned = subprocess.run(["make", "-n", "bench"], cwd=root, capture_output=True, text=True, check=True).stdout

    ran = {line.split("-m bench.")[1].split()[0] for line in planned.splitlines() if "-m bench." in line}

    assert ran == runnable - parts


def test_the_baseline_with_an_sdk_call_stores_claudes_reply():
    """bench.minimal_app with MINIMAL_MODEL_URL asks the model through the anthropic SDK for the reply it stores."""
    from bench.minimal_app import _claude
    from tests.fake_model_server import FakeModelServer

    with FakeModelServer() as server:
        answer = _claude(server.base_url)

        assert answer("hello there") == "reply to: hello there"
        (sent,) = server.requests
    assert sent.path == "/v1/messages" and sent.headers["user-agent"].startswith("Anthropic/Python")
    assert sent.body["messages"] == [{"role": "user", "content": "hello there"}]
