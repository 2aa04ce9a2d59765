"""Locks that a failed request could not give back, given back once the database takes them.

A turn that fails gives its conversation's lease back (`conversations.abandon_turn`),
and a failed request with an Idempotency-Key gives its key back
(`idempotency.release`). When the database cannot take that at the moment
(down, restarting, or no pooled connection free), the lock would stay until
it runs out by itself, `TURN_LEASE_SECONDS` later, and the conversation
would answer 409 all that time. So each process keeps such releases and
tries them again in the background, after 1, 2, 4 and then every 8 seconds,
until one commits or its lock would have run out anyway.

Trying again is safe: a release matches the very lease or claim it gives
back, so once another request holds the lock, or the first try did commit
after all, it changes nothing. A process that exits drops the releases it
kept; their locks run out as before.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

FIRST_WAIT_SECONDS = 1.0
LONGEST_WAIT_SECONDS = 8.0


@dataclass
class _Release:
    what: str  # for the log: "the turn lease of <conversation>"
    give_back: Callable[[Session], None]  # runs the release and commits
    bind: object  # the engine to open its sessions on
    until: float  # time.monotonic() when the lock runs out by itself


class _Pending:
    """The releases this process keeps, and the background thread (a greenlet under gevent) that tries them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.releases: list[_Release] = []
        self.running = False

    def add(self, release: _Release) -> None:
        with self.lock:
            self.releases.append(release)
            if self.running:
                return
            self.running = True
        threading.Thread(target=self._run, name="parley-releases", daemon=True).start()

    def _run(self) -> None:
        wait = FIRST_WAIT_SECONDS
        while True:
            time.sleep(wait)
            wait = min(wait * 2, LONGEST_WAIT_SECONDS)
            with self.lock:
                due = list(self.releases)
            done = [release for release in due if _try(release)]
            with self.lock:
                self.releases = [release for release in self.releases if release not in done]
                if not self.releases:
                    self.running = False
                    return


def _try(release: _Release) -> bool:
    """Whether `release` is finished with: given back now, or its lock has run out."""
    try:
        with Session(release.bind) as session:
            release.give_back(session)
    except SQLAlchemyError as exc:
        if time.monotonic() < release.until:
            return False
        log.warning("gave up giving back %s; it has run out by itself: %s", release.what, exc.__class__.__name__)
        return True
    except Exception:  # not the database being away: trying again would fail alike
        log.exception("could not give back %s; it runs out by itself", release.what)
        return True
    log.info("gave back %s once the database took it", release.what)
    return True


_pending = _Pending()


def _forget_in_child() -> None:
    """A forked process starts with none: the parent's thread is not in it, and its lock may be held."""
    global _pending
    _pending = _Pending()


os.register_at_fork(after_in_child=_forget_in_child)


def later(what: str, give_back: Callable[[Session], None], session: Session, lock_seconds: float) -> None:
    """Keep trying `give_back` (which releases and commits) on `session`'s database, for `lock_seconds` at most."""
    _pending.add(_Release(what, give_back, session.get_bind(), time.monotonic() + lock_seconds))


def pending() -> int:
    """How many releases this process still keeps (for tests and the log)."""
    with _pending.lock:
        return len(_pending.releases)
