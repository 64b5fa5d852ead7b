"""The egress's protection before authentication: upgrade deadline and pre-auth caps.

A connection is *pre-auth* from ``accept()`` until it has been upgraded to an authenticated
WebSocket. While pre-auth it costs a descriptor and some memory but proves nothing, so:

* **deadline** -- the TLS handshake (``wss://``) and the request head must be complete, and
  the request answered, within ``upgrade_timeout`` seconds of the accept; after a plain
  answer (health, CA certificate, 401, 429, ...) the next request on a kept-alive connection
  gets the same time from that answer. Otherwise the connection is aborted (reason
  ``upgrade-timeout``). aiohttp alone waits forever for a half-sent head.
* **per-peer cap** -- at most ``max_pending_per_peer`` pre-auth connections per peer IP
  address; a new connection over the cap is closed at once (``preauth-per-peer``).
* **total cap** -- at most ``max_pending`` pre-auth connections in all; a new connection
  over the cap evicts the *oldest* pre-auth one (``preauth-total``). A legitimate relay
  upgrades within milliseconds, so it is almost never the oldest: a flood of slow
  connections pushes out its own members, not the relays.

A connection leaves the pre-auth state when a ``101`` is prepared on it: an authenticated,
admitted WebSocket, counted by the session limits from then on (:meth:`PreauthGuard.left_preauth`,
called by aiohttp's ``on_response_prepare`` signal and by the native upgrade).

Peer addresses are what the egress sees: behind a load balancer that does not preserve
client addresses every relay shares the balancer's address, and the per-peer cap should be
raised to the total cap (documented in the README).
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from ..errors import ConfigError

UPGRADE_TIMEOUT: Final = "upgrade-timeout"
PER_PEER: Final = "preauth-per-peer"
TOTAL: Final = "preauth-total"

#: Key of a connection: its peer address tuple as ``accept()`` and the transport report it.
Key = Any


@dataclass(frozen=True)
class PreauthLimits:
    upgrade_timeout: float = 5.0
    max_pending: int = 1024
    max_pending_per_peer: int = 256

    def validate(self) -> None:
        if self.upgrade_timeout <= 0:
            raise ConfigError("upgrade_timeout", "must be positive")
        if self.max_pending < 1:
            raise ConfigError("max_preauth", "must be at least 1")
        if self.max_pending_per_peer < 1:
            raise ConfigError("max_preauth_per_peer", "must be at least 1")


class _Pending:
    __slots__ = ("peer", "sock", "task", "timer", "transport")

    def __init__(self, peer: str, sock: socket.socket, timer: asyncio.TimerHandle) -> None:
        self.peer = peer
        self.sock = sock
        self.timer = timer
        self.task: asyncio.Task[Any] | None = None
        self.transport: asyncio.Transport | None = None

    def closed(self) -> bool:
        if self.transport is not None:
            return self.transport.is_closing()
        return self.task is not None and self.task.done()

    def abort(self) -> None:
        self.timer.cancel()
        if self.transport is not None:
            self.transport.abort()
        elif self.task is not None:
            self.task.cancel()  # still in the TLS handshake: asyncio closes the socket
        else:
            self.sock.close()


class PreauthGuard:
    """Book-keeping of pre-auth connections for one listener (single event loop)."""

    def __init__(
        self, limits: PreauthLimits, on_refused: Callable[[str], None] = lambda reason: None
    ) -> None:
        self.limits = limits
        self._on_refused = on_refused
        self._pending: dict[Key, _Pending] = {}  # insertion order: oldest first
        self._per_peer: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._pending)

    def per_peer(self, peer: str) -> int:
        return self._per_peer[peer]

    # -- the listener's side ---------------------------------------------------------------

    def admit(self, key: Key, sock: socket.socket) -> bool:
        """A connection was accepted. False: refused (``sock`` is already closed)."""
        peer = str(key[0]) if isinstance(key, tuple) else str(key)
        limits = self.limits
        if key in self._pending:  # the 4-tuple was reused: the old connection is gone
            self._drop(key).abort()
        if self._per_peer[peer] >= limits.max_pending_per_peer:
            self._sweep()
            if self._per_peer[peer] >= limits.max_pending_per_peer:
                sock.close()
                self._on_refused(PER_PEER)
                return False
        if len(self._pending) >= limits.max_pending:
            self._sweep()
            while len(self._pending) >= limits.max_pending:
                oldest = next(iter(self._pending))
                self._drop(oldest).abort()
                self._on_refused(TOTAL)
        timer = asyncio.get_running_loop().call_later(limits.upgrade_timeout, self._expire, key)
        self._pending[key] = _Pending(peer, sock, timer)
        self._per_peer[peer] += 1
        return True

    def connecting(self, key: Key, task: asyncio.Task[Any]) -> None:
        entry = self._pending.get(key)
        if entry is not None:
            entry.task = task

    def connected(self, key: Key, transport: asyncio.Transport) -> None:
        entry = self._pending.get(key)
        if entry is not None:
            entry.transport = transport

    def forget(self, key: Key, transport: asyncio.BaseTransport | None = None) -> None:
        """The connection ended before answering (failed TLS handshake, say). With
        ``transport``: only if the entry is that connection's (the 4-tuple may be reused)."""
        entry = self._pending.get(key)
        if entry is not None and (transport is None or entry.transport is transport):
            self._drop(key).timer.cancel()

    def close_all(self) -> None:
        for key in list(self._pending):
            self._drop(key).abort()

    # -- the application's side ------------------------------------------------------------

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """aiohttp ``on_response_prepare`` signal: an answer on a connection is going out."""
        transport = request.transport
        if transport is None:
            return
        key = transport.get_extra_info("peername")
        if response.status == 101:
            self.left_preauth(key)
        else:
            self.answered(key)

    def left_preauth(self, key: Key) -> None:
        """A ``101`` went out on the connection: it is an authenticated, admitted WebSocket
        (aiohttp's signal above and the native upgrade both end pre-auth here)."""
        entry = self._pending.get(key)
        if entry is not None:
            self._drop(key).timer.cancel()

    def answered(self, key: Key) -> None:
        """A plain answer went out: still unauthenticated, so the next request on the
        kept-alive connection gets a fresh deadline from now."""
        entry = self._pending.get(key)
        if entry is None:
            return
        entry.timer.cancel()
        entry.timer = asyncio.get_running_loop().call_later(
            self.limits.upgrade_timeout, self._expire, key
        )

    # -- internals -------------------------------------------------------------------------

    def _drop(self, key: Key) -> _Pending:
        entry = self._pending.pop(key)
        self._per_peer[entry.peer] -= 1
        if self._per_peer[entry.peer] <= 0:
            del self._per_peer[entry.peer]
        return entry

    def _expire(self, key: Key) -> None:
        if key in self._pending:
            entry = self._drop(key)
            if not entry.closed():
                self._on_refused(UPGRADE_TIMEOUT)
            entry.abort()

    def _sweep(self) -> None:
        """Forget connections that closed on their own before their deadline."""
        for key in [k for k, entry in self._pending.items() if entry.closed()]:
            self._drop(key).timer.cancel()
