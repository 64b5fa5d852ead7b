"""The two sockets of a tunnel as asyncio buffered protocols: zero-copy, no tasks.

A :class:`WsLink` is the WebSocket between relay and egress once upgraded; a
:class:`LocalLink` is the local stream (the client at the relay, the upstream at the egress).
Each reads with ``recv_into`` into one buffer shared by every link of the process - the
event loop runs one callback at a time, and what a callback read is written out (or copied
by the transport, or by the core while it holds a head) before it returns - so a busy tunnel
holds no read buffer of its own, and no chunk is copied in user space on its way through:

* egress: upstream bytes land after :data:`~.wsframes.HEADROOM` free bytes; the frame and
  chunk headers are written into that room and the whole frame leaves in one ``send``;
* relay: a frame's payload is a slice of what was read and goes to the client as it is.

Links report to an *owner* (the tunnel driver; the relay's pool for an idle pre-opened
socket) through plain method calls. Writes complete when the transport has handed them to
the kernel: the write buffer's high-water mark is (about) 0, so ``pause_writing`` means "a
write is outstanding" and ``resume_writing`` "all of it went out" - the core's notion of a
write.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import socket
import struct
import termios
from collections.abc import Callable
from typing import Final, Protocol

from ..codec import END_OF_TUNNEL
from . import pipe
from .core import CLOSE_NORMAL
from .payload import Piped
from .wsframes import (
    CLOSE_PROTOCOL_ERROR,
    HEADROOM,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    Close,
    End,
    Event,
    FrameReader,
    Ping,
    WsError,
    chunk_header,
    close_payload,
    frame,
    masked_chunk_frame,
)

#: How long a graceful close (WebSocket handshake, local flush) may take before the socket
#: is reset. What is still unsent then would only hold a socket open for nobody.
CLOSE_GRACE: Final = 1.0
#: Largest read into the shared buffer: the relay's WebSocket reads two chunks and framing.
SHARED_READ: Final = 256 * 1024 + 64
#: What a WebSocket with no tunnel yet (pooled, or waiting for its CONNECT) reads at once.
WS_IDLE_READ: Final = 16 * 1024
#: What a reused WebSocket reads at once while it waits for the peer's end of a tunnel
#: (dropping the tunnel's last bytes the peer sent before it saw ours).
_END_WAIT_READ: Final = 64 * 1024
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
#: How often a server's WebSocket that sent its close checks whether its bytes arrived.
_LINGER_CHECK: Final = 0.1
_HANGUP: Final = select.POLLRDHUP | select.POLLHUP | select.POLLERR

#: Where reads land in a read buffer: after room for a frame header.
READ_AT: Final = HEADROOM
_shared_view = memoryview(bytearray(READ_AT + SHARED_READ))
_busy = False  # a read from the shared buffer is being handled


def _read_buffer(size: int) -> memoryview:
    """The shared buffer - or, for a read that happens while another is being handled (an
    in-memory transport delivers synchronously), a fresh one, so neither overwrites the
    other."""
    if _busy:
        return memoryview(bytearray(READ_AT + size))
    return _shared_view


class _Handling:
    """Marks the shared buffer busy while a read from it is handled."""

    __slots__ = ("_was",)

    def __enter__(self) -> None:
        global _busy
        self._was = _busy
        _busy = True

    def __exit__(self, *exc: object) -> None:
        global _busy
        _busy = self._was


class WsOwner(Protocol):
    def ws_events(self, link: WsLink, events: list[Event]) -> None: ...

    def ws_writable(self, link: WsLink) -> None: ...

    def ws_lost(self, link: WsLink) -> None: ...


class LocalOwner(Protocol):
    def local_data(self, data: memoryview | Piped) -> None: ...

    def local_eof(self) -> None: ...

    def local_writable(self) -> None: ...


class _Link(asyncio.BufferedProtocol):
    """What both links share: the transport, write completion, bounded close, hang-up check."""

    transport: asyncio.Transport | None

    def __init__(self) -> None:
        self.transport = None
        #: Whether we last asked the transport to read (only changes reach the transport).
        self.reading = True
        self.write_paused = False
        self.lost = False
        self._on_lost: list[Callable[[], None]] = []
        self._close_timer: asyncio.TimerHandle | None = None
        self._patience = CLOSE_GRACE
        self._flush_until = 0.0
        self._flush_left = 0
        #: The plain socket under the transport, when reads can be spliced (see :mod:`.pipe`).
        self.sock: socket.socket | None = None
        #: Set by the driver once the tunnel is established and splicing pays (both sockets
        #: plain, the download direction): a bulk read then switches the link to splicing.
        self.splice_ok = False
        self.splicing = False
        #: Where spliced bytes go (the other link's socket), to size each splice.
        self.sink: socket.socket | None = None
        #: Closing, waiting for the peer to have its bytes (see :meth:`linger`).
        self._lingering = False

    def _take(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.sock = pipe.plain_socket(transport)
        self.write_paused = False
        self.reading = transport.is_reading()
        transport.set_protocol(self)
        try:  # noqa: SIM105 (hot path: see pause_reading)
            # "Paused" = anything left unsent (see the module docstring). high=1, not 0: the
            # TLS transport pauses at size >= high, which 0 would make true after every write.
            transport.set_write_buffer_limits(high=1, low=0)
        except (NotImplementedError, AttributeError):
            pass
        if transport.get_write_buffer_size():
            self.write_paused = True

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        callbacks, self._on_lost = self._on_lost, []
        for callback in callbacks:
            callback()

    def when_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the connection is gone (at once if it is): whatever the
        socket holds - a session's slot, say - is held until then, lingering included."""
        if self.lost:
            callback()
        else:
            self._on_lost.append(callback)

    # try/except rather than contextlib.suppress on these paths: they run several times per
    # tunnel, and suppress costs three Python calls each time.
    def pause_reading(self) -> None:
        if self.reading and self.transport is not None and not self.lost:
            self.reading = False
            try:  # noqa: SIM105 (hot path: see pause_reading)
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):
                pass

    def resume_reading(self) -> None:
        if not self.reading and self.transport is not None and not self.lost:
            self.reading = True
            try:  # noqa: SIM105 (hot path: see pause_reading)
                self.transport.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    def hung_up(self, *, fin_is_gone: bool = False) -> bool:
        """Whether the peer hung up (FIN or RST), checked without reading; ``fin_is_gone``:
        a FIN counts even with bytes still unread (see :func:`transport_hung_up`)."""
        return self.lost or transport_hung_up(self.transport, fin_is_gone=fin_is_gone)

    def close_gracefully(self, patience: float = CLOSE_GRACE) -> None:
        """Flush what is buffered, then close; reset if that takes over :data:`CLOSE_GRACE`.

        ``patience`` over :data:`CLOSE_GRACE`: a peer that is slow but there (it takes bytes
        at least once per ``patience``, and has not hung up) gets the rest - the tail of a
        download to a client that paused reading is not thrown away after a second.
        """
        if self._lingering:  # done lingering: the peer answered, or has everything
            self._lingering = False
            timer, self._close_timer = self._close_timer, None
            if timer is not None:
                timer.cancel()
        transport = self.transport
        if transport is None or self.lost:
            return
        # A plain socket transport with nothing buffered closes its socket on the next loop
        # iteration (the kernel delivers its send queue): no timer needs to watch it.
        settled = self.sock is not None and not transport.get_write_buffer_size()
        transport.close()
        if not self.lost and self._close_timer is None and not settled:
            self._bounded_wait(patience)

    def _bounded_wait(self, patience: float) -> None:
        """Reset the connection after :data:`CLOSE_GRACE`, or - with more ``patience`` -
        once the peer took nothing for ``patience`` or is gone."""
        loop = asyncio.get_running_loop()
        if patience <= CLOSE_GRACE:
            self._close_timer = loop.call_later(CLOSE_GRACE, self.abort)
            return
        self._patience = patience
        self._flush_until = loop.time() + patience
        self._flush_left = _unsent(self.transport)
        self._close_timer = loop.call_later(CLOSE_GRACE, self._flush_check)

    def _flush_check(self) -> None:
        """A patient close, every :data:`CLOSE_GRACE`: reset once the peer is gone or took
        nothing for ``patience``."""
        self._close_timer = None
        transport = self.transport
        if self.lost or transport is None:
            return
        self._watch_progress(transport, _unsent(transport), CLOSE_GRACE, self._flush_check)

    def _watch_progress(
        self, transport: asyncio.Transport, left: int, every: float, check: Callable[[], None]
    ) -> None:
        """A patient close's look at its peer, ``left`` bytes still unsent: the deadline
        moves on while the peer takes bytes; past it, or with the peer gone, reset; else
        ``check`` again in ``every`` seconds."""
        loop = asyncio.get_running_loop()
        if left < self._flush_left and self._patience > CLOSE_GRACE:  # it is reading
            self._flush_until = loop.time() + self._patience
        self._flush_left = left
        if loop.time() >= self._flush_until or peer_gone(transport):
            self.abort()
        else:
            self._close_timer = loop.call_later(every, check)

    # -- splicing (see :mod:`.pipe`) -----------------------------------------------------------

    def _bulk_read(self, nbytes: int) -> None:
        """After a read: one of :data:`~.pipe.SPLICE_AFTER` bytes or more switches the link
        to splicing, where the driver allowed it."""
        if nbytes < pipe.SPLICE_AFTER or not self.splice_ok or self.splicing:
            return
        if self.transport is not None and self.sock is not None and not self.lost:
            self.splicing = True
            pipe.redirect_reads(self.transport, self._splice_ready)

    def _splice_ready(self) -> None:
        """The socket is readable while splicing: :meth:`_splice_once`; an error is the
        transport's, as on its own reads."""
        transport = self.transport
        assert transport is not None
        try:
            self._splice_once(transport)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            pipe.fail(transport, exc)

    def _splice_once(self, transport: asyncio.Transport) -> None:
        raise NotImplementedError

    def linger(self, patience: float) -> None:
        """Close without throwing away what was sent: closed while the peer still sends
        (a pong, a keepalive, a client's acknowledgements), a socket is reset by the kernel,
        and the peer's kernel discards the tail it has not handed to its reader yet. So the
        socket stays open and is read - what arrives is dropped - until the peer says it is
        done (:meth:`_peer_done`: a WebSocket's answer to our close, a stream's EOF after
        ours), then closes - or, once all of it was delivered, a :data:`CLOSE_GRACE` later
        anyway. A peer that took none of our bytes for ``patience`` (:data:`CLOSE_GRACE` at
        least) - whatever it sends - or is gone, is reset. (For a tunnel that ended
        cleanly: one that failed is closed at once.)"""
        transport = self.transport
        if transport is None or self.lost:
            return
        if self._peer_done() or self._close_timer is not None or transport.is_closing():
            self.close_gracefully(patience)
            return
        self._lingering = True
        self._stop_sending(transport)
        self.resume_reading()
        loop = asyncio.get_running_loop()
        self._patience = patience
        self._flush_until = loop.time() + max(patience, CLOSE_GRACE)
        self._flush_left = _unsent(transport) or -1  # (-1: delivered, a grace not yet given)
        self._close_timer = loop.call_later(_LINGER_CHECK, self._linger_check)

    def _peer_done(self) -> bool:
        """The peer will send nothing more (closing now cannot make the kernel reset)."""
        return False

    def _stop_sending(self, transport: asyncio.Transport) -> None:
        """Tell the peer we are done (a WebSocket already sent its close frame)."""

    def _linger_check(self) -> None:
        self._close_timer = None
        transport = self.transport
        if not self._lingering or self.lost or transport is None:
            return
        if self._peer_done():
            self.close_gracefully(self._patience)
            return
        loop = asyncio.get_running_loop()
        left = _unsent(transport)
        if not left:
            # All delivered: the peer's kernel holds it, and hands it (and our FIN) to its
            # reader even after a reset. The peer gets one more grace to finish, then the
            # socket closes - one that keeps sending (a stream nobody wants any more) is not
            # read and dropped for long.
            if self._flush_left == 0:
                self.close_gracefully(self._patience)
                return
            self._flush_left = 0
            self._close_timer = loop.call_later(CLOSE_GRACE, self._linger_check)
            return
        self._watch_progress(transport, left, _LINGER_CHECK, self._linger_check)

    @property
    def lingering(self) -> bool:
        """The link is closing and closes the transport itself, bounded (see
        :meth:`linger`): whoever handed it the transport must not close it first."""
        return self._lingering

    def abort(self) -> None:
        """Drop the connection at once (a TCP reset)."""
        timer, self._close_timer = self._close_timer, None
        if timer is not None:  # a graceful close was under way: its deadline is moot now
            timer.cancel()
        if not self.lost:
            reset(self.transport)


