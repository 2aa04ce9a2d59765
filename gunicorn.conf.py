"""Gunicorn settings for Parley's production server.

    gunicorn -c gunicorn.conf.py "main:create_app()"

Turns are served cooperatively on gevent workers: a turn waiting on the
model holds a socket and a greenlet, not a thread, so one worker carries
hundreds of turns at once. Every setting below can be changed from the
environment (documented defaults) or overridden on the command line.

Nothing from Parley is imported here: gevent patches the standard library
when each worker starts, and modules that create sockets or locks must be
imported after that, which gunicorn does when it loads the app in the worker.
"""
import os

bind = os.environ.get("BIND", f"0.0.0.0:{os.environ.get('PORT', '8000')}")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gevent"
# Concurrent connections (turns in flight, streams) per worker.
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "1000"))
# A worker silent this long is restarted. gevent workers notify from their
# own loop, so a long model call does not count against it.
timeout = int(os.environ.get("WORKER_TIMEOUT", "60"))
# On SIGTERM, turns in flight get this long to finish before the worker stops.
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "90"))
keepalive = int(os.environ.get("KEEPALIVE", "5"))
accesslog = os.environ.get("ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
