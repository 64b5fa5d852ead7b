"""An in-memory, flow-controlled pair of asyncio streams (no sockets, no file descriptors).

``stream_pair()`` returns two ``(StreamReader, StreamWriter)`` ends; what one end writes the
other reads. Backpressure is real: when a reader's buffer passes its limit, the writer at the
other end sees ``drain()`` wait, exactly as over a socket. EOF (``write_eof``) and close travel
across; ``abort()`` closes both at once.

Used where a tunnel is needed inside one process without a kernel socket pair: the relay's
:meth:`~upstreamproxy.relay.Relay.open_tunnel` runs the CONNECT path over one.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final, Protocol, runtime_checkable

#: Per-direction buffer limit: the reader pauses its writer past this many bytes.
DEFAULT_LIMIT: Final = 256 * 1024


@runtime_checkable
class PeekableTransport(Protocol):
    """A transport whose unread input can be inspected before a protocol is given it."""

    def pause_reading(self) -> None: ...
    def write(self, data: bytes) -> None: ...
    def peek_incoming(self) -> tuple[bytes, bool]: ...
    def discard_incoming(self, size: int) -> None: ...


class _MemoryTransport(asyncio.Transport):
    # loop.start_tls() accepts only transports that say so; this one can be switched to a
    # new protocol (set_protocol, pause/resume) as it requires.
    _start_tls_compatible = True

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self._protocol: asyncio.Protocol | None = None
        self._peer: _MemoryTransport | None = None
        self._closing = False
        self._reading = True
        self._eof_sent = False
        self._writing_paused = False
        self._pending = bytearray()  # written while the peer is paused
        self._close_after_flush = False

    # -- wiring --------------------------------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]
        self._writing_paused = False  # a new protocol starts unpaused (start_tls swaps) ...
        if self._pending:  # ... unless bytes are still unsent: it is told, so it is told
            self._pause_writer()  # when they went out (resume_writing)

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("memory", 0), "sockname": ("memory", 0)}.get(name, default)

    # -- reading (flow control from our protocol toward the peer's writer) ---------------

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        self._reading = False
        if self._peer is not None:
            self._peer._pause_writer()

    def resume_reading(self) -> None:
        self._reading = True
        if self._peer is not None:
            # Later, as a socket's data would arrive: StreamReader resumes reading just
            # before it sets up the waiter that this delivery must wake.
            self._loop.call_soon(self._peer._flush)

    def peek_incoming(self) -> tuple[bytes, bool]:
        """What the peer wrote that our protocol has not been given yet (held while reading
        is paused), and whether the peer has finished writing."""
        peer = self._peer
        if peer is None:
            return b"", True
        return bytes(peer._pending), peer._eof_sent or peer._closing

    def discard_incoming(self, size: int) -> None:
        if self._peer is not None:
            del self._peer._pending[:size]

    # -- writing --------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._eof_sent:
            return
        if not data:
            return
        self._pending += data
        self._flush()

    def write_eof(self) -> None:
        if self._eof_sent or self._closing:
            return
        self._eof_sent = True
        self._flush()

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return len(self._pending)

    def _flush(self) -> None:
        peer = self._peer
        if peer is None or peer._protocol is None:
            return
        if self._pending and peer._reading:
            data, self._pending = bytes(self._pending), bytearray()
            _deliver(peer._protocol, data)
        if self._pending or not peer._reading:
            self._pause_writer()
        else:
            self._resume_writer()
            if self._eof_sent and not peer._closing:
                peer._protocol.eof_received()
            if self._close_after_flush:
                self._close_after_flush = False
                self._shutdown()

    def _pause_writer(self) -> None:
        if not self._writing_paused and self._protocol is not None:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _resume_writer(self) -> None:
        if self._writing_paused and self._protocol is not None:
            self._writing_paused = False
            self._protocol.resume_writing()

    # -- closing --------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self.write_eof()
        if self._pending:  # flush first, like a socket's close
            self._close_after_flush = True
        else:
            self._shutdown()

    def abort(self) -> None:
        self._pending.clear()
        self._shutdown()

    def _force_close(self, exc: BaseException | None) -> None:
        # Not public API, but asyncio's TLS layer (start_tls's SSLProtocol) calls it on its
        # transport for every fatal error: a failed handshake, its timeout, a failed or timed
        # out shutdown. Without it those raised AttributeError inside the TLS layer instead, so
        # the handshake's waiter was never woken (the server hung until its own timeout) and
        # closing a TLS connection whose peer misbehaved raised out of StreamWriter.close().
        # Like a socket transport's: buffered data is dropped and the connection ends now.
        self.abort()

    def _shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.call_soon(self._lost)
        peer = self._peer
        if peer is not None and not peer._closing:
            if not self._eof_sent and peer._protocol is not None:
                self._eof_sent = True
                peer._protocol.eof_received()
            peer._closing = True
            self._loop.call_soon(peer._lost)

    def _lost(self) -> None:
        if self._protocol is not None:
            self._protocol.connection_lost(None)


def _deliver(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Hand bytes to a protocol, streaming or buffered (``start_tls``'s SSL protocol is one)."""
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buffer = memoryview(protocol.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            protocol.buffer_updated(size)
            view = view[size:]
    else:
        assert isinstance(protocol, asyncio.Protocol)
        protocol.data_received(data)


def stream_pair(
    limit: int = DEFAULT_LIMIT,
) -> tuple[
    tuple[asyncio.StreamReader, asyncio.StreamWriter],
    tuple[asyncio.StreamReader, asyncio.StreamWriter],
]:
    """Two connected stream ends (call inside a running event loop)."""
    loop = asyncio.get_running_loop()
    a, b = _MemoryTransport(loop), _MemoryTransport(loop)
    a._peer, b._peer = b, a
    ends = []
    for transport in (a, b):
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        ends.append((reader, asyncio.StreamWriter(transport, protocol, reader, loop)))
    return ends[0], ends[1]
