"""A logging filter that redacts credentials from third-party log lines.

websockets logs handshake headers at DEBUG, which would put the session token in the log.
Every logger we hand to a library goes through :func:`redacting_logger`.
"""

from __future__ import annotations

import logging
import re
from typing import Final

# Another scheme's whole value, to the end of the line or quote: a credential may follow the
# scheme word ("Token abc", "Digest username=..., response=...").
_HEADER_RE: Final = re.compile(
    r"(?i)((?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?)(?![\s'\"]*(?:bearer|basic)\b)[^\r\n'\"]+"
)
_SCHEME_RE: Final = re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s'\"]+")


def redact(text: str) -> str:
    """Replace credentials after ``Bearer``/``Basic`` and ``Authorization:`` with ``***``."""
    text = _SCHEME_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    return _HEADER_RE.sub(lambda m: f"{m.group(1)}***", text)


_formatter = logging.Formatter()


class RedactingFilter(logging.Filter):
    """Redacts the message and any traceback (a library may quote a header in an exception)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info:
            record.exc_text = redact(_formatter.formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def redacting_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):
        logger.addFilter(RedactingFilter())
    return logger
