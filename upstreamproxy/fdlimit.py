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


#: Descriptors kept back from tunnels: listeners, log files, DNS, the pool, a reserve fd.
FD_RESERVE: Final = 64


def tunnel_budget(fds_per_tunnel: int = 2, reserve: int = FD_RESERVE) -> int:
    """How many tunnels this process can hold open with the soft limit it has now.

    A tunnel that is accepted but cannot open its second socket only ends in a 502 after
    using a descriptor another tunnel needed; refusing it at once (503) keeps those that fit
    working.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = UNLIMITED_FALLBACK
    return max(16, (soft - reserve) // fds_per_tunnel)
