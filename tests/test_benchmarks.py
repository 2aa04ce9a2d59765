"""The benchmarks' own arithmetic: how a load generator's report becomes a rate, how cores and connections are counted."""
from __future__ import annotations

import os
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


def _acceptor(listener: socket.socket, count: int) -> subprocess.Popen:
    """A child that accepts `count` connections from `listener`, says so, and holds them until killed."""
    code = (f"import socket, sys\nlistener = socket.socket(fileno={listener.fileno()})\n"
            f"held = [listener.accept()[0] for _ in range({count})]\nprint('accepted', flush=True)\nsys.stdin.read()")
    return subprocess.Popen([sys.executable, "-c", code], pass_fds=[listener.fileno()], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_connection_split_counts_the_connections_each_child_accepted():
    """Two children accept 3 and 2 connections from one listening socket, as two workers do."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    clients, children = [], []
    try:
        for count in (3, 2):
            children.append(_acceptor(listener, count))
            clients += [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
            assert children[-1].stdout.readline() == "accepted\n"
        with ConnectionSplit(os.getpid(), port, delay=0.0) as split:
            pass
    finally:
        for child in children:
            child.kill()
            child.wait()
        for client in clients:
            client.close()
        listener.close()

    assert split.per_worker == [2, 3]
    assert str(split) == "2+3"
