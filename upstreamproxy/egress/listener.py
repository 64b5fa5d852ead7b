"""An aiohttp site on our own accept loop, with the pre-auth guard at accept time.

aiohttp's ``TCPSite`` leaves accepting to asyncio, whose accept loop floods the log when
descriptors run out and offers no hook between ``accept()`` and the HTTP parser. This site
binds the listening sockets itself, accepts with :class:`~upstreamproxy.acceptor.Acceptor`
(backoff and one rate-limited line on ``EMFILE``), asks the :class:`PreauthGuard` whether
to keep each connection, and hands kept ones to aiohttp's protocol with
``loop.connect_accepted_socket``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any, Final

from aiohttp import web

from ..acceptor import Acceptor, bind_sockets
from .preauth import PreauthGuard

#: TLS handshake bound for listeners without a guard (the metrics listener).
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0


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
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
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
        task = asyncio.get_running_loop().create_task(self._connect(conn, address))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        if self._guard is not None:
            self._guard.connecting(address, task)

    async def _connect(self, conn: socket.socket, address: Any) -> None:
        server = self._runner.server
        assert server is not None
        timeout = (
            self._guard.limits.upgrade_timeout
            if self._guard is not None
            else DEFAULT_HANDSHAKE_TIMEOUT
        )
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_accepted_socket(
                server,
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
