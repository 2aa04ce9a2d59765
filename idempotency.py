"""`Idempotency-Key` on the POST routes that change a conversation, with Stripe's semantics.

A request that carries the header claims the key (scoped to the API key)
before it runs:
- the first request runs; when it succeeds, its status and body are stored,
  in the same transaction as its work (for /new_chat and /chat), so a stored
  turn always has its stored response and vice versa;
- a retry with the same key and the same body gets that response again,
  marked `Idempotent-Replayed: true`, without running anything;
- the same key with a different body (or route) gets 422;
- a retry while the first is still running gets 409 `request_in_progress`;
- a request that failed keeps its error answer for its retries as well
  (`keeps`), unless its input was refused, another turn held the
  conversation, or the database failed. Then the claim is released and a
  retry runs afresh.

Records are kept for `IDEMPOTENCY_TTL_HOURS` (24). Expired records are
deleted by each process at most every `PURGE_INTERVAL_SECONDS`, and by
`parley idempotency-purge`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import click
from flask import Flask
from flask.cli import with_appcontext
from pydantic import BaseModel
from sqlalchemy import ColumnElement, delete, or_, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

import releases
from config import turn_lease_seconds
from database_utils import IdempotencyRecord, get_session, utcnow
from errors import (
    DATABASE_NOT_MIGRATED,
    DATABASE_UNAVAILABLE,
    MISCONFIGURED,
    ApiError,
    IdempotencyClaimLost,
    IdempotencyKeyReused,
    RequestInProgress,
    TurnInProgress,
)

log = logging.getLogger("parley")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
# Visible ASCII but the comma: two Idempotency-Key headers reach the app joined by one.
_KEY_PATTERN = re.compile(r"[\x21-\x2b\x2d-\x7e]{1,255}")
PURGE_INTERVAL_SECONDS = 600.0
RENEW_AFTER_SECONDS = 1.0  # a turn's lease taken this long after its key's claim renews the claim's lock
# Failures whose answer is not kept, so a retry with the same key runs again. Stripe keeps
# none "if incoming parameters fail validation, or the request conflicts with another request
# that's executing concurrently": refused input (400, 413, 415, 422) and another turn holding
# the conversation. Nor are failures of the database itself kept: their answer could not be stored.
REFUSED_INPUT_STATUSES = frozenset({400, 413, 415, 422})
UNKEPT_ERRORS = frozenset({TurnInProgress.error, DATABASE_UNAVAILABLE, DATABASE_NOT_MIGRATED, MISCONFIGURED})
# Answers never replayed: refused input, and refusals of the caller (no key, a key without the
# role, the rate limit), which mostly come before a key is claimed; one that comes after (a
# staff key revoked through another process, found when it claims a conversation) is not kept
# either: the request never began, and the same Idempotency-Key sent with a key that works runs.
NEVER_REPLAYED_STATUSES = REFUSED_INPUT_STATUSES | {401, 403, 429}


@dataclass(frozen=True)
class Claim:
    """This request holds the key and runs.

    `claimed_at` is the record's `created_at` as this request set it: once its
    lock ran out and a retry took the key over, the record is the retry's.
    """

    key_id: uuid.UUID  # the lineage of the API key that sent it (see ApiKey.lineage_id)
    idempotency_key: str
    claimed_at: datetime
    lock_seconds: float  # the claim runs out this long after `claimed_at` if nobody releases it


@dataclass(frozen=True)
class Replay:
    """The key's first request has finished: answer with its response."""

    status: int
    body: dict[str, Any]


