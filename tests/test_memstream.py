"""The in-memory stream pair: data both ways, backpressure, EOF, close and abort."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from conftest import TLSFiles

from upstreamproxy.memstream import stream_pair


async def test_bytes_flow_both_ways_in_order() -> None:
    (ra, wa), (rb, wb) = stream_pair()
    wa.write(b"hello ")
    wa.write(b"world")
    await wa.drain()
    assert await rb.readexactly(11) == b"hello world"
    wb.write(b"back")
    assert await ra.readexactly(4) == b"back"


async def test_a_reader_that_does_not_read_pushes_back() -> None:
    (_, wa), (rb, _) = stream_pair(limit=1024)
    wa.write(b"x" * 10_000)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(wa.drain(), 0.2)  # nobody reads: the writer waits
    wa.write(b"x" * 10_000)  # held by the writer's end while the reader is paused
    assert wa.transport.get_write_buffer_size() == 10_000
    assert len(await rb.readexactly(20_000)) == 20_000  # reading releases it
    await asyncio.wait_for(wa.drain(), 1)


async def test_eof_and_close_arrive_after_the_data() -> None:
    (_, wa), (rb, wb) = stream_pair(limit=1024)
    wa.write(b"y" * 5000)
    wa.close()  # the peer is still paused: close flushes first, like a socket
    assert await asyncio.wait_for(rb.read(), 1) == b"y" * 5000
    await asyncio.wait_for(wa.wait_closed(), 1)
    with pytest.raises(ConnectionError):
        wb.write(b"z")
        await wb.drain()


async def test_abort_drops_pending_data_and_ends_both() -> None:
    (ra, wa), (rb, _) = stream_pair(limit=1024)
    wa.write(b"q" * 5000)  # delivered; the reader is now over its limit and paused
    wa.write(b"r" * 5000)  # held by the writer's end
    wa.transport.abort()
    data = await asyncio.wait_for(rb.read(), 1)
    assert data == b"q" * 5000  # what was delivered stays; what was held is dropped
    assert wa.transport.is_closing()
    assert await asyncio.wait_for(ra.read(), 1) == b""


async def test_tls_runs_over_the_pair(tls: TLSFiles) -> None:
    # How the egress hands an intercepted tunnel to the interception engine: the engine's
    # TLS server (loop.start_tls) on one end, the tunnel's bytes on the other.
    (ra, wa), (_, wb) = stream_pair()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)

    async def server() -> None:
        transport = await loop.start_tls(
            wb.transport,
            protocol,
            tls.server_context(),
            server_side=True,  # type: ignore[arg-type]
        )
        assert transport is not None
        protocol.connection_made(transport)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        writer.write((await reader.readexactly(5)).upper() * 50_000)
        await writer.drain()
        writer.close()

    served = asyncio.ensure_future(server())
    await wa.start_tls(tls.client_context(), server_hostname="localhost")
    wa.write(b"hello")
    assert await asyncio.wait_for(ra.read(), 10) == b"HELLO" * 50_000
    await served


async def test_bytes_written_while_paused_wait_for_the_next_protocol() -> None:
    """What the egress relies on for interception: bytes that arrive before the engine's
    start_tls() stay in the transport (peekable) and go to the protocol that resumes it."""
    (_, outer), (inner_reader, inner) = stream_pair()
    transport = inner.transport
    transport.pause_reading()
    outer.write(b"hello, pipelined")
    await asyncio.sleep(0)
    assert transport.peek_incoming() == (b"hello, pipelined", False)  # type: ignore[attr-defined]
    assert inner_reader._buffer == b""  # type: ignore[attr-defined]  # nothing went astray

    got = bytearray()

    class Taker(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            got.extend(data)

    transport.set_protocol(Taker())
    transport.resume_reading()
    await asyncio.sleep(0.01)
    assert bytes(got) == b"hello, pipelined"


async def test_a_failed_tls_handshake_over_the_pair_fails_at_once(tls: TLSFiles) -> None:
    # Regression: asyncio's TLS layer ends a connection on a fatal error with the transport's
    # _force_close(); the pair had none, so a failed handshake raised AttributeError inside
    # the TLS layer and start_tls() only returned at its handshake timeout.
    (_, wa), (_, wb) = stream_pair()
    loop = asyncio.get_running_loop()
    protocol = asyncio.StreamReaderProtocol(asyncio.StreamReader())
    wb.transport.pause_reading()  # as the egress hands it over: held for the TLS layer
    handshake = asyncio.ensure_future(
        loop.start_tls(
            wb.transport,
            protocol,
            tls.server_context(),
            server_side=True,
            ssl_handshake_timeout=10,  # type: ignore[arg-type]
        )
    )
    wa.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")  # not a ClientHello
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.wait_for(handshake, 2)
    assert wb.transport.is_closing()
