"""The relay refuses tunnels it has no descriptors for at once (503), not with a late 502."""

from __future__ import annotations

import asyncio
import resource
import socket

import pytest

from upstreamproxy import fdlimit
from upstreamproxy.relay import Relay


def test_budget_is_half_the_descriptors_after_the_reserve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 4096))
    assert fdlimit.tunnel_budget() == (1024 - fdlimit.FD_RESERVE) // 2
    monkeypatch.setattr(resource, "getrlimit", lambda _: (70, 4096))
    assert fdlimit.tunnel_budget() == 16  # never below a usable floor
    infinity = resource.RLIM_INFINITY
    monkeypatch.setattr(resource, "getrlimit", lambda _: (infinity, infinity))
    assert fdlimit.tunnel_budget() > 100_000


async def test_over_budget_clients_get_503_and_the_rest_still_work(relay: Relay) -> None:
    relay._budget = 3  # as if the soft limit left room for three tunnels
    held = []
    for _ in range(3):  # three clients that have not sent their head yet hold the budget
        held.append(await asyncio.open_connection("127.0.0.1", relay.port))
    await asyncio.sleep(0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b"too-many-tunnels (file descriptor limit)" in answer
    writer.close()
    for _, held_writer in held:
        held_writer.close()
    deadline = asyncio.get_running_loop().time() + 10
    while relay.active_tunnels and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert relay.active_tunnels == 0


async def test_a_client_socket_still_closing_holds_its_place_in_the_budget(relay: Relay) -> None:
    """A tunnel that ended cleanly keeps its client's socket open while the tail of the
    download still goes out (a slow reader; see ``LocalLink.linger``). That descriptor is in
    use until the socket is closed: the budget counts it until then, or slow readers let the
    relay accept past its budget into EMFILE."""
    relay._budget = 1

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"d" * (1024 * 1024))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(origin, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: a slow reader
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", relay.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    try:
        writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(
            b"HTTP/1.1 200"
        )
        received = 0
        async with asyncio.timeout(20):
            while relay.active_tunnels:  # read slowly until the tunnel has ended
                received += len(await reader.read(8192))
                await asyncio.sleep(0.01)
        assert received < 1024 * 1024  # the tail is still on its way: the socket is open
        other_reader, other_writer = await asyncio.open_connection("127.0.0.1", relay.port)
        other_writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        answer = await asyncio.wait_for(other_reader.readuntil(b"\r\n\r\n"), 5)
        other_writer.close()
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        async with asyncio.timeout(20):  # the rest is taken: the socket closes, room again
            while await reader.read(65536):
                pass
            writer.close()
            while relay._closing:
                await asyncio.sleep(0.02)
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", relay.port)
        writer2.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        head = await asyncio.wait_for(reader2.readuntil(b"\r\n\r\n"), 10)
        writer2.close()
        assert head.startswith(b"HTTP/1.1 200"), head
    finally:
        writer.close()
        server.close()
