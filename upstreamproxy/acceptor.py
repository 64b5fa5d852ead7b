"""Accepting connections without a log flood when file descriptors run out.

asyncio's own accept loop reports ``EMFILE``/``ENFILE`` through the loop's exception handler,
once per failed ``accept()`` and up to ``backlog`` times per wake-up: at the fd limit a busy
listener wrote a traceback per attempt (tens of thousands a second). :class:`Acceptor` owns
the accept loop of one listening socket instead:

* on ``EMFILE``/``ENFILE`` it frees a descriptor it keeps in reserve, accepts the waiting
  connections with it one at a time and *sheds* them (``on_shed``: close, or a short refusal
  the protocol allows), so clients get a prompt, clean refusal instead of waiting in the
  kernel's backlog; then it stops reading the socket and retries after a delay that doubles
  up to :data:`MAX_BACKOFF`; the first accept that succeeds resets the delay;
* it logs through a :class:`RateLimitedLog`: one line when the trouble starts, then at most
  one line per :data:`LOG_INTERVAL` with the number of failures since, never a traceback.

:class:`Listener` runs it on listening sockets (the relay's CONNECT listener accepts
straight into its tunnel protocol, :func:`socket_transport`); :func:`start_server` is a drop-in
for :func:`asyncio.start_server` built on it; the egress plugs :class:`Acceptor` into aiohttp
(``egress/listener.py``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

log = logging.getLogger("upstreamproxy.acceptor")

#: First pause after the process ran out of descriptors, and the most it grows to.
MIN_BACKOFF: Final = 0.05
MAX_BACKOFF: Final = 1.0
#: At most one log line per this many seconds about accept failures.
LOG_INTERVAL: Final = 10.0
#: Connections accepted per wake-up before yielding to the rest of the loop.
ACCEPT_BATCH: Final = 128
#: Resource errors: nothing is wrong with the listener, the process or system is full.
RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

AcceptFn = Callable[[socket.socket, Any], None]
ShedFn = Callable[[socket.socket], None]


def close_at_once(conn: socket.socket) -> None:
    conn.close()


#: What an HTTP proxy listener answers a connection it sheds (before reading its request).
HTTP_503: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nX-Upstreamproxy-Reason: out-of-file-descriptors\r\n"
    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
)


def refuse_http_503(conn: socket.socket) -> None:
    """Shed an HTTP client with a 503 (best effort: one non-blocking send, then close)."""
    try:
        conn.send(HTTP_503)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    conn.close()


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class RateLimitedLog:
    """One warning now, then at most one per ``interval`` seconds carrying a count of the rest."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: float | None = None
        self.suppressed = 0

    def warning(self, message: str, *args: object) -> bool:
        """Log ``message`` unless one was logged less than ``interval`` ago; True if logged."""
        now = self.clock()
        if self._last is not None and now - self._last < self.interval:
            self.suppressed += 1
            return False
        if self.suppressed:
            message += " (%d similar events since the last report)"
            args = (*args, self.suppressed)
        self.logger.warning(message, *args)
        self._last = now
        self.suppressed = 0
        return True


class Acceptor:
    """The accept loop of one non-blocking listening socket; ``on_accept`` gets each socket."""

    def __init__(
        self, sock: socket.socket, on_accept: AcceptFn, name: str, on_shed: ShedFn = close_at_once
    ) -> None:
        self.sock = sock
        self.name = name
        self._on_accept = on_accept
        self._on_shed = on_shed
        #: A descriptor held back so that, out of descriptors, we can still accept and refuse.
        self._reserve = _open_reserve()
        self._loop = asyncio.get_running_loop()
        self._backoff = 0.0
        self._retry: asyncio.TimerHandle | None = None
        self._reading = False
        self._closed = False
        self._log = RateLimitedLog(log)
        #: Accepts that failed for lack of resources, and connections refused for it.
        self.exhausted = 0
        self.shed = 0

    def start(self) -> None:
        self.sock.setblocking(False)
        self._resume()

    def _resume(self) -> None:
        self._retry = None
        if self._reserve is None:
            self._reserve = _open_reserve()
        if not self._closed and not self._reading:
            self._loop.add_reader(self.sock.fileno(), self._accept_ready)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False

    def _accept_ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued; take the next one
            except OSError as exc:
                self._failed(exc)
                return
            self._backoff = 0.0
            conn.setblocking(False)
            try:
                self._on_accept(conn, address)
            except Exception:  # a bug in a handler must not stop the listener
                log.exception("%s: handling an accepted connection failed", self.name)
                conn.close()

    def _shed_waiting(self) -> None:
        """Out of descriptors: refuse what waits in the backlog, using the reserve fd."""
        for _ in range(ACCEPT_BATCH):
            if self._reserve is None:
                return
            os.close(self._reserve)
            self._reserve = None
            try:
                conn, _ = self.sock.accept()
            except OSError:
                conn = None
            if conn is not None:
                self.shed += 1
                try:
                    conn.setblocking(False)
                    self._on_shed(conn)
                except OSError:
                    pass
                finally:
                    conn.close()
            self._reserve = _open_reserve()
            if conn is None:
                return

    def _failed(self, exc: OSError) -> None:
        self.exhausted += 1
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            self._shed_waiting()
        self._backoff = min(MAX_BACKOFF, max(MIN_BACKOFF, self._backoff * 2))
        if exc.errno in RESOURCE_ERRNOS:
            what = "out of file descriptors" if exc.errno != errno.ENOMEM else "out of memory"
        else:
            what = "accept failed"
        self._log.warning(
            "%s: %s (%s); %d connection(s) refused so far; pausing accepts, retrying with "
            "backoff up to %.1fs",
            self.name,
            what,
            errno.errorcode.get(exc.errno or 0, str(exc.errno)),
            self.shed,
            MAX_BACKOFF,
        )

        self._pause()
        self._retry = self._loop.call_later(self._backoff, self._resume)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        self._pause()
        self.sock.close()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None


