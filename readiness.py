"""What `/readyz` checks: the database (reachable, schema at the latest
revision) and the archive, each with a reason when it fails, in bounded time.

The checks run side by side, each on a thread of its own (a greenlet on
gevent workers), and the answer waits at most `READYZ_TIMEOUT_SECONDS`: a
check still running then is reported as `Timeout`, so a load balancer's probe
never hangs on a dead dependency. A check still running from an earlier
probe is waited on again rather than started twice, so probes against a hung
dependency do not pile up, nor hold back the other dependency's check.
A reason is an error class or S3 error code and a fixed hint; never a
message from the failure itself, which may carry a URL with a password. The
failure's own message goes to the server log (`parley.readiness`; a password in a
URL masked), once per worker each time a check's outcome changes, so a probe every
few seconds does not flood it.
"""
from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

from flask import Flask
from sqlalchemy.exc import DBAPIError

import database_utils
from archive_setup import failure_reason
from database_utils import DatabaseNotMigrated

log = logging.getLogger("parley.readiness")
# The credentials in a URL (scheme://user:password@host), masked in what the log is given.
_PASSWORD_IN_URL = re.compile(r"(\w+://[^/\s@:]*:)[^/\s@]*@")

_DATABASE_HINTS = {
    "OperationalError": "cannot connect or the server refused: check DATABASE_URL, the server and the network",
    "InterfaceError": "the connection failed: check DATABASE_URL and the network",
}


class Checks:
    """Each dependency's check under way (one at most), started on demand.

    Threads are made when a probe comes, in the process that serves it: with
    gunicorn's `--preload` the app is made in the master, before gevent
    patches the worker, and a thread pool made then would block the worker's
    event loop. The lock guards only the dict and is never held while waiting.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, Future] = {}
        self._reported: dict[str, dict[str, str] | None] = {}  # each check's last outcome logged: its reason, or None when ok

    def start(self, name: str, check: Callable[[], None]) -> Future:
        """The check `name` under way, or a new one."""
        with self._lock:
            future = self._running.get(name)
            if future is not None and not future.done():
                return future
            future = self._running[name] = Future()
        try:
            threading.Thread(target=_run, args=(future, check), name=f"readyz-{name}", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had (at interpreter shutdown): this probe fails, the next tries again
            future.set_exception(exc)
        return future

    def report(self, name: str, reason: dict[str, str] | None, failure: BaseException | None) -> None:
        """Log a check's outcome if it differs from the last one logged."""
        with self._lock:
            changed = self._reported.get(name) != reason
            self._reported[name] = reason
        if not changed:
            return
        if reason is None:
            log.info("readyz: the %s check passes", name)
        else:
            log.warning("readyz: the %s check fails: %s: %s", name, reason["error"], _detail(failure) or reason["hint"])


def _run(future: Future, check: Callable[[], None]) -> None:
    try:
        check()
    except BaseException as exc:  # reported by the probe
        future.set_exception(exc)
    else:
        future.set_result(None)


def init_app(app: Flask) -> None:
    app.extensions["parley.readiness"] = Checks()


def check_readiness(app: Flask) -> tuple[dict[str, Any], bool]:
    """The `/readyz` body and whether every check passed."""
    checks: dict[str, Callable[[], None]] = {
        "database": lambda: _check_database(app),
        "archive": lambda: app.extensions["parley.archive"].ping(),
    }
    running: Checks = app.extensions["parley.readiness"]
    futures = {name: running.start(name, check) for name, check in checks.items()}
    timeout = app.config["READYZ_TIMEOUT_SECONDS"]
    wait(futures.values(), timeout=timeout)
    results: dict[str, str] = {}
    reasons: dict[str, dict[str, str]] = {}
    for name, future in futures.items():
        failure = None
        if not future.done():
            reason = {"error": "Timeout", "hint": f"no answer within READYZ_TIMEOUT_SECONDS={timeout:g}"}
        elif future.exception() is None:
            results[name] = "ok"
            running.report(name, None, None)
            continue
        else:
            failure = future.exception()
            reason = _reason(name, failure)
        results[name] = "unavailable"
        reasons[name] = reason
        running.report(name, reason, failure)
    ready = not reasons
    body: dict[str, Any] = {"status": "ok" if ready else "unavailable", "checks": results}
    if reasons:
        body["reasons"] = reasons
    return body, ready


def _check_database(app: Flask) -> None:
    with app.app_context():
        engine = database_utils.get_engine()
        try:
            database_utils.require_current_schema(engine)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            # A pooled connection the database closed (a restart, within PING_IDLE_SECONDS of its
            # last use): the pool has dropped it and its older ones. Once more, on a fresh one.
            database_utils.require_current_schema(engine)


def _detail(failure: BaseException | None) -> str:
    """What the failure says of itself, for the log: the driver's or S3's own message (a check
    sends no user data, and the log keeps no tracebacks), without SQLAlchemy's SQL and links."""
    if failure is None:
        return ""
    cause = failure.orig if isinstance(failure, DBAPIError) and failure.orig is not None else failure.__cause__ or failure
    return _PASSWORD_IN_URL.sub(r"\1***@", " ".join(str(cause).split()))[:500]


def _reason(name: str, exc: BaseException) -> dict[str, str]:
    if name == "archive":
        error, hint = failure_reason(exc)
        return {"error": error, "hint": hint}
    if isinstance(exc, DatabaseNotMigrated):
        return {"error": "database_not_migrated", "hint": exc.message}
    error = type(exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc).__name__
    hint = _DATABASE_HINTS.get(type(exc).__name__, "see the server log for details")
    return {"error": error, "hint": hint}
