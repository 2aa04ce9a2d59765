"""Gunicorn settings for Parley's production server.

    gunicorn -c gunicorn.conf.py "main:create_app()"

Turns are served cooperatively on gevent workers: a turn waiting on the
model holds a socket and a greenlet, not a thread, so one worker carries
hundreds of turns at once. The settings read from the environment below have
their defaults documented in the README; every setting can be changed on the
command line, which wins over this file.

At the top, nothing from Parley is read but config.py's plain constants, and
nothing that makes sockets or locks: gevent patches the standard library
when each worker starts, after this file and the hooks' master-side code
have run. The app itself is loaded in each worker, after the patching.
"""
import atexit
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import uuid

from gunicorn.glogging import Logger

# The most workers and connections per worker a server may be given: past these a typo forks
# workers without end, or makes a pool size gevent cannot hold (its workers then fail in a loop).
MOST_WORKERS = 512
MOST_WORKER_CONNECTIONS = 100_000


def _whole_number(name: str, default: int, least: int, most: int | None = None) -> int:
    """A setting from the environment (empty counts as unset); one that is not a whole number from
    `least` to `most` stops the server with one line that names it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < least or (most is not None and value > most):
        sys.exit(f"Error: {name}={raw!r} must be a whole number " + (f"from {least} to {most}" if most else f"of at least {least}"))
    return value


def _bind() -> str:
    """BIND, or every interface on PORT (8000); a TCP port outside 0-65535 stops the server with one line."""
    name, address = "BIND", os.environ.get("BIND", "").strip()
    if not address:
        name, address = "PORT", f"0.0.0.0:{os.environ.get('PORT', '').strip() or '8000'}"
    host, _, port = address.rpartition(":")
    if host and not address.startswith(("unix:", "fd://")) and port.lstrip("-").isdigit() and not 0 <= int(port) <= 65535:
        sys.exit(f"Error: {name}={os.environ[name].strip()!r}: a port must be from 0 to 65535")
    return address


bind = _bind()
workers = _whole_number("WEB_CONCURRENCY", 2, least=1, most=MOST_WORKERS)
worker_class = os.environ.get("WORKER_CLASS", "").strip() or "gevent"
# psycopg picks how it waits for the database when it is imported: its C wait, which blocks
# the whole worker, unless gevent has patched `select` by then. With --preload it is imported
# in the master, before any patching, so gevent workers are told here to wait as psycopg does
# under gevent: with poll(), which gevent makes cooperative. (A worker class given with -k on
# the command line is not known here; with --preload, give gevent's through WORKER_CLASS.)
if worker_class == "gevent":
    os.environ.setdefault("PSYCOPG_WAIT_FUNC", "wait_poll")
# Connections (turns in flight, streams) each worker carries at once.
worker_connections = _whole_number("WORKER_CONNECTIONS", 1000, least=1, most=MOST_WORKER_CONNECTIONS)
# A worker that stops answering its master this long is restarted (0: never). gevent
# workers report from their own loop, so a long model call does not count.
timeout = _whole_number("WORKER_TIMEOUT", 30, least=0)


def _past_the_model_deadline() -> int:
    """The model's whole deadline (LLM_TOTAL_TIMEOUT_SECONDS) and a turn lease's margin: 150 s by default."""
    from config import LEASE_MARGIN_SECONDS, default, number  # plain constants: nothing patched by gevent

    raw = os.environ.get("LLM_TOTAL_TIMEOUT_SECONDS", "").strip()
    try:
        deadline = number(raw) if raw else default("LLM_TOTAL_TIMEOUT_SECONDS")
    except ValueError:
        sys.exit(f"Error: LLM_TOTAL_TIMEOUT_SECONDS={raw!r} is not a valid number")
    return math.ceil(deadline + LEASE_MARGIN_SECONDS)


# On SIGTERM, turns in flight get this long to finish before workers stop:
# past the model's deadline, so no turn is cut short.
graceful_timeout = _whole_number("GRACEFUL_TIMEOUT", _past_the_model_deadline(), least=0)
keepalive = _whole_number("KEEPALIVE", 5, least=0)
# What gunicorn refuses before Parley sees a request: a request line over
# 8 KiB (414), more than 100 headers or one over 8 KiB (431). The answer is
# JSON like every other error (see on_starting).
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
# The runtime control socket is one path per machine user; several servers
# on one machine would share it. Parley is managed with signals instead.
control_socket_disable = True
accesslog = os.environ.get("ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "").strip() or "info"


class JsonLogger(Logger):
    """gunicorn's own lines (its start, workers booting and exiting, signals) in
    the format of Parley's (LOG_FORMAT, logs.py): with JSON, stderr is JSON
    throughout. The access log, off unless ACCESS_LOG is set, keeps its format."""

    def setup(self, cfg):
        super().setup(cfg)
        if (os.environ.get("LOG_FORMAT", "").strip() or "json") == "json":  # empty counts as unset, as in config.py
            from pythonjsonlogger.json import JsonFormatter

            formatter = JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s", timestamp=False)
            for handler in self.error_log.handlers:
                handler.setFormatter(formatter)


logger_class = JsonLogger

# prometheus-client's multiprocess mode: every worker writes its samples in
# PROMETHEUS_MULTIPROC_DIR and /metrics merges them. The variable is set here,
# before anything imports prometheus-client (with --preload, the master loads
# the app before any server hook runs): to a new temporary directory unless it
# names one. It is removed when the master exits (on_exit), and by the
# process that made it when that exits: gunicorn itself after --check-config
# or --print-config, which run no server hook (nor the workers forked from it).
_made_metrics_directory: list[str] = []
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="parley-metrics-")
    _made_metrics_directory.append(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    _made_by = os.getpid()

    @atexit.register
    def _remove_on_exit_of_the_maker() -> None:
        if os.getpid() == _made_by:  # not in a worker: they inherit exit handlers
            on_exit(None)
elif not os.path.exists(os.environ["PROMETHEUS_MULTIPROC_DIR"]):
    # A directory named but not made yet: with --preload the app writes samples there before on_starting.
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)


def on_starting(server):
    """Start with no samples from an earlier run (nor the master's, with --preload); answer refused requests in JSON.

    A master started by an upgrade (USR2: `server.master_pid` is the old
    master's) keeps the samples: a PROMETHEUS_MULTIPROC_DIR that is named
    holds the old generation's, whose workers still serve and count there.
    """
    for setting, most in (("workers", MOST_WORKERS), ("worker_connections", MOST_WORKER_CONNECTIONS)):
        value = getattr(server.cfg, setting)  # the command line's, which skipped the checks above
        if not 1 <= value <= most:
            sys.exit(f"Error: {setting} {value} must be from 1 to {most}")
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if not server.master_pid:
        shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory, exist_ok=True)

    from gunicorn import util

    util.write_error = _write_json_error


def when_ready(server):
    """Name the workers killed because the graceful timeout ran out.

    When it does, gunicorn sends SIGKILL to every worker still running, and at most logs that a
    worker "was sent SIGKILL! Perhaps out of memory?". Requests still running there were cut.
    """
    kill_workers = server.kill_workers

    def kill_naming_them(sig):
        if sig == signal.SIGKILL and server.WORKERS:
            server.log.warning(
                "the graceful timeout (%s s) ran out: killing %d worker(s) that had not finished (pid %s); "
                "requests still running there are cut, and a turn cut so holds its conversation's lease for up "
                "to TURN_LEASE_SECONDS", server.cfg.graceful_timeout, len(server.WORKERS), ", ".join(map(str, server.WORKERS)),
            )
        kill_workers(sig)

    server.kill_workers = kill_naming_them


def on_exit(server):
    """The temporary metrics directory goes with the server (one PROMETHEUS_MULTIPROC_DIR names stays)."""
    for directory in _made_metrics_directory:
        shutil.rmtree(directory, ignore_errors=True)


def post_fork(server, worker):
    """The worker's connections as in force (the command line wins over WORKER_CONNECTIONS):
    the app, loaded next in the worker, sizes its pool of model connections by them.
    With --preload the app was loaded in the master and keeps WORKER_CONNECTIONS's value."""
    os.environ["WORKER_CONNECTIONS"] = str(worker.cfg.worker_connections)  # every worker class has cfg


def post_worker_init(worker):
    """The app is loaded (and gevent's patches made): tune the garbage collector for serving.

    GC_TUNING is read from the environment, as the app reads it, so that any
    app served with this file is tuned alike (the benchmarks' baseline too).
    Then say that this worker serves: gunicorn's own "Booting worker" line
    comes before the app has loaded, and until then the other workers take
    every connection (the benchmarks wait for all of these lines).
    """
    from config import load_config, tune_garbage_collector

    tune_garbage_collector(load_config()["GC_TUNING"])
    _tell_the_app_when_stopping(worker)
    worker.log.info("Worker ready (pid: %s)", os.getpid())


def _tell_the_app_when_stopping(worker):
    """Let Parley's app see that its worker is stopping (`worker.alive` turns false: SIGTERM, a
    reload, or `--max-requests` reached).

    A request that began before the signal is answered with keep-alive, and gunicorn then reads
    the next request on that connection and runs it (and accepts connections for about a second
    more): a turn begun then may not finish within the graceful timeout. The app refuses every
    turn from the signal on with 503 `shutting_down` instead.
    """
    extensions = getattr(getattr(worker, "wsgi", None), "extensions", None)
    if extensions is not None and "parley.stopping" in extensions:
        extensions["parley.stopping"] = lambda: not worker.alive


def child_exit(server, worker):
    """A worker's gauges leave the totals with it."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def _write_json_error(sock, status_int, reason, mesg):
    """gunicorn's own error page (for a bad request line, too many headers ...), as Parley's JSON error.

    The request was refused before its headers were read, so its X-Request-ID
    is a new one, as Parley gives a request that sent none; a log line carries
    it (gunicorn's own line about the refusal, just before, cannot). The
    request is counted in the metrics like the app's.
    """
    from gunicorn import util

    from metrics import count_refused_by_server

    request_id = uuid.uuid4().hex
    logging.getLogger("gunicorn.error").info("gunicorn answered: %s %s", status_int, reason, extra={"request_id": request_id})
    count_refused_by_server(status_int)
    body = json.dumps({"error": reason.lower().replace(" ", "_"), "message": mesg or reason}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nX-Request-ID: {request_id}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)
