"""The relay's native WebSocket client handshake (:mod:`upstreamproxy.relay_handshake`).

Against the real egress (in-process, on loopback, ws:// and wss:// with the tests' trustme
CA), a real squid for the proxy path, and small named stand-ins for the misbehaving peers
(a server that never answers, one that answers garbage, a wrong key, 200, a cut head, a
refusing proxy). After a success the socket is proven to be a working WebSocket by sending
a masked binary frame with a CONNECT chunk and reading the egress's ``200`` back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shutil
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from conftest import SESSION, TOKEN, TLSFiles, loopback_policy
from test_egress_proxy import Squid

from upstreamproxy.codec import decode_chunk, encode_chunk
from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.limits import LimitConfig
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.relay_handshake import (
    USER_AGENT,
    Upgraded,
    open_upgraded,
    open_upgraded_retrying,
)
from upstreamproxy.relay_link import LinkConfig
from upstreamproxy.secret import Secret
from upstreamproxy.tunnel.driver import OpenFailed
from upstreamproxy.ws_handshake import accept_key

WS_PATH = "/v1/code/upstreamproxy/ws"


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def link(
    url: str,
    *,
    token: str = TOKEN,
    timeout: float = 10.0,
    proxy: str | None = None,
    tls: ssl.SSLContext | None = None,
) -> LinkConfig:
    return LinkConfig(url, Secret(token), timeout, proxy, tls)


async def settle_fds(baseline: int, within: float = 5.0) -> int:
    """The fd count once it is back to ``baseline`` (or whatever it is after ``within``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while fd_count() > baseline and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return fd_count()


# -- a minimal WebSocket frame writer/reader, enough to prove the socket works ---------------


def masked_binary(payload: bytes) -> bytes:
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x82, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x82, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x82, 0x80 | 127, size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def parse_frame(data: bytes) -> tuple[int, bytes, bytes] | None:
    """(opcode, payload, rest) of the first unmasked frame, or None if incomplete."""
    if len(data) < 2:
        return None
    opcode, size = data[0] & 0x0F, data[1] & 0x7F
    assert not data[1] & 0x80, "server frames are not masked"
    at = 2
    if size == 126:
        if len(data) < 4:
            return None
        (size,) = struct.unpack("!H", data[2:4])
        at = 4
    elif size == 127:
        if len(data) < 10:
            return None
        (size,) = struct.unpack("!Q", data[2:10])
        at = 10
    if len(data) < at + size:
        return None
    return opcode, data[at : at + size], data[at + size :]


class Collector(asyncio.Protocol):
    """The tunnel protocol's stand-in: takes the upgraded transport over and collects bytes."""

    def __init__(self, leftover: bytes) -> None:
        self.data = bytearray(leftover)
        self.changed = asyncio.Event()
        self.closed = False

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.changed.set()

    async def frame(self) -> tuple[int, bytes]:
        async with asyncio.timeout(10):
            while (parsed := parse_frame(bytes(self.data))) is None:
                assert not self.closed, bytes(self.data)
                self.changed.clear()
                await self.changed.wait()
        opcode, payload, rest = parsed
        self.data[:] = rest
        return opcode, payload


async def prove_websocket(up: Upgraded, origin_port: int, *, close: bool = True) -> None:
    """Send a CONNECT chunk to an allowed loopback origin; the egress answers 200 in a frame."""
    assert up.transport.is_reading() is False
    collector = Collector(up.leftover)
    up.transport.set_protocol(collector)
    up.transport.resume_reading()
    credentials = base64.b64encode(f"{SESSION}:{TOKEN}".encode()).decode()
    head = (
        f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\n"
        f"Proxy-Authorization: Basic {credentials}\r\n\r\n"
    ).encode()
    up.transport.write(masked_binary(encode_chunk(head)))
    while True:
        opcode, payload = await collector.frame()
        if opcode == 0x2:
            break
    answer = decode_chunk(payload)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    if close:
        up.transport.abort()


@pytest.fixture
async def origin() -> AsyncIterator[int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


def make_egress(
    tls: TLSFiles | None = None, host: str = "127.0.0.1", **limits: int
) -> EgressServer:
    config = EgressConfig(
        host=host,
        tls_cert_file=str(tls.cert_file) if tls else None,
        tls_key_file=str(tls.key_file) if tls else None,
        limits=LimitConfig(**limits),
    )
    return EgressServer(config, StaticTokens({TOKEN: Session(SESSION)}), loopback_policy())


@pytest.fixture
async def wss_egress(tls: TLSFiles) -> AsyncIterator[EgressServer]:
    server = make_egress(tls)
    await server.start()
    yield server
    await server.stop()


# -- success ----------------------------------------------------------------------------------


async def test_ws_upgrade_gives_a_working_websocket(egress: EgressServer, origin: int) -> None:
    up = await open_upgraded(link(egress.url))
    assert isinstance(up.transport, asyncio.Transport)
    assert up.leftover == b""
    assert not up.eof
    await prove_websocket(up, origin)


def spy_on_create_connection(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The running loop's create_connection, recording each call (the list it returns)."""
    loop = asyncio.get_running_loop()
    used: list[object] = []
    real = loop.create_connection

    async def spy(*args: object, **kwargs: object) -> object:
        used.append(args)
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "create_connection", spy)
    return used


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_plain_ip_egress_is_connected_without_create_connection(
    host: str, origin: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool's refill path: a plain ws:// egress at an IP literal gets a non-blocking
    connect and its transport at once (the upgrade waits in the transport's buffer), with
    TCP_NODELAY as create_connection would set it; a working WebSocket all the same."""
    server = make_egress(host=host)
    await server.start()
    used = spy_on_create_connection(monkeypatch)
    try:
        up = await open_upgraded(link(server.url))
        assert used == []
        sock = up.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        await prove_websocket(up, origin)
    finally:
        await server.stop()


async def test_egress_named_by_host_name_still_connects(
    egress: EgressServer, origin: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    used = spy_on_create_connection(monkeypatch)
    up = await open_upgraded(link(egress.url.replace("127.0.0.1", "localhost")))
    assert len(used) == 1  # a name is resolved the usual way
    await prove_websocket(up, origin)


async def test_refused_plain_connect_releases_the_socket() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    baseline = fd_count()
    for _ in range(20):
        with pytest.raises(OpenFailed) as info:
            await open_upgraded(link(f"ws://127.0.0.1:{port}/ws"))
        assert info.value.reason == "cannot reach the egress: ConnectionRefusedError"
    assert await settle_fds(baseline) <= baseline


async def test_wss_upgrade_gives_a_working_websocket(
    wss_egress: EgressServer, tls: TLSFiles, origin: int
) -> None:
    assert wss_egress.url.startswith("wss://")
    up = await open_upgraded(link(wss_egress.url, tls=tls.client_context()))
    assert up.transport.get_extra_info("ssl_object") is not None
    await prove_websocket(up, origin)


async def test_ipv6_literal_egress_over_wss(tls: TLSFiles, origin: int) -> None:
    server = make_egress(tls, host="::1")
    await server.start()
    try:
        assert server.url.startswith("wss://[::1]:")
        up = await open_upgraded(link(server.url, tls=tls.client_context()))
        assert up.transport.get_extra_info("peername")[0] == "::1"
        await prove_websocket(up, origin)
    finally:
        await server.stop()


async def test_wss_with_an_untrusted_certificate_is_a_502(wss_egress: EgressServer) -> None:
    baseline = fd_count()
    with pytest.raises(OpenFailed) as info:
        await open_upgraded(link(wss_egress.url, tls=ssl.create_default_context()))
    assert info.value.status == 502
    assert info.value.reason == "cannot reach the egress: SSLCertVerificationError"
    assert await settle_fds(baseline) <= baseline


async def test_preopened_upgrade_says_so(egress: EgressServer, origin: int) -> None:
    heads: list[bytes] = []

    async def spy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", egress.port)
        up_writer.write(heads[-1])

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(spy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        up = await open_upgraded(link(f"ws://127.0.0.1:{port}{WS_PATH}"), preopened=True)
        await prove_websocket(up, origin)
    finally:
        server.close()
    lines = heads[0].decode().split("\r\n")
    assert lines[0] == f"GET {WS_PATH} HTTP/1.1"
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    assert headers["Host"] == f"127.0.0.1:{port}"
    assert headers["Upgrade"] == "websocket"
    assert headers["Connection"] == "Upgrade"
    assert headers["Sec-WebSocket-Version"] == "13"
    assert len(base64.b64decode(headers["Sec-WebSocket-Key"])) == 16
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["Content-Type"] == "application/proto"
    assert headers["User-Agent"] == USER_AGENT
    assert headers["X-Upstreamproxy-Preopened"] == "1"


async def test_bytes_after_the_101_are_leftover_not_lost() -> None:
    """The egress's first frame can arrive in the same segment as its 101."""

    async def eager(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"sec-websocket-key:")]
        accept = accept_key(key[0].split(b":", 1)[1].strip().decode())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
            b"\x82\x02\x0a\x00" + b"\x82\x02\x0a\x00"
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"\x82\x02\x0a\x00")  # after the hand-over: reaches the new protocol
        await reader.read()

    server = await asyncio.start_server(eager, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        up = await open_upgraded(link(f"ws://127.0.0.1:{port}/"))
        assert up.leftover == b"\x82\x02\x0a\x00" * 2
        await asyncio.sleep(0.5)  # reading is paused: the third frame waits in the kernel
        assert not up.transport.is_reading()
        collector = Collector(up.leftover)
        up.transport.set_protocol(collector)
        up.transport.resume_reading()
        for _ in range(3):
            assert await collector.frame() == (0x2, b"\x0a\x00")
        up.transport.abort()
    finally:
        server.close()


async def test_tls_egress_that_answers_and_hangs_up_loses_nothing(tls: TLSFiles) -> None:
    """101, a frame and the TLS close, written back to back: whether the end arrives with
    the head (``eof``) or after the hand-over, the new protocol gets the frame and the end."""

    async def answer_and_go(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(answer_101()(head) + b"\x82\x02\x0a\x00")
        writer.close()

    server = await asyncio.start_server(answer_and_go, "127.0.0.1", 0, ssl=tls.server_context())
    port = server.sockets[0].getsockname()[1]
    try:
        for _ in range(20):
            up = await open_upgraded(link(f"wss://127.0.0.1:{port}/", tls=tls.client_context()))
            collector = Collector(up.leftover)
            up.transport.set_protocol(collector)
            up.transport.resume_reading()
            assert await collector.frame() == (0x2, b"\x0a\x00")
            if not up.eof:
                async with asyncio.timeout(10):
                    while not collector.closed:
                        collector.changed.clear()
                        await collector.changed.wait()
            up.transport.abort()
    finally:
        server.close()


# -- refusals ---------------------------------------------------------------------------------


async def test_wrong_token_is_a_502_naming_the_401(egress: EgressServer) -> None:
    with pytest.raises(OpenFailed) as info:
        await open_upgraded(link(egress.url, token="not-the-token"))
    assert (info.value.status, info.value.reason) == (
        502,
        "egress refused the WebSocket upgrade (HTTP 401: unknown-token)",
    )


async def test_session_limit_is_a_429_with_the_egress_reason(origin: int) -> None:
    server = make_egress(max_session_tunnels=1)
    await server.start()
    try:
        first = await open_upgraded(link(server.url))
        with pytest.raises(OpenFailed) as info:
            await open_upgraded(link(server.url))
        assert info.value.status == 429
        assert info.value.reason and "egress" not in info.value.reason  # the egress's reason
        await prove_websocket(first, origin)
    finally:
        await server.stop()


async def test_a_websocket_still_delivering_its_tail_keeps_its_session_slot() -> None:
    """A tunnel that ended while its WebSocket still holds bytes for a relay that reads
    slowly lingers until they are delivered (or the relay stops taking them): it still holds
    a socket and fds, so it keeps counting against --max-session-tunnels until it is gone.
    (It used to free the slot at once: a session could hold any number of lingering sockets.)"""

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"d" * (8 * 1024 * 1024))
        await writer.drain()
        writer.close()

    origin_server = await asyncio.start_server(big, "127.0.0.1", 0)
    origin_port = origin_server.sockets[0].getsockname()[1]
    server = make_egress(max_session_tunnels=1)
    await server.start()
    try:
        first = await open_upgraded(link(server.url))
        await prove_websocket(first, origin_port, close=False)  # the tunnel is open
        async with asyncio.timeout(20):
            while server.active:  # a relay whose client reads slowly, until the tunnel ends
                first.transport.pause_reading()
                await asyncio.sleep(0.03)
                first.transport.resume_reading()
                await asyncio.sleep(0.01)
        first.transport.pause_reading()  # ... with the tail still in the egress's send queue
        with pytest.raises(OpenFailed) as info:
            await open_upgraded(link(server.url))
        assert info.value.status == 429  # the lingering socket still counts
        first.transport.abort()  # the relay lets go: the socket, and the slot, are freed
        async with asyncio.timeout(10):
            while True:
                try:
                    third = await open_upgraded(link(server.url))
                    break
                except OpenFailed as exc:
                    assert exc.status == 429
                    await asyncio.sleep(0.1)
        third.transport.abort()
    finally:
        await server.stop()
        origin_server.close()


async def test_draining_is_a_503_and_retried(egress: EgressServer, origin: int) -> None:
    busy = await open_upgraded(link(egress.url))
    await prove_websocket(busy, origin, close=False)  # an established tunnel keeps it draining
    draining = asyncio.create_task(egress.stop(grace=30))
    try:
        await asyncio.sleep(0.2)
        started = asyncio.get_running_loop().time()
        with pytest.raises(OpenFailed) as info:
            await open_upgraded_retrying(link(egress.url))
        assert (info.value.status, info.value.reason) == (503, "draining")
        assert asyncio.get_running_loop().time() - started >= 0.1 + 0.2 + 0.4  # retried
    finally:
        busy.transport.abort()
        await draining


async def canned(
    answer: bytes | Callable[[bytes], bytes], *, close: bool = False
) -> asyncio.Server:
    """A stand-in egress that reads the upgrade head and writes ``answer`` (a fixed one, or
    one made from the request head)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(head) if callable(answer) else answer)
        await writer.drain()
        if close:
            writer.close()
            return
        await reader.read()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def answer_101(extra: bytes = b"", accept: str | None = None) -> Callable[[bytes], bytes]:
    def make(head: bytes) -> bytes:
        lines = head.split(b"\r\n")
        key = next(ln for ln in lines if ln.lower().startswith(b"sec-websocket-key:"))
        value = accept or accept_key(key.split(b":", 1)[1].strip().decode())
        return (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + value.encode() + b"\r\n" + extra + b"\r\n"
        )

    return make


BAD_ANSWERS = [
    (b"garbage garbage\r\n\r\n", 502, "cannot reach the egress: MalformedResponse"),
    (b"HTTP/1.1 101 Go\r\nbad header\r\n\r\n", 502, "cannot reach the egress: MalformedResponse"),
    (b"HTTP/1.1 200 OK\r\nX-Upstreamproxy-Reason: hello\r\n\r\n", 502, "(HTTP 200: hello)"),
    (b"HTTP/1.1 503 Busy\r\n\r\n", 503, "egress answered HTTP 503"),
    (b"HTTP/1.1 429 Slow\r\nX-Upstreamproxy-Reason: session-rate\r\n\r\n", 429, "session-rate"),
    (b"HTTP/1.1 401 No\r\nX-Upstreamproxy-Reason: bad-token\r\n\r\n", 502, "(HTTP 401: bad-token)"),
    (b"HTTP/1.1 418 Teapot\r\n\r\n", 502, "egress refused the WebSocket upgrade (HTTP 418)"),
    (b"HTTP/1.1 101 OK\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 502, "ResponseTooLarge"),
    (b"HTTP/1.1 101 Switching" + b"a" * 20000, 502, "ResponseTooLarge"),
    (answer_101(accept="d3Jvbmcga2V5IHdyb25nIGtleQ=="), 502, "egress: InvalidAccept"),
    (answer_101(b"Sec-WebSocket-Extensions: permessage-deflate\r\n"), 502, "InvalidUpgrade"),
    (answer_101(b"Sec-WebSocket-Protocol: chat\r\n"), 502, "InvalidUpgrade"),
]


@pytest.mark.parametrize(("answer", "status", "expected"), BAD_ANSWERS)
async def test_bad_answers_are_specific_failures_and_release_the_socket(
    answer: bytes | Callable[[bytes], bytes], status: int, expected: str
) -> None:
    server = await canned(answer)
    port = server.sockets[0].getsockname()[1]
    baseline = fd_count()
    try:
        with pytest.raises(OpenFailed) as info:
            await open_upgraded(link(f"ws://127.0.0.1:{port}/ws"))
        assert expected in info.value.reason
        assert info.value.status == status
        assert await settle_fds(baseline) <= baseline
    finally:
        server.close()


async def test_close_mid_head_is_a_502() -> None:
    server = await canned(b"HTTP/1.1 101 Switching Protocols\r\nUpgr", close=True)
    port = server.sockets[0].getsockname()[1]
    baseline = fd_count()
    try:
        with pytest.raises(OpenFailed) as info:
            await open_upgraded(link(f"ws://127.0.0.1:{port}/ws"))
        assert (info.value.status, info.value.reason) == (
            502,
            "cannot reach the egress: ClosedBeforeAnswer",
        )
        assert await settle_fds(baseline) <= baseline
    finally:
        server.close()


async def test_refused_connection_is_a_502() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(OpenFailed) as info:
        await open_upgraded(link(f"ws://127.0.0.1:{port}/ws"))
    assert (info.value.status, info.value.reason) == (
        502,
        "cannot reach the egress: ConnectionRefusedError",
    )


@pytest.mark.parametrize(
    ("url", "proxy", "name"),
    [
        ("http://127.0.0.1:1/ws", None, "InvalidEgressUrl"),
        ("ws://127.0.0.1:99999/ws", None, "InvalidEgressUrl"),
        ("ws://127.0.0.1:1/ws", "http://[::1", "InvalidProxy"),
        ("ws://127.0.0.1:1/ws", "ftp://proxy:21", "InvalidProxy"),
    ],
)
async def test_bad_urls_are_502s_naming_the_problem(url: str, proxy: str | None, name: str) -> None:
    with pytest.raises(OpenFailed) as info:
        await open_upgraded(link(url, proxy=proxy))
    assert (info.value.status, info.value.reason) == (502, f"cannot reach the egress: {name}")


@pytest.mark.parametrize("mute_after", [b"", b"HTTP/1.1 101 Switching Protocols\r\n"])
async def test_server_that_never_answers_is_a_prompt_504(mute_after: bytes) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(mute_after)
        await reader.read()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    baseline = fd_count()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(OpenFailed) as info:
            await open_upgraded(link(f"ws://127.0.0.1:{port}/ws", timeout=0.5))
        assert loop.time() - started < 10
        assert (info.value.status, info.value.reason) == (
            504,
            "timed out opening the WebSocket to the egress",
        )
        for writer in accepted:
            writer.close()
        assert await settle_fds(baseline) <= baseline
    finally:
        server.close()


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accepts, never answers; closes its end once the client has gone."""
    await reader.read()
    writer.close()


async def test_tls_server_that_never_finishes_the_tls_handshake_is_a_504(tls: TLSFiles) -> None:
    server = await asyncio.start_server(hold, "127.0.0.1", 0)  # no TLS at all
    port = server.sockets[0].getsockname()[1]
    baseline = fd_count()
    try:
        with pytest.raises(OpenFailed) as info:
            await open_upgraded(
                link(f"wss://127.0.0.1:{port}/ws", timeout=0.5, tls=tls.client_context())
            )
        assert info.value.status == 504
        assert await settle_fds(baseline) <= baseline
    finally:
        server.close()


async def test_cancelled_handshake_releases_the_socket() -> None:
    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    baseline = fd_count()
    try:
        task = asyncio.create_task(open_upgraded(link(f"ws://127.0.0.1:{port}/ws")))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await settle_fds(baseline) <= baseline
    finally:
        server.close()


# -- through an HTTP proxy ---------------------------------------------------------------------


ProxyHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def connect_proxy(
    seen: list[bytes], answer: bytes = b"HTTP/1.1 200 Connection established\r\n\r\n"
) -> ProxyHandler:
    """A small CONNECT proxy (a stand-in for a corporate proxy; squid is tested below)."""

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        if not answer.startswith(b"HTTP/1.1 200"):
            writer.write(answer)
            writer.close()
            return
        host, port = head.split()[1].decode().rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(answer)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return handle


@pytest.mark.parametrize("secure", [False, True])
async def test_through_an_http_proxy_with_credentials(
    egress: EgressServer, wss_egress: EgressServer, tls: TLSFiles, origin: int, secure: bool
) -> None:
    seen: list[bytes] = []
    server = await asyncio.start_server(connect_proxy(seen), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    target = wss_egress if secure else egress
    try:
        up = await open_upgraded(
            link(
                target.url,
                proxy=f"http://us%40er:p%3Ass@127.0.0.1:{port}",
                tls=tls.client_context() if secure else None,
            )
        )
        assert (up.transport.get_extra_info("ssl_object") is not None) is secure
        await prove_websocket(up, origin)
    finally:
        server.close()
    lines = seen[0].decode().split("\r\n")
    assert lines[0] == f"CONNECT 127.0.0.1:{target.port} HTTP/1.1"
    expected = base64.b64encode(b"us@er:p:ss").decode()
    assert f"Proxy-Authorization: Basic {expected}" in lines
    assert not any(TOKEN in line for line in lines)  # the token goes to the egress only


@pytest.mark.parametrize("secure", [False, True])
async def test_through_an_https_proxy(
    egress: EgressServer,
    wss_egress: EgressServer,
    tls: TLSFiles,
    origin: int,
    secure: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TLS to the proxy (verified against the system trust store, here pointed at the
    tests' CA), then, for wss://, TLS to the egress inside it."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca_file))
    seen: list[bytes] = []
    server = await asyncio.start_server(
        connect_proxy(seen), "127.0.0.1", 0, ssl=tls.server_context()
    )
    port = server.sockets[0].getsockname()[1]
    target = wss_egress if secure else egress
    try:
        up = await open_upgraded(
            link(
                target.url,
                proxy=f"https://localhost:{port}",
                tls=tls.client_context() if secure else None,
            )
        )
        await prove_websocket(up, origin)
    finally:
        server.close()
    assert seen[0].startswith(f"CONNECT 127.0.0.1:{target.port} HTTP/1.1".encode())


async def test_proxy_refusal_is_a_502_naming_the_proxy_status(egress: EgressServer) -> None:
    seen: list[bytes] = []
    answer = b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"
    server = await asyncio.start_server(connect_proxy(seen, answer), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    baseline = fd_count()
    try:
        with pytest.raises(OpenFailed) as info:
            await open_upgraded(link(egress.url, proxy=f"http://127.0.0.1:{port}"))
        assert (info.value.status, info.value.reason) == (
            502,
            "cannot reach the egress: the proxy answered HTTP 407",
        )
        assert await settle_fds(baseline) <= baseline
    finally:
        server.close()


@pytest.mark.parametrize(
    ("answer", "status", "reason"),
    [
        (None, 504, "timed out opening the WebSocket to the egress"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", 502, "cannot reach the egress: MalformedResponse"),
        (b"HTTP/1.1 200 OK\r\n\r\nearly", 502, "cannot reach the egress: MalformedResponse"),
        (b"HTTP/1.1 200 OK\r\nVia: x", 502, "cannot reach the egress: ClosedBeforeAnswer"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 5000, 502, "egress: ResponseTooLarge"),
    ],
)
async def test_misbehaving_proxy(answer: bytes | None, status: int, reason: str) -> None:
    """A stand-in proxy that never answers, answers garbage, sends bytes nobody asked for
    after its 200, hangs up mid-head, or never ends its head."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if answer is not None:
            writer.write(answer)
            if answer.endswith(b"Via: x"):
                writer.close()
                return
        await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    baseline = fd_count()
    try:
        with pytest.raises(OpenFailed) as info:
            await open_upgraded(
                link("ws://127.0.0.1:9/ws", timeout=0.5, proxy=f"http://127.0.0.1:{port}")
            )
        assert info.value.status == status
        assert reason in info.value.reason
        assert await settle_fds(baseline) <= baseline
    finally:
        server.close()


async def test_socks_proxy_failure_is_a_502() -> None:
    """SOCKS goes through python-socks when installed (as with websockets); without it, or
    with nothing listening, the client still gets a 502 naming the cause."""
    with pytest.raises(OpenFailed) as info:
        await open_upgraded(link("ws://127.0.0.1:1/ws", proxy="socks5://127.0.0.1:1"))
    assert info.value.status == 502
    assert info.value.reason in (
        "cannot reach the egress: ProxyUnsupported",
        "cannot reach the egress: ConnectionRefusedError",
        "cannot reach the egress: SocksFailed",
    )


@pytest.fixture
def squid_proxy() -> Iterator[Squid]:
    if shutil.which("squid") is None:
        pytest.skip("squid not installed")
    proxy = Squid()
    proxy.start()
    yield proxy
    proxy.stop()
    shutil.rmtree(proxy.base, ignore_errors=True)


@pytest.mark.parametrize("secure", [False, True])
async def test_through_a_real_squid(
    egress: EgressServer,
    wss_egress: EgressServer,
    tls: TLSFiles,
    origin: int,
    squid_proxy: Squid,
    secure: bool,
) -> None:
    target = wss_egress if secure else egress
    up = await open_upgraded(
        link(
            target.url,
            proxy=squid_proxy.url,
            tls=tls.client_context() if secure else None,
        )
    )
    await prove_websocket(up, origin)


# -- the token stays secret --------------------------------------------------------------------


async def test_token_never_in_logs_or_exception_texts(
    egress: EgressServer, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    secret = "tok-\r\nX-Injected: 1"  # a token that would break the head is refused, unquoted
    cases = [
        link(egress.url, token=secret),
        link(egress.url, token="wrong-SECRET-token"),
        link(egress.url, token="wrong-SECRET-token", proxy="http://[::1"),
        link("ws://127.0.0.1:1/ws", token="wrong-SECRET-token"),
    ]
    for cfg in cases:
        with pytest.raises(OpenFailed) as info:
            await open_upgraded(cfg)
        exc = info.value
        texts += [str(exc), repr(exc), exc.reason, repr(exc.__cause__), repr(exc.__context__)]
    texts.append(caplog.text)
    for text in texts:
        assert "SECRET" not in text and "tok-" not in text, text
    assert "cannot reach the egress: InvalidRequestHeader" in texts[0]


async def test_keep_reading_hands_over_without_a_pause_and_loses_nothing() -> None:
    """``keep_reading``: the transport is still reading at the hand-over (no pause and
    resume); frames in the 101's segment are in ``leftover``, later ones reach the link."""

    async def eager(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"sec-websocket-key:")]
        accept = accept_key(key[0].split(b":", 1)[1].strip().decode())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
            b"\x82\x02\x0a\x00"
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"\x82\x02\x0a\x00")  # after the hand-over: reaches the new protocol
        await reader.read()

    server = await asyncio.start_server(eager, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        up = await open_upgraded(link(f"ws://127.0.0.1:{port}/"), keep_reading=True)
        assert up.transport.is_reading()
        collector = Collector(up.leftover)
        up.transport.set_protocol(collector)  # no await since the handshake returned
        for _ in range(2):
            assert await collector.frame() == (0x2, b"\x0a\x00")
        up.transport.abort()
    finally:
        server.close()
