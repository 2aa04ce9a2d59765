"""Where the hot path's CPU goes: each process group's cores and CPU per turn.

Runs the hot path's load (16 clients, each on its own conversation) against
one setup at a time, under the production command, and samples /proc for
the middle of the run: the gunicorn workers, PostgreSQL (all of its
processes on the machine), the load generator and the fake model server.
The baseline's figures are measured in the same run, so the last line
compares CPU per turn.

    python -m bench.cpu_split [--setups baseline minimal_sdk echo anthropic] [--seconds 14]
"""
from __future__ import annotations

import argparse

from bench.serving import (
    CoreUse,
    client_key,
    database,
    fake_model,
    gunicorn,
    hot_path_setups,
    open_conversations,
    run_load,
    summarize,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", nargs="+", choices=("baseline", "minimal_sdk", "echo", "anthropic"),
                        default=["baseline", "minimal_sdk", "echo", "anthropic"])
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
            with gunicorn(app, env) as (server, master), CoreUse(master, options.seconds / 4, options.seconds / 2) as use:
                report = run_load(server, key, conversations, options.seconds)
            rate = summarize(report, warmup=options.seconds / 4)["per_second"]
            per_turn[setup] = {group: used / rate * 1000 for group, used in use.cores.items()}
            print(f"{setup:<11} {rate:7.1f} turns/s  cores: "
                  + "  ".join(f"{group} {use.cores[group]:.2f}" for group in CoreUse.GROUPS)
                  + "  |  ms CPU per turn: " + "  ".join(f"{group} {per_turn[setup][group]:.2f}" for group in CoreUse.GROUPS))
    if "baseline" in per_turn:
        base = sum(per_turn["baseline"].values())
        for setup, split in per_turn.items():
            print(f"{setup:<11} {sum(split.values()):.2f} ms CPU per turn in all, {sum(split.values()) / base:.2f}x the baseline's")


if __name__ == "__main__":
    main()
