"""A throwaway PostgreSQL database for tests and benchmarks."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def admin_url() -> str:
    """TEST_DATABASE_URL names a server where this user may create databases."""
    return os.environ.get("TEST_DATABASE_URL", DEFAULT_ADMIN_URL)


@contextmanager
def temporary_database(server_url: str, prefix: str = "parley_test") -> Iterator[str]:
    """Create a fresh database on `server_url`, yield its URL, drop it after."""
    url = make_url(server_url)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def allow_connections(database_url: str, allowed: bool) -> None:
    """Let a database take connections or not; not also ends the ones it has (an outage, on a live server)."""
    name = make_url(database_url).database
    admin = create_engine(admin_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}'))
        if not allowed:
            connection.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"), {"name": name})
    admin.dispose()
