"""The tunnel endpoint's native WebSocket upgrade, against an in-process egress.

The egress is the real :class:`EgressServer` on port 0 (plain and TLS) with the native path
switched on. Its ``on_upgraded`` is a stub tunnel runner, named as such: it speaks just
enough RFC 6455 to echo one binary message and close, or holds the connection idle -- the
real runner is the tunnel core's, not this module's subject. Clients are the ``websockets``
library and raw sockets for what no library would send.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from conftest import SESSION, TOKEN, TLSFiles, loopback_policy
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.limits import LimitConfig
from upstreamproxy.egress.preauth import PreauthLimits
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.egress.upgrade_head import MAX_HEAD_BYTES
from upstreamproxy.ws_handshake import accept_key, new_key

WS_PATH = "/v1/code/upstreamproxy/ws"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/proto"}
DEADLINE = 1.0


# -- the stub tunnel runner ------------------------------------------------------------------


def frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final RFC 6455 frame (payloads under 64 KiB)."""
    length = len(payload)
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask is not None else 0
    head += (
        bytes([bit | length]) if length < 126 else bytes([bit | 126]) + struct.pack("!H", length)
    )
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class EchoOnce(asyncio.Protocol):
    """Reads one masked frame, answers its payload in one unmasked binary frame, then a close
    frame (1000), and closes."""

    def __init__(self, transport: asyncio.Transport, leftover: bytes) -> None:
        self.transport = transport
        self.buffer = bytearray(leftover)
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.try_frame()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(b"")

    def try_frame(self) -> None:
        buf = self.buffer
        if self.done.done() or len(buf) < 2:
            return
        length, offset = buf[1] & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return
            length, offset = struct.unpack("!H", buf[2:4])[0], 4
        if not buf[1] & 0x80 or len(buf) < offset + 4 + length:
            if not buf[1] & 0x80:
                self.transport.abort()  # a client must mask
            return
        mask = buf[offset : offset + 4]
        payload = bytes(
            b ^ mask[i % 4] for i, b in enumerate(buf[offset + 4 : offset + 4 + length])
        )
        self.transport.write(frame(0x2, payload) + frame(0x8, struct.pack("!H", 1000)))
        self.transport.close()
        self.done.set_result(payload)


class Idle(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


@dataclass
class StubRunner:
    """Stub ``on_upgraded`` (not the real tunnel): echo once, or idle until the peer leaves."""

    mode: str = "echo"
    calls: list[tuple[Session, str, bool, bytes]] = field(default_factory=list)
    echoed: list[bytes] = field(default_factory=list)

    async def __call__(
        self,
        transport: asyncio.Transport,
        leftover: bytes,
        session: Session,
        token: str,
        preopened: bool,
        reuse: bool = False,
    ) -> None:
        self.calls.append((session, token, preopened, leftover))
        if self.mode == "echo":
            echo = EchoOnce(transport, leftover)
            transport.set_protocol(echo)
            echo.try_frame()
            transport.resume_reading()
            self.echoed.append(await asyncio.wait_for(echo.done, 10))
        else:
            idle = Idle()
            transport.set_protocol(idle)
            transport.resume_reading()
            await idle.lost


# -- fixtures and helpers --------------------------------------------------------------------


def make_native(
    runner: StubRunner, tls: TLSFiles | None = None, limits: LimitConfig | None = None
) -> EgressServer:
    config = EgressConfig(
        preauth=PreauthLimits(upgrade_timeout=DEADLINE, max_pending=64, max_pending_per_peer=32),
        limits=limits or LimitConfig(),
        ca_cert_pem=b"-----BEGIN CERTIFICATE-----\nstub\n-----END CERTIFICATE-----\n",
    )
    if tls is not None:
        config.tls_cert_file, config.tls_key_file = str(tls.cert_file), str(tls.key_file)
    tokens = StaticTokens({TOKEN: Session(SESSION)})
    return EgressServer(config, tokens, loopback_policy(), on_upgraded=runner)


@pytest.fixture
def runner() -> StubRunner:
    return StubRunner()


@pytest.fixture
async def native(runner: StubRunner) -> AsyncIterator[EgressServer]:
    server = make_native(runner)
    async with server:
        yield server


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def back_to(baseline: int, seconds: float = 10) -> int:
    deadline = time.monotonic() + seconds
    while open_fds() > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return open_fds()


def upgrade_head(*extra: str, token: str = TOKEN, drop: str = "", target: str = WS_PATH) -> bytes:
    fields = [
        "Host: egress",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {new_key()}",
        "Sec-WebSocket-Version: 13",
        f"Authorization: Bearer {token}",
    ]
    fields = [f for f in fields if not (drop and f.startswith(drop))]
    return ("\r\n".join([f"GET {target} HTTP/1.1", *fields, *extra]) + "\r\n\r\n").encode()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the egress closed the connection after the answer


async def exchange(
    port: int,
    data: bytes,
    *,
    tls: TLSFiles | None = None,
    shut: bool = False,
    expect_close: bool = True,
) -> Reply:
    """Send ``data`` raw, read one response (and whether the connection then closes)."""
    ctx = tls.client_context() if tls else None
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost" if tls else None
    )
    try:
        writer.write(data)
        if shut:
            writer.write_eof()
        return await read_reply(reader, expect_close)
    finally:
        writer.close()


