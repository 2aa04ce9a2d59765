"""Settings: every environment variable Parley reads, with its default.

`load_config()` turns the process environment into a plain dict that
`create_app()` puts into `app.config`; tests pass their own overrides on top.
"""
from __future__ import annotations

import gc
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import limits

DATA_DIR = Path("data")
DEFAULT_DECLINE_REPLY = "I could not find this in the knowledge base, so I cannot answer it reliably."
DEFAULT_HANDOFF_PHRASES = "talk to a human,speak to a human,talk to a person,speak to a person,human agent,real person"


class ConfigError(ValueError):
    """A setting in the environment that Parley cannot use; the message names it."""


# Python's cyclic garbage collector, for a process that has loaded the app and
# then serves requests or runs a batch job: most objects of a turn or of an
# archived conversation are freed by reference counting, but the collector
# ran every 700 net new objects and walked all of the app's long-lived
# objects in its full collections (14 % of a worker's CPU on the hot path;
# README, Performance).
GC_THRESHOLD = (10_000, 10, 10)


def tune_garbage_collector(enabled: bool = True) -> None:
    """Once the app is loaded: move its objects out of the collector's reach and collect less often.

    For a process that serves or runs a job: a gunicorn worker, a batch
    command; `enabled` is the GC_TUNING setting (off in the test run, whose
    process runs many apps and commands). Once per process (a second call
    changes nothing).
    """
    if not enabled or gc.get_threshold() == GC_THRESHOLD:
        return
    gc.collect()  # garbage frozen would never be collected
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def on_off(raw: str) -> bool:
    """A switch: on/off, true/false, yes/no or 1/0."""
    value = raw.lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ValueError(raw)


def number(raw: str) -> float:
    """A number of seconds, hours, ...: `nan` and `inf` are none."""
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


# An Idempotency-Key's response is kept at least this long (hours), as Stripe keeps it.
MIN_IDEMPOTENCY_TTL_HOURS = 24

