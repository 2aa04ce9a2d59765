"""The audit log for admins: `GET /audit` pages, and `audit-prune` applies
`AUDIT_RETENTION_DAYS`.

Audit events are written where the audited reads happen
(`database_utils.record_audit`); this module only reads and expires them.
Pages are newest first by `event_id`, which only grows, so a cursor stays
exact while new events arrive.
"""
from __future__ import annotations

import base64
from datetime import datetime, timedelta

import click
from flask import Flask, current_app
from flask.cli import with_appcontext
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from database_utils import ApiKey, AuditEvent, get_session, utcnow
from errors import ApiError
from schemas import AuditEventOut, AuditPage, AuditQuery


def list_audit_events(session: Session, query: AuditQuery) -> AuditPage:
    """One page of audit events matching `query`, newest first."""
    statement = select(AuditEvent, ApiKey.name, ApiKey.role).join(ApiKey, ApiKey.key_id == AuditEvent.key_id)
    if query.key_id:
        statement = statement.where(AuditEvent.key_id == query.key_id)
    if query.action:
        statement = statement.where(AuditEvent.action == query.action)
    if query.conversation_id:
        statement = statement.where(AuditEvent.conversation_id == query.conversation_id)
    if query.created_from:
        statement = statement.where(AuditEvent.created_at >= query.created_from)
    if query.created_to:
        statement = statement.where(AuditEvent.created_at < query.created_to)
    if query.cursor:
        statement = statement.where(AuditEvent.event_id < _decode_cursor(query.cursor))
    rows = session.execute(statement.order_by(AuditEvent.event_id.desc()).limit(query.limit + 1)).all()
    page = rows[: query.limit]
    more = len(rows) > query.limit
    return AuditPage(
        events=[_event_out(event, name, role) for event, name, role in page],
        next_cursor=_encode_cursor(page[-1][0].event_id) if more else None,
    )


def prune_audit_events(session: Session, retention_days: int, now: datetime | None = None) -> tuple[int, datetime]:
    """Delete events older than `retention_days`; returns how many and the cutoff."""
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    deleted = session.execute(delete(AuditEvent).where(AuditEvent.created_at < cutoff)).rowcount
    session.commit()
    return deleted, cutoff


def _event_out(event: AuditEvent, key_name: str, key_role: str) -> AuditEventOut:
    return AuditEventOut(
        event_id=event.event_id,
        key_id=event.key_id,
        key_name=key_name,
        key_role=key_role,
        action=event.action,
        conversation_id=event.conversation_id,
        detail=event.detail,
        created_at=event.created_at,
    )


def _encode_cursor(event_id: int) -> str:
    return base64.urlsafe_b64encode(f"audit:{event_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        kind, _, number = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().partition(":")
        if kind != "audit":
            raise ValueError(kind)
        return int(number)
    except (ValueError, UnicodeDecodeError):
        raise ApiError("cursor is not one this service returned") from None


@click.command("audit-prune")
@click.option("--days", type=click.IntRange(min=1), default=None, help="Override AUDIT_RETENTION_DAYS.")
@with_appcontext
def audit_prune_command(days: int | None) -> None:
    """Delete audit events older than AUDIT_RETENTION_DAYS (run it daily)."""
    days = days or current_app.config["AUDIT_RETENTION_DAYS"]
    if days is None:
        click.echo("AUDIT_RETENTION_DAYS is not set: audit events are kept; nothing deleted.")
        return
    deleted, cutoff = prune_audit_events(get_session(), days)
    click.echo(f"Deleted {deleted} audit event(s) older than {cutoff.isoformat()} ({days} days).")


def init_app(app: Flask) -> None:
    app.cli.add_command(audit_prune_command)