async def read_reply(reader: asyncio.StreamReader, expect_close: bool = True) -> Reply:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    closed = False
    if expect_close:
        try:
            closed = await asyncio.wait_for(reader.read(1), 10) == b""
        except ConnectionError:
            closed = True
    return Reply(status, headers, body, closed)


# -- the upgrade -----------------------------------------------------------------------------


async def test_websockets_client_upgrades_and_talks(
    native: EgressServer, runner: StubRunner
) -> None:
    async with connect(native.url, additional_headers=AUTH, proxy=None, compression=None) as ws:
        await ws.send(b"hello native")
        assert await asyncio.wait_for(ws.recv(), 10) == b"hello native"
    assert runner.echoed == [b"hello native"]
    session, token, preopened, _ = runner.calls[0]
    assert (session, token, preopened) == (Session(SESSION), TOKEN, False)
    for _ in range(100):
        if not native.active:
            break
        await asyncio.sleep(0.02)
    assert native.active == set() and native.limiter.total == 0  # slot released at the end
    assert len(native.preauth) == 0


async def test_raw_upgrade_answers_the_accept_key_and_keeps_the_leftover(
    native: EgressServer, runner: StubRunner
) -> None:
    key = new_key()
    head = upgrade_head("X-Upstreamproxy-Preopened: 1").replace(
        b"Sec-WebSocket-Key: ", b"Sec-WebSocket-Key: " + key.encode() + b"\r\nX-Old: "
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", native.port)
    # The head and the first frame in one write: the frame must reach the runner.
    writer.write(head + frame(0x2, b"first frame", mask=b"\x01\x02\x03\x04"))
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert (
        raw
        == (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n"
        ).encode()
    )
    echoed = await asyncio.wait_for(reader.readexactly(2 + len(b"first frame")), 10)
    assert echoed == frame(0x2, b"first frame")
    writer.close()
    assert runner.calls[0][2] is True  # pre-opened
    assert runner.calls[0][3].startswith(b"\x82")  # the leftover bytes


async def test_wss_upgrade_and_health_on_the_same_listener(tls: TLSFiles) -> None:
    runner = StubRunner()
    server = make_native(runner, tls)
    async with server:
        assert server.url.startswith("wss://")
        async with connect(
            server.url, additional_headers=AUTH, proxy=None, ssl=tls.client_context()
        ) as ws:
            await ws.send(b"over tls")
            assert await asyncio.wait_for(ws.recv(), 10) == b"over tls"
        # Kept-alive health requests over TLS, through the sniffer to aiohttp.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=tls.client_context(), server_hostname="localhost"
        )
        for path in ("/healthz", "/readyz", "/healthz"):
            writer.write(f"GET {path} HTTP/1.1\r\nHost: e\r\n\r\n".encode())
            reply = await read_reply(reader, expect_close=False)
            assert reply.status == 200, path
        writer.close()
        # Pipelined over TLS, in the connection's first write.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=tls.client_context(), server_hostname="localhost"
        )
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: e\r\n\r\n" * 2 + b"GET /x HTTP/1.1\r\n")
        writer.write(b"Host: e\r\n\r\n")
        statuses = [(await read_reply(reader, expect_close=False)).status for _ in range(3)]
        assert statuses == [200, 200, 404]
        writer.close()


