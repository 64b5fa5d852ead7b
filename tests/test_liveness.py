"""Liveness and write deadlines with the real relay and egress in-process: a frozen peer,
a peer that never reads, a client that leaves while its reads are paused, a relay stopping."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import select
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import WSMsgType, web
from conftest import SESSION, TOKEN, _serve, connect_via, loopback_policy, raw_request

from upstreamproxy.codec import decode_chunk, encode_chunk
from upstreamproxy.connect_head import build_status_head, build_tunnel_request, parse_target
from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.egress.tunnel import TunnelTimeouts
from upstreamproxy.errors import ConfigError
from upstreamproxy.relay import Relay, RelayConfig
from upstreamproxy.secret import Secret

FAST = {"ping_interval": 0.3, "ping_timeout": 0.5}


def make_relay(url: str, **kwargs: object) -> Relay:
    return Relay(
        RelayConfig(egress_url=url, session_id=SESSION, token=Secret(TOKEN), **kwargs)  # type: ignore[arg-type]
    )


def egress_server(timeouts: TunnelTimeouts | None = None) -> EgressServer:
    return EgressServer(
        EgressConfig(timeouts=timeouts or TunnelTimeouts()),
        StaticTokens({TOKEN: Session(SESSION)}),
        loopback_policy(),
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def fds_back_to(baseline: int, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while open_fds() > baseline:
            await asyncio.sleep(0.05)


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def stand_in(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> tuple[web.AppRunner, str]:
    """A stand-in egress (named so): a WebSocket server that misbehaves on purpose."""
    app = web.Application()
    app.router.add_get("/ws", handler)
    runner, port = await _serve(app, None)
    return runner, f"ws://127.0.0.1:{port}/ws"


def frozen_egress(
    answer: bool, release: asyncio.Event
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Upgrades, maybe answers 200, then stops reading its socket and never answers a ping:
    what a SIGSTOPped egress or a path that drops packets looks like from the relay."""

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        message = await ws.receive()
        assert message.type is WSMsgType.BINARY
        if answer:
            await ws.send_bytes(encode_chunk(build_status_head(200)))
        assert request.transport is not None
        request.transport.pause_reading()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 30)
        request.transport.abort()  # no close handshake with a "frozen" socket
        return ws

    return handler


async def test_relay_closes_an_established_tunnel_whose_egress_froze() -> None:
    release = asyncio.Event()
    runner, url = await stand_in(frozen_egress(answer=True, release=release))
    try:
        async with make_relay(url, pool_size=0, **FAST) as relay:
            reader, writer, head = await connect_via(relay.port, "a.test:443")
            assert head.startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            await read_until_closed(reader)  # reset: the stream broke, it did not end
            assert time.monotonic() - started < 5  # 0.3 s + 0.5 s, with room for a busy CI
            writer.close()
            await until(lambda: relay.active_tunnels == 0)
    finally:
        release.set()
        await runner.cleanup()


async def test_relay_answers_504_when_the_egress_froze_before_answering() -> None:
    release = asyncio.Event()
    runner, url = await stand_in(frozen_egress(answer=False, release=release))
    try:
        async with make_relay(url, pool_size=0, establish_timeout=60, **FAST) as relay:
            started = time.monotonic()
            answer = await raw_request(relay.port, b"CONNECT a.test:443 HTTP/1.1\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 504"), answer
            assert b"egress-unresponsive" in answer
            assert time.monotonic() - started < 5
    finally:
        release.set()
        await runner.cleanup()


async def test_egress_closes_a_tunnel_whose_relay_froze() -> None:
    from websockets.asyncio.client import connect

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    origin = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = origin.sockets[0].getsockname()[1]
    async with egress_server(TunnelTimeouts(ping_interval=0.3, ping_timeout=0.5)) as egress:
        baseline = open_fds()
        ws = await connect(egress.url, additional_headers={"Authorization": f"Bearer {TOKEN}"})
        await ws.send(
            encode_chunk(build_tunnel_request(parse_target(f"127.0.0.1:{port}"), SESSION, TOKEN))
        )
        assert decode_chunk(await ws.recv()).startswith(b"HTTP/1.1 200")  # type: ignore[arg-type]
        ws.transport.pause_reading()  # a frozen relay: nothing read, no pong
        started = time.monotonic()
        await until(lambda: not egress.active, timeout=10)
        assert time.monotonic() - started < 5
        ws.transport.abort()
        await fds_back_to(baseline)
    origin.close()


