"""One JSON line per tunnel (and per intercepted request). Never a token or a secret value.

Lines go to the ``upstreamproxy.audit`` logger, which the CLI points at stdout or at
``--audit-log FILE``; each line is a complete JSON object a log shipper can parse.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

audit_log = logging.getLogger("upstreamproxy.audit")


def utc_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


_encoder = json.JSONEncoder(separators=(",", ":"), default=str)


def emit(record: Mapping[str, Any]) -> None:
    # ``Logger.info`` less its caller lookup (a stack walk per line; an audit line names no
    # source line): the same record goes to the same handlers.
    if not audit_log.isEnabledFor(logging.INFO):
        return
    line = _encoder.encode({"time": utc_now(), **record})
    audit_log.handle(
        audit_log.makeRecord(audit_log.name, logging.INFO, "(audit)", 0, line, (), None)
    )


def log_to_file(path: Path) -> None:
    """Send audit lines (bare JSON, one per line) to ``path`` instead of the root handlers."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    audit_log.addHandler(handler)
    audit_log.propagate = False
    audit_log.setLevel(logging.INFO)
