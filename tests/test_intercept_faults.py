"""Intercepted tunnels under faults, through the real chain: a TLS client -> relay -> egress
(terminating TLS with its CA, injecting a credential) -> a scriptable TLS origin on loopback.

The origin is a raw asyncio TLS server whose per-connection handler each test sets, so it can
stop reading, answer late or never; the engine's idle timeout is shortened to keep tests quick.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import certifi
import pytest
from conftest import SESSION, TOKEN, connect_via
from testpki import interception_pki

from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.intercept_wiring import Interception, InterceptionConfig
from upstreamproxy.egress.metrics import EgressMetrics
from upstreamproxy.egress.policy import PolicyStore, parse_policy_document
from upstreamproxy.egress.resolver import StaticResolver
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.relay import Relay, RelayConfig
from upstreamproxy.secret import Secret

SECRET_VALUE = "s3cr3t-INJECTED-9f8e7d"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Rig:
    relay: Relay
    egress: EgressServer
    port: int
    bundle: Path
    handler: list[Handler]
    interception: list[Interception]
    origin_conns: list[asyncio.StreamWriter]

    def drop_origin_connections(self) -> None:
        """The origin (in this process) lets go of its sockets: what stays open is ours."""
        for writer in self.origin_conns:
            writer.transport.abort()

    def set_timeouts(self, **kw: float) -> None:
        env = self.interception[0]._env
        self.interception[0]._env = dataclasses.replace(
            env, timeouts=dataclasses.replace(env.timeouts, **kw)
        )

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer, head = await connect_via(self.relay.port, f"api.test:{self.port}")
        assert head.startswith(b"HTTP/1.1 200"), head
        ctx = ssl.create_default_context(cafile=str(self.bundle))
        await asyncio.wait_for(writer.start_tls(ctx, server_hostname="api.test"), 10)
        return reader, writer


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    egress_ca, origin_ctx = interception_pki(tmp_path)
    handler: list[Handler] = []
    origin_conns: list[asyncio.StreamWriter] = []

    async def dispatch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        origin_conns.append(writer)
        try:
            await handler[0](reader, writer)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(dispatch, "127.0.0.1", 0, ssl=origin_ctx)
    port = server.sockets[0].getsockname()[1]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "api-token").write_text(SECRET_VALUE + "\n")
    rule = {
        "id": "api",
        "hosts": ["api.test"],
        "ports": [port],
        "intercept": {
            "inject": [{"header": "Authorization", "value": "Bearer {secret:api-token}"}]
        },
    }
    policy = parse_policy_document(
        {"policies": {"default": {"rules": [rule], "allow_cidrs": ["127.0.0.0/8"]}}}
    )
    config = InterceptionConfig(
        tmp_path / "ca.pem",
        tmp_path / "ca-key.pem",
        secrets,
        upstream_ca=tmp_path / "origin-ca.pem",
    )
    made: list[Interception] = []

    def make(metrics: EgressMetrics) -> Interception:
        made.append(Interception(config, metrics.registry))
        return made[0]

    egress = EgressServer(
        EgressConfig(ca_cert_pem=egress_ca.cert_pem()),
        StaticTokens({TOKEN: Session(SESSION)}),
        PolicyStore(policy),
        resolver=StaticResolver({"api.test": ["127.0.0.1"]}),
        interception=make,
    )
    await egress.start()
    relay = Relay(RelayConfig(egress_url=egress.url, session_id=SESSION, token=Secret(TOKEN)))
    await relay.start()
    bundle = tmp_path / "sandbox-bundle.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + egress_ca.cert_pem())
    yield Rig(relay, egress, port, bundle, handler, made, origin_conns)
    await relay.stop()
    await egress.stop()
    server.close()


async def read_all(reader: asyncio.StreamReader, limit: float = 10) -> bytes:
    out = bytearray()
    with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
        async with asyncio.timeout(limit):
            while chunk := await reader.read(65536):
                out += chunk
    return bytes(out)


async def fds_back_to(count: int, within: float = 10) -> None:
    try:
        async with asyncio.timeout(within):
            while fds() > count:
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{fds()} fds, baseline {count}") from None


async def warm_up(rig: Rig) -> int:
    """One finished exchange (the relay keeps its WebSocket for reuse): the fd baseline."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
        await writer.drain()

    rig.handler[:] = [answer]
    reader, writer = await rig.open()
    writer.write(b"GET / HTTP/1.1\r\nHost: api.test:%d\r\nConnection: close\r\n\r\n" % rig.port)
    assert (await read_all(reader)).startswith(b"HTTP/1.1 200")
    writer.close()
    await asyncio.sleep(0.5)
    return fds()


UPLOAD_PIECE = 64 * 1024
UPLOAD_PIECES = 8


def upload_head(rig: Rig) -> bytes:
    return b"POST /up HTTP/1.1\r\nHost: api.test:%d\r\nContent-Length: %d\r\n\r\n" % (
        rig.port,
        UPLOAD_PIECE * UPLOAD_PIECES,
    )


async def upload(rig: Rig, writer: asyncio.StreamWriter, pause: float) -> None:
    """A POST of UPLOAD_PIECES pieces, ``pause`` seconds apart."""
    writer.write(upload_head(rig))
    for _ in range(UPLOAD_PIECES):
        writer.write(b"u" * UPLOAD_PIECE)
        await writer.drain()
        await asyncio.sleep(pause)