class WsLink(_Link):
    """One upgraded WebSocket carrying a tunnel (or waiting for one, in the relay's pool).

    ``client``: the relay's end - frames it sends are masked, frames it reads must not be.

    ``reuse``: the upgrade negotiated tunnel reuse (SPEC §11). A tunnel then ends with an
    end-of-tunnel message each way instead of the closing handshake - the same steps, a
    message instead of a close frame: ``close(1000)`` sends ours and waits (reading and
    dropping, bounded as :meth:`linger` is) for the peer's; the peer's, when it comes first,
    is answered at once and reported to the owner as ``Close(1000)``. Once both went, the
    WebSocket carries nothing of that tunnel any more: it goes to :attr:`on_reusable` (the
    relay's pool, the egress's next tunnel) instead of being closed. Any other close code,
    an abort or an error closes it for real.
    """

    def __init__(self, *, client: bool, reuse: bool = False) -> None:
        super().__init__()
        self.client = client
        self.reuse = reuse
        #: Called with the link once a tunnel ended on it with the end-of-tunnel exchange
        #: (None: it is then closed for real).
        self.on_reusable: Callable[[WsLink], None] | None = None
        #: Both ends' end-of-tunnel messages went (the peer's first): the owner's close
        #: hands the link on instead of closing it.
        self.ended = False
        self._end_sent = False  # ours went first: the peer's is awaited
        self._held: list[Event] = []  # read after the peer's end, before the link is free
        self._carried = False  # a chunk with bytes came since the upgrade or the last end
        self.reader = FrameReader(masked=not client, reuse=reuse)
        self.owner: WsOwner | None = None
        self._early: list[Event] = []  # events read before there was an owner
        self.close_sent = False
        self.closed_by_peer = False
        #: The close code our reader asked for (a malformed frame), used by :meth:`close`.
        self.error_code: int | None = None
        self._full = _shared_view
        #: Set by the driver from the core's budget (a chunk and its framing, less what is
        #: still unwritten); an idle pooled socket reads small control frames only.
        self.read_size = WS_IDLE_READ

    @classmethod
    def attach(
        cls,
        transport: asyncio.Transport,
        leftover: bytes = b"",
        *,
        client: bool,
        eof: bool = False,
        reuse: bool = False,
    ) -> WsLink:
        """Take over an upgraded transport (reading paused by whoever upgraded it, or still on
        if nothing awaited since: what it read is in ``leftover``).

        ``leftover``: bytes read past the upgrade's head; ``eof``: the peer's end of stream
        came with them (or the transport is already closing) - the link is then lost.
        ``reuse``: the upgrade negotiated tunnel reuse.
        """
        link = cls(client=client, reuse=reuse)
        link._take(transport)
        if leftover:
            link._handle(link.reader.feed(leftover))
        if eof or transport.is_closing():
            link.lost = True
            transport.abort()
        else:
            link.resume_reading()
        return link

    def set_owner(self, owner: WsOwner | None) -> None:
        self.owner = owner
        if owner is not None:
            if self._early:
                events, self._early = self._early, []
                owner.ws_events(self, events)
            if self._held and not self.ended:  # read after a tunnel's end: not handled yet
                held, self._held = self._held, []
                self._handle(held)
            if self.lost and self.owner is owner:
                owner.ws_lost(self)

    # -- reading -----------------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        self._full = _read_buffer(self.read_size)
        return self._full[READ_AT : READ_AT + self.read_size]

    def buffer_updated(self, nbytes: int) -> None:
        with _Handling():
            self._handle(self.reader.feed(self._full[READ_AT : READ_AT + nbytes]))
        self._bulk_read(nbytes)

    def _splice_once(self, transport: asyncio.Transport) -> None:
        """Payload of a data frame goes into the pipe and on as :class:`Piped`; headers are
        peeked, then read and fed to the reader (which checks them as ever); anything else -
        control frames, EOF, a tunnel that ended - is read the transport's own way. Only
        unmasked frames (the relay's side) are ever spliced."""
        sock, reader = self.sock, self.reader
        assert sock is not None
        if self.owner is None or self.close_sent or not self.splice_ok or not self.client:
            pipe.plain_read(transport)
            return
        left = reader.payload_left()
        if not left:
            need = 0
            try:
                peek = sock.recv(pipe.PEEK, socket.MSG_PEEK)
                need = reader.head_size(peek)
                if need:
                    head = sock.recv(need)  # already queued: all of it
                    self._handle(reader.feed(head))
                    left = reader.payload_left()
            except (BlockingIOError, InterruptedError):
                return
            if not left or self.owner is None or not self.reading:
                if not need:
                    pipe.plain_read(transport)
                return
        try:
            moved = pipe.splice_in(sock.fileno(), min(left, pipe.room(self.sink, self.read_size)))
        except (BlockingIOError, InterruptedError):
            return
        if not moved:  # EOF: the transport's own read sees and reports it
            pipe.plain_read(transport)
            return
        try:
            self._handle(reader.skip(moved))
        finally:
            pipe.settle()

    def _handle(self, events: list[Event]) -> None:
        if not events:
            return
        if self.ended:  # the next tunnel's, come early: kept for the link's next owner
            self._held.extend(_detach(e) for e in events)
            return
        keep = not self.close_sent  # (what comes after our close nobody will take)
        for event in events:
            if isinstance(event, Ping):
                if not self.close_sent:
                    self._write(frame(OP_PONG, event.payload, masked=self.client))
            elif isinstance(event, Close):
                self.closed_by_peer = True
                if not self.close_sent:  # answer it (RFC 6455 §5.5.1), then hang up
                    self.close_sent = True
                    code = event.code if event.code is not None else 1000
                    self._write(frame(OP_CLOSE, close_payload(code), masked=self.client))
                self.close_gracefully()
            elif isinstance(event, WsError):
                self.error_code = event.code
            elif isinstance(event, End):
                events = self._end_received(events)
                if not events:
                    return
                break
            elif event:
                self._carried = True
        if self.owner is not None:
            self.owner.ws_events(self, events)
        elif keep:
            self._early.extend(_detach(e) for e in events)

    def _end_received(self, events: list[Event]) -> list[Event]:
        """The peer's end-of-tunnel message is among ``events``: what the owner is told."""
        at = next(i for i, e in enumerate(events) if isinstance(e, End))
        if self._end_sent:  # the answer to ours: the tunnel is over at both ends
            rest = events[at + 1 :]
            self._free()
            if rest:  # (nothing can follow before the next tunnel; kept for its owner)
                self._handle(rest)
            return []
        if self.close_sent or self.ended or not self._carried:
            # After a real close, twice, or ending a tunnel that never carried a byte (no
            # peer does that; a hostile one would make empty rounds cheap): not the protocol.
            self.error_code = CLOSE_PROTOCOL_ERROR
            return [*events[:at], WsError(CLOSE_PROTOCOL_ERROR, "unexpected end-of-tunnel message")]
        # The peer ended the tunnel first: answer at once (as a close frame is answered) -
        # nothing of this tunnel is sent after it - and tell the owner it closed normally.
        # What follows belongs to the next tunnel: held (reading paused) for the next owner.
        self.close_sent = self.closed_by_peer = self.ended = True
        self._send_end()
        self._held = [_detach(e) for e in events[at + 1 :]]
        self.pause_reading()
        return [*events[:at], Close(CLOSE_NORMAL, "")]

    def _free(self) -> None:
        """Both end-of-tunnel messages went: the link is as a fresh upgraded one, paused,
        for :attr:`on_reusable` (or closed, for real, when nobody takes it)."""
        timer, self._close_timer = self._close_timer, None
        if timer is not None:
            timer.cancel()
        self._lingering = self._end_sent = self.ended = self._carried = False
        self.close_sent = self.closed_by_peer = False
        self.owner = None
        self._early = []  # (what was read after the peer's end stays held for the next owner)
        transport = self.transport
        if self.splicing and transport is not None:
            transport.set_protocol(self)  # reads go through the protocol again
        self.splicing = self.splice_ok = False
        self.sink = None
        self.read_size = WS_IDLE_READ
        self.pause_reading()
        hook, self.on_reusable = self.on_reusable, None
        if hook is None:
            self.retire()
        else:
            hook(self)

    def _send_end(self) -> None:
        self._write(frame(OP_BINARY, END_OF_TUNNEL, masked=self.client))

    def resume_reading(self) -> None:
        if not self.ended:  # (ended: nothing is read until the next owner has the link)
            super().resume_reading()

    def retire(self) -> None:
        """Close a reusable link that is not wanted any more, with the closing handshake."""
        self.reuse = self.reader.reuse = False
        self.close(CLOSE_NORMAL)

    def eof_received(self) -> bool:
        return False  # no half-open WebSockets: the transport closes, connection_lost follows

    def _peer_done(self) -> bool:
        # (a reader that stopped - an error, a text frame - would not see the answer)
        return self.closed_by_peer or self.reader.done

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.owner is not None:
            self.owner.ws_lost(self)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.owner is not None:
            self.owner.ws_writable(self)

    # -- writing -----------------------------------------------------------------------------

    def _write(self, data: bytes | memoryview) -> None:
        transport = self.transport
        if transport is not None and not self.lost and not transport.is_closing():
            transport.write(data)

    def send_data(
        self, payload: bytes | bytearray | memoryview | Piped, room: memoryview | None = None
    ) -> None:
        """Send one chunk carrying ``payload``. ``room``: the read buffer ``payload`` sits in
        at :data:`READ_AT`, with the bytes before it free for the headers (one write).
        :class:`Piped` bytes go from the pipe to the socket behind their headers."""
        if self.close_sent:
            return
        if isinstance(payload, Piped):
            transport = self.transport
            if self.client or transport is None or self.lost or transport.is_closing():
                payload = pipe.take(payload)  # the relay masks: through user space
            else:
                pipe.send(transport, self.sock, payload, chunk_header(payload.size))
                return
        if self.client:
            self._write(masked_chunk_frame(payload))
            return
        size = len(payload)
        if room is not None:
            header = chunk_header(size)
            start = READ_AT - len(header)
            room[start:READ_AT] = header
            self._write(room[start : READ_AT + size])
        else:
            self._write(chunk_header(size) + payload)

    def send_message(self, message: bytes) -> None:
        """Send one binary message as it is (an already encoded chunk)."""
        if not self.close_sent:
            self._write(frame(OP_BINARY, message, masked=self.client))

    def send_ping(self, payload: bytes = b"") -> None:
        if not self.close_sent:
            self._write(frame(OP_PING, payload, masked=self.client))

    def close(self, code: int, patience: float = CLOSE_GRACE) -> None:
        """Start the closing handshake: our close frame now, the socket is released once the
        peer answers (or after :data:`CLOSE_GRACE`; a server flushing to a peer that is slow
        but there waits as :meth:`close_gracefully` says)."""
        if self.lost:
            return
        if self.reuse and code == CLOSE_NORMAL and self.error_code is None:
            if self.ended:  # the peer's end came first and was answered
                self._free()
                return
            if not self.close_sent:  # our end first: the peer's answer frees the link
                self.close_sent = self._end_sent = True
                self._send_end()
                self.read_size = _END_WAIT_READ
                self.linger(patience)
                return
        if self._end_sent or self.ended:  # the exchange did not finish: no handshake now
            self.abort()
            return
        if self.error_code is not None and code == 1002:
            code = self.error_code  # a reader error knows its precise code (1009, 1007)
        if not self.close_sent:
            self.close_sent = True
            self._write(frame(OP_CLOSE, close_payload(code), masked=self.client))
        if self.closed_by_peer:
            self.close_gracefully(patience)
        elif not self.client:
            self.linger(patience)  # the server closes TCP first (§7.1.1)
        elif self._close_timer is None:
            self._bounded_wait(patience)  # for the server's answer to our close

    @property
    def usable(self) -> bool:
        transport = self.transport
        return (
            not self.lost
            and not self.close_sent
            and not self.closed_by_peer
            and not self.reader.done
            and transport is not None
            and not transport.is_closing()
        )


