"""The relay accepts clients straight into their tunnel's link: no task, no stream pair."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from conftest import connect_via

from upstreamproxy.relay import Relay

RELAY_TASKS = ("Relay.", "RelayTunnel.", "StreamServer.", "TunnelDriver._open")


def relay_tasks() -> list[asyncio.Task[object]]:
    """Tasks running relay code (the egress in this process has its own)."""
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "").startswith(RELAY_TASKS)
    ]


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def test_established_tunnels_hold_no_task(relay: Relay, echo_port: int) -> None:
    tunnels = [await connect_via(relay.port, f"127.0.0.1:{echo_port}") for _ in range(3)]
    for reader, writer, head in tunnels:
        assert head.startswith(b"HTTP/1.1 200"), head
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    assert relay.active_tunnels == 3
    assert relay_tasks() == []
    for _, writer, _ in tunnels:
        writer.close()
    async with asyncio.timeout(10):
        while relay.active_tunnels:
            await asyncio.sleep(0.02)


async def test_stop_closes_clients_that_sent_nothing_yet(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="upstreamproxy.relay")
    clients = [await asyncio.open_connection("127.0.0.1", relay.port) for _ in range(3)]
    async with asyncio.timeout(10):
        while relay.active_tunnels < 3:
            await asyncio.sleep(0.02)
    await relay.stop()
    for reader, writer in clients:
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert relay.active_tunnels == 0
    assert caplog.text.count("closed: relay-stopping") == 3
    assert "Traceback" not in caplog.text


async def test_a_head_split_across_reads_and_eof_in_the_same_breath(relay: Relay) -> None:
    """The first bytes and the client's FIN may come before the link is the transport's
    protocol: both still reach the core (here: an incomplete head, then end of stream)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n")
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer
    async with asyncio.timeout(10):
        while relay.active_tunnels:
            await asyncio.sleep(0.02)


async def test_a_loop_without_the_transport_factory_takes_asyncios_way(
    relay: Relay, echo_port: int
) -> None:
    relay._fast_accept = False  # as on an event loop that is not asyncio's selector loop
    reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{echo_port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    writer.close()
    async with asyncio.timeout(10):
        while relay.active_tunnels:
            await asyncio.sleep(0.02)
