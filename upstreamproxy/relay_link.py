"""The relay's WebSockets to the egress: opening one, the pre-opened pool, the driver's port.

Opening a tunnel costs a WebSocket upgrade (TCP, TLS, HTTP) before the CONNECT chunk can even
be sent. :class:`WsPool` keeps ``size`` upgraded, authenticated sockets ready, so a CONNECT
waits only for the CONNECT -> ``200`` round trip. An idle pooled socket is kept alive as an
open tunnel is: a keepalive chunk every ``keepalive`` seconds (the platform's idle timer) and
a ping when nothing was heard for ``ping_interval`` seconds, dropped when no pong follows
within ``ping_timeout``. A socket the egress closes while idle (a draining egress closes its
pre-opened sockets with 1001) is dropped and replaced in the background. The wire is
unchanged: to the egress a pooled socket is a tunnel whose CONNECT is late, so a CCR-style
server that knows nothing of pools serves it too (within its own head timeout; set
``pool_size`` 0 for a server that waits less than a keepalive interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.protocol import State as WsState

from . import __version__
from .codec import KEEPALIVE, MAX_MESSAGE_BYTES
from .connect_head import PREOPENED_HEADER, REASON_HEADER
from .logredact import redacting_logger
from .secret import Secret
from .tasks import TaskSet
from .tunnel.core import READ_SIZE
from .tunnel.driver import (
    CLOSE_GRACE,
    OpenFailed,
    WsClosed,
    cap_reads,
    reset,
    transport_hung_up,
)

log = logging.getLogger("upstreamproxy.relay")
_ws_log = redacting_logger("upstreamproxy.relay.websocket")
# websockets logs every frame at DEBUG, abbreviated in the middle: the first chunk's
# credentials could show up cut where no redaction pattern matches. Frames are never logged.
_ws_log.setLevel(logging.INFO)

#: Messages websockets buffers before it stops reading the socket (backpressure).
WS_MAX_QUEUE: Final = 1
WS_WRITE_LIMIT: Final = 64 * 1024
#: Refill back-off after a failed pre-open (doubling up to the maximum).
POOL_BACKOFF: Final = 1.0
POOL_BACKOFF_MAX: Final = 30.0


class WebsocketsPort:
    """:class:`~upstreamproxy.tunnel.driver.WsPort` over a websockets client connection."""

    __slots__ = ("ws",)

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        cap_reads(ws.transport, 2 * READ_SIZE)  # a chunk and its framing in one recv

    async def send(self, message: bytes) -> None:
        try:
            await self.ws.send(message)
        except ConnectionClosed:
            raise WsClosed() from None

    async def recv(self) -> bytes | str | None:
        try:
            return await self.ws.recv()
        except ConnectionClosed:
            return None

    async def ping(self) -> None:
        # Not websockets' own keepalive: it awaits the drain of the ping before timing the
        # pong, so behind a stalled write it never times out. The core times the pong.
        try:
            waiter = await self.ws.ping()
            await waiter
        except ConnectionClosed:
            raise WsClosed() from None

    async def close(self, code: int) -> None:
        await close_ws(self.ws, code)

    def abort(self) -> None:
        reset(self.ws.transport)

    def lost(self) -> bool:
        return transport_hung_up(self.ws.transport)

    @property
    def usable(self) -> bool:
        return self.ws.state is WsState.OPEN


async def close_ws(ws: ClientConnection, code: int = 1000) -> None:
    """Close, aborting the socket if the close handshake does not finish within the grace.

    Shielded so a cancelled tunnel (relay stopping) still releases its socket.
    """

    async def close() -> None:
        try:
            async with asyncio.timeout(CLOSE_GRACE):
                await ws.close(code)
        except (TimeoutError, ConnectionClosed, OSError):
            pass
        finally:
            reset(ws.transport)  # no-op once closed; a reset if the handshake never finished

    await asyncio.shield(close())


@dataclass(frozen=True)
class LinkConfig:
    egress_url: str
    token: Secret
    handshake_timeout: float
    egress_proxy: str | None
    ssl: ssl.SSLContext | None


#: An upgrade refused because that egress is draining is tried again this many times (after
#: DRAINING_RETRY_DELAY, doubling): behind a load balancer the next try usually reaches a
#: replica that is not, and nothing of the client's was sent yet.
DRAINING_RETRIES: Final = 3
DRAINING_RETRY_DELAY: Final = 0.1


async def open_ws(cfg: LinkConfig, *, preopened: bool = False) -> WebsocketsPort:
    """Upgrade one WebSocket to the egress (see :func:`_open_ws_once`), trying again when
    the egress that answered is draining."""
    delay = DRAINING_RETRY_DELAY
    for attempt in range(DRAINING_RETRIES + 1):
        try:
            return await _open_ws_once(cfg, preopened=preopened)
        except OpenFailed as exc:
            if exc.status != 503 or exc.reason != "draining" or attempt == DRAINING_RETRIES:
                raise
        await asyncio.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


async def _open_ws_once(cfg: LinkConfig, *, preopened: bool = False) -> WebsocketsPort:
    """Upgrade one WebSocket to the egress, or raise :class:`OpenFailed` with the answer.

    ``preopened``: for the pool; the upgrade says so (``X-Upstreamproxy-Preopened: 1``, an
    optional header a server that knows nothing of pools ignores) so the egress waits longer
    for its CONNECT.
    """
    headers = {
        "Authorization": f"Bearer {cfg.token.reveal()}",
        "Content-Type": "application/proto",
    }
    if preopened:
        headers[PREOPENED_HEADER] = "1"
    try:
        ws = await connect(
            cfg.egress_url,
            additional_headers=headers,
            user_agent_header=f"upstreamproxy-relay/{__version__}",
            open_timeout=cfg.handshake_timeout,
            proxy=cfg.egress_proxy,
            ssl=cfg.ssl,
            compression=None,
            ping_interval=None,  # the tunnel core pings (see WebsocketsPort.ping)
            close_timeout=CLOSE_GRACE,
            logger=_ws_log,
            max_size=MAX_MESSAGE_BYTES,
            max_queue=WS_MAX_QUEUE,
            write_limit=WS_WRITE_LIMIT,
        )
    except TimeoutError:
        raise OpenFailed(504, "timed out opening the WebSocket to the egress") from None
    except InvalidStatus as exc:
        status = exc.response.status_code
        reason = exc.response.headers.get(REASON_HEADER, "")
        if status in (429, 503):  # a limit or a drain: the client may retry later
            raise OpenFailed(status, reason or f"egress answered HTTP {status}") from None
        detail = f"HTTP {status}: {reason}" if reason else f"HTTP {status}"
        raise OpenFailed(502, f"egress refused the WebSocket upgrade ({detail})") from None
    except (WebSocketException, OSError, ValueError) as exc:
        # WebSocketException covers a malformed --egress-proxy (InvalidProxy) too: the
        # client gets a 502 naming the problem, never an empty reply.
        raise OpenFailed(502, f"cannot reach the egress: {type(exc).__name__}") from None
    return WebsocketsPort(ws)


@dataclass
class _Idle:
    port: WebsocketsPort
    watcher: asyncio.Task[None] | None = None


class WsPool:
    """Up to ``size`` pre-opened WebSockets; :meth:`take` hands one out (or opens one)."""

    def __init__(
        self,
        size: int,
        opener: Callable[[], Awaitable[WebsocketsPort]],
        *,
        keepalive: float,
        ping_interval: float | None,
        ping_timeout: float,
    ) -> None:
        self.size = size
        self._open = opener
        self._keepalive = keepalive
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._idle: deque[_Idle] = deque()
        self._waiters: deque[asyncio.Future[WebsocketsPort | None]] = deque()
        self._opening = 0  # open attempts, including ones backing off
        self._connecting = 0  # open attempts actually under way
        self._tasks = TaskSet()
        self._backoff = 0.0
        self._closed = False
        self._wake = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None
        #: Sockets handed out, replaced after dying before an answer, opened on demand.
        self.stats = {"taken": 0, "replaced": 0, "missed": 0}

    def __len__(self) -> int:
        return len(self._idle)

    def start(self) -> None:
        if self.size > 0:
            self._filler = self._tasks.spawn(self._fill(), name="ws-pool-fill")

    async def take(self) -> tuple[WebsocketsPort, bool]:
        """A ready socket (``pooled`` True) or, if none is ready, a freshly opened one."""
        while self._idle:
            idle = self._idle.popleft()
            if idle.watcher is not None:
                idle.watcher.cancel()
            self._wake.set()
            if idle.port.usable:
                self.stats["taken"] += 1
                return idle.port, True
            idle.port.abort()
        if self._connecting > len(self._waiters):
            # One is on its way and started before this CONNECT: it arrives sooner than a
            # fresh one would, and does not compete with it for the session's limit.
            waiter: asyncio.Future[WebsocketsPort | None] = (
                asyncio.get_running_loop().create_future()
            )
            self._waiters.append(waiter)
            try:
                port = await waiter
            except asyncio.CancelledError:
                handed = waiter.result() if waiter.done() and not waiter.cancelled() else None
                if handed is not None:
                    handed.abort()  # handed over just as this CONNECT gave up
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if port is not None:
                self.stats["taken"] += 1
                return port, True
        if self.size > 0:
            self.stats["missed"] += 1
        return await self._open(), False

    async def close(self) -> None:
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        await self._tasks.cancel_all(grace=CLOSE_GRACE * 2)
        while self._idle:
            self._idle.popleft().port.abort()

    async def _fill(self) -> None:
        while not self._closed:
            while len(self._idle) + self._opening < self.size:
                self._opening += 1
                self._tasks.spawn(self._open_one(), name="ws-pool-open")
            self._wake.clear()
            await self._wake.wait()

    async def _open_one(self) -> None:
        try:
            if self._backoff:
                await asyncio.sleep(self._backoff)
            self._connecting += 1
            try:
                port = await self._open()
            except OpenFailed as exc:
                if not self._backoff:  # one line per failure streak, not one per attempt
                    log.warning("pre-opening a WebSocket failed: %s", exc.reason)
                self._backoff = min(max(self._backoff * 2, POOL_BACKOFF), POOL_BACKOFF_MAX)
                if self._waiters:  # that CONNECT opens its own and gets the real answer
                    self._waiters.popleft().set_result(None)
                return
            finally:
                self._connecting -= 1
            if self._backoff:
                log.info("pre-opening WebSockets works again")
            self._backoff = 0.0
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(port)
                    return
            idle = _Idle(port)
            idle.watcher = self._tasks.spawn(self._watch(idle), name="ws-pool-watch")
            self._idle.append(idle)
        finally:
            self._opening -= 1
            self._wake.set()

    async def _watch(self, idle: _Idle) -> None:
        """Keep an idle socket alive; drop it when it dies or its peer stops answering."""
        ws = idle.port.ws
        step = min(self._keepalive, self._ping_interval or self._keepalive)
        since_keepalive = 0.0
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(step):
                        await ws.wait_closed()
                    return  # closed by the egress (draining, say): replace it
                since_keepalive += step
                if since_keepalive >= self._keepalive:
                    since_keepalive = 0.0
                    await ws.send(KEEPALIVE)
                if self._ping_interval is not None:
                    async with asyncio.timeout(self._ping_timeout):
                        await (await ws.ping())
        except (TimeoutError, ConnectionClosed, OSError):
            pass
        finally:
            if idle in self._idle:
                self._idle.remove(idle)
                self.stats["replaced"] += 1
                idle.port.abort()
                self._wake.set()