async def test_upgraded_connection_outlives_the_preauth_deadline(runner: StubRunner) -> None:
    runner.mode = "idle"
    server = make_native(runner)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(upgrade_head())
        assert (await read_reply(reader, expect_close=False)).status == 101
        assert len(server.preauth) == 0
        await asyncio.sleep(DEADLINE * 2)
        assert not reader.at_eof()
        assert server.limiter.total == 1 and len(server.active) == 1
        writer.close()
        for _ in range(100):
            if server.limiter.total == 0:
                break
            await asyncio.sleep(0.02)
        assert server.limiter.total == 0 and not server.active


async def test_stop_cancels_upgraded_connections_and_releases_their_slots(
    runner: StubRunner,
) -> None:
    runner.mode = "idle"
    server = make_native(runner)
    await server.start()
    readers = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(upgrade_head())
        assert (await read_reply(reader, expect_close=False)).status == 101
        readers.append((reader, writer))
    assert server.limiter.total == 3
    await asyncio.wait_for(server.stop(grace=0.1), 15)
    assert server.limiter.total == 0 and not server.active
    for reader, writer in readers:
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()


# -- what it refuses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing-authorization"),
        ({"Authorization": "Bearer wrong-SECRET"}, "unknown-token"),
        ({"Authorization": f"Basic {TOKEN}"}, "malformed-authorization"),
        ({"Authorization": "Bearer"}, "malformed-authorization"),
    ],
)
async def test_bad_bearer_is_401_with_reason_and_never_logged(
    native: EgressServer,
    headers: dict[str, str],
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Only the egress's loggers: the websockets client logs its own request at DEBUG.
    with caplog.at_level(logging.DEBUG, "upstreamproxy"), pytest.raises(InvalidStatus) as info:
        await connect(native.url, additional_headers=headers, proxy=None, open_timeout=5)
    response = info.value.response
    assert response.status_code == 401
    assert response.headers["X-Upstreamproxy-Reason"] == reason
    assert json.loads(response.body or b"") == {"error": "unauthorized", "reason": reason}
    sample = native.metrics.registry.get_sample_value(
        "upstreamproxy_auth_failures_total", {"reason": reason}
    )
    assert sample == 1
    assert f"upgrade refused from 127.0.0.1: {reason}" in caplog.text
    assert "SECRET" not in caplog.text and TOKEN not in caplog.text


async def test_draining_is_503(native: EgressServer) -> None:
    native._refusing = True  # what stop() sets once its delay is over
    reply = await exchange(native.port, upgrade_head())
    assert (reply.status, reply.headers["x-upstreamproxy-reason"]) == (503, "draining")
    assert json.loads(reply.body) == {"error": "draining"}
    assert reply.closed


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (upgrade_head(drop="Upgrade:"), 400),
        (upgrade_head("Upgrade: h2c", drop="Upgrade:"), 400),
        (upgrade_head(drop="Connection:"), 400),
        (upgrade_head(drop="Sec-WebSocket-Key:"), 400),
        (upgrade_head("Sec-WebSocket-Key: c2hvcnQ=", drop="Sec-WebSocket-Key:"), 400),
        (upgrade_head(f"Sec-WebSocket-Key: {new_key()}"), 400),  # duplicate key
        (upgrade_head(drop="Sec-WebSocket-Version:"), 400),
        (upgrade_head("Sec-WebSocket-Version: 8", drop="Sec-WebSocket-Version:"), 426),
        (upgrade_head("Content-Length: 4") + b"body", 400),
        (upgrade_head().replace(b"HTTP/1.1", b"HTTP/1.0", 1), 400),
    ],
)
async def test_not_an_upgrade_is_400_or_426(native: EgressServer, data: bytes, status: int) -> None:
    reply = await exchange(native.port, data)
    assert reply.status == status
    assert json.loads(reply.body) == {"error": "websocket upgrade required"}
    assert reply.headers["connection"] == "close" and reply.closed
    if status == 426:
        assert reply.headers["sec-websocket-version"] == "13"
    assert native.limiter.total == 0