def fingerprint(method: str, path: str, body: Any, defaults: Mapping[str, Any]) -> str:
    """What makes two requests "the same": route and JSON body, key order ignored.

    A field sent with its default value (`defaults`, from `body_defaults`)
    is the same request as the field left out: `{"stream": false}` is `{}`,
    and so is no body at all.
    """
    if body is None:
        body = {}
    if isinstance(body, dict):
        body = {name: value for name, value in body.items() if not _is_default(value, defaults.get(name, _REQUIRED))}
    canonical = json.dumps([method, path, body], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # "surrogatepass": a lone surrogate ("\ud800") is valid JSON; the body's validation refuses it later (400).
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


_REQUIRED = object()


@functools.cache
def body_defaults(model: type[BaseModel]) -> Mapping[str, Any]:
    """The value each optional field of a request body's model takes when it is left out."""
    return {
        field.alias or name: field.get_default(call_default_factory=True)
        for name, field in model.model_fields.items()
        if not field.is_required()
    }


def _is_default(value: Any, default: Any) -> bool:
    # The type too: 0 is not false, and 1.0 is not 1.
    return default is not _REQUIRED and type(value) is type(default) and value == default


def check_key(value: str) -> str:
    if not _KEY_PATTERN.fullmatch(value):
        raise ApiError(f"{HEADER} must be one header of 1 to 255 visible ASCII characters other than a comma")
    return value


def claim(session: Session, key_id: uuid.UUID, idempotency_key: str, digest: str, settings: Any) -> Claim | Replay:
    """Claim `idempotency_key` for this request, sent with a key of lineage `key_id`, or say
    what answers it instead.

    Raises 422 for a different request under the same key, 409 while the
    first request still runs. A record whose request died (its lock ran out)
    or that expired is taken over.
    """
    lock_seconds = turn_lease_seconds(settings)
    ttl = timedelta(hours=settings["IDEMPOTENCY_TTL_HOURS"])
    for _ in range(3):
        now = utcnow()
        record = IdempotencyRecord(
            key_id=key_id,
            idempotency_key=idempotency_key,
            fingerprint=digest,
            created_at=now,
            locked_until=now + timedelta(seconds=lock_seconds),
            expires_at=now + ttl,
        )
        session.add(record)
        try:
            session.commit()
            return Claim(key_id, idempotency_key, now, lock_seconds)
        except IntegrityError:
            session.rollback()
        existing = session.get(IdempotencyRecord, (key_id, idempotency_key), populate_existing=True)
        if existing is None:
            continue  # purged in between: claim again
        if existing.expires_at > now:
            if existing.fingerprint != digest:
                session.rollback()
                raise IdempotencyKeyReused(
                    f"{HEADER} {idempotency_key!r} was used for a different request; use a new key for a new request"
                )
            if existing.response_status is not None:
                session.rollback()
                return Replay(existing.response_status, existing.response_body or {})
            if existing.locked_until > now:
                session.rollback()
                raise RequestInProgress(f"the first request with {HEADER} {idempotency_key!r} is still running")
        if _take_over(session, key_id, idempotency_key, digest, now, lock_seconds, ttl):
            return Claim(key_id, idempotency_key, now, lock_seconds)
    raise RequestInProgress(f"the request with {HEADER} {idempotency_key!r} is contended; retry")


def _take_over(
    session: Session, key_id: uuid.UUID, idempotency_key: str, digest: str, now: datetime, lock_seconds: float, ttl: timedelta
) -> bool:
    """Claim an expired record, or a running one whose request died, unless someone else just did."""
    result = session.execute(
        update(IdempotencyRecord)
        .where(
            IdempotencyRecord.key_id == key_id,
            IdempotencyRecord.idempotency_key == idempotency_key,
            or_(
                IdempotencyRecord.expires_at <= now,
                (IdempotencyRecord.response_status.is_(None)) & (IdempotencyRecord.locked_until <= now),
            ),
        )
        .values(
            fingerprint=digest,
            response_status=None,
            response_body=None,
            created_at=now,
            locked_until=now + timedelta(seconds=lock_seconds),
            expires_at=now + ttl,
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1


def renew(session: Session, held: Claim) -> Claim:
    """Run the claim's lock from now, as the turn's lease (taken now) runs, when the work before
    the lease took longer than `RENEW_AFTER_SECONDS` (a turn's files read from the archive, a
    statement kept waiting by a lock): else the key's lock would end before the lease, and a
    retry could take the key over from a turn that still holds its conversation.

    Raises 409 if a retry has taken the key over already.
    """
    now = utcnow()
    held_for = (now - held.claimed_at).total_seconds()
    if held_for < RENEW_AFTER_SECONDS:
        return held
    result = session.execute(
        update(IdempotencyRecord)
        .where(_held(held), IdempotencyRecord.response_status.is_(None))
        .values(locked_until=now + timedelta(seconds=held.lock_seconds))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if result.rowcount != 1:
        raise IdempotencyClaimLost(
            f"this request outlived its {HEADER} lock and a retry with the key took it over; the retry's answer is the key's"
        )
    return dataclasses.replace(held, lock_seconds=held_for + held.lock_seconds)


def save_response(session: Session, held: Claim, status: int, body: dict[str, Any]) -> None:
    """Store the response of the claiming request; the caller commits it with the request's work.

    Raises 409 if a retry has taken the key over (this request outlived its
    lock): the caller rolls its work back, and the retry's answer stands.
    """
    result = session.execute(
        update(IdempotencyRecord)
        .where(_held(held), IdempotencyRecord.response_status.is_(None))
        .values(response_status=status, response_body=body)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        raise IdempotencyClaimLost(
            f"this request outlived its {HEADER} lock and a retry with the key took it over; the retry's answer is the key's"
        )


def keeps(status: int, body: Any) -> bool:
    """Whether an error answer is kept for the key's retries, as a success is (`save_response`)."""
    if status < 400 or not isinstance(body, dict) or status in NEVER_REPLAYED_STATUSES:
        return False
    return body.get("error") not in UNKEPT_ERRORS


def release(session: Session, held: Claim) -> None:
    """Drop the claim of a request that failed, so that a retry runs afresh.

    If the database cannot take that now, it is tried again in the
    background until the claim would have run out (releases.py).
    """
    try:
        _release(session, held)
    except SQLAlchemyError as exc:
        with contextlib.suppress(SQLAlchemyError):
            session.rollback()
        log.warning("could not release an idempotency claim: %s; trying again in the background", exc.__class__.__name__)
        remaining = (held.claimed_at + timedelta(seconds=held.lock_seconds) - utcnow()).total_seconds()
        releases.later(f"the claim of {HEADER} {held.idempotency_key!r}", lambda retry: _release(retry, held), session, remaining)


def _release(session: Session, held: Claim) -> None:
    session.rollback()
    session.execute(delete(IdempotencyRecord).where(_held(held), IdempotencyRecord.response_status.is_(None)))
    session.commit()


def _held(held: Claim) -> ColumnElement[bool]:
    """The key's record while this request's claim is the one it holds."""
    return (
        (IdempotencyRecord.key_id == held.key_id)
        & (IdempotencyRecord.idempotency_key == held.idempotency_key)
        & (IdempotencyRecord.created_at == held.claimed_at)
    )


def purge_expired(session: Session) -> int:
    """Delete every expired record; returns how many."""
    result = session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.expires_at <= utcnow()))
    session.commit()
    return result.rowcount


def purge_now_and_then(session: Session, app: Flask) -> None:
    """Purge expired records at most once per PURGE_INTERVAL_SECONDS in this process."""
    state = app.extensions["parley.idempotency"]
    if time.monotonic() - state["last_purge"] >= PURGE_INTERVAL_SECONDS:
        state["last_purge"] = time.monotonic()
        purge_expired(session)


@click.command("idempotency-purge")
@with_appcontext
def purge_command() -> None:
    """Delete expired idempotency records (older than IDEMPOTENCY_TTL_HOURS)."""
    click.echo(f"Deleted {purge_expired(get_session())} expired idempotency records.")


def init_app(app: Flask) -> None:
    app.extensions["parley.idempotency"] = {"last_purge": float("-inf")}
    app.cli.add_command(purge_command)


