"""Keep terminal colour codes out of logs that are not read on a terminal.

The development server colours its request lines; written to a file or a
log collector, those codes are noise (`\\x1b[33m`). When stderr is not a
terminal, a filter strips them from every record before it is formatted.
"""
from __future__ import annotations

import logging
import re
import sys

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class StripAnsi(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\x1b" in message:
            record.msg, record.args = ANSI_ESCAPE.sub("", message), None
        return True


def init_app(_app: object = None) -> None:
    """Strip colour codes from the root handlers' records unless stderr is a terminal."""
    if sys.stderr.isatty():
        return
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, StripAnsi) for f in handler.filters):
            handler.addFilter(StripAnsi())
