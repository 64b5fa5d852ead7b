"""A logging filter that redacts credentials from third-party log lines.

websockets logs handshake headers at DEBUG, which would put the session token in the log.
Every logger we hand to a library goes through :func:`redacting_logger`.
"""

from __future__ import annotations

import logging
import re
from typing import Final

_CREDENTIAL_RE: Final = re.compile(
    r"(?i)((?:proxy-)?authorization\s*[:=]\s*)(?:(basic|bearer)\s+)?\S+"
)


def redact(text: str) -> str:
    return _CREDENTIAL_RE.sub(lambda m: f"{m.group(1)}{m.group(2) + ' ' if m.group(2) else ''}***",
                              text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def redacting_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):
        logger.addFilter(RedactingFilter())
    return logger