async def test_session_limit_is_429_and_the_slot_comes_back(runner: StubRunner) -> None:
    runner.mode = "idle"
    server = make_native(runner, limits=LimitConfig(max_session_tunnels=1))
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(upgrade_head())
        assert (await read_reply(reader, expect_close=False)).status == 101
        reply = await exchange(server.port, upgrade_head())
        assert reply.status == 429
        assert reply.headers["x-upstreamproxy-reason"] == "session-concurrency-limit"
        assert json.loads(reply.body) == {"error": "limited", "reason": "session-concurrency-limit"}
        writer.close()  # the first tunnel ends: its slot is released
        for _ in range(100):
            if server.limiter.total == 0:
                break
            await asyncio.sleep(0.02)
        runner.mode = "echo"
        async with connect(server.url, additional_headers=AUTH, proxy=None) as ws:
            await ws.send(b"again")
            assert await asyncio.wait_for(ws.recv(), 10) == b"again"


# -- hostile heads ---------------------------------------------------------------------------


HOSTILE: list[tuple[str, bytes, int, str | None]] = [
    (
        "oversized",
        upgrade_head("X-Pad: " + "p" * MAX_HEAD_BYTES),
        431,
        "head-too-large",
    ),
    ("obs-fold", upgrade_head(" folded"), 400, "obs-fold"),
    ("control character", upgrade_head("X-Bad: a\x01b"), 400, "bad-header-character"),
    ("missing host", upgrade_head(drop="Host:"), 400, "missing-host"),
    ("HTTP/1.2", upgrade_head().replace(b"HTTP/1.1", b"HTTP/1.2", 1), 505, None),
    ("space in target", upgrade_head(target=WS_PATH + "?a b"), 400, "malformed-request-line"),
]


@pytest.mark.parametrize(("name", "data", "status", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_hostile_heads_are_refused_natively(
    native: EgressServer, name: str, data: bytes, status: int, reason: str | None
) -> None:
    reply = await exchange(native.port, data)
    assert reply.status == status
    if reason is not None:
        assert reply.headers["x-upstreamproxy-reason"] == reason
    assert reply.closed


async def test_truncated_head_is_400_when_the_client_stops_sending(native: EgressServer) -> None:
    reply = await exchange(native.port, upgrade_head()[:-4], shut=True)
    assert (reply.status, reply.headers["x-upstreamproxy-reason"]) == (400, "truncated-head")


async def test_slowloris_head_is_cut_at_the_preauth_deadline(native: EgressServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", native.port)
    started = time.monotonic()

    async def until_closed() -> float:
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        return time.monotonic()

    closed = asyncio.ensure_future(until_closed())
    for byte in upgrade_head()[:200]:  # one byte every 50 ms: the head would take 10 s
        if closed.done() or time.monotonic() - started > 10:
            break
        writer.write(bytes([byte]))
        await asyncio.sleep(0.05)
    closed_at = await asyncio.wait_for(closed, 10)
    writer.close()
    assert DEADLINE * 0.8 < closed_at - started < 8
    assert native.metrics.registry.get_sample_value(
        "upstreamproxy_preauth_refusals_total", {"reason": "upgrade-timeout"}
    )


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", 400),
        (b"POST " + WS_PATH.encode() + b" HTTP/1.1\r\nHost: e\r\nContent-Length: 0\r\n\r\n", 405),
        (
            b"GET http://egress" + WS_PATH.encode() + b" HTTP/1.1\r\nHost: egress\r\n\r\n",
            401,
        ),  # aiohttp: no token
        (b"GET " + WS_PATH.encode() + b"/more HTTP/1.1\r\nHost: e\r\n\r\n", 404),
        (b"GET /nowhere HTTP/1.1\r\nHost: e\r\n\r\n", 404),
    ],
)
async def test_other_requests_are_aiohttps(native: EgressServer, data: bytes, status: int) -> None:
    """Garbage, other methods and paths go to aiohttp, whose answers are today's; an
    absolute-form upgrade is not served by aiohttp any more (400)."""
    reply = await exchange(native.port, data, expect_close=False)
    assert reply.status == status
    assert not native.active and native.limiter.total == 0


# -- every other endpoint: aiohttp through the sniffer ---------------------------------------


async def test_keep_alive_and_pipelined_requests_are_aiohttps(native: EgressServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", native.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: e\r\n\r\n")
    assert (await read_reply(reader, expect_close=False)).status == 200
    # Pipelined: three requests in one write, the last one an upgrade aiohttp will not serve.
    writer.write(
        b"GET /readyz HTTP/1.1\r\nHost: e\r\n\r\n"
        b"GET /v1/code/upstreamproxy/ca-cert HTTP/1.1\r\nHost: e\r\n\r\n" + upgrade_head()
    )
    assert (await read_reply(reader, expect_close=False)).status == 200
    ca = await read_reply(reader, expect_close=False)
    assert ca.status == 200 and ca.body.startswith(b"-----BEGIN CERTIFICATE-----")
    assert (await read_reply(reader, expect_close=False)).status == 400
    writer.close()
    assert not native.active


async def test_request_split_in_the_sniffed_prefix(native: EgressServer) -> None:
    """Bytes that could still be the ws request line are held, then replayed to aiohttp."""
    reader, writer = await asyncio.open_connection("127.0.0.1", native.port)
    for piece in (b"G", b"ET /v1/code/", b"upstreamproxy/ca-cert HTTP/1.1\r\n", b"Host: e\r\n\r\n"):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.05)
    assert (await read_reply(reader, expect_close=False)).status == 200
    writer.close()