async def test_a_slow_steady_upload_outlasting_the_idle_timeout_is_answered(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression: while the request body was still flowing, the response side waited for the
    # origin's answer under the idle timeout alone, so any upload lasting longer than it (120 s
    # in production) was cut with "504 upstream-timeout" although bytes moved all along.
    caplog.set_level(logging.DEBUG)
    baseline = await warm_up(rig)
    rig.set_timeouts(idle=1)
    received: list[int] = []

    async def read_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert f"Bearer {SECRET_VALUE}".encode() in head
        received.append(len(await reader.readexactly(UPLOAD_PIECE * UPLOAD_PIECES)))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
        await writer.drain()
        await asyncio.sleep(5)

    rig.handler[:] = [read_then_answer]
    reader, writer = await rig.open()
    started = time.monotonic()
    await upload(rig, writer, 0.35)  # 512 KiB over ~2.8 s: progress every 0.35 s
    assert time.monotonic() - started > 2  # twice the idle timeout
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert await reader.readexactly(3) == b"ok\n"
    assert received == [UPLOAD_PIECE * UPLOAD_PIECES]
    writer.close()
    await fds_back_to(baseline)
    assert SECRET_VALUE not in caplog.text


async def test_an_origin_that_never_answers_an_upload_is_504_soon_after_it(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    # The patience above lasts while the body moves, not longer.
    caplog.set_level(logging.DEBUG)
    baseline = await warm_up(rig)
    rig.set_timeouts(idle=1)

    async def read_then_freeze(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(UPLOAD_PIECE * UPLOAD_PIECES)
        await asyncio.sleep(30)

    rig.handler[:] = [read_then_freeze]
    reader, writer = await rig.open()
    await upload(rig, writer, 0.2)
    sent = time.monotonic()
    out = await read_all(reader, 10)
    assert out.startswith(b"HTTP/1.1 504 "), out[:200]
    assert b"upstream-timeout" in out
    assert time.monotonic() - sent < 3.5  # at most two idle periods after the last byte
    writer.close()
    await fds_back_to(baseline)
    assert SECRET_VALUE not in caplog.text


async def test_an_origin_that_stops_reading_an_upload_is_504(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    baseline = await warm_up(rig)
    rig.set_timeouts(idle=1)

    async def read_head_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)

    rig.handler[:] = [read_head_only]
    reader, writer = await rig.open()
    size = 64 * 1024 * 1024  # far more than every buffer on the way holds
    writer.write(
        b"POST /up HTTP/1.1\r\nHost: api.test:%d\r\nContent-Length: %d\r\n\r\n" % (rig.port, size)
    )

    async def flood() -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            for _ in range(size // UPLOAD_PIECE):
                writer.write(b"u" * UPLOAD_PIECE)
                await writer.drain()

    uploading = asyncio.get_running_loop().create_task(flood())
    started = time.monotonic()
    out = await read_all(reader, 15)
    assert out.startswith(b"HTTP/1.1 504 "), out[:200]
    assert time.monotonic() - started < 10
    uploading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await uploading
    writer.transport.abort()
    rig.drop_origin_connections()
    await fds_back_to(baseline)
    # Regression: closing the sandbox's TLS after that (its peer still sending) failed inside
    # asyncio's TLS layer, which calls _force_close() on the in-memory transport: the engine
    # raised AttributeError out of StreamWriter.close() instead of returning.
    assert "interception engine failed" not in caplog.text
    assert "_force_close" not in caplog.text
    assert SECRET_VALUE not in caplog.text


@pytest.mark.parametrize(
    "hello",
    ["wrong-sni", "not-tls"],
)
async def test_a_refused_client_handshake_ends_the_tunnel_at_once(
    rig: Rig, caplog: pytest.LogCaptureFixture, hello: str
) -> None:
    # Regression: over the in-memory stream pair, a failed server handshake raised
    # AttributeError ('_MemoryTransport' has no '_force_close') inside asyncio's TLS layer
    # ("Exception in callback _MemoryTransport._flush()"), so the handshake never completed
    # with its error: the client hung until the handshake timeout (10 s, +1) instead of being
    # closed at once.
    caplog.set_level(logging.DEBUG)
    baseline = await warm_up(rig)
    reader, writer, head = await connect_via(rig.relay.port, f"api.test:{rig.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    started = time.monotonic()
    if hello == "wrong-sni":
        ctx = ssl.create_default_context(cafile=str(rig.bundle))
        ctx.check_hostname = False
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.wait_for(writer.start_tls(ctx, server_hostname="other.test"), 15)
    else:
        writer.write(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        assert await read_all(reader, 15) == b""
    assert time.monotonic() - started < 3
    writer.close()
    await fds_back_to(baseline)
    logged = {
        "wrong-sni": "TLS handshake refused: sni-mismatch",
        "not-tls": "client TLS handshake failed (SSLError)",
    }[hello]
    assert logged in caplog.text
    assert "Exception in callback" not in caplog.text
    assert "_force_close" not in caplog.text


async def test_a_body_sent_late_for_a_head_is_not_read_as_the_next_response(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    # An origin that sends a body for HEAD after its response - in a later packet, past the
    # check made when the response ended - must not have those bytes taken for the answer
    # to the next request on a kept-alive connection: that connection is not reused.
    caplog.set_level(logging.DEBUG)
    baseline = await warm_up(rig)
    connections: list[int] = []

    async def late_head_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"HEAD "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write(b"HTTP/1.1 666 Smuggled\r\nContent-Length: 0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
            await writer.drain()

    rig.handler[:] = [late_head_body]
    reader, writer = await rig.open()
    host = b"Host: api.test:%d\r\n" % rig.port
    writer.write(b"HEAD /h HTTP/1.1\r\n" + host + b"\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200"), head
    await asyncio.sleep(0.6)  # the stray bytes reach the egress meanwhile
    writer.write(b"GET /g HTTP/1.1\r\n" + host + b"\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"next"
    assert len(connections) == 2  # a fresh upstream connection for the GET
    writer.close()
    rig.drop_origin_connections()
    await fds_back_to(baseline)
    assert SECRET_VALUE not in caplog.text
