"""The tunnel's socket links (upstreamproxy/tunnel/links.py) over real loopback sockets.

What the data path promises beyond carrying bytes: the egress sends a chunk as one write with
its headers in front of the data it read; the relay writes the pieces of one read with one
``writev``; reads land in one shared buffer, and a read that happens while another is being
handled (an in-memory transport delivers synchronously) gets its own.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator

import pytest

from upstreamproxy.codec import encode_chunk
from upstreamproxy.tunnel import links
from upstreamproxy.tunnel.links import READ_AT, LocalLink, WsLink
from upstreamproxy.tunnel.wsframes import Event, FrameReader, Ping


class Pair:
    """A connected loopback TCP pair: an asyncio transport on ``ours``, a plain socket."""

    def __init__(self, transport: asyncio.Transport, theirs: socket.socket) -> None:
        self.transport = transport
        self.theirs = theirs

    async def read_exactly(self, size: int) -> bytes:
        loop = asyncio.get_running_loop()
        data = b""
        while len(data) < size:
            piece = await asyncio.wait_for(loop.sock_recv(self.theirs, size - len(data)), 10)
            assert piece, "the other end closed"
            data += piece
        return data


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    connecting = loop.create_task(
        loop.create_connection(asyncio.Protocol, "127.0.0.1", listener.getsockname()[1])
    )
    theirs, _ = await loop.sock_accept(listener)
    theirs.setblocking(False)
    transport, _ = await connecting
    listener.close()
    yield Pair(transport, theirs)
    transport.abort()
    theirs.close()


class Owner:
    """Collects what a WebSocket link reports (the tunnel driver's role)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.views_of: list[object] = []
        self.lost = False

    def ws_events(self, link: WsLink, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, memoryview):
                self.views_of.append(event.obj)
                self.events.append(bytes(event))
            else:
                self.events.append(event)

    def ws_writable(self, link: WsLink) -> None:
        pass

    def ws_lost(self, link: WsLink) -> None:
        self.lost = True


async def test_the_egress_sends_a_chunk_as_one_write_with_its_headers_in_front(
    pair: Pair,
) -> None:
    pair.transport.pause_reading()
    link = WsLink.attach(pair.transport, client=False)
    writes: list[int] = []
    real_write = pair.transport.write

    def counting_write(data: bytes | memoryview) -> None:  # the real transport, observed
        writes.append(len(data))
        real_write(data)

    pair.transport.write = counting_write  # type: ignore[method-assign]
    payload = os.urandom(100_000)
    room = memoryview(bytearray(READ_AT + len(payload)))
    room[READ_AT:] = payload
    link.send_data(room[READ_AT:], room)
    assert len(writes) == 1
    wire = await pair.read_exactly(writes[0])
    reader = FrameReader(masked=False)
    assert b"".join(bytes(e) for e in reader.feed(wire)) == payload  # type: ignore[arg-type]


async def test_the_relay_masks_what_it_sends(pair: Pair) -> None:
    pair.transport.pause_reading()
    link = WsLink.attach(pair.transport, client=True)
    link.send_data(b"hello egress")
    link.send_message(encode_chunk(b""))
    wire = await pair.read_exactly(2 + 4 + 14 + 2 + 4 + 2)
    assert wire[1] & 0x80  # masked
    events = FrameReader(masked=True).feed(wire)
    assert [bytes(e) for e in events] == [b"hello egress", b""]  # type: ignore[arg-type]


async def test_unmasked_payloads_reach_the_owner_as_views_of_the_shared_buffer(
    pair: Pair,
) -> None:
    pair.transport.pause_reading()
    link = WsLink.attach(pair.transport, client=True)
    owner = Owner()
    link.set_owner(owner)
    link.read_size = 64 * 1024
    frames = b"".join(
        bytes((0x82, 126)) + (len(m)).to_bytes(2, "big") + m
        for m in (encode_chunk(b"a" * 1000), encode_chunk(b"b" * 2000))
    )
    pair.theirs.sendall(frames + bytes((0x89, 1)) + b"p")
    async with asyncio.timeout(10):
        while len(owner.events) < 3:
            await asyncio.sleep(0.01)
    assert b"".join(e for e in owner.events if isinstance(e, bytes)) == b"a" * 1000 + b"b" * 2000
    assert Ping(b"p") in owner.events
    assert owner.views_of and all(obj is links._shared_view.obj for obj in owner.views_of)
    # The link answered the ping itself, masked (it is the client end).
    pong = await pair.read_exactly(2 + 4 + 1)
    assert pong[0] == 0x8A and pong[1] == 0x81


async def test_a_batch_of_pieces_leaves_in_one_writev(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_writev = os.writev

    def counting_writev(fd: int, buffers: list[bytes | memoryview]) -> int:
        calls.append(len(buffers))
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", counting_writev)
    reader, writer = await _streams_over(pair.transport)

    class Sink:
        def local_data(self, data: memoryview) -> None:
            pass

        def local_eof(self) -> None:
            pass

        def local_writable(self) -> None:
            pass

    link = LocalLink(Sink())
    assert link.take(reader, writer) == b""
    pieces = [b"one-", memoryview(b"xxtwo-xx")[2:6], b"three"]
    link.begin_batch()
    for piece in pieces:
        link.write(piece)
    assert not calls  # nothing left before the batch ended
    link.end_batch()
    assert calls == [3]
    assert await pair.read_exactly(13) == b"one-two-three"


async def _streams_over(
    transport: asyncio.Transport,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def test_a_read_during_another_gets_its_own_buffer() -> None:
    first = links._read_buffer(1024)
    assert first is links._shared_view
    with links._Handling():
        nested = links._read_buffer(1024)
        assert nested.obj is not links._shared_view.obj
        with links._Handling():
            assert links._read_buffer(10).obj is not links._shared_view.obj
    assert links._read_buffer(10) is links._shared_view  # free again afterwards