async def test_the_ws_request_line_split_byte_by_byte_is_native(
    native: EgressServer, runner: StubRunner
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", native.port)
    for byte in upgrade_head():
        writer.write(bytes([byte]))
    await writer.drain()
    assert (await read_reply(reader, expect_close=False)).status == 101
    writer.write(frame(0x2, b"x", mask=b"abcd"))
    assert await asyncio.wait_for(reader.readexactly(3), 10) == frame(0x2, b"x")
    writer.close()


# -- resources -------------------------------------------------------------------------------


async def test_descriptors_return_to_baseline_after_every_fault(
    native: EgressServer, runner: StubRunner
) -> None:
    port = native.port
    # Warm up (aiohttp's and the loop's lazily created descriptors), then measure.
    await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n")
    await asyncio.sleep(0.2)
    baseline = open_fds()

    async def reset_midway(data: bytes) -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(data)
        await asyncio.sleep(0.05)
        sock.close()  # RST

    faults = [
        exchange(port, upgrade_head(token="wrong")),
        exchange(port, upgrade_head("X-Pad: " + "p" * MAX_HEAD_BYTES)),
        exchange(port, upgrade_head()[:-4], shut=True),
        exchange(port, upgrade_head(drop="Sec-WebSocket-Key:")),
        exchange(port, b"\x00\x01garbage\r\n\r\n"),
        reset_midway(upgrade_head()[:50]),
        reset_midway(b"GET /healthz HTTP/1.1\r\n"),
        reset_midway(upgrade_head()),  # upgraded, then reset under the runner
    ]
    for fault in faults:
        await fault
    # A silent connection, cut by the deadline.
    silent = socket.create_connection(("127.0.0.1", port))
    await asyncio.sleep(DEADLINE + 0.5)
    silent.close()
    assert await back_to(baseline) <= baseline
    assert len(native.preauth) == 0 and native.limiter.total == 0 and not native.active


async def test_tls_faults_return_descriptors(
    tls: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_native(StubRunner(), tls)
    async with server:
        await exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: e\r\n\r\n", tls=tls)
        await asyncio.sleep(0.2)
        baseline = open_fds()
        for data in (upgrade_head(token="nope"), upgrade_head("X-Pad: " + "p" * MAX_HEAD_BYTES)):
            reply = await exchange(server.port, data, tls=tls)
            assert reply.status in (401, 431)
        # A TLS client that starts an upgrade head and vanishes (reset).
        _, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=tls.client_context(), server_hostname="localhost"
        )
        writer.write(upgrade_head()[:40])
        await writer.drain()
        writer.transport.abort()
        # One that ends its TLS session (close_notify) in the middle of the head.
        _, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=tls.client_context(), server_hostname="localhost"
        )
        writer.write(upgrade_head()[:60])
        await writer.drain()
        writer.close()
        # One that upgrades, then vanishes under the runner.
        _, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=tls.client_context(), server_hostname="localhost"
        )
        writer.write(upgrade_head())
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()
        assert await back_to(baseline) <= baseline
        assert len(server.preauth) == 0
    unexpected = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "upgrade refused" not in r.getMessage()
    ]
    assert not unexpected  # no asyncio or aiohttp complaint about the sniffer's transports


def test_the_native_upgrade_is_always_on() -> None:
    server = EgressServer(
        EgressConfig(), StaticTokens({TOKEN: Session(SESSION)}), loopback_policy()
    )
    assert server.native is not None