# name -> (default, parser). The README's configuration table mirrors this.
_SETTINGS: dict[str, tuple[Any, Any]] = {
    "DATABASE_URL": (f"sqlite:///{DATA_DIR / 'parley.db'}", str),
    "ARCHIVE_URL": (f"file://{DATA_DIR / 'archive'}", str),
    "S3_ENDPOINT_URL": (None, str),
    "LLM_PROVIDER": (None, str),
    "LLM_MODEL": (None, str),
    "LLM_MAX_TOKENS": (1024, int),
    "LLM_TEMPERATURE": (None, number),
    "LLM_TIMEOUT_SECONDS": (60.0, number),
    "LLM_TOTAL_TIMEOUT_SECONDS": (120.0, number),
    "LLM_MAX_RETRIES": (2, int),
    "LLM_RETRY_AFTER_MAX_SECONDS": (10.0, number),
    "STREAM_HEARTBEAT_SECONDS": (15.0, number),
    "TURN_LEASE_SECONDS": (None, number),
    "CONTEXT_MAX_TOKENS": (8000, int),
    "CONTEXT_MAX_MESSAGES": (None, int),
    "CONTEXT_CACHE_CONVERSATIONS": (500, int),
    "MAX_MESSAGE_CHARS": (32_000, int),
    "MAX_CONTENT_LENGTH": (256 * 1024, int),
    "MAX_FILE_BYTES": (10 * 1024 * 1024, int),
    "REDIS_URL": (None, str),
    "RATE_LIMIT": ("120 per minute", str),
    "AUTH_CACHE_SECONDS": (5.0, number),
    "GC_TUNING": (True, on_off),
    "IDEMPOTENCY_TTL_HOURS": (24.0, number),
    "DB_POOL_SIZE": (30, int),
    "DB_MAX_OVERFLOW": (10, int),
    "DB_POOL_TIMEOUT": (10.0, number),
    "LOG_FORMAT": ("json", str),
    # Also read by gunicorn.conf.py for gunicorn's own lines.
    "LOG_LEVEL": ("info", str),
    # Also read by gunicorn.conf.py (connections per gevent worker); the model's connection pool follows it.
    "WORKER_CONNECTIONS": (1000, int),
    "TRUSTED_PROXY_HOPS": (0, int),
    "CORS_ORIGINS": (None, str),
    "READYZ_TIMEOUT_SECONDS": (3.0, number),
    "AUDIT_RETENTION_DAYS": (None, int),
    "SESSION_IDLE_MINUTES": (60, int),
    "LIVE_RETENTION_DAYS": (0, int),
    "ARCHIVE_RETENTION_DAYS": (None, int),
    "HANDOFF_PHRASES": (DEFAULT_HANDOFF_PHRASES, str),
    "HANDOFF_AFTER_MESSAGES": (None, int),
    "HANDOFF_TOOL": (True, on_off),
    "VARIABLES_MAX_COUNT": (100, int),
    "VARIABLE_MAX_BYTES": (16 * 1024, int),
    "KNOWLEDGE_BACKEND": ("database", str),
    "KNOWLEDGE_DEFAULT": (False, on_off),
    "KNOWLEDGE_LANGUAGE": ("english", str),
    "KNOWLEDGE_TOP_K": (3, int),
    "KNOWLEDGE_MIN_SCORE": (None, number),
    "KNOWLEDGE_LOW_CONFIDENCE_POLICY": ("answer", str),
    "KNOWLEDGE_DECLINE_REPLY": (DEFAULT_DECLINE_REPLY, str),
    "KNOWLEDGE_MAX_BYTES": (10 * 1024 * 1024, int),
    "KENDRA_INDEX_ID": (None, str),
    "KENDRA_REGION": (None, str),
    "KENDRA_ENDPOINT_URL": (None, str),
    "KENDRA_MIN_CONFIDENCE": ("HIGH", str),
}
# The least each of these may be set to (when set, for those unset by default): SQLAlchemy reads
# a pool of 0 (or less) as one without a limit and a negative pool timeout as an error, a gevent
# worker that may hold no connection serves nothing, and a negative wait, count or size is none
# that the code could keep to.
_MINIMUMS = {
    "DB_POOL_SIZE": 1,
    "DB_MAX_OVERFLOW": 0,
    "DB_POOL_TIMEOUT": 0,
    "WORKER_CONNECTIONS": 1,
    "LLM_MAX_TOKENS": 1,
    "LLM_MAX_RETRIES": 0,
    "LLM_RETRY_AFTER_MAX_SECONDS": 0,
    "CONTEXT_MAX_TOKENS": 1,
    "CONTEXT_MAX_MESSAGES": 1,
    "CONTEXT_CACHE_CONVERSATIONS": 0,
    "MAX_MESSAGE_CHARS": 1,
    "MAX_CONTENT_LENGTH": 1,
    "MAX_FILE_BYTES": 1,
    "AUTH_CACHE_SECONDS": 0,
    "TRUSTED_PROXY_HOPS": 0,
    # A day or a minute at least: 0 would erase every audit event, end every conversation or drop every archive.
    "AUDIT_RETENTION_DAYS": 1,
    "SESSION_IDLE_MINUTES": 1,
    "LIVE_RETENTION_DAYS": 0,  # 0: an ended conversation's live rows go at once (the archive holds them)
    "ARCHIVE_RETENTION_DAYS": 1,
    "HANDOFF_AFTER_MESSAGES": 0,
    "VARIABLES_MAX_COUNT": 0,
    "VARIABLE_MAX_BYTES": 1,
    "KNOWLEDGE_MAX_BYTES": 1,
}
# The most these may be set to: a time past them is beyond the dates the database and Python can
# hold (a lease or a key's record ending after the year 9999), so every request using it would fail.
_MAXIMUMS = {
    "LLM_TIMEOUT_SECONDS": 86_400,  # a day
    "LLM_TOTAL_TIMEOUT_SECONDS": 86_400,
    "TURN_LEASE_SECONDS": 86_400,
    "IDEMPOTENCY_TTL_HOURS": 87_600,  # ten years
    "SESSION_IDLE_MINUTES": 5_256_000,
    "AUDIT_RETENTION_DAYS": 36_500,  # a hundred years
    "LIVE_RETENTION_DAYS": 36_500,
    "ARCHIVE_RETENTION_DAYS": 36_500,
}
# ... and these more than 0 (a wait of none, or a negative one, that the code would wait on).
_POSITIVE = ("LLM_TIMEOUT_SECONDS", "LLM_TOTAL_TIMEOUT_SECONDS", "STREAM_HEARTBEAT_SECONDS", "TURN_LEASE_SECONDS",
             "READYZ_TIMEOUT_SECONDS")
# A turn's lease outlives its longest model call by this much, so a lease
# expires only when its worker died.
LEASE_MARGIN_SECONDS = 30.0

# The temperatures each provider's API takes (the echo model takes any, and uses none).
HIGHEST_TEMPERATURES = {"anthropic": 1, "bedrock": 1, "openai": 2}

DEFAULT_MODELS = {
    "anthropic": "claude-sonnet-4-5",
    "bedrock": "anthropic.claude-sonnet-4-5-20250929-v1:0",
    "openai": "gpt-4o-mini",
    "echo": "echo",
}


