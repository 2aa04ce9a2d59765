"""API keys: creation, lookup, revocation, and the `keys` CLI.

A key is `prly_` plus 43 random URL-safe characters. It is shown once, when
created; the database keeps its SHA-256 (a fast hash is right here: the keys
are random, not passwords) and its first characters, to tell keys apart.

Lookups are cached in each process for `AUTH_CACHE_SECONDS`, so a busy key
costs no query per request. Revoking through this process takes effect at
once; through another process (a second worker or machine) within that time.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import click
from cachetools import TTLCache
from flask import Flask, current_app
from flask.cli import AppGroup
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from database_utils import ApiKey, Conversation, add_transition, get_session, utcnow
from errors import NotFound, Unauthorized
from schemas import MAX_KEY_NAME_CHARS
from states import Handoff, Role, Status

KEY_PREFIX = "prly_"
SHOWN_PREFIX_CHARS = 12
ROLES = tuple(role.value for role in Role)
_CACHE_SIZE = 10_000
MAX_EXPIRES_IN_DAYS = 36_500  # a hundred years; beyond, dates overflow


def _key_name(_context: click.Context, _parameter: click.Parameter, name: str | None) -> str | None:
    """A key's name as `POST /keys` takes it: 1 to MAX_KEY_NAME_CHARS characters, not blank."""
    if name is not None and not (name.strip() and len(name) <= MAX_KEY_NAME_CHARS):
        raise click.BadParameter(f"a name is 1 to {MAX_KEY_NAME_CHARS} characters, not blank")
    return name


@dataclass(frozen=True)
class Caller:
    """The key a request was made with: a plain copy, safe to cache and share."""

    key_id: uuid.UUID
    role: Role
    name: str
    expires_at: datetime | None
    lineage_id: uuid.UUID  # the Idempotency-Keys it sends belong to its lineage (see ApiKey)

    @classmethod
    def of(cls, key: ApiKey) -> Caller:
        return cls(key.key_id, Role(key.role), key.name, key.expires_at, key.lineage_id)


class KeyCache:
    """Usable keys by hash, each kept for `ttl` seconds (0 turns caching off)."""

    def __init__(self, ttl: float) -> None:
        self._entries: TTLCache[str, Caller] | None = TTLCache(_CACHE_SIZE, ttl) if ttl > 0 else None
        self._lock = threading.Lock()
        self.generation = 0  # how many times it was cleared

    def get(self, key_hash: str) -> Caller | None:
        if self._entries is None:
            return None
        with self._lock:
            return self._entries.get(key_hash)

    def put(self, key_hash: str, caller: Caller, generation: int) -> None:
        """Keep `caller`, read from the database when the cache was at `generation`.

        A read that began before a `clear` (a revocation) may have seen the key
        still usable: it is not kept.
        """
        if self._entries is not None:
            with self._lock:
                if generation == self.generation:
                    self._entries[key_hash] = caller

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            if self._entries is not None:
                self._entries.clear()


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_key(session: Session, role: str, name: str, expires_at: datetime | None = None) -> tuple[ApiKey, str]:
    """Make a key; returns the stored row and the secret, which is not kept."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    key, secret = _new_key(role, name, expires_at)
    session.add(key)
    session.commit()
    return key, secret


def _new_key(role: str, name: str, expires_at: datetime | None, lineage_id: uuid.UUID | None = None) -> tuple[ApiKey, str]:
    """A new key (and its secret): the first of a new lineage, or the next of `lineage_id`'s."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = uuid.uuid4()
    key = ApiKey(key_id=key_id, lineage_id=lineage_id or key_id, name=name, role=role, key_hash=hash_key(secret),
                 prefix=secret[:SHOWN_PREFIX_CHARS], expires_at=expires_at)
    return key, secret


