"""Prometheus metrics, served at `/metrics`.

Under gunicorn every worker is its own process, so the samples of all of
them must be merged: `gunicorn.conf.py` sets `PROMETHEUS_MULTIPROC_DIR`,
each worker writes its samples there (prometheus-client's multiprocess
mode) and `/metrics` reads them all. Without that variable (the tests'
in-process apps, `parley run`) the process's own samples are served.
"""
from __future__ import annotations

import functools
import glob
import os
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask, Response, current_app, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from sqlalchemy import Engine, event
from werkzeug.exceptions import MethodNotAllowed

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The service's metrics, registered on a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = _requests_counter(registry)
        self.request_seconds = Histogram(
            "parley_http_request_duration_seconds", "Time to answer a request (to its first byte when streamed).",
            ["route", "method"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.model_seconds = Histogram(
            "parley_model_request_duration_seconds",
            "Time the model provider took for a reply, retries included (streamed: until the stream ended).",
            ["provider", "outcome"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.model_tokens = Counter(
            "parley_model_tokens", "Tokens the provider reported, by direction (input or output).",
            ["provider", "direction"], registry=registry,
        )
        self.turns_in_flight = Gauge(
            "parley_turns_in_flight", "Turns between calling the model and storing the reply (streamed: to the stream's end).",
            multiprocess_mode="livesum", registry=registry,
        )
        self.db_connections_in_use = Gauge(
            "parley_db_pool_connections_in_use", "Database connections checked out of the pools.",
            multiprocess_mode="livesum", registry=registry,
        )
        self.db_pool_size = Gauge(
            "parley_db_pool_size", "Connections the pools keep open (overflow not counted).",
            multiprocess_mode="livesum", registry=registry,
        )

    @contextmanager
    def turn(self) -> Iterator[None]:
        self.turns_in_flight.inc()
        try:
            yield
        finally:
            self.turns_in_flight.dec()

    @contextmanager
    def model_call(self, provider: str) -> Iterator[None]:
        started = time.perf_counter()
        outcome = "error"
        try:
            yield
            outcome = "ok"
        finally:
            self.model_seconds.labels(provider, outcome).observe(time.perf_counter() - started)

    def streamed_turn(self, provider: str, started: float, events: Iterator[str], replied: Callable[[], bool]) -> Iterator[str]:
        """A streamed turn's events (`streaming.stream_turn`), the turn counted in flight until
        they end, and the model's time, from `started` (opening its stream), with them;
        `replied` tells whether the whole reply came. A stream its client left
        before then is `cancelled`, not a model error."""
        self.turns_in_flight.inc()
        left = False
        try:
            yield from events
        except GeneratorExit:  # the server closed the response: its client went away
            left = True
            raise
        finally:
            self.turns_in_flight.dec()
            outcome = "ok" if replied() else "cancelled" if left else "error"
            self.model_seconds.labels(provider, outcome).observe(time.perf_counter() - started)

    def count_tokens(self, provider: str, usage: dict[str, int]) -> None:
        self.model_tokens.labels(provider, "input").inc(usage.get("input_tokens", 0))
        self.model_tokens.labels(provider, "output").inc(usage.get("output_tokens", 0))

    def watch_pool(self, engine: Engine) -> None:
        size = getattr(engine.pool, "size", None)
        if callable(size):
            self.db_pool_size.inc(size())
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                # With --preload the master made the app, and a forked worker starts
                # its samples from zero: each worker counts its own pool again.
                gauge, pool = weakref.ref(self.db_pool_size), weakref.ref(engine.pool)
                os.register_at_fork(after_in_child=lambda: _add_pool(gauge(), pool()))
        event.listen(engine, "checkout", self._checked_out)
        event.listen(engine, "checkin", self._checked_in)

    # A record is checked in without a checkout when its connection could not be
    # opened (the database is down), so each checkout is marked on its record, whose
    # `record_info` outlives the connection, and only a marked record counts back in.
    def _checked_out(self, _connection: Any, record: Any, _proxy: Any) -> None:
        if not record.record_info.get("parley_in_use"):  # a checkout retried after a disconnect counts once
            record.record_info["parley_in_use"] = True
            self.db_connections_in_use.inc()

    def _checked_in(self, _connection: Any, record: Any) -> None:
        if record.record_info.pop("parley_in_use", False):
            self.db_connections_in_use.dec()

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            merged = CollectorRegistry()
            _SizedFilesCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)


class _SizedFilesCollector(multiprocess.MultiProcessCollector):
    """The samples of every process, leaving out a file a process has just made and not yet sized:
    it holds no sample, and prometheus-client cannot read its missing header (`struct.error`)."""

    def collect(self) -> Any:
        return self.merge([path for path in glob.glob(os.path.join(self._path, "*.db")) if _size(path) >= _HEADER_BYTES])


_HEADER_BYTES = 8  # a sample file starts with the 4-byte length in use, padded to 8


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:  # a dead worker's live gauge, removed since the listing
        return 0


def _add_pool(gauge: Gauge | None, pool: Any) -> None:
    """A forked worker's pool in the pool-size gauge (weak references: a disposed app is not kept)."""
    if gauge is not None and pool is not None:
        gauge.inc(pool.size())


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _route_label() -> str:
    """The rule a request matched; for a 405, the rule its path matches under another method."""
    if request.url_rule is not None:
        return request.url_rule.rule
    refused = request.routing_exception
    if isinstance(refused, MethodNotAllowed) and refused.valid_methods:
        adapter = current_app.create_url_adapter(request)
        rule, _ = adapter.match(method=refused.valid_methods[0], return_rule=True)
        return rule.rule
    return "unmatched"


def count_refused_by_server(status: int) -> None:
    """Count a request gunicorn answered itself (a request line or headers over its limits, a
    malformed request), which the app never saw: `unmatched` and `other`, as no route or method
    was read. In the shared samples of gunicorn's workers only (PROMETHEUS_MULTIPROC_DIR)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _refused_requests().labels("unmatched", "other", str(status)).inc()


@functools.cache
def _refused_requests() -> Counter:
    # Not registered: the samples go to the worker's file, where /metrics merges them with the app's.
    return _requests_counter(None)


def _requests_counter(registry: CollectorRegistry | None) -> Counter:
    return Counter(
        "parley_http_requests", "HTTP requests answered, by route, method and status.",
        ["route", "method", "status"], registry=registry,
    )


def get_metrics(app: Flask) -> Metrics:
    return app.extensions["parley.metrics"]


def init_app(app: Flask, engine: Engine) -> Metrics:
    metrics = Metrics()
    app.extensions["parley.metrics"] = metrics
    metrics.watch_pool(engine)

    @app.before_request
    def _start_timer() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _count_request(response: Response) -> Response:
        route = _route_label()
        elapsed = time.perf_counter() - g.get("request_started", time.perf_counter())
        method = request.method if request.method in _METHODS else "other"  # any token is a method to HTTP
        metrics.requests.labels(route, method, str(response.status_code)).inc()
        metrics.request_seconds.labels(route, method).observe(elapsed)
        return response

    app.add_url_rule("/metrics", "metrics", lambda: Response(metrics.exposition(), content_type=CONTENT_TYPE_LATEST))
    return metrics


