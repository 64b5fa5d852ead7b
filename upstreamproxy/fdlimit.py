"""Raising the soft file-descriptor limit (``RLIMIT_NOFILE``) to the hard limit at start.

Every tunnel costs each process two or three descriptors, and the common default soft limit
of 1024 is reached with a few hundred tunnels while the hard limit (often 2^20 in containers)
would allow far more. Raising the soft limit needs no privilege. Both long-running processes
(``egress``, ``relay``/``start``) call :func:`raise_nofile_limit` once at start and log what
they got, so an operator reading the log knows the ceiling before it is hit.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from typing import Final

log = logging.getLogger("upstreamproxy.fdlimit")

#: Used when the hard limit is "unlimited", which Linux refuses as a soft NOFILE value.
UNLIMITED_FALLBACK: Final = 1 << 20


@dataclass(frozen=True)
class FdLimit:
    before: int
    soft: int
    hard: int

    def describe(self) -> str:
        if self.soft == self.before:
            return f"file descriptor limit {self.soft} (hard limit {_show(self.hard)})"
        return (
            f"file descriptor limit raised from {self.before} to {self.soft} "
            f"(hard limit {_show(self.hard)})"
        )


def _show(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def raise_nofile_limit(process: str) -> FdLimit:
    """Set the soft ``RLIMIT_NOFILE`` to the hard limit; log and return the outcome.

    Never fails: a limit that cannot be raised stays as it was (and is logged as such).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    candidates = [hard] if hard != resource.RLIM_INFINITY else []
    candidates.append(UNLIMITED_FALLBACK)
    for target in candidates:
        if soft != resource.RLIM_INFINITY and target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        break
    now, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    result = FdLimit(soft, now, hard)
    log.info("%s: %s", process, result.describe())
    return result