def key_of(session: Session, key_id: uuid.UUID) -> ApiKey:
    """A key's row (the caller's own: it was found when the request was authenticated)."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no key {key_id}")
    return key


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(session: Session, key_id: uuid.UUID) -> ApiKey:
    """Revoke a key; revoking it again keeps the first revocation time.

    The key's row is locked first, as a claim locks it (`handoff.claim`):
    a claim that started before waits for its commit to be re-queued here,
    one that starts after sees the key revoked. Revoking again re-queues too.
    """
    key = session.get(ApiKey, key_id, with_for_update=True)
    if key is None:
        raise NotFound(f"key {key_id} does not exist")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    _requeue_assigned(session, key)
    session.commit()
    _key_cache().clear()
    return key


def _requeue_assigned(session: Session, key: ApiKey) -> None:
    """Put the active conversations a revoked staff key had claimed back in the queue
    (`human -> needs_human`, unassigned), so that another staff key can claim them."""
    held = session.scalars(
        select(Conversation)
        .where(Conversation.assigned_key_id == key.key_id, Conversation.status == Status.ACTIVE,
               Conversation.handoff == Handoff.HUMAN)
        .with_for_update()
    ).all()
    for conversation in held:
        add_transition(conversation, "handoff", Handoff.NEEDS_HUMAN, None, "key_revoked",
                       f"the assigned staff key {key.key_id} was revoked")
        conversation.assigned_key_id = None


def rotate_key(
    session: Session, key_id: uuid.UUID, name: str | None = None, expires_at: datetime | None = None
) -> tuple[ApiKey, str, int]:
    """Replace a key: a new key of the same role takes over the old key's
    conversations (a client's own, a staff key's claimed ones), and the old
    key is revoked, all in one transaction. The new key is of the old one's
    lineage, to which the Idempotency-Keys belong: a retry sent with the new
    key is answered from the first request, or gets 409 while that still runs.

    Returns the new key, its secret and how many conversations moved. A key
    that was already revoked (a leak is often revoked first) can be rotated too.
    """
    old = session.get(ApiKey, key_id, with_for_update=True)  # no claim with it meanwhile (see `revoke_key`)
    if old is None:
        raise NotFound(f"key {key_id} does not exist")
    new, secret = _new_key(old.role, name or old.name, expires_at, old.lineage_id)
    session.add(new)
    session.flush()
    moved = session.execute(
        update(Conversation).where(Conversation.owner_key_id == old.key_id).values(owner_key_id=new.key_id)
    ).rowcount
    moved += session.execute(
        update(Conversation).where(Conversation.assigned_key_id == old.key_id).values(assigned_key_id=new.key_id)
    ).rowcount
    if old.revoked_at is None:
        old.revoked_at = utcnow()
    session.commit()
    _key_cache().clear()
    return new, secret, moved


def authenticate(session: Session, authorization: str | None) -> Caller:
    """The usable key named by an `Authorization: Bearer ...` header, or 401."""
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("send your API key as 'Authorization: Bearer <key>'")
    key_hash = hash_key(secret.strip())
    cache = _key_cache()
    caller = cache.get(key_hash)
    if caller is None:
        generation = cache.generation
        key = session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None)))
        if key is None:
            raise Unauthorized("the API key is unknown, revoked or expired")
        caller = Caller.of(key)
        cache.put(key_hash, caller, generation)
    if caller.expires_at is not None and caller.expires_at <= utcnow():
        raise Unauthorized("the API key is unknown, revoked or expired")
    return caller


def _key_cache() -> KeyCache:
    return current_app.extensions["parley.key_cache"]


def bootstrap_keys(session: Session) -> list[tuple[ApiKey, str]]:
    """On an empty key table, make an admin and a client key to start with."""
    if session.scalar(select(func.count()).select_from(ApiKey)):
        return []
    return [create_key(session, Role.ADMIN, "first admin"), create_key(session, Role.CLIENT, "first client")]


keys_cli = AppGroup("keys", help="Create, list and revoke API keys.")


@keys_cli.command("create")
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--name", required=True, callback=_key_name, help="Who or what the key is for.")
@click.option("--expires-in-days", type=click.IntRange(min=1, max=MAX_EXPIRES_IN_DAYS), default=None, help="Default: never expires.")
def create_key_command(role: str, name: str, expires_in_days: int | None) -> None:
    """Create a key and print it. It is shown only this once."""
    expires_at = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
    key, secret = create_key(get_session(), role, name, expires_at)
    click.echo(f"Created {role} key {key.key_id} ({name}). Store it now; it is not shown again:", err=True)
    click.echo(secret)


@keys_cli.command("list")
def list_keys_command() -> None:
    """List keys (never their secrets)."""
    now = utcnow()
    for key in list_keys(get_session()):
        state = key.state(now)
        expires = key.expires_at.isoformat() if key.expires_at else "never"
        click.echo(f"{key.key_id}  {key.role:<6}  {state:<7}  {key.prefix}...  expires {expires}  {key.name}")


@keys_cli.command("revoke")
@click.argument("key_id", type=click.UUID)
def revoke_key_command(key_id: uuid.UUID) -> None:
    """Revoke a key at once."""
    try:
        key = revoke_key(get_session(), key_id)
    except NotFound as exc:
        raise click.ClickException(exc.message) from None
    click.echo(f"Revoked {key.key_id} ({key.name}).")


@keys_cli.command("rotate")
@click.argument("key_id", type=click.UUID)
@click.option("--name", default=None, callback=_key_name, help="Name of the new key (default: the old key's).")
@click.option("--expires-in-days", type=click.IntRange(min=1, max=MAX_EXPIRES_IN_DAYS), default=None, help="Default: never expires.")
def rotate_key_command(key_id: uuid.UUID, name: str | None, expires_in_days: int | None) -> None:
    """Make a new key that takes over KEY_ID's conversations, and revoke KEY_ID."""
    expires_at = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
    try:
        key, secret, moved = rotate_key(get_session(), key_id, name, expires_at)
    except NotFound as exc:
        raise click.ClickException(exc.message) from None
    click.echo(f"Revoked {key_id}; new {key.role} key {key.key_id} ({key.name}) takes over its {moved} conversation(s). "
               "Store it now; it is not shown again:", err=True)
    click.echo(secret)


@keys_cli.command("bootstrap")
def bootstrap_command() -> None:
    """Create a first admin and client key if there are no keys yet."""
    created = bootstrap_keys(get_session())
    if not created:
        click.echo("API keys exist already, so none were made. Make another with:\n"
                   "  parley keys create --role client --name 'my app'   (from the venv: .venv/bin/parley,"
                   " or: make keys ARGS=\"create --role client --name 'my app'\")", err=True)
        return
    # PORT: the port `make run` serves on, as it reads it.
    url = current_app.config.get("SERVER_NAME") or f"http://127.0.0.1:{os.environ.get('PORT') or 8000}"
    click.echo("No API keys existed, so these were made. They are shown only this once:", err=True)
    for key, secret in created:
        click.echo(f"  {key.role:<6} {secret}", err=True)
    click.echo(f"Try: curl -H 'Authorization: Bearer <client key>' -H 'Content-Type: application/json' "
               f"-d '{{\"user_id\": \"me\"}}' {url}/new_chat", err=True)


def init_app(app: Flask) -> None:
    app.extensions["parley.key_cache"] = KeyCache(app.config["AUTH_CACHE_SECONDS"])
    app.cli.add_command(keys_cli)
