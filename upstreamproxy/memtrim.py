"""Give freed memory back to the kernel once tunnels have ended.

glibc's allocator keeps what a process freed for reuse: after a burst of busy tunnels (each
with its chunks in flight) a relay or an egress stays at its peak RSS for as long as it runs,
although the memory is free. ``malloc_trim(0)`` releases the free pages (the heap's top and,
since glibc 2.8, whole free pages inside it). :class:`Trimmer` calls it at most once per
``interval`` seconds, and only when a tunnel has ended since the last call - an idle process
does nothing, a busy one pays a few milliseconds every couple of seconds.

Elsewhere than glibc (musl, macOS) there is no ``malloc_trim``: the trimmer does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable
from typing import Final

log = logging.getLogger("upstreamproxy.memtrim")

#: Seconds between two trims at most.
TRIM_INTERVAL: Final = 2.0


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        # The symbols already loaded (libc's among them): no library search, no subprocess.
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    result: Callable[[int], int] = trim
    return result


_malloc_trim = _find_malloc_trim()


def available() -> bool:
    return _malloc_trim is not None


def trim() -> bool:
    """Release free heap pages now; whether anything was released."""
    return _malloc_trim is not None and bool(_malloc_trim(0))


class Trimmer:
    """Call :meth:`tunnel_ended` whenever a tunnel ends; the trim follows within ``interval``."""

    def __init__(self, interval: float = TRIM_INTERVAL) -> None:
        self.interval = interval
        self.trims = 0
        self._handle: asyncio.TimerHandle | None = None

    def tunnel_ended(self) -> None:
        if self._handle is None and _malloc_trim is not None:
            loop = asyncio.get_running_loop()
            self._handle = loop.call_later(self.interval, self._trim)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _trim(self) -> None:
        self._handle = None
        self.trims += 1
        trim()