def _detach(event: Event) -> Event:
    """An event kept past the read that produced it: no views into the shared buffer."""
    return bytes(event) if isinstance(event, memoryview) else event


class LocalLink(_Link):
    """The local stream of one tunnel, taken over from its asyncio stream pair."""

    def __init__(self, owner: LocalOwner) -> None:
        super().__init__()
        self.owner = owner
        self.read_size = SHARED_READ // 2
        self.eof = False
        #: The stream ended with an error (a reset) rather than an EOF.
        self.was_reset = False
        self._saved: asyncio.BaseProtocol | None = None
        self._last_read: memoryview | None = None
        self._full = _shared_view
        self._batch: list[bytes | bytearray | memoryview] | None = None
        self._fd = -1  # a plain socket's descriptor, for writev

    def take(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        """Become the protocol of ``writer``'s transport; returns what ``reader`` had
        buffered (to be fed first). EOF already seen by ``reader`` is kept in :attr:`eof`."""
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        # Kept alive with the link: a StreamWriter closes its transport when collected.
        self._writer: asyncio.StreamWriter | None = writer
        self._saved = transport.get_protocol()
        buffer = read_ahead(reader)
        buffered = bytes(buffer)
        buffer.clear()
        self.eof = reader.at_eof() or bool(getattr(reader, "_eof", False))
        self.attach(transport)
        return buffered

    def take_transport(self, transport: asyncio.Transport) -> bytes:
        """Become the protocol of a bare transport (its protocol a :class:`Parked`, or any
        protocol that saw nothing yet); returns what the parked protocol kept."""
        parked = transport.get_protocol()
        buffered = b""
        if isinstance(parked, Parked):
            buffered, self.eof = bytes(parked.data), parked.eof
            parked.data.clear()
        self.attach(transport)
        return buffered

    def attach(self, transport: asyncio.Transport) -> None:
        """Become (or, from ``connection_made``, be) the protocol of ``transport``."""
        self._take(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and transport.get_extra_info("sslcontext") is None:
            self._fd = sock.fileno()
        if transport.is_closing():
            self.lost = True
        elif not self.eof:
            self.resume_reading()

    def give_back(self) -> None:
        """Return the transport to the stream protocol it came with (plain-HTTP hand-off)."""
        transport, saved = self.transport, self._saved
        self.transport = None
        if transport is None or saved is None or self.lost:
            return
        transport.set_protocol(saved)
        with contextlib.suppress(NotImplementedError, AttributeError):
            transport.set_write_buffer_limits()
        self._saved = None
        with contextlib.suppress(RuntimeError, AttributeError):
            transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        self._full = _read_buffer(self.read_size)
        return self._full[READ_AT : READ_AT + self.read_size]

    def buffer_updated(self, nbytes: int) -> None:
        if self._lingering:  # closing: what the peer still sends is dropped
            return
        view = self._last_read = self._full[READ_AT : READ_AT + nbytes]
        try:
            with _Handling():
                self.owner.local_data(view)
        finally:
            self._last_read = None
        self._bulk_read(nbytes)

    def _splice_once(self, transport: asyncio.Transport) -> None:
        """The socket's bytes go into the pipe and on as :class:`Piped`; EOF and a tunnel
        that ended are read the transport's way."""
        sock = self.sock
        assert sock is not None
        if not self.splice_ok or self.eof or self._lingering:
            pipe.plain_read(transport)
            return
        try:
            moved = pipe.splice_in(sock.fileno(), pipe.room(self.sink, self.read_size))
        except (BlockingIOError, InterruptedError):
            return
        if not moved:
            pipe.plain_read(transport)
            return
        try:
            self.owner.local_data(Piped(moved))
        finally:
            pipe.settle()

    def data_received(self, data: bytes) -> None:  # transports that are not buffered
        if self._lingering:
            return
        self.owner.local_data(memoryview(data))

    def eof_received(self) -> bool:
        self.eof = True
        if self._lingering:  # the peer saw our EOF and is done too: close cleanly
            self.close_gracefully(self._patience)
            return True
        self.owner.local_eof()
        return True  # the tunnel decides when to close

    def _peer_done(self) -> bool:
        return self.eof

    def _stop_sending(self, transport: asyncio.Transport) -> None:
        with contextlib.suppress(NotImplementedError, AttributeError, RuntimeError, OSError):
            if transport.can_write_eof():
                transport.write_eof()  # our FIN, after what is buffered

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.eof:
            self.eof = True
            self.was_reset = exc is not None  # (known before the owner hears of the end)
            self.owner.local_eof()
        saved, self._saved = self._saved, None
        if saved is not None:  # its StreamWriter.wait_closed() waits for this
            with contextlib.suppress(Exception):
                saved.connection_lost(exc)

    def hung_up(self, *, fin_is_gone: bool = False) -> bool:
        gone = super().hung_up(fin_is_gone=fin_is_gone)
        if gone and not self.lost and not self.eof and self.transport is not None:
            # Seen while not reading: a reset (POLLHUP/POLLERR) rather than a FIN.
            self.was_reset = peer_gone(self.transport)
        return gone

    def resume_writing(self) -> None:
        super().resume_writing()
        self.owner.local_writable()

    def write(self, data: bytes | bytearray | memoryview | Piped) -> None:
        if isinstance(data, Piped):
            transport = self.transport
            if self._batch is None and transport is not None and not self.lost:
                if not transport.is_closing():
                    pipe.send(transport, self.sock, data)
                return  # (what nobody took, pipe.settle drops)
            data = pipe.take(data)  # into a batch of read bytes (rare), in order
        if self._batch is not None:
            self._batch.append(data)
            return
        transport = self.transport
        if transport is not None and not self.lost and not transport.is_closing():
            transport.write(data)

    def begin_batch(self) -> None:
        """Collect writes until :meth:`end_batch`: the payload pieces of one WebSocket read
        then leave in one ``writev`` instead of a ``send`` each."""
        self._batch = []

    def end_batch(self) -> None:
        batch, self._batch = self._batch, None
        if not batch:
            return
        transport = self.transport
        if transport is None or self.lost or transport.is_closing():
            return
        if len(batch) > 1 and self._fd >= 0 and not transport.get_write_buffer_size():
            try:
                sent = os.writev(self._fd, batch)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # the transport's own write meets the error and reports it
            for data in batch:
                size = len(data)
                if sent >= size:
                    sent -= size
                    continue
                transport.write(memoryview(data)[sent:] if sent else data)
                sent = 0
            return
        for data in batch:
            transport.write(data)

    def room_for(self, data: object) -> memoryview | None:
        """The read buffer ``data`` sits in, when ``data`` is the very view
        :meth:`buffer_updated` is passing on (a frame header fits before it)."""
        if data is not None and data is self._last_read:
            return self._full
        return None


def read_ahead(reader: asyncio.StreamReader) -> bytearray:
    """What ``reader`` has received and not yet handed out (its own buffer, not public API:
    empty for a reader without one). Bytes that arrived on a connection between exchanges
    show here."""
    buffer = getattr(reader, "_buffer", None)
    return buffer if isinstance(buffer, bytearray) else bytearray()


class Parked(asyncio.Protocol):
    """A fresh connection's protocol until a :class:`LocalLink` takes it over
    (:meth:`LocalLink.take_transport`): it keeps whatever arrives meanwhile."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True  # the link decides when to close


_INT0: Final = bytes(4)  # TIOCOUTQ's argument


def _unsent(transport: asyncio.BaseTransport | None) -> int:
    """Bytes written to ``transport`` that its peer has not taken yet: the transport's own
    buffer and the socket's send queue (which a peer that stopped reading leaves full)."""
    if transport is None:
        return 0
    left = 0
    try:  # noqa: SIM105 (hot path: see pause_reading)
        left = transport.get_write_buffer_size()  # type: ignore[attr-defined]
    except (AttributeError, NotImplementedError):
        pass
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:  # noqa: SIM105 (hot path: see pause_reading)
            left += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, _INT0))[0]
        except (OSError, ValueError):
            pass
    return left


