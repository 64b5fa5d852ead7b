"""Connections made transports at once (``egress/transports.py``), and the dialled upstream
taken over by the tunnel's link without a stream layer (``LocalLink.take_transport``).

Both paths are exercised: the direct one (asyncio's selector loop) and the public-coroutine
fallback a loop without a direct way takes (forced here by making ``socket_transport`` answer
None, as such a loop would).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from conftest import connect_via

from upstreamproxy.egress import listener, transports
from upstreamproxy.egress.transports import parked_transport
from upstreamproxy.relay import Relay
from upstreamproxy.tunnel.links import LocalLink, Parked


class RecordingOwner:
    """Stands in for the tunnel driver (the link's owner): records what the link reports."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = asyncio.get_running_loop().create_future()

    def local_data(self, data: memoryview) -> None:
        self.data += data

    def local_eof(self) -> None:
        if not self.eof.done():
            self.eof.set_result(None)

    def local_writable(self) -> None:
        pass


@pytest.fixture(params=["direct", "fallback"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Which way connections become transports; counts the fallback's uses."""
    used = [0]
    if request.param == "fallback":

        def no_direct_way(sock: socket.socket, protocol: asyncio.BaseProtocol) -> None:
            used[0] += 1
            return None

        monkeypatch.setattr(transports, "socket_transport", no_direct_way)
        monkeypatch.setattr(listener, "socket_transport", no_direct_way)
    return used


@pytest.fixture
async def banner_origin() -> AsyncIterator[int]:
    """Speaks first (an SSH or SMTP banner), then hangs up without reading."""

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 banner\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def dial(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def test_bytes_and_eof_before_the_takeover_are_kept(
    path: list[int], banner_origin: int
) -> None:
    transport = await parked_transport(await dial(banner_origin))
    assert isinstance(transport.get_protocol(), Parked)
    await asyncio.sleep(0.2)  # the banner and the origin's FIN arrive before anyone takes over
    owner = RecordingOwner()
    link = LocalLink(owner)
    # Either way the transport reads as soon as it is connected: the parked protocol kept
    # what came, and the link starts from it.
    assert link.take_transport(transport) == b"220 banner\r\n"
    assert link.eof and not owner.data
    link.abort()


async def test_a_tunnel_works_either_way(path: list[int], relay: Relay, banner_origin: int) -> None:
    reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{banner_origin}")
    try:
        assert head.startswith(b"HTTP/1.1 200")
        # The origin spoke first and left: the client gets the banner, then the end.
        assert await asyncio.wait_for(reader.read(), 10) == b"220 banner\r\n"
    finally:
        writer.close()
    if path[0] == 0:
        return
    assert path[0] >= 1  # the fallback really ran (the dial; the relay's pool may predate it)


async def test_a_closed_socket_fails_cleanly(path: list[int]) -> None:
    sock = socket.socket()
    sock.close()
    with pytest.raises(OSError):
        await parked_transport(sock)
