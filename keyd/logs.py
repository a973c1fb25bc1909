"""Logging set-up: plain text for people, one JSON object per line for machines.

JSON lines have stable fields: ``time`` (RFC 3339, UTC, milliseconds), ``level``, ``logger``,
``message``, and, when a record carries them (``extra={"app": ...}``): ``event`` (what happened, a
fixed word such as ``loaded``, ``refresh``, ``rotation``, ``degraded``, ``unavailable``,
``recovered``, ``renewal``, ``relogin``), ``app``, ``key_version``, ``previous_version``, ``ttl``
(seconds), ``error`` (a keyd error message, which never holds a secret), ``node`` (a Vault node's
address), ``attempt`` and ``apps``. ``exception`` holds only
the type name of an exception; tracebacks are never written. docs/operations.md lists the events.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

# "node" (a Vault node's address: vault_node_failed, login), "attempt" (recovery_attempt) and "apps"
# (the reload_failed summary) are passed by the code as well; a field missing here is silently dropped.
EXTRA_FIELDS = ("event", "app", "key_version", "previous_version", "ttl", "error", "node", "attempt", "apps")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            if hasattr(record, name):
                doc[name] = getattr(record, name)
        if record.exc_info and record.exc_info[0] is not None:
            doc["exception"] = record.exc_info[0].__name__
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatException(self, ei: object) -> str:
        # Tracebacks can show local variables' reprs in some handlers; keep just the type.
        exc_type = ei[0] if isinstance(ei, tuple) else None
        return f"  ({getattr(exc_type, '__name__', 'exception')}; traceback suppressed)"


def setup(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def ago(seconds: float | None) -> str:
    """A short, readable duration: "12 s", "4 m", "3 h", "2 d"."""
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{int(seconds)} s"
    if seconds < 7200:
        return f"{int(seconds // 60)} m"
    if seconds < 172800:
        return f"{int(seconds // 3600)} h"
    return f"{int(seconds // 86400)} d"
