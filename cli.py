"""The `parley` command: Flask's CLI for `main:create_app`.

Every command the app registers (`keys`, `db-upgrade`, `archive-prepare`,
`audit-prune`, `run`, and any added later) is available as
`parley <command>`, with settings read from the environment exactly as the
server reads them.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from flask.cli import FlaskGroup

# Parley runs from its checkout. The editable install maps only the modules
# listed in pyproject.toml; with the checkout on the path, modules added
# since then are found too.
CHECKOUT = str(Path(__file__).resolve().parent)


def _create_app():
    # A command is not one of the server's workers: in the server's metrics
    # directory its samples would join the server's totals.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from main import create_app

    return create_app()


def main() -> None:
    if CHECKOUT not in sys.path:
        sys.path.insert(0, CHECKOUT)
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    from config import ConfigError

    try:
        FlaskGroup(name="parley", create_app=_create_app, help="Parley's commands (Flask's CLI for main:create_app).")()
    except ConfigError as exc:  # a setting that cannot be used: one line that names it
        sys.exit(f"Error: {exc}")
    except OperationalError as exc:  # the database is down, unreachable or missing: one line, not a traceback
        reason = " ".join(str(exc.orig).split())
        sys.exit(f"Error: cannot use the database at DATABASE_URL: {reason}")
    except (ArgumentError, NoSuchModuleError) as exc:  # not echoed: a malformed URL may hold a password
        reason = str(exc) if isinstance(exc, NoSuchModuleError) else "it cannot be parsed"
        sys.exit(f"Error: DATABASE_URL is not a database URL Parley can use ({reason}); "
                 "e.g. postgresql+psycopg://user@host:5432/parley or sqlite:///parley.db")
