"""One side of an intercepted exchange: an h11 connection over an asyncio stream.

The engine talks to the sandbox through a server-role peer and to the origin through a
client-role peer. Every read and write has a deadline; every failure becomes a :class:`PeerError`
naming the side and a stable reason, so the engine can decide between answering (a status),
retrying (a stale keep-alive upstream) or closing.

Exceptions from h11 or ssl are never turned into text here: a message about a request head the
engine built could contain an injected header value.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Final

import h11

from ...tunnel.links import read_ahead

READ_SIZE: Final = 64 * 1024
#: Largest request or response head accepted, exactly: h11's ``max_incomplete_event_size``
#: only bounds an *incomplete* head in its buffer, so a head that completes within one more
#: read passed at twice the size; :meth:`Peer.check_head` measures every complete head.
MAX_HEAD_BYTES: Final = 64 * 1024
CLOSE_TIMEOUT: Final = 2.0

CLIENT: Final = "client"
UPSTREAM: Final = "upstream"


class PeerError(Exception):
    """``side`` ("client" or "upstream") failed; ``reason`` is a stable code.

    ``closed`` is True when the peer simply went away (EOF or reset), which for a reused
    upstream connection means it may be retried.
    """

    def __init__(
        self, side: str, reason: str, *, closed: bool = False, status_hint: int = 0
    ) -> None:
        super().__init__(f"{side}: {reason}")
        self.side = side
        self.reason = reason
        self.closed = closed
        self.status_hint = status_hint


class Peer:
    def __init__(
        self,
        side: str,
        role: type[h11.CLIENT] | type[h11.SERVER],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        idle: float,
    ) -> None:
        self.side = side
        self.conn = h11.Connection(role, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.reader = reader
        self.writer = writer
        self.idle = idle
        self.bytes_in = 0
        self.bytes_out = 0
        self.cycle_bytes_in = 0  # since the last start_next_cycle()
        self.eof = False
        self._head_start = 0  # bytes h11 had consumed when the next head began

    def start_next_cycle(self) -> None:
        self.conn.start_next_cycle()
        self.cycle_bytes_in = 0
        self._head_start = self._consumed()

    def _consumed(self) -> int:
        """Bytes fed to h11 that it has parsed (every byte read is fed to it)."""
        return self.bytes_in - len(self.conn.trailing_data[0])

    def check_head(self, event: object) -> None:
        """Refuse a complete head over :data:`MAX_HEAD_BYTES` (a 1xx response counts too)."""
        if isinstance(event, h11.Request | h11.InformationalResponse | h11.Response):
            consumed = self._consumed()
            size, self._head_start = consumed - self._head_start, consumed
            if size > MAX_HEAD_BYTES:
                raise self._error("head-too-large", status_hint=431)

    @property
    def idle_and_open(self) -> bool:
        """Ready for another request: both sides IDLE, the stream not closed by the peer, and
        nothing unasked-for arrived while it idled (a body sent late for a HEAD, a stray
        response): those bytes would be read as the next request's response."""
        return (
            self.conn.our_state is h11.IDLE
            and self.conn.their_state is h11.IDLE
            and not self.eof
            and not self.reader.at_eof()
            and not read_ahead(self.reader)
            and not self.writer.transport.is_closing()
        )

    @property
    def cycle_complete(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    def _error(self, reason: str, *, closed: bool = False, status_hint: int = 0) -> PeerError:
        return PeerError(self.side, f"{self.side}-{reason}", closed=closed, status_hint=status_hint)

    async def read(
        self, wait: float | None = None, *, patient: Callable[[], bool] | None = None
    ) -> bytes:
        """Raw bytes (b"" at EOF) within ``wait`` seconds (default: idle); callers feed ``conn``.

        When the wait runs out and ``patient()`` is true (the exchange is still moving in the
        other direction, under deadlines of its own), wait another period instead of failing.
        """
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle if wait is None else wait):
                        data = await self.reader.read(READ_SIZE)
                    break
                except TimeoutError:
                    if patient is None or not patient():
                        raise
        except TimeoutError:
            raise self._error("timeout") from None
        except (ConnectionError, ssl.SSLError, OSError):
            self.eof = True
            raise self._error("closed", closed=True) from None
        if not data:
            self.eof = True
        self.bytes_in += len(data)
        self.cycle_bytes_in += len(data)
        return data

    async def next_event(
        self, *, patient: Callable[[], bool] | None = None
    ) -> h11.Event | type[h11.PAUSED]:
        """The next h11 event, reading as needed (each read within the idle timeout, extended
        while ``patient()`` is true: see :meth:`read`)."""
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self.eof:
                    raise self._error("closed", closed=True) from None
                raise self._error("protocol-error", status_hint=exc.error_status_hint) from None
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.read(patient=patient))
                continue
            self.check_head(event)
            return event  # type: ignore[return-value]

    async def send(self, event: h11.Event) -> None:
        try:
            data = self.conn.send(event)
        except h11.LocalProtocolError:
            raise self._error("local-protocol-error") from None
        if not data:
            return
        try:
            self.writer.write(data)
            async with asyncio.timeout(self.idle):
                await self.writer.drain()
        except TimeoutError:
            raise self._error("timeout") from None
        except (ConnectionError, ssl.SSLError, OSError, RuntimeError):
            # RuntimeError: asyncio refuses writes to a transport that is closing.
            self.eof = True
            raise self._error("closed", closed=True) from None
        self.bytes_out += len(data)

    async def aclose(self) -> None:
        """Close gracefully (TLS close_notify) within CLOSE_TIMEOUT, then abort."""
        writer = self.writer
        writer.close()
        try:
            await asyncio.shield(asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT))
        except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
            writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
            raise


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.shield(asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT))
    if not writer.transport.is_closing():
        writer.transport.abort()
