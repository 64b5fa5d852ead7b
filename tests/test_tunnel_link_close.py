"""Tunnel links (``tunnel/links.py``) on real sockets: an abort cancels a close deadline."""

from __future__ import annotations

import asyncio

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