SIZE = 16 * 1024 * 1024

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def pinging_tunnel(
    origin_handler: StreamHandler,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A tunnel through a relay and an egress that both ping (FAST) to an origin served by
    ``origin_handler``: the client's stream."""
    origin = await asyncio.start_server(origin_handler, "127.0.0.1", 0)
    port = origin.sockets[0].getsockname()[1]
    try:
        async with (
            egress_server(TunnelTimeouts(**FAST)) as egress,
            make_relay(egress.url, pool_size=0, **FAST) as relay,
        ):
            reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{port}")
            assert head.startswith(b"HTTP/1.1 200")
            try:
                yield reader, writer
            finally:
                writer.close()
    finally:
        origin.close()


async def test_a_download_paused_longer_than_the_ping_timeout_completes() -> None:
    """A client that stops reading a download for longer than ping interval + timeout: the
    relay stops reading the WebSocket, so the egress's pong waits behind its data. That is
    not an unresponsive egress - the download resumes and completes (it was cut at ~1 s)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(hashlib.sha256(b"seed").digest() * (SIZE // 32))
        await writer.drain()
        writer.close()

    async with pinging_tunnel(serve) as (reader, writer):
        assert len(await reader.readexactly(65536)) == 65536
        writer.transport.pause_reading()
        await asyncio.sleep(3.0)  # six ping timeouts
        writer.transport.resume_reading()
        rest = await asyncio.wait_for(reader.read(), 30)
        assert 65536 + len(rest) == SIZE


async def test_an_upload_paused_by_the_origin_longer_than_the_ping_timeout_completes() -> None:
    """The same on the egress: an origin that stops reading an upload pauses the egress's
    WebSocket reads; the relay's pong waits behind the upload, and the relay is not dead."""
    got = asyncio.get_running_loop().create_future()

    async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3.0)  # six ping timeouts, with the upload queued
        total = 0
        while chunk := await reader.read(1 << 20):
            total += len(chunk)
        got.set_result(total)
        writer.close()

    async with pinging_tunnel(slow_reader) as (_, writer):
        writer.write(b"u" * SIZE)
        writer.write_eof()
        assert await asyncio.wait_for(got, 30) == SIZE


@pytest.fixture
async def deaf_origin() -> AsyncIterator[tuple[int, list[socket.socket]]]:
    """Accepts and never reads: its receive buffer fills and it stops accepting bytes."""
    accepted: list[socket.socket] = []
    keep: list[asyncio.StreamWriter] = []

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.pause_reading()
        accepted.append(writer.get_extra_info("socket"))
        keep.append(writer)

    server = await asyncio.start_server(deaf, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], accepted
    for writer in keep:
        writer.transport.abort()
    server.close()


async def read_until_closed(reader: asyncio.StreamReader) -> None:
    """Read until EOF or a reset, bounded."""
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(65536), 10):
            pass


def peer_gone(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


async def fill_until_blocked(writer: asyncio.StreamWriter) -> int:
    """Write until the tunnel stops taking bytes for a second; returns what was written."""
    sent = 0
    block = b"u" * 65536
    while True:
        try:
            writer.write(block)
            sent += len(block)
            await asyncio.wait_for(writer.drain(), 1.0)
        except (TimeoutError, ConnectionError):
            return sent
        assert sent < 512 * 1024 * 1024, "the tunnel never pushed back"


async def test_client_leaving_while_paused_releases_the_origin_socket(
    deaf_origin: tuple[int, list[socket.socket]],
) -> None:
    port, accepted = deaf_origin
    # Default write deadline (60 s): what ends this is noticing the client left, not a timer.
    async with egress_server() as egress, make_relay(egress.url, pool_size=0) as relay:
        baseline = open_fds()
        _, writer, head = await connect_via(relay.port, f"127.0.0.1:{port}")
        assert head.startswith(b"HTTP/1.1 200")
        await fill_until_blocked(writer)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # the client leaves with its upload unsent
        started = time.monotonic()
        await until(lambda: bool(accepted) and peer_gone(accepted[0]), timeout=15)
        await until(lambda: relay.active_tunnels == 0 and not egress.active, timeout=15)
        assert time.monotonic() - started < 10
        # the origin's end still exists in this test; everything else is released
        await fds_back_to(baseline + 1)


async def test_write_stall_ends_a_tunnel_whose_origin_never_reads(
    deaf_origin: tuple[int, list[socket.socket]],
) -> None:
    port, accepted = deaf_origin
    async with (
        egress_server(TunnelTimeouts(write_stall=1.0)) as egress,
        make_relay(egress.url, pool_size=0, write_stall_timeout=1.0) as relay,
    ):
        reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{port}")
        assert head.startswith(b"HTTP/1.1 200")
        await fill_until_blocked(writer)  # the client stays, still trying to upload
        started = time.monotonic()
        await until(lambda: bool(accepted) and peer_gone(accepted[0]), timeout=15)
        await read_until_closed(reader)
        assert time.monotonic() - started < 10
        writer.transport.abort()


async def test_stopping_the_relay_logs_no_cancelled_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    origin = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = origin.sockets[0].getsockname()[1]
    caplog.set_level(logging.DEBUG)
    async with egress_server() as egress:
        relay = make_relay(egress.url)
        await relay.start()
        tunnels = [await connect_via(relay.port, f"127.0.0.1:{port}") for _ in range(3)]
        assert all(head.startswith(b"HTTP/1.1 200") for _, _, head in tunnels)
        await relay.stop()
        for reader, writer, _ in tunnels:
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        await asyncio.sleep(0.1)
    origin.close()
    assert "CancelledError" not in caplog.text
    assert "Traceback" not in caplog.text
    assert "relay-stopping" in caplog.text


def test_relay_refuses_an_egress_proxy_it_cannot_use() -> None:
    with pytest.raises(ConfigError) as info:
        make_relay("ws://127.0.0.1:1/ws", egress_proxy="garbage://proxy")
    assert info.value.field == "egress_proxy"


async def test_malformed_egress_proxy_gives_clients_a_502() -> None:
    async with make_relay("ws://127.0.0.1:1/ws", egress_proxy="http://[::1", pool_size=0) as relay:
        answer = await raw_request(relay.port, b"CONNECT a.test:443 HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 502"), answer
    assert b"cannot reach the egress" in answer
