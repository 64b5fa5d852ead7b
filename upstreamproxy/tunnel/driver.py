"""The asyncio adapter around :class:`~.core.TunnelCore`, shared by the relay and the egress.

It owns sockets and timers - nothing else - and runs on callbacks, not tasks. Per tunnel:

* the two sockets are :mod:`links <.links>` (buffered protocols over the transports): what a
  link reads goes straight into the core, and the actions that come back are executed
  before the callback returns - writes are ``transport.write`` calls, so nothing waits;
* reading is paused and resumed as the core's :attr:`~.core.TunnelCore.may_read_local` /
  ``may_read_ws`` say, and a write is reported done (``written``) when its transport has
  handed everything to the kernel - at once, usually, else on ``resume_writing``;
* one event-loop timer is armed at :meth:`~.core.TunnelCore.next_deadline` (no sleep loop),
  which calls ``tick`` and executes its actions;
* a task exists only while the core waits for :class:`~.actions.Open` (the relay taking or
  opening a WebSocket; the egress checking, admitting and dialling).

When the core finishes, the closes it asked for run, each bounded: a WebSocket closing
handshake gets :data:`~.links.CLOSE_GRACE`, a local stream that cannot flush in that time is
reset (``SO_LINGER`` 0) rather than left established with bytes nobody will read.

The two ends differ only in their ``opener``: the relay opens (or takes a pre-opened)
WebSocket, the egress checks credentials, admits and dials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ProtocolError
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
    SendData,
    SendPing,
    WriteLocal,
)
from .core import CLOSE_GOING_AWAY, CLOSE_NORMAL, Role, State, TunnelCore
from .links import CLOSE_GRACE, LocalLink, WsLink, reset
from .payload import Payload, Piped
from .wsframes import Close, End, Event, Ping, Pong, Text, WsError

log = logging.getLogger("upstreamproxy.tunnel")

__all__ = [
    "CLOSE_GRACE",
    "OpenFailed",
    "OpenStale",
    "Opened",
    "TunnelDriver",
    "close_stream",
    "reset",
]


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

    ws: WsLink | None = None
    pooled: bool = False
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    #: A local stream as a bare transport (egress: the dialled upstream, its protocol a
    #: :class:`~.links.Parked`), taken over without a stream layer.
    transport: asyncio.Transport | None = None


Opener = Callable[[Open], Awaitable[Opened]]
#: What can be opened without waiting (the relay's ready pooled socket), or None.
ReadyOpener = Callable[[Open], "Opened | None"]


class TunnelDriver:
    def __init__(
        self,
        core: TunnelCore,
        opener: Opener,
        *,
        ws: WsLink | None = None,
        reader: asyncio.StreamReader | None = None,
        writer: asyncio.StreamWriter | None = None,
        connect_chunk: Callable[[SendConnect], bytes] | None = None,
        open_ready: ReadyOpener | None = None,
    ) -> None:
        self.core = core
        self.ws: WsLink | None = None
        self.local: LocalLink | None = None
        self._opener = opener
        #: Tried first: what it returns is used on the next loop iteration, as the task
        #: running ``opener`` would, without a task.
        self._open_ready = open_ready
        self._connect_chunk = connect_chunk
        self._loop = asyncio.get_running_loop()
        self._opening: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closing: list[Action] = []
        #: Sizes of writes handed to a paused transport, reported done on resume_writing.
        self._unconfirmed: dict[Any, deque[int]] = {LOCAL: deque(), WS: deque()}
        self._initial_ws = ws
        self._initial_local = (reader, writer)
        self._running = False
        self._batched: list[int] | None = None
        #: Set by :class:`~.actions.HandOff`: the local stream was given back to its stream
        #: pair for the plain-HTTP forwarder, which starts from these bytes.
        self.handed_off: bytes | None = None
        #: Set by :meth:`start`: called once the tunnel ended.
        self._on_done: Callable[[], None] | None = None
        self._ending = False
        self._splice_checked = False

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> str:
        """Run the tunnel to its end (:meth:`start`, awaited); returns the outcome.
        Cancellation closes it too, and waits for the opening step to let go of its socket."""
        ended: asyncio.Future[None] = self._loop.create_future()

        def on_done() -> None:
            if not ended.done():  # cancelled, when stop() below ends it
                ended.set_result(None)

        self.start(on_done)
        try:
            await ended
        finally:
            self.stop()  # nothing left to do once it ended by itself
            opening = self._opening
            if opening is not None and not opening.done():
                with contextlib.suppress(BaseException):
                    await asyncio.shield(asyncio.wait([opening]))
        return self.core.outcome

    def start(self, on_done: Callable[[], None], *, local: LocalLink | None = None) -> None:
        """Run the tunnel on callbacks alone, without a task: as :meth:`run` does, but
        ``on_done`` is called once it ended (its closes started), on a later loop iteration
        as :meth:`run` would have returned. :meth:`stop` ends it early, as cancelling
        :meth:`run` does.

        ``local``: a link that already is its transport's protocol (a connection accepted
        straight into it), instead of the stream pair given to the constructor.
        """
        self._running = True
        self._on_done = on_done
        if self._initial_ws is not None:
            self._use_ws(self._initial_ws)
        reader, writer = self._initial_local
        if local is not None:
            self.local = local
            local.owner = self
            if local.eof and not self.core.closed:
                self.local_eof()
        elif reader is not None and writer is not None:
            self._use_local(reader, writer)
        self._sync()

    def stop(self) -> None:
        """End a tunnel run by :meth:`start` now (``on_done`` is called before this returns)."""
        self._end()

    def _end(self) -> None:
        if self._on_done is None:
            return
        on_done, self._on_done = self._on_done, None
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()  # the opener releases what it holds when cancelled
        self._close_all()
        on_done()

    def execute_soon(self, actions: list[Action]) -> None:
        """Execute actions from an input fed outside the driver (``drain``, say)."""
        self._loop.call_soon(self._execute, actions)

    def _finish(self) -> None:
        if self._on_done is not None and not self._ending:
            self._ending = True  # on a later iteration: the input that ended it still runs
            self._loop.call_soon(self._end)

    def _close_all(self) -> None:
        if self.local is not None:
            self.local.end_batch()  # what was written before the close goes out first
        closing, self._closing = self._closing, []
        if not any(isinstance(a, CloseWs) for a in closing) and self.ws is not None:
            if self.core.closed:  # the peer closed, or failed: just release the socket
                closing.append(CloseWs(CLOSE_NORMAL, abort=True))
            else:  # cancelled: this end is shutting down
                closing.append(CloseWs(CLOSE_GOING_AWAY))
        if not any(isinstance(a, CloseLocal) for a in closing) and self.local is not None:
            closing.append(CloseLocal())  # bounded: reset if it cannot flush in time
        for action in closing:
            if isinstance(action, CloseWs) and self.ws is not None:
                ws, self.ws = self.ws, None
                ws.set_owner(None)
                if action.abort and not ws.ended:  # (an ended tunnel left it clean: reuse it)
                    ws.abort()
                else:
                    ws.close(action.code, self._patience(action.patient))
            elif isinstance(action, CloseLocal) and self.local is not None:
                local, self.local = self.local, None
                if action.abort:
                    local.abort()
                elif action.linger:
                    local.linger(self._patience(action.patient))
                else:
                    local.close_gracefully(self._patience(action.patient))

    def _patience(self, patient: bool) -> float:
        """How long a close may wait for a peer that is slow but there (see
        :class:`~.actions.CloseWs`): the write-stall time, or :data:`CLOSE_GRACE`."""
        stall = self.core.timeouts.write_stall
        return max(stall, CLOSE_GRACE) if patient and stall is not None else CLOSE_GRACE

    # -- the sockets ---------------------------------------------------------------------------

    def _use_ws(self, link: WsLink) -> None:
        self.ws = link
        self._unconfirmed[WS].clear()
        link.set_owner(self)

    def _use_local(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        local = self.local = LocalLink(self)
        buffered = local.take(reader, writer)
        if buffered:
            self.local_data(memoryview(buffered))
        if local.eof and not self.core.closed:
            self.local_eof()

    # WsOwner

    def ws_events(self, link: WsLink, events: list[Event]) -> None:
        if link is not self.ws:
            return
        local = self.local
        if local is None or len(events) < 2:
            self._ws_events(events)
            return
        # Several payload pieces from one read: written out together (see LocalLink).
        self._batched = []
        local.begin_batch()
        try:
            self._ws_events(events)
        finally:
            sizes, self._batched = self._batched, None
            local.end_batch()
            for size in sizes:
                self._after_write(LOCAL, local.write_paused, size)
            self._sync()

    def _ws_events(self, events: list[Event]) -> None:
        core, now = self.core, self._loop.time()
        for event in events:
            if core.closed:
                return
            if isinstance(event, memoryview | bytes | Piped):
                self._execute(core.ws_payload(event, now))
            elif isinstance(event, Pong):
                core.pong(now)
            elif isinstance(event, Ping):
                core.pong(now)  # the peer is alive; the link answered it
            elif isinstance(event, Close):
                self._execute(core.ws_closed(event.code, now))
            elif isinstance(event, Text):
                self._execute(core.ws_message("", now))
            elif isinstance(event, WsError):
                self._execute(core.ws_payload(ProtocolError(event.reason), now))
            elif isinstance(event, End):  # (never: the link reports it as a Close)
                continue
            else:  # a ChunkError
                self._execute(core.ws_payload(event, now))

    def ws_writable(self, link: WsLink) -> None:
        if link is self.ws:
            self._confirm(WS)

    def ws_lost(self, link: WsLink) -> None:
        if link is self.ws and not self.core.closed:
            self._execute(self.core.ws_closed(None, self._loop.time()))

    # LocalOwner

    def local_data(self, data: memoryview | Piped) -> None:
        core = self.core
        if core.closed:
            return
        self._execute(core.local_data(data, self._loop.time()))

    def local_eof(self) -> None:
        if not self.core.closed and self.local is not None:
            self._execute(self.core.local_eof(self._loop.time(), reset=self.local.was_reset))

    def local_writable(self) -> None:
        self._confirm(LOCAL)

    def _confirm(self, side: Any) -> None:
        """The transport of ``side`` wrote out everything: its writes are done."""
        pending = self._unconfirmed[side]
        if not pending:
            return
        core, now = self.core, self._loop.time()
        while pending:
            core.written(side, pending.popleft(), now)
        self._sync()

    # -- flow and time -------------------------------------------------------------------------

    def _sync(self) -> None:
        """After every core input: reading permissions and the timer."""
        core = self.core
        if core.closed:
            self._finish()
            return
        local, ws = self.local, self.ws
        if not self._splice_checked and core.state is State.ESTABLISHED:
            self._splice_checked = True
            self._allow_splice()
        if local is not None:
            if core.may_read_local:
                local.read_size = core.local_read_size
                local.resume_reading()
            else:
                local.pause_reading()
        if ws is not None:
            if core.may_read_ws:
                ws.read_size = core.ws_read_size
                ws.resume_reading()
            else:
                ws.pause_reading()
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

    def _allow_splice(self) -> None:
        """Once established: let the download direction splice (see :mod:`.pipe`) where
        both sockets are plain - the egress's upstream reads, the relay's WebSocket reads."""
        local, ws = self.local, self.ws
        if local is None or ws is None or local.sock is None or ws.sock is None:
            return
        if self.core.role is Role.RELAY:
            ws.splice_ok, ws.sink = True, local.sock
        else:
            local.splice_ok, local.sink = True, ws.sock

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        actions = self.core.tick(self._loop.time())
        self.core.deadline_moved = True  # the timer is gone: always re-arm
        self._execute(actions)

    # -- executing actions -------------------------------------------------------------------

    def _execute(self, actions: list[Action]) -> None:
        core = self.core
        for action in actions:
            if isinstance(action, SendData):
                self._send_data(action.payload)
            elif isinstance(action, WriteLocal):
                self._write_local(action.data)
            elif isinstance(action, SendChunk):
                self._send_message(action.message, len(action.message))
            elif isinstance(action, SendConnect):
                assert self._connect_chunk is not None
                if self.ws is not None:
                    self.ws.send_message(self._connect_chunk(action))
            elif isinstance(action, Open):
                ready = self._open_ready(action) if self._open_ready is not None else None
                if ready is not None:
                    self._loop.call_soon(self._opened, ready)
                else:
                    self._opening = self._loop.create_task(self._open(action))
            elif isinstance(action, SendPing):
                if self.ws is not None:
                    self.ws.send_ping()
            elif isinstance(action, CheckPeers):
                if self.local is not None and self.local.hung_up():
                    now = self._loop.time()
                    self._execute(core.local_eof(now, reset=self.local.was_reset))
                    return
                # The egress does not read the WebSocket while it admits and dials, so a
                # relay that left then (close frame, then FIN) showed only as unread bytes:
                # the lookup and dial ran on to the open deadline. No WebSocket peer
                # half-closes and still waits for an answer.
                opening = core.role is Role.EGRESS and core.state is State.OPENING
                if self.ws is not None and self.ws.hung_up(fin_is_gone=opening):
                    self._execute(core.ws_closed(None, self._loop.time()))
                    return
            elif isinstance(action, CloseWs | CloseLocal):
                self._closing.append(action)
            elif isinstance(action, HandOff):
                self.handed_off = action.initial
                local, self.local = self.local, None
                if local is not None:
                    local.give_back()  # not ours to read or close any more
            elif isinstance(action, Finished):
                self._close_all()
                self._finish()
                return
        self._sync()

    def _send_data(self, payload: Payload) -> None:
        ws, local = self.ws, self.local
        if ws is None:
            return
        ws.send_data(payload, local.room_for(payload) if local is not None else None)
        self._after_write(WS, ws.write_paused, len(payload))

    def _send_message(self, message: bytes, size: int) -> None:
        ws = self.ws
        if ws is None:
            return
        ws.send_message(message)
        self._after_write(WS, ws.write_paused, size)

    def _write_local(self, data: Payload) -> None:
        local = self.local
        if local is None:
            return
        local.write(data)
        if self._batched is not None:
            self._batched.append(len(data))  # accounted once the batch went out
        else:
            self._after_write(LOCAL, local.write_paused, len(data))

    def _after_write(self, side: Any, paused: bool, size: int) -> None:
        if paused:
            self._unconfirmed[side].append(size)
        else:
            self.core.written(side, size, self._loop.time())

    async def _open(self, action: Open) -> None:
        core, loop = self.core, self._loop
        try:
            opened = await self._opener(action)
        except OpenFailed as exc:
            self._execute(core.open_failed(exc.status, exc.reason, loop.time(), rule=exc.rule))
            return
        except OpenStale:
            self._execute(core.open_stale(loop.time()))
            return
        except Exception:
            # A bug, or an error nobody foresaw, in the opening step: fail this tunnel now,
            # said once with its traceback, instead of leaving it to its open deadline (and
            # the task's exception to "never retrieved").
            log.exception("opening the tunnel failed unexpectedly")
            self._execute(core.open_failed(502, "internal-error", loop.time()))
            return
        if core.closed or not self._running:  # the client left, or a deadline passed
            await _discard(opened)
            return
        self._opened(opened)

    def _opened(self, opened: Opened) -> None:
        core, loop = self.core, self._loop
        if core.closed or not self._running:  # the client left, or a deadline passed
            if opened.ws is not None:
                opened.ws.abort()
            if opened.writer is not None:
                reset(opened.writer.transport)
            return
        if opened.ws is not None:
            old = self.ws
            if old is not None:  # a pooled socket that died before the answer
                old.set_owner(None)
                old.abort()
            self._use_ws(opened.ws)
            self._execute(core.ws_opened(loop.time(), pooled=opened.pooled))
        else:
            local = self.local = LocalLink(self)
            if opened.transport is not None:
                buffered = local.take_transport(opened.transport)
            else:
                assert opened.reader is not None and opened.writer is not None
                buffered = local.take(opened.reader, opened.writer)
            self._execute(core.open_done(loop.time()))
            if buffered and not core.closed:
                self.local_data(memoryview(buffered))
            if local.eof and not core.closed:
                self.local_eof()


async def _discard(opened: Opened) -> None:
    if opened.ws is not None:
        opened.ws.abort()
    if opened.transport is not None:
        reset(opened.transport)
    if opened.writer is not None:
        await close_stream(opened.writer, abort=True)


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
        async with asyncio.timeout(CLOSE_GRACE):
            await writer.wait_closed()
