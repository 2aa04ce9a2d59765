"""Locks that a failed request could not give back, given back once the database takes them.

A turn that fails gives its conversation's lease back (`conversations.abandon_turn`),
and a failed request with an Idempotency-Key gives its key back
(`idempotency.release`). When the database cannot take that at the moment
(down, restarting, or no pooled connection free), the lock would stay until
it runs out by itself, `TURN_LEASE_SECONDS` later, and the conversation
would answer 409 all that time. So each process keeps such releases and
tries them again in the background, in passes after waits of 1, 2 and 4
seconds, then every 8 seconds, until none is left. A pass drops
the releases whose lock has run out by now, untried, and stops at the first
sign that the database is still away, leaving the rest for the next pass.

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

from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

log = logging.getLogger("parley")

FIRST_WAIT_SECONDS = 1.0
LONGEST_WAIT_SECONDS = 8.0
# The database is away (not this one release refused): the pass stops at such an error.
_AWAY = (OperationalError, InterfaceError, PoolTimeout)


@dataclass(eq=False)
class _Release:
    what: str  # for the log: "the turn lease of <conversation>"
    give_back: Callable[[Session], None]  # runs the release and commits
    bind: object  # the engine to open its sessions on
    until: float  # time.monotonic() when the lock runs out by itself


class Releases:
    """The releases one process keeps, and the thread (a greenlet under gevent) that tries them.

    The lock guards only the list and the flag, and nothing under it may
    wait or yield: with gunicorn's `--preload`, a forked worker's lock is a
    real thread lock, made before gevent patched the worker.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.kept: list[_Release] = []
        self.running = False

    def later(self, what: str, give_back: Callable[[Session], None], session: Session, lock_seconds: float) -> None:
        """Keep trying `give_back` (which releases and commits) on `session`'s database, for `lock_seconds` at most."""
        with self.lock:
            self.kept.append(_Release(what, give_back, session.get_bind(), time.monotonic() + lock_seconds))
            if self.running:
                return
            self.running = True
        try:
            threading.Thread(target=self._run, name="parley-releases", daemon=True).start()
        except RuntimeError as exc:  # e.g. at interpreter shutdown: the locks run out by themselves
            with self.lock:
                self.running = False
            log.warning("could not start giving back %s in the background: %s", what, exc)

    def pending(self) -> int:
        with self.lock:
            return len(self.kept)

    def _run(self) -> None:
        wait = FIRST_WAIT_SECONDS
        try:
            while True:
                time.sleep(wait)
                wait = min(wait * 2, LONGEST_WAIT_SECONDS)
                with self.lock:
                    due = list(self.kept)
                finished = self._pass(due)
                with self.lock:
                    self.kept = [release for release in self.kept if release not in finished]
                    if not self.kept:
                        self.running = False  # under the lock: a release kept from now on starts a new thread
                        return
        except BaseException:  # the thread is killed (GreenletExit): the next release kept starts another
            with self.lock:
                self.running = False
            raise

    def _pass(self, due: list[_Release]) -> list[_Release]:
        """Try `due` in order; returns those finished with (given back, run out, or failing for good)."""
        now = time.monotonic()
        finished = [release for release in due if release.until <= now]
        for release in finished:
            log.warning("gave up giving back %s: it has run out by itself", release.what)
        for release in (release for release in due if release.until > now):
            try:
                with Session(release.bind) as session:
                    release.give_back(session)
            except _AWAY:
                break  # the others would wait and fail alike: the next pass tries them
            except SQLAlchemyError as exc:
                log.warning("could not give back %s yet: %s", release.what, exc.__class__.__name__)
                continue
            except Exception:  # not the database: trying again would fail alike
                log.exception("could not give back %s; it runs out by itself", release.what)
            else:
                log.info("gave back %s once the database took it", release.what)
            finished.append(release)
        return finished


# One per process: a request's failure hands its release to it. A forked process starts
# with a new one: the parent's thread is not in it, and the parent's lock may be held.
_releases = Releases()


def _new_in_child() -> None:
    global _releases
    _releases = Releases()


os.register_at_fork(after_in_child=_new_in_child)


def later(what: str, give_back: Callable[[Session], None], session: Session, lock_seconds: float) -> None:
    """This process's `Releases.later`."""
    _releases.later(what, give_back, session, lock_seconds)


def pending() -> int:
    """How many releases this process still keeps."""
    return _releases.pending()
