"""The relay refuses tunnels it has no descriptors for at once (503), not with a late 502."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket

import pytest

from upstreamproxy import fdlimit
from upstreamproxy.relay import EVICT_AFTER, Relay


def test_budget_is_half_the_descriptors_after_the_reserve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 4096))
    assert fdlimit.tunnel_budget() == (1024 - fdlimit.FD_RESERVE) // 2
    monkeypatch.setattr(resource, "getrlimit", lambda _: (70, 4096))
    assert fdlimit.tunnel_budget() == 16  # never below a usable floor
    infinity = resource.RLIM_INFINITY
    monkeypatch.setattr(resource, "getrlimit", lambda _: (infinity, infinity))
    assert fdlimit.tunnel_budget() > 100_000


async def open_tunnel(relay: Relay, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def until_no_tunnels(relay: Relay) -> None:
    async with asyncio.timeout(10):
        while relay.active_tunnels:
            await asyncio.sleep(0.05)


async def test_over_budget_clients_get_503_when_every_tunnel_is_in_use(
    relay: Relay, echo_port: int
) -> None:
    relay._budget = 3  # as if the soft limit left room for three tunnels
    held = [await open_tunnel(relay, echo_port) for _ in range(3)]
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b"too-many-tunnels (file descriptor limit)" in answer
    writer.close()
    for held_reader, held_writer in held:  # the tunnels in use were not touched
        held_writer.write(b"still here")
        assert await asyncio.wait_for(held_reader.readexactly(10), 5) == b"still here"
        held_writer.close()
    await until_no_tunnels(relay)


async def test_over_budget_the_longest_silent_client_makes_room(
    relay: Relay, echo_port: int
) -> None:
    """Connections that never send a head (a process holding them open, or a tool that
    stalled) would otherwise lock every other tool out of the relay for the head timeout:
    over budget, the one that has waited longest without a head is dropped instead."""
    relay._budget = 3
    silent = []
    for _ in range(3):
        silent.append(await asyncio.open_connection("127.0.0.1", relay.port))
        await asyncio.sleep(0.05)  # (an order: the first is the oldest)
    # Younger than EVICT_AFTER they may be a burst whose heads are on their way: 503.
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 503 ")
    writer.close()
    await asyncio.sleep(EVICT_AFTER)
    reader, writer = await open_tunnel(relay, echo_port)  # not 503: the oldest made room
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(silent[0][0].read(), 5) == b""  # dropped (reset)
    for other_reader, _ in silent[1:]:
        with pytest.raises(TimeoutError):  # still waiting for their heads
            await asyncio.wait_for(other_reader.read(1), 0.2)
    writer.close()
    for _, silent_writer in silent:
        silent_writer.close()
    await until_no_tunnels(relay)


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
