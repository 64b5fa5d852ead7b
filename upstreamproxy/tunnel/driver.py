"""The asyncio adapter around :class:`~.core.TunnelCore`, shared by the relay and the egress.

It owns sockets, tasks and cancellation - nothing else. Per tunnel:

* a reader task per side (local stream, WebSocket), each reading only while the core says
  it may (:attr:`~.core.TunnelCore.may_read_local` / ``may_read_ws``), feeding what it read
  to the core and executing the actions that come back, in order (so a write's backpressure
  holds up only that reader);
* one event-loop timer armed at :meth:`~.core.TunnelCore.next_deadline` (no task, no sleep
  loop), which calls ``tick`` and executes its actions;
* an opening task while the core waits for :class:`~.actions.Open`.

When the core finishes, every task is cancelled and the closes it asked for run shielded,
each bounded: a WebSocket close handshake gets :data:`CLOSE_GRACE` seconds, a local stream
with data it cannot flush in that time is reset (``SO_LINGER`` 0) rather than left
established with bytes nobody will read.

The two ends differ only in their :class:`WsPort` (websockets at the relay, aiohttp at the
egress) and in their ``opener``: the relay opens (or takes a pre-opened) WebSocket, the
egress checks credentials, admits and dials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import struct
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Protocol

from .actions import (
    LOCAL,
    WS,
    Action,
    CheckPeers,
    CloseLocal,
    CloseWs,
    Finished,
    HandOff,
    Open,
    SendChunk,
    SendConnect,
    SendPing,
    WriteLocal,
)
from .core import CLOSE_GOING_AWAY, CLOSE_NORMAL, READ_SIZE, TunnelCore

log = logging.getLogger("upstreamproxy.tunnel")

#: How long a graceful close (WebSocket handshake, local flush) may take before the socket
#: is dropped. What is still unsent then would only hold a socket open for nobody.
CLOSE_GRACE: Final = 1.0
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
_HANGUP: Final = select.POLLRDHUP | select.POLLHUP | select.POLLERR


class WsPort(Protocol):
    """The few WebSocket operations the driver needs, over any library."""

    async def send(self, message: bytes) -> None:
        """Send one binary message; raise :class:`WsClosed` if the socket is gone."""

    async def recv(self) -> bytes | str | None:
        """The next data message, or None once the WebSocket is closed."""

    async def ping(self) -> None:
        """Send a ping and return when its pong arrives."""

    async def close(self, code: int) -> None:
        """Close with ``code``; bounded, and the socket is released when this returns."""

    def abort(self) -> None:
        """Drop the connection at once."""

    def lost(self) -> bool:
        """Whether the connection is gone (seen without reading from it)."""


class WsClosed(Exception):
    """A send on a WebSocket that is already closed."""


class OpenFailed(Exception):
    """The opening step failed; what to answer."""

    def __init__(self, status: int, reason: str, rule: str = "-") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.rule = rule


class OpenStale(Exception):
    """Egress: the socket is no longer good for any tunnel (see ``TunnelCore.open_stale``)."""


@dataclass
class Opened:
    """What the opening step produced: a WebSocket (relay) or a local stream (egress)."""

    ws: WsPort | None = None
    pooled: bool = False
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None


Opener = Callable[[Open], Awaitable[Opened]]
ConnectChunk = Callable[[Open | SendConnect], bytes]


class TunnelDriver:
    def __init__(
        self,
        core: TunnelCore,
        opener: Opener,
        *,
        ws: WsPort | None = None,
        reader: asyncio.StreamReader | None = None,
        writer: asyncio.StreamWriter | None = None,
        connect_chunk: Callable[[SendConnect], bytes] | None = None,
    ) -> None:
        self.core = core
        self.ws = ws
        self.reader = reader
        self.writer = writer
        if writer is not None:
            cap_reads(writer.transport, READ_SIZE)
        self._opener = opener
        self._connect_chunk = connect_chunk
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._done = asyncio.Event()
        self._local_go = asyncio.Event()
        self._ws_go = asyncio.Event()
        self._closing: list[Action] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        #: Set by :class:`~.actions.HandOff`: the local stream was left open for the
        #: plain-HTTP forwarder, which starts from these bytes.
        self.handed_off: bytes | None = None

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> str:
        """Run the tunnel to its end; returns the outcome. Cancellation closes it too."""
        try:
            if self.reader is not None:
                self._spawn(self._read_local())
            if self.ws is not None:
                self._spawn(self._read_ws())
            self._sync()
            await self._done.wait()
        finally:
            if self._timer is not None:
                self._timer.cancel()
            current = asyncio.current_task()
            tasks = [t for t in self._tasks if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.shield(self._close(tasks))
        return self.core.outcome

    def execute_soon(self, actions: list[Action]) -> None:
        """Execute actions from an input fed outside the driver (``drain``, say)."""
        self._spawn(self._execute(actions))

    async def _close(self, tasks: list[asyncio.Task[Any]]) -> None:
        if tasks:
            await asyncio.wait(tasks)
        closing, self._closing = self._closing, []
        if not any(isinstance(a, CloseWs) for a in closing) and self.ws is not None:
            if self.core.closed:  # the peer closed, or failed: just release the socket
                closing.append(CloseWs(CLOSE_NORMAL, abort=True))
            else:  # cancelled: this end is shutting down
                closing.append(CloseWs(CLOSE_GOING_AWAY))
        if not any(isinstance(a, CloseLocal) for a in closing) and self.writer is not None:
            closing.append(CloseLocal())  # bounded: reset if it cannot flush in time
        for action in closing:
            if isinstance(action, CloseWs) and self.ws is not None:
                ws, self.ws = self.ws, None
                if action.abort:
                    ws.abort()
                else:
                    await ws.close(action.code)
            elif isinstance(action, CloseLocal) and self.writer is not None:
                writer, self.writer = self.writer, None
                await close_stream(writer, abort=action.abort)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug must not leave the tunnel hanging: end it, keep the traceback.
            log.error("tunnel task failed", exc_info=task.exception())
            self.core.outcome = "internal-error"
            self._done.set()

    def _sync(self) -> None:
        """After every core input: reading permissions and the timer."""
        core = self.core
        if core.closed:
            self._done.set()
            return
        if core.may_read_local:
            self._local_go.set()
        else:
            self._local_go.clear()
        if core.may_read_ws:
            self._ws_go.set()
        else:
            self._ws_go.clear()
        if not core.deadline_moved:
            return
        core.deadline_moved = False
        deadline = core.next_deadline()
        # Only an earlier deadline re-arms: a timer that fires early just ticks and re-arms.
        if deadline is not None and (self._timer_at is None or deadline < self._timer_at):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        actions = self.core.tick(self._loop.time())
        self.core.deadline_moved = True  # the timer is gone: always re-arm
        if actions:
            self._spawn(self._execute(actions))
        else:
            self._sync()

    # -- executing actions -------------------------------------------------------------------

    async def _execute(self, actions: list[Action]) -> None:
        core = self.core
        # The input that produced these actions may have moved a deadline earlier (a write
        # now outstanding arms the stall and hang-up timers): re-arm before any await.
        self._sync()
        for action in actions:
            if isinstance(action, SendChunk):
                await self._send(action.message)
            elif isinstance(action, WriteLocal):
                await self._write_local(action.data)
            elif isinstance(action, SendConnect):
                assert self._connect_chunk is not None
                await self._send(self._connect_chunk(action), counted=False)
            elif isinstance(action, Open):
                # Inline: the task that got here (the reader of the side that asked) reads
                # nothing more until the tunnel is open anyway; one task fewer per tunnel.
                await self._open(action)
            elif isinstance(action, SendPing):
                self._spawn(self._ping())
            elif isinstance(action, CheckPeers):
                if self.writer is not None and hung_up(self.writer):
                    await self._execute(core.local_eof(self._loop.time()))
                    return
                if self.ws is not None and self.ws.lost():
                    await self._execute(core.ws_closed(None, self._loop.time()))
                    return
            elif isinstance(action, CloseWs | CloseLocal):
                self._closing.append(action)
            elif isinstance(action, HandOff):
                self.handed_off = action.initial
                self.reader = self.writer = None  # not ours to read or close any more
            elif isinstance(action, Finished):
                self._done.set()
                return
        self._sync()

    async def _send(self, message: bytes, *, counted: bool = True) -> None:
        ws = self.ws
        if ws is None:
            return
        try:
            await ws.send(message)
        except (WsClosed, ConnectionError):
            await self._execute(self.core.ws_closed(None, self._loop.time()))
            return
        if counted:
            self.core.written(WS, len(message), self._loop.time())

    async def _write_local(self, data: bytes) -> None:
        writer = self.writer
        if writer is None:
            return
        try:
            writer.write(data)
            await writer.drain()
        except (ConnectionError, RuntimeError):
            if not self.core.closed:
                await self._execute(self.core.local_eof(self._loop.time()))
            return
        self.core.written(LOCAL, len(data), self._loop.time())

    async def _read_local(self) -> None:
        reader, core, loop = self.reader, self.core, self._loop
        assert reader is not None
        while True:
            if not self._local_go.is_set():
                await self._local_go.wait()
            if core.closed:
                return
            try:
                data = await reader.read(core.local_read_size)
            except ConnectionError:
                data = b""
            if core.closed:
                return
            if not data:
                await self._execute(core.local_eof(loop.time()))
                return
            await self._execute(core.local_data(data, loop.time()))

    async def _read_ws(self) -> None:
        ws, core, loop = self.ws, self.core, self._loop
        assert ws is not None
        while True:
            if not self._ws_go.is_set():
                await self._ws_go.wait()
            if core.closed or self.ws is not ws:
                return
            message = await ws.recv()
            if core.closed or self.ws is not ws:
                return
            if message is None:
                await self._execute(core.ws_closed(None, loop.time()))
                return
            await self._execute(core.ws_message(message, loop.time()))

    async def _ping(self) -> None:
        ws = self.ws
        if ws is None:
            return
        with contextlib.suppress(WsClosed, ConnectionError):
            await ws.ping()
            if self.ws is ws:
                self.core.pong(self._loop.time())

    async def _open(self, action: Open) -> None:
        core, loop = self.core, self._loop
        try:
            opened = await self._opener(action)
        except OpenFailed as exc:
            await self._execute(
                core.open_failed(exc.status, exc.reason, loop.time(), rule=exc.rule)
            )
            return
        except OpenStale:
            await self._execute(core.open_stale(loop.time()))
            return
        if core.closed:  # the client left, or a deadline passed, while we opened
            await _discard(opened)
            return
        if opened.ws is not None:
            old, self.ws = self.ws, opened.ws
            if old is not None:  # a pooled socket that died before the answer
                old.abort()
            self._spawn(self._read_ws())
            await self._execute(core.ws_opened(loop.time(), pooled=opened.pooled))
        else:
            self.reader, self.writer = opened.reader, opened.writer
            if opened.writer is not None:
                cap_reads(opened.writer.transport, READ_SIZE)
            self._spawn(self._read_local())
            await self._execute(core.open_done(loop.time()))


async def _discard(opened: Opened) -> None:
    if opened.ws is not None:
        opened.ws.abort()
    if opened.writer is not None:
        await close_stream(opened.writer, abort=True)


def cap_reads(transport: asyncio.BaseTransport | None, size: int) -> None:
    """Make a socket transport ``recv`` at most ``size`` bytes at a time.

    asyncio's selector transports read up to 256 KiB per ``recv`` into a fresh buffer: per busy
    tunnel that is a quarter MiB allocated (and left in the allocator's free lists) for data
    the tunnel will not take before it is written out anyway. ``max_size`` is the attribute
    every supported CPython's selector transport reads; any other transport is left alone.
    """
    if transport is not None and getattr(transport, "max_size", 0) > size:
        transport.max_size = size  # type: ignore[attr-defined]


def hung_up(writer: asyncio.StreamWriter) -> bool:
    """Whether the peer of ``writer``'s socket hung up, checked without reading."""
    return transport_hung_up(writer.transport)


def transport_hung_up(transport: asyncio.BaseTransport | None) -> bool:
    """Whether a transport is closed or its socket's peer hung up (FIN or RST), checked
    without reading - a transport whose reading is paused sees neither by itself."""
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    try:
        poller.register(sock.fileno(), _HANGUP)
    except (ValueError, OSError):
        return True
    return any(events & _HANGUP for _, events in poller.poll(0))


async def close_stream(writer: asyncio.StreamWriter, *, abort: bool = False) -> None:
    """Close a stream, bounded: flush for up to :data:`CLOSE_GRACE`, else reset it.

    ``writer.close()`` alone waits for the buffer to flush to a peer that may never read it,
    leaving the socket established with data queued; a reset releases it at once.
    """
    transport = writer.transport
    if not abort:
        writer.close()
        try:
            async with asyncio.timeout(CLOSE_GRACE):
                await writer.wait_closed()
            return
        except (TimeoutError, ConnectionError, OSError):
            pass
    reset(transport)
    with contextlib.suppress(Exception):
        await writer.wait_closed()


def reset(transport: asyncio.WriteTransport | None) -> None:
    """Drop a connection at once with a TCP reset.

    A plain ``abort()`` closes the socket, but the kernel still queues a FIN behind any
    unsent data - to a peer whose window is closed it never arrives, and the peer never
    learns we left. ``SO_LINGER`` 0 makes the close a reset, which always gets through.
    """
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()
