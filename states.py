"""The states a conversation moves through and the roles a key holds.

Each state is a `StrEnum` with one transition table. Every change of a
conversation's status or handoff state goes through its table: a status
through `moves_into`, which gives the statuses a move may start from (in
Python or in an UPDATE's WHERE), a handoff state through `check_handoff`. The request and response
models (schemas.py) take their allowed values from these enums too.
"""
from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """Where a conversation is in its life."""

    ACTIVE = "active"  # it takes turns
    ENDING = "ending"  # frozen: its archive document is being written
    ENDED = "ended"  # archived; read back from the archive


# The only moves a conversation's status may make.
STATUS_TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.ACTIVE: frozenset({Status.ENDING}),
    Status.ENDING: frozenset({Status.ENDED}),
    Status.ENDED: frozenset(),
}


def moves_into(target: Status) -> tuple[Status, ...]:
    """The statuses from which a conversation may move to `target`."""
    return tuple(source for source, targets in STATUS_TRANSITIONS.items() if target in targets)


class Handoff(StrEnum):
    """Who answers the user: the model, nobody yet (waiting for staff), or a staff member."""

    BOT = "bot"
    NEEDS_HUMAN = "needs_human"
    HUMAN = "human"


# The only moves a conversation's handoff state may make.
HANDOFF_TRANSITIONS: dict[Handoff, frozenset[Handoff]] = {
    Handoff.BOT: frozenset({Handoff.NEEDS_HUMAN}),
    Handoff.NEEDS_HUMAN: frozenset({Handoff.HUMAN}),
    Handoff.HUMAN: frozenset({Handoff.BOT, Handoff.NEEDS_HUMAN}),  # back to the queue: its staff key was revoked
}


def check_handoff(current: str, new: str) -> None:
    if Handoff(new) not in HANDOFF_TRANSITIONS[Handoff(current)]:
        raise ValueError(f"a conversation's handoff state cannot go from {current} to {new}")


class Role(StrEnum):
    """What an API key may do; main.py declares the roles each route allows."""

    CLIENT = "client"
    STAFF = "staff"
    ADMIN = "admin"


class KeyState(StrEnum):
    """Whether an API key is usable now (`database_utils.ApiKey.state`)."""

    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"
