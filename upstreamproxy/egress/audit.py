"""One JSON line per tunnel (and per intercepted request). Never a token or a secret value.

Lines go to the ``upstreamproxy.audit`` logger, which the CLI points at stdout or at
``--audit-log FILE``; each line is a complete JSON object a log shipper can parse.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

audit_log = logging.getLogger("upstreamproxy.audit")
log = logging.getLogger("upstreamproxy.egress")

#: The last timestamp's whole second, and that second formatted (once per second).
_second = -1
_second_text = ""


def utc_now() -> str:
    global _second, _second_text
    now = time.time()
    second = int(now)
    if second != _second:
        _second, _second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second_text}.{int(now % 1 * 1000):03d}Z"


_encoder = json.JSONEncoder(separators=(",", ":"), default=str)

#: ``--audit-log``: the file's descriptor (``O_APPEND``), written directly; None: the logger.
_fd: int | None = None
#: The path ``_fd`` was opened from (looked at again by :func:`reopen_if_moved`).
_path: Path | None = None
_failed_at = 0.0


def emit(record: Mapping[str, Any]) -> None:
    if _fd is not None:
        # One write(2) per line, whole (O_APPEND): a line is on disk - in the page cache -
        # before the next tunnel starts, as with logging's flush per record, without a
        # LogRecord, a handler lock and a formatter per tunnel.
        _write((_encoder.encode({"time": utc_now(), **record}) + "\n").encode())
        return
    # ``Logger.info`` less its caller lookup (a stack walk per line; an audit line names no
    # source line): the same record goes to the same handlers.
    if not audit_log.isEnabledFor(logging.INFO):
        return
    line = _encoder.encode({"time": utc_now(), **record})
    audit_log.handle(
        audit_log.makeRecord(audit_log.name, logging.INFO, "(audit)", 0, line, (), None)
    )


def _write(data: bytes) -> None:
    global _failed_at
    assert _fd is not None
    try:
        while data:
            data = data[os.write(_fd, data) :]
    except OSError as exc:
        now = time.monotonic()
        if now - _failed_at >= 60:  # a full disk must not turn into a log line per tunnel
            _failed_at = now
            log.error("cannot write the audit log: %s", exc.strerror or exc)


def _open(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)


def log_to_file(path: Path) -> None:
    """Send audit lines (bare JSON, one per line) to ``path`` instead of the root handlers
    (appended; created as ``logging.FileHandler`` would, honouring the umask)."""
    global _fd, _path
    fd = _open(path)
    if _fd is not None:
        os.close(_fd)
    _fd, _path = fd, path


def reopen_if_moved() -> bool:
    """After a log rotation renamed or removed the audit file, open its path anew (created
    if missing) so that lines stop going to the old file - or, once the rotation deleted
    it, nowhere. Cheap (a ``stat`` and an ``fstat``): the egress calls it on SIGHUP and on
    every ``--reload-interval`` tick. A path that cannot be opened keeps the old file,
    logged; returns whether the file was reopened."""
    global _fd
    if _fd is None or _path is None:
        return False
    try:
        now = os.stat(_path)
        same = os.path.samestat(now, os.fstat(_fd))
    except FileNotFoundError:
        same = False
    except OSError:
        return False  # cannot tell: keep writing where we are
    if same:
        return False
    try:
        fd = _open(_path)
    except OSError as exc:
        log.error("cannot reopen the audit log %s: %s", _path, exc.strerror or exc)
        return False
    old, _fd = _fd, fd
    os.close(old)
    log.info("audit log reopened: %s", _path)
    return True