def transport_hung_up(
    transport: asyncio.BaseTransport | None, *, fin_is_gone: bool = False
) -> bool:
    """Whether a transport is closed or its socket's peer hung up (FIN or RST), checked
    without reading - a transport whose reading is paused sees neither by itself.

    ``fin_is_gone``: a FIN alone counts, whatever is still unread - for a peer that cannot
    be waiting for an answer any more (a relay that closed its WebSocket while the egress
    was admitting: its close frame sits unread in front of the FIN).
    """
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
    events = 0
    for _, got in poller.poll(0):
        events |= got
    if not events & _HANGUP:
        return False
    if fin_is_gone or events & (select.POLLHUP | select.POLLERR):
        return True
    # A FIN: the peer is done sending - but what it sent before is still to be read (the
    # kernel's queue, a TLS transport's buffers); the end is seen once that is read.
    return not _unread(transport, sock)


def _unread(transport: asyncio.BaseTransport, sock: socket.socket) -> bool:
    """Whether bytes the peer sent are still waiting to be read from ``transport``."""
    try:
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    except OSError:
        queued = 0
    if queued > 0:
        return True
    with contextlib.suppress(AttributeError, NotImplementedError):
        if transport.get_read_buffer_size() > 0:  # type: ignore[attr-defined]
            return True
    ssl_object = transport.get_extra_info("ssl_object")
    with contextlib.suppress(Exception):
        if ssl_object is not None and ssl_object.pending() > 0:
            return True
    return False


def peer_gone(transport: asyncio.BaseTransport) -> bool:
    """Whether a socket's peer is gone for writing too (a reset, or both ways closed) - a
    FIN alone (:data:`select.POLLRDHUP`) is a peer that may still read."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    try:
        poller.register(sock.fileno(), select.POLLHUP | select.POLLERR)
    except (ValueError, OSError):
        return True
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


def reset(transport: asyncio.BaseTransport | None) -> None:  # abort() is on every kind
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
    transport.abort()  # type: ignore[attr-defined]