def load_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read settings from the environment, falling back to the defaults."""
    environ = os.environ if environ is None else environ
    config: dict[str, Any] = {}
    for name, (default, parse) in _SETTINGS.items():
        raw = environ.get(name, "").strip()
        try:
            config[name] = parse(raw) if raw else default
        except ValueError as exc:
            raise ConfigError(f"{name}={raw!r} is not a valid {parse.__name__}") from exc
    # The echo model says why it is answering: chosen, or no key configured.
    config["LLM_PROVIDER_CHOSEN"] = config["LLM_PROVIDER"] is not None
    config["LLM_PROVIDER"] = (config["LLM_PROVIDER"] or _default_provider(environ)).lower()
    if config["LLM_PROVIDER"] not in DEFAULT_MODELS:
        raise ConfigError(f"LLM_PROVIDER must be one of {', '.join(DEFAULT_MODELS)}")
    config["LLM_MODEL"] = config["LLM_MODEL"] or DEFAULT_MODELS[config["LLM_PROVIDER"]]
    most = HIGHEST_TEMPERATURES.get(config["LLM_PROVIDER"])
    if config["LLM_TEMPERATURE"] is not None and most is not None and not 0 <= config["LLM_TEMPERATURE"] <= most:
        # The provider would refuse every turn (a 502 each).
        raise ConfigError(f"LLM_TEMPERATURE must be between 0 and {most} for {config['LLM_PROVIDER']}")
    if config["LOG_FORMAT"] not in ("json", "text"):
        raise ConfigError("LOG_FORMAT must be json or text")
    config["LOG_LEVEL"] = config["LOG_LEVEL"].lower()
    if config["LOG_LEVEL"] not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
    for name, least in _MINIMUMS.items():
        if config[name] is not None and config[name] < least:
            raise ConfigError(f"{name} must be at least {least}")
    for name in _POSITIVE:
        if config[name] is not None and config[name] <= 0:
            raise ConfigError(f"{name} must be more than 0")
    for name, most in _MAXIMUMS.items():
        if config[name] is not None and config[name] > most:
            raise ConfigError(f"{name} must be at most {most}")
    try:
        limits.parse_many(config["RATE_LIMIT"])
    except ValueError:  # flask-limiter would refuse it on each request and let every one through
        raise ConfigError(f"RATE_LIMIT={config['RATE_LIMIT']!r} is not a rate in limits' notation, "
                          "e.g. '120 per minute' or '10 per second; 1000 per hour'") from None
    if config["IDEMPOTENCY_TTL_HOURS"] < MIN_IDEMPOTENCY_TTL_HOURS:
        raise ConfigError(f"IDEMPOTENCY_TTL_HOURS must be at least {MIN_IDEMPOTENCY_TTL_HOURS}: clients may retry for a day")
    _check_knowledge(config)
    return config


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
KNOWLEDGE_BACKENDS = ("database", "kendra")
KNOWLEDGE_POLICIES = ("answer", "decline", "handoff")
KENDRA_CONFIDENCES = ("VERY_HIGH", "HIGH", "MEDIUM", "LOW")


def _check_knowledge(config: dict[str, Any]) -> None:
    config["KNOWLEDGE_BACKEND"] = config["KNOWLEDGE_BACKEND"].lower()
    if config["KNOWLEDGE_BACKEND"] not in KNOWLEDGE_BACKENDS:
        raise ConfigError(f"KNOWLEDGE_BACKEND must be one of {', '.join(KNOWLEDGE_BACKENDS)}")
    config["KNOWLEDGE_LOW_CONFIDENCE_POLICY"] = config["KNOWLEDGE_LOW_CONFIDENCE_POLICY"].lower()
    if config["KNOWLEDGE_LOW_CONFIDENCE_POLICY"] not in KNOWLEDGE_POLICIES:
        raise ConfigError(f"KNOWLEDGE_LOW_CONFIDENCE_POLICY must be one of {', '.join(KNOWLEDGE_POLICIES)}")
    config["KENDRA_MIN_CONFIDENCE"] = config["KENDRA_MIN_CONFIDENCE"].upper()
    if config["KENDRA_MIN_CONFIDENCE"] not in KENDRA_CONFIDENCES:
        raise ConfigError(f"KENDRA_MIN_CONFIDENCE must be one of {', '.join(KENDRA_CONFIDENCES)}")
    if config["KNOWLEDGE_BACKEND"] == "kendra" and len(config["KENDRA_INDEX_ID"] or "") != 36:
        raise ConfigError("KNOWLEDGE_BACKEND=kendra needs KENDRA_INDEX_ID, the index's 36-character ID")
    if not config["KNOWLEDGE_LANGUAGE"].replace("_", "").isalnum():
        raise ConfigError("KNOWLEDGE_LANGUAGE must be a text search configuration name, e.g. english")
    if not 1 <= config["KNOWLEDGE_TOP_K"] <= 20:
        raise ConfigError("KNOWLEDGE_TOP_K must be between 1 and 20")
    if config["KNOWLEDGE_MIN_SCORE"] is not None and not 0 <= config["KNOWLEDGE_MIN_SCORE"] <= 1:
        raise ConfigError("KNOWLEDGE_MIN_SCORE must be between 0 and 1 (a passage's score is)")


def default(name: str) -> Any:
    """A setting's default, for code that runs without an app (the engine's pool sizes)."""
    return _SETTINGS[name][0]


def turn_lease_seconds(config: Mapping[str, Any]) -> float:
    """How long a turn may hold its conversation: past the model's total deadline."""
    lease = config["TURN_LEASE_SECONDS"]
    return lease if lease is not None else config["LLM_TOTAL_TIMEOUT_SECONDS"] + LEASE_MARGIN_SECONDS


def _default_provider(environ: Mapping[str, str]) -> str:
    """Claude when a key is configured, otherwise the offline echo model."""
    if environ.get("ANTHROPIC_API_KEY") or environ.get("ANTHROPIC_AUTH_TOKEN"):
        return "anthropic"
    if environ.get("OPENAI_API_KEY"):
        return "openai"
    return "echo"