async def test_preauth_caps_still_hold_with_the_sniffer(native: EgressServer) -> None:
    held = [
        await asyncio.open_connection("127.0.0.1", native.port, local_addr=("127.0.0.5", 0))
        for _ in range(32)  # the per-peer cap of make_native
    ]
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", native.port, local_addr=("127.0.0.5", 0)
    )
    assert await asyncio.wait_for(reader.read(), 5) == b""  # refused at once
    assert native.metrics.registry.get_sample_value(
        "upstreamproxy_preauth_refusals_total", {"reason": "preauth-per-peer"}
    )
    # Another peer still upgrades.
    async with connect(native.url, additional_headers=AUTH, proxy=None) as ws:
        await ws.send(b"ok")
        assert await asyncio.wait_for(ws.recv(), 10) == b"ok"
    for _, held_writer in [*held, (reader, writer)]:
        held_writer.close()


# -- the sniffer's routing, by property (fake transport and protocols, no sockets) -----------


class FakeTransport(asyncio.Transport):
    """Stands in for the accepted connection's transport: records what the sniffer does."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: asyncio.BaseProtocol | None = None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        pass


class FakeAiohttp(asyncio.Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True

    def data_received(self, data: bytes) -> None:
        self.received += data


class FakeHook:
    def __init__(self) -> None:
        self.handled: list[tuple[bytes, bytes]] = []

    def claims(self, buffer: bytes | bytearray) -> bool | None:
        from upstreamproxy.egress.native_upgrade import claims

        return claims(buffer, b"GET " + WS_PATH.encode())

    def handle(
        self, transport: asyncio.Transport, key: object, head: bytes, leftover: bytes
    ) -> None:
        self.handled.append((head, leftover))


class FakeGuard:
    def connected(self, key: object, transport: object) -> None:
        pass

    def forget(self, key: object, transport: object = None) -> None:
        pass


HEALTH = b"GET /healthz HTTP/1.1\r\nHost: e\r\n\r\n"
STREAMS = [
    HEALTH * 3,
    b"GET /v1/code/upstreamproxy/wsX HTTP/1.1\r\nHost: e\r\n\r\n" + HEALTH,
    b"GET /v1/code/upstreamproxy/ws HTTP/1.1\r\nHost: e\r\n\r\n\x82\x80abcd" + HEALTH,
    upgrade_head() + b"\x82\x85\x00\x00\x00\x00hello",
    upgrade_head("X-Pad: " + "p" * MAX_HEAD_BYTES),
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(256)),
]


@given(st.sampled_from(range(len(STREAMS))), st.lists(st.integers(1, 700), max_size=30))
@settings(max_examples=300, deadline=None)
def test_sniffer_routes_every_byte_however_it_arrives(which: int, cuts: list[int]) -> None:
    from upstreamproxy.egress.listener import _Sniffer

    stream = STREAMS[which]
    pieces, position = [], 0
    for size in cuts:
        pieces.append(stream[position : position + size])
        position += size
    pieces.append(stream[position:])
    hook, aiohttp_side, transport = FakeHook(), FakeAiohttp(), FakeTransport()
    sniffer = _Sniffer(lambda: aiohttp_side, hook, FakeGuard(), ("127.0.0.1", 1))  # type: ignore[arg-type]
    transport.set_protocol(sniffer)
    sniffer.connection_made(transport)
    for piece in pieces:
        if not piece:
            continue
        target = transport.protocol
        assert isinstance(target, asyncio.Protocol)
        target.data_received(piece)
    if stream.startswith(b"GET " + WS_PATH.encode() + b" "):
        # Native: the head and what followed it, nothing lost, nothing to aiohttp.
        assert len(hook.handled) == 1 and not aiohttp_side.made
        head, leftover = hook.handled[0]
        if len(stream) > MAX_HEAD_BYTES and b"\r\n\r\n" not in stream[: MAX_HEAD_BYTES + 4]:
            assert len(head) > MAX_HEAD_BYTES  # handed over as oversized: the hook says 431
        else:
            end = stream.index(b"\r\n\r\n") + 4
            assert head == stream[:end]
            # Bytes that arrive after the hand-off are the runner's (reading is paused).
            assert stream.startswith(head + leftover)
    else:
        # aiohttp's: every byte, in order, after connection_made.
        assert hook.handled == [] and aiohttp_side.made
        assert bytes(aiohttp_side.received) == stream
        assert transport.protocol is aiohttp_side
