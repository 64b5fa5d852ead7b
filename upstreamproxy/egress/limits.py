"""Admission limits: concurrent tunnels in total and per session, new tunnels per second.

Each limit has its own status and reason so a client (or agent) can tell which one it hit:

==========================  ======  ===========================================
limit                       status  reason
==========================  ======  ===========================================
total concurrent tunnels    503     ``egress-at-capacity``
concurrent per session      429     ``session-concurrency-limit``
new tunnels/s per session   429     ``session-rate-limit``
==========================  ======  ===========================================
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..errors import ConfigError

#: Idle sessions whose buckets are forgotten first once this many are tracked.
MAX_TRACKED_SESSIONS: Final = 100_000


@dataclass(frozen=True)
class LimitConfig:
    max_tunnels: int = 10_000
    max_session_tunnels: int = 512
    session_rate: float = 100.0  # new tunnels per second, sustained
    session_burst: int = 256

    def validate(self) -> None:
        for name in ("max_tunnels", "max_session_tunnels", "session_burst"):
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be at least 1")
        if self.session_rate <= 0:
            raise ConfigError("session_rate", "must be positive")


class LimitExceeded(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.updated = now


class Limiter:
    """Counts open tunnels and rate-limits new ones. Single event loop: no locking needed."""

    def __init__(self, config: LimitConfig, clock: Callable[[], float] = time.monotonic) -> None:
        config.validate()
        self.config = config
        self._clock = clock
        self.total = 0
        self._per_session: dict[str, int] = {}
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def acquire(self, session_id: str) -> None:
        """Count a new tunnel for ``session_id`` or raise :class:`LimitExceeded`."""
        cfg = self.config
        if self.total >= cfg.max_tunnels:
            raise LimitExceeded(503, "egress-at-capacity")
        if self._per_session.get(session_id, 0) >= cfg.max_session_tunnels:
            raise LimitExceeded(429, "session-concurrency-limit")
        if not self._take_token(session_id):
            raise LimitExceeded(429, "session-rate-limit")
        self.total += 1
        self._per_session[session_id] = self._per_session.get(session_id, 0) + 1

    def release(self, session_id: str) -> None:
        self.total -= 1
        left = self._per_session.get(session_id, 1) - 1
        if left > 0:
            self._per_session[session_id] = left
        else:
            self._per_session.pop(session_id, None)

    def renew(self, session_id: str) -> None:
        """A new tunnel on a WebSocket that already holds its slot (tunnel reuse): only the
        rate applies (:class:`LimitExceeded` with ``session-rate-limit``)."""
        if not self._take_token(session_id):
            raise LimitExceeded(429, "session-rate-limit")

    def session_tunnels(self, session_id: str) -> int:
        return self._per_session.get(session_id, 0)

    def _take_token(self, session_id: str) -> bool:
        now = self._clock()
        bucket = self._buckets.get(session_id)
        if bucket is None:
            bucket = _Bucket(float(self.config.session_burst), now)
            self._buckets[session_id] = bucket
            while len(self._buckets) > MAX_TRACKED_SESSIONS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(session_id)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(
                float(self.config.session_burst), bucket.tokens + elapsed * self.config.session_rate
            )
            bucket.updated = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True
