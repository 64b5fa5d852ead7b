"""Tunnel links (``tunnel/links.py``) on real sockets: an abort cancels a close deadline; a
lingering close ends when the peer is done, or a grace after all was delivered."""

from __future__ import annotations

import asyncio
import contextlib

from upstreamproxy.tunnel.links import LocalLink, Parked


class QuietOwner:
    """Stands in for the tunnel driver: ignores what the link reports."""

    def local_data(self, data: memoryview) -> None:
        pass

    def local_eof(self) -> None:
        pass

    def local_writable(self) -> None:
        pass


async def test_abort_during_a_graceful_close_cancels_its_deadline() -> None:
    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

    def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(writer)

    server = await asyncio.start_server(keep, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(Parked, "127.0.0.1", port)
    peer = await asyncio.wait_for(accepted, 5)
    link = LocalLink(QuietOwner())
    link.take_transport(transport)
    transport.pause_reading()
    link.write(b"x" * (8 << 20))  # more than the kernel takes: the close must wait to flush
    link.close_gracefully()
    deadline = link._close_timer
    assert deadline is not None and not link.lost
    link.abort()  # the tunnel gives up first
    assert deadline.cancelled()  # no reset left to fire a second later for a gone socket
    await asyncio.sleep(0.05)
    assert link.lost
    link.abort()  # again, once lost: nothing to do, no error
    peer.close()
    server.close()


async def _linking_pair() -> tuple[LocalLink, asyncio.StreamWriter, asyncio.StreamReader]:
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
    accepted = asyncio.get_running_loop().create_future()

    def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    server = await asyncio.start_server(keep, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await asyncio.get_running_loop().create_connection(Parked, "127.0.0.1", port)
    peer_reader, peer_writer = await asyncio.wait_for(accepted, 5)
    server.close()
    link = LocalLink(QuietOwner())
    link.take_transport(transport)
    return link, peer_writer, peer_reader


async def test_a_lingering_link_lets_go_of_a_peer_that_keeps_sending() -> None:
    """Everything of ours was delivered and the peer streams on (a response nobody wants):
    lingering ends a grace later, not after the whole (here 30 s) patience of reading and
    dropping."""
    link, peer, peer_reader = await _linking_pair()
    sent = [0]

    async def stream() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                peer.write(b"s" * 65536)
                await peer.drain()
                sent[0] += 65536

    streaming = asyncio.create_task(stream())
    try:
        await asyncio.sleep(0.1)
        link.linger(30.0)
        assert link.lingering
        async with asyncio.timeout(5):
            assert await peer_reader.read() == b""  # our FIN
            while not link.lost:
                await asyncio.sleep(0.05)
        at = sent[0]
        await asyncio.sleep(0.3)
        assert sent[0] == at  # nobody reads the stream any more
    finally:
        streaming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await streaming
        peer.transport.abort()


async def test_a_lingering_link_closes_at_once_when_the_peer_closes_too() -> None:
    link, peer, peer_reader = await _linking_pair()
    link.write(b"tail" * 1000)
    link.linger(30.0)
    async with asyncio.timeout(5):
        assert await peer_reader.read() == b"tail" * 1000  # all of it, then our FIN
        peer.close()  # the peer is done too
        while not link.lost:
            await asyncio.sleep(0.01)
    assert not link.lingering
