"""An aiohttp site on our own accept loop, with the pre-auth guard at accept time.

aiohttp's ``TCPSite`` leaves accepting to asyncio, whose accept loop floods the log when
descriptors run out and offers no hook between ``accept()`` and the HTTP parser. This site
binds the listening sockets itself, accepts with :class:`~upstreamproxy.acceptor.Acceptor`
(backoff and one rate-limited line on ``EMFILE``), asks the :class:`PreauthGuard` whether
to keep each connection, and hands kept ones to aiohttp's protocol with
``loop.connect_accepted_socket`` - or, for plain TCP, by making the transport at once
(``transports.py``: no task per connection).

With an ``upgrade`` hook (the tunnel endpoint's native WebSocket upgrade,
``native_upgrade.py``) each kept connection starts with a :class:`_Sniffer` instead: it reads
the first bytes, and as soon as they cannot be ``GET <ws path> `` it hands the connection to
aiohttp's protocol as if aiohttp had accepted it (``set_protocol``, ``connection_made``, then
the bytes read so far), so every other endpoint -- and every request after it on a kept-alive
connection -- is aiohttp's. An upgrade's head is read whole (at most ``MAX_HEAD_BYTES``; the
pre-auth deadline and caps bound it as before) and given to the hook with reading paused.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any, Final, Protocol

from aiohttp import web

from ..acceptor import Acceptor, bind_sockets, socket_transport
from .preauth import PreauthGuard
from .upgrade_head import MAX_HEAD_BYTES, head_end

#: TLS handshake bound for listeners without a guard (the metrics listener).
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0


class UpgradeHook(Protocol):
    def claims(self, buffer: bytes | bytearray) -> bool | None:
        """Whether a connection starting with ``buffer`` is for the hook (None: undecided)."""

    def handle(self, transport: asyncio.Transport, key: Any, head: bytes, leftover: bytes) -> None:
        """Serve the request whose head is ``head`` (complete, or oversized/truncated: the
        hook answers the error); ``leftover``: the bytes after it. Owns ``transport`` now."""


class GuardedSite(web.BaseSite):
    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 128,
        guard: PreauthGuard | None = None,
        upgrade: UpgradeHook | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        if upgrade is not None and guard is None:
            raise ValueError("a native upgrade needs the pre-auth guard (its head deadline)")
        self._upgrade = upgrade
        self._host = host
        self._requested_port = port
        self._guard = guard
        self._acceptors: list[Acceptor] = []
        self._connecting: set[asyncio.Task[None]] = set()
        self._bound_port: int | None = None

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self.port}"

    @property
    def port(self) -> int:
        return self._bound_port if self._bound_port is not None else self._requested_port

    async def start(self) -> None:
        await super().start()
        sockets = bind_sockets(self._host, self._requested_port, self._backlog)
        self._bound_port = sockets[0].getsockname()[1]
        label = f"egress listener {self.name}"
        self._acceptors = [Acceptor(sock, self._accepted, label) for sock in sockets]
        for acceptor in self._acceptors:
            acceptor.start()

    def _accepted(self, conn: socket.socket, address: Any) -> None:
        if self._guard is not None and not self._guard.admit(address, conn):
            return
        if self._ssl_context is None and self._connect_now(conn, address):
            return
        task = asyncio.get_running_loop().create_task(self._connect(conn, address))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        if self._guard is not None:
            self._guard.connecting(address, task)

    def _factory(self, address: Any) -> Callable[[], asyncio.BaseProtocol]:
        server = self._runner.server
        assert server is not None
        if self._upgrade is None:
            return server
        hook, guard = self._upgrade, self._guard
        assert guard is not None
        return lambda: _Sniffer(server, hook, guard, address)

    def _connect_now(self, conn: socket.socket, address: Any) -> bool:
        """Plain TCP: the transport is made here, without a task (see ``transports.py``).
        False: the loop cannot, :meth:`_connect` does it."""
        try:
            transport = socket_transport(conn, self._factory(address)())
        except OSError:
            conn.close()
            if self._guard is not None:
                self._guard.forget(address)
            return True
        if transport is None:
            return False
        if self._guard is not None:
            self._guard.connected(address, transport)
        return True

    async def _connect(self, conn: socket.socket, address: Any) -> None:
        timeout = (
            self._guard.limits.upgrade_timeout
            if self._guard is not None
            else DEFAULT_HANDSHAKE_TIMEOUT
        )
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_accepted_socket(
                self._factory(address),
                conn,
                ssl=self._ssl_context,
                ssl_handshake_timeout=timeout if self._ssl_context else None,
            )
        except (OSError, ssl.SSLError, TimeoutError):
            # asyncio closed the transport (and with it the socket).
            if self._guard is not None:
                self._guard.forget(address)
            return
        if self._guard is not None:
            self._guard.connected(address, transport)

    async def stop(self) -> None:
        for acceptor in self._acceptors:
            acceptor.close()
        for task in list(self._connecting):
            task.cancel()
        if self._guard is not None:
            self._guard.close_all()
        await super().stop()


class _Sniffer(asyncio.Protocol):
    """A connection's first protocol when the site has an upgrade hook: routes it by its
    first request line to the hook or to aiohttp."""

    def __init__(
        self, server: web.Server, hook: UpgradeHook, guard: PreauthGuard, key: Any
    ) -> None:
        self._server = server
        self._hook = hook
        self._guard = guard
        self._key = key
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._native = False
        self._done = False
        self._scanned = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._guard.connected(self._key, transport)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        buffer = self._buffer
        buffer += data
        if not self._native:
            claimed = self._hook.claims(buffer)
            if claimed is None:
                return
            if not claimed:
                self._hand_over()
                return
            self._native = True
        end = head_end(buffer, self._scanned)
        if end >= 0:
            self._finish(bytes(buffer[:end]), bytes(buffer[end:]))
        elif len(buffer) > MAX_HEAD_BYTES:
            self._finish(bytes(buffer), b"")  # the hook answers 431
        else:
            self._scanned = len(buffer)

    def eof_received(self) -> bool | None:
        if self._native and not self._done:
            self._finish(bytes(self._buffer), b"")  # truncated: the hook answers 400
            # Keep the write side for that answer (plain TCP; TLS closes regardless).
            return (
                self._transport is not None and self._transport.get_extra_info("sslcontext") is None
            )
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        # Only while this is still the protocol: a refused upgrade, or a peer gone early.
        self._guard.forget(self._key, self._transport)
        self._buffer = bytearray()

    def _finish(self, head: bytes, leftover: bytes) -> None:
        assert self._transport is not None
        self._done = True
        self._buffer = bytearray()
        self._hook.handle(self._transport, self._key, head, leftover)

    def _hand_over(self) -> None:
        """To aiohttp, as if it had accepted the connection; it parses what we read."""
        transport = self._transport
        assert transport is not None
        self._done = True
        data, self._buffer = bytes(self._buffer), bytearray()
        protocol = self._server()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data:
            protocol.data_received(data)
