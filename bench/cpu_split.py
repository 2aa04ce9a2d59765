"""Where the hot path's CPU goes: each process group's cores and CPU per turn.

Runs the hot path's load (16 clients, each on its own conversation) against
one setup at a time, under the production command, and samples /proc for
the middle of the run: the gunicorn workers, PostgreSQL (all of its
processes on the machine), the load generator and the fake model server.
The baseline's figures are measured in the same run, so the last line
compares CPU per turn.

    python -m bench.cpu_split [--setups baseline echo anthropic] [--seconds 14]
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

from bench.serving import (
    client_key,
    database,
    fake_model,
    gunicorn,
    hot_path_setups,
    open_conversations,
    run_load,
    summarize,
)

GROUPS = ("workers", "postgres", "load", "fake model")
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", nargs="+", choices=("baseline", "echo", "anthropic"), default=["baseline", "echo", "anthropic"])
    parser.add_argument("--seconds", type=float, default=14)
    parser.add_argument("--clients", type=int, default=16)
    options = parser.parse_args()
    per_turn = {}
    with database() as url, fake_model(0.0) as model_url:
        key = client_key(url)
        apps = hot_path_setups(url, model_url)
        with gunicorn(*apps["echo"]) as (parley, _pid):
            conversations = open_conversations(parley, key, options.clients)
        for setup in options.setups:
            app, env = apps[setup]
            with gunicorn(app, env) as (server, master):
                window = options.seconds / 2
                cores: dict[str, float] = {}
                sampler = threading.Thread(target=_sample, args=(master, options.seconds / 4, window, cores))
                sampler.start()
                report = run_load(server, key, conversations, options.seconds)
                sampler.join()
            rate = summarize(report, warmup=options.seconds / 4)["per_second"]
            per_turn[setup] = {group: used / rate * 1000 for group, used in cores.items()}
            print(f"{setup:<10} {rate:7.1f} turns/s  cores: "
                  + "  ".join(f"{group} {cores[group]:.2f}" for group in GROUPS)
                  + "  |  ms CPU per turn: " + "  ".join(f"{group} {per_turn[setup][group]:.2f}" for group in GROUPS))
    if "baseline" in per_turn:
        base = sum(per_turn["baseline"].values())
        for setup, split in per_turn.items():
            print(f"{setup:<10} {sum(split.values()):.2f} ms CPU per turn in all, {sum(split.values()) / base:.2f}x the baseline's")


def _sample(master: int, delay: float, window: float, cores: dict[str, float]) -> None:
    time.sleep(delay)
    before = _ticks(_groups(master))
    time.sleep(window)
    after = _ticks(_groups(master))
    cores.update({group: (after[group] - before.get(group, 0)) / TICKS_PER_SECOND / window for group in GROUPS})


def _groups(master: int) -> dict[str, list[int]]:
    """The PIDs of each group: gunicorn's workers are the master's children."""
    groups: dict[str, list[int]] = {group: [] for group in GROUPS}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if parent == master:
            groups["workers"].append(int(entry.name))
        elif command.startswith("postgres"):
            groups["postgres"].append(int(entry.name))
        elif "bench.load" in command:
            groups["load"].append(int(entry.name))
        elif "bench.fake_model" in command:
            groups["fake model"].append(int(entry.name))
    return groups


def _ticks(groups: dict[str, list[int]]) -> dict[str, int]:
    """User and system CPU ticks of each group; a process gone since counts nothing."""
    totals = {}
    for group, pids in groups.items():
        totals[group] = 0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            totals[group] += int(fields[11]) + int(fields[12])
    return totals


if __name__ == "__main__":
    main()