def bind_sockets(host: str | None, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for ``host`` (every address it resolves to), like asyncio binds them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, type_, proto, _, address in infos:
            if port == 0 and sockets:
                # Several addresses on "any free port": all take the first one's port.
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Listener:
    """Listening sockets, each with an :class:`Acceptor` handing connections to ``on_accept``;
    the parts of :class:`asyncio.Server` callers use."""

    def __init__(
        self, sockets: list[socket.socket], on_accept: AcceptFn, on_shed: ShedFn = close_at_once
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()
        name = "listener " + ", ".join(_format(s.getsockname()) for s in sockets)
        self.acceptors = [Acceptor(sock, on_accept, name, on_shed) for sock in sockets]
        for acceptor in self.acceptors:
            acceptor.start()

    @property
    def sockets(self) -> list[socket.socket]:
        return [a.sock for a in self.acceptors if a.sock.fileno() != -1]

    def is_serving(self) -> bool:
        return not self._closed.done()

    def close(self) -> None:
        for acceptor in self.acceptors:
            acceptor.close()
        if not self._closed.done():
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def serve_forever(self) -> None:
        await asyncio.shield(self._closed)


def supports_make_transport(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether :func:`socket_transport` can make transports on ``loop`` (asyncio's selector
    loops, the only ones the relay and the egress run on: no uvloop)."""
    return isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop) and callable(
        getattr(loop, "_make_socket_transport", None)
    )


def socket_transport(
    sock: socket.socket, protocol: asyncio.BaseProtocol, address: Any = None
) -> asyncio.Transport | None:
    """A transport over the connected ``sock``, made at once with ``protocol`` (whose
    ``connection_made`` follows on the next loop iteration, as on asyncio's own path); None
    when the loop cannot (see :func:`supports_make_transport`: await the public coroutine).

    ``loop.connect_accepted_socket`` and ``loop.create_connection(sock=...)`` are coroutines -
    a task, a waiter future and a wake-up per connection before its protocol sees a byte, a
    good part of what a new tunnel costs; on selector loops both build the transport with
    ``_make_socket_transport``, which is what this calls. Plain TCP only.
    """
    loop = asyncio.get_running_loop()
    if not supports_make_transport(loop):
        return None
    if sock.getblocking():
        sock.setblocking(False)
    extra = None if address is None else {"peername": address}
    make = loop._make_socket_transport  # type: ignore[attr-defined]
    transport: asyncio.Transport = make(sock, protocol, extra=extra)
    return transport


class StreamServer(Listener):
    """What :func:`start_server` returns: each connection as a stream pair for a callback."""

    def __init__(
        self,
        sockets: list[socket.socket],
        callback: ClientConnected,
        limit: int,
        on_shed: ShedFn = close_at_once,
    ) -> None:
        self._callback = callback
        self._limit = limit
        self._connecting: set[asyncio.Task[Any]] = set()
        super().__init__(sockets, self._accepted, on_shed)

    def _accepted(self, conn: socket.socket, address: Any) -> None:
        task = self._loop.create_task(self._connect(conn))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket) -> None:
        reader = asyncio.StreamReader(limit=self._limit, loop=self._loop)
        # StreamReaderProtocol runs the callback as a task it keeps a reference to.
        protocol = asyncio.StreamReaderProtocol(reader, self._callback, loop=self._loop)
        try:
            await self._loop.connect_accepted_socket(lambda: protocol, conn)
        except OSError:
            conn.close()


async def start_server(
    client_connected_cb: ClientConnected,
    host: str | None,
    port: int,
    *,
    limit: int = 2**16,
    backlog: int = 100,
    on_shed: ShedFn = close_at_once,
) -> StreamServer:
    """Like :func:`asyncio.start_server`, with :class:`Acceptor`'s handling of fd exhaustion."""
    return StreamServer(bind_sockets(host, port, backlog), client_connected_cb, limit, on_shed)


def _format(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
