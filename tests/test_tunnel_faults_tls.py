"""Backpressure faults over ``wss://`` between relay and egress - the production hop, where the
links sit on asyncio's TLS transports (whose write flow control differs from a socket's: a
write limit of 0 once made a tunnel that hit backpressure never resume).

Each test runs the real relay and egress in-process with real TLS (the tests' CA): a client
that stops reading a firehose and resumes, an origin that stops reading an upload and
resumes, a client that leaves while its reads are paused, and an intercepted tunnel (the TLS
interception engine on the in-memory stream pair) downloading through a slow reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import certifi
import pytest
from conftest import SESSION, TOKEN, TLSFiles, _serve, connect_via, loopback_policy, pattern_bytes
from testpki import interception_pki

from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.intercept_wiring import Interception, InterceptionConfig
from upstreamproxy.egress.policy import PolicyStore, parse_policy_document
from upstreamproxy.egress.resolver import StaticResolver
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.relay import Relay, RelayConfig
from upstreamproxy.secret import Secret

BLOCK = 64 * 1024


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settled_fds(settle: float = 0.5) -> int:
    """This process's fd count once it stopped moving."""
    last, since = fds(), time.monotonic()
    async with asyncio.timeout(20):
        while time.monotonic() - since < settle:
            await asyncio.sleep(0.05)
            if (now := fds()) != last:
                last, since = now, time.monotonic()
    return last


async def fds_back_to(count: int, timeout: float) -> float:
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            while fds() > count:
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{fds()} fds, baseline {count}") from None
    return time.monotonic() - started


def tls_egress(tls: TLSFiles, **kwargs: object) -> EgressServer:
    config = EgressConfig(tls_cert_file=str(tls.cert_file), tls_key_file=str(tls.key_file))
    return EgressServer(
        config, StaticTokens({TOKEN: Session(SESSION)}), loopback_policy(), **kwargs
    )  # type: ignore[arg-type]


def wss_relay(egress: EgressServer, tls: TLSFiles, pool_size: int = 2) -> Relay:
    """A relay reaching ``egress`` over wss://, trusting the tests' CA."""
    assert egress.url.startswith("wss://")
    config = RelayConfig(
        egress_url=egress.url,
        session_id=SESSION,
        token=Secret(TOKEN),
        egress_ca_file=str(tls.ca_file),
        pool_size=pool_size,
    )
    return Relay(config)


@pytest.fixture(params=[0, 2], ids=["fresh", "pooled"])
async def wss(request: pytest.FixtureRequest, tls: TLSFiles) -> AsyncIterator[Relay]:
    """A relay reaching its egress over wss:// (fresh or pre-opened WebSockets)."""
    egress = tls_egress(tls)
    await egress.start()
    relay = wss_relay(egress, tls, pool_size=request.param)
    await relay.start()
    yield relay
    await relay.stop()
    await egress.stop()


@pytest.fixture
async def pattern_firehose() -> AsyncIterator[tuple[int, list[int], int]]:
    """An origin that writes ``size`` pattern bytes as fast as it is let, then closes;
    counts what it managed to hand to its socket."""
    size = 40 * 1024 * 1024 + 7
    data = memoryview(pattern_bytes(size))
    sent = [0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for at in range(0, size, BLOCK):
                writer.write(data[at : at + BLOCK])
                await writer.drain()
                sent[0] = min(at + BLOCK, size)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], sent, size
    server.close()
    await server.wait_closed()


async def stalls(counter: list[int], pause: float) -> int:
    """Waits ``pause``, then checks the counter stopped moving (backpressure reached)."""
    await asyncio.sleep(pause)
    stalled_at = counter[0]
    await asyncio.sleep(0.5)
    assert counter[0] - stalled_at <= 2 * 1024 * 1024, (stalled_at, counter[0])
    return stalled_at


async def test_client_stops_reading_a_download_then_resumes(
    wss: Relay, pattern_firehose: tuple[int, list[int], int]
) -> None:
    port, sent, size = pattern_firehose
    reader, writer, head = await connect_via(wss.port, f"127.0.0.1:{port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    digest, got = hashlib.sha256(), 0
    async with asyncio.timeout(60):
        for pause_after in (1024 * 1024, 12 * 1024 * 1024):
            while got < pause_after:
                piece = await reader.read(1 << 20)
                assert piece, got
                digest.update(piece)
                got += len(piece)
            stalled_at = await stalls(sent, 1.5)  # the client reads nothing meanwhile
            assert stalled_at < size
        while piece := await reader.read(1 << 20):  # resumes; EOF once the origin is done
            digest.update(piece)
            got += len(piece)
    assert got == size
    assert digest.hexdigest() == hashlib.sha256(pattern_bytes(size)).hexdigest()
    writer.close()


async def test_origin_stops_reading_an_upload_then_resumes(wss: Relay) -> None:
    size = 40 * 1024 * 1024 + 3
    data = memoryview(pattern_bytes(size))
    received = [0]
    reading = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        try:
            for pause_at in (2 * 1024 * 1024, 20 * 1024 * 1024, size):
                while received[0] < pause_at:
                    piece = await reader.read(min(1 << 20, pause_at - received[0]))
                    if not piece:
                        return
                    digest.update(piece)
                    received[0] += len(piece)
                if pause_at < size:  # then it stops reading until told
                    await reading.wait()
                    reading.clear()
            writer.write(digest.hexdigest().encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer, head = await connect_via(wss.port, f"127.0.0.1:{port}")
        assert head.startswith(b"HTTP/1.1 200"), head
        written = [0]

        async def upload() -> None:
            for at in range(0, size, BLOCK):
                writer.write(data[at : at + BLOCK])
                await writer.drain()
                written[0] = min(at + BLOCK, size)

        uploading = asyncio.create_task(upload())
        try:
            async with asyncio.timeout(60):
                for _ in range(2):  # the origin is not reading: the client is pushed back
                    stalled_at = await stalls(written, 2.0)
                    assert stalled_at < size, stalled_at
                    assert not uploading.done()
                    reading.set()  # and it resumes
                await uploading
                answer = await reader.readline()
        finally:
            uploading.cancel()
        assert received[0] == size
        assert answer == hashlib.sha256(data).hexdigest().encode() + b"\n"
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("how", ["reset", "close"])
async def test_client_leaves_while_backpressured(
    tls: TLSFiles, pattern_firehose: tuple[int, list[int], int], how: str
) -> None:
    """Both ends release the tunnel long before any write deadline (60 s by default)."""
    port, sent, size = pattern_firehose
    egress = tls_egress(tls)
    await egress.start()
    relay = wss_relay(egress, tls, pool_size=0)  # no pool refilling behind the fd count's back
    await relay.start()
    try:
        baseline = await settled_fds()
        reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{port}")
        assert head.startswith(b"HTTP/1.1 200"), head
        await asyncio.wait_for(reader.readexactly(1024 * 1024), 30)
        stalled_at = await stalls(sent, 1.5)  # the tunnel is backpressured end to end
        assert stalled_at < size
        assert relay.active_tunnels == 1
        if how == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
            writer.transport.abort()
        else:
            writer.close()  # a FIN, while the relay's reads from it are paused
        took = await fds_back_to(baseline, 20)
        assert took < 12, took
        assert relay.active_tunnels == 0
    finally:
        await relay.stop()
        await egress.stop()


# -- an intercepted tunnel over wss:// ---------------------------------------------------


@pytest.fixture
async def intercepting(tls: TLSFiles, tmp_path: Path) -> AsyncIterator[tuple[Relay, int, Path]]:
    """A relay -> wss:// -> intercepting egress -> HTTPS origin chain: the egress terminates
    the sandbox's TLS with its own CA (over the in-memory stream pair) and dials the origin."""
    from conftest import origin_app

    egress_ca, origin_ctx = interception_pki(tmp_path)
    runner, port = await _serve(origin_app(), origin_ctx)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "api-token").write_text("injected-value\n")
    rule = {
        "id": "api",
        "hosts": ["api.test"],
        "ports": [port],
        "intercept": {"inject": [{"header": "Authorization", "value": "{secret:api-token}"}]},
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
    egress = EgressServer(
        EgressConfig(
            ca_cert_pem=egress_ca.cert_pem(),
            tls_cert_file=str(tls.cert_file),
            tls_key_file=str(tls.key_file),
        ),
        StaticTokens({TOKEN: Session(SESSION)}),
        PolicyStore(policy),
        resolver=StaticResolver({"api.test": ["127.0.0.1"]}),
        interception=lambda metrics: Interception(config, metrics.registry),
    )
    await egress.start()
    assert egress.url.startswith("wss://")
    relay = wss_relay(egress, tls)
    await relay.start()
    bundle = tmp_path / "sandbox-bundle.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + egress_ca.cert_pem())
    yield relay, port, bundle
    await relay.stop()
    await egress.stop()
    await runner.cleanup()


async def test_intercepted_large_download_through_a_slow_reader(
    intercepting: tuple[Relay, int, Path],
) -> None:
    relay, port, bundle = intercepting
    size = 24 * 1024 * 1024 + 11
    reader, writer, head = await connect_via(relay.port, f"api.test:{port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=str(bundle))
    async with asyncio.timeout(120):
        await writer.start_tls(ctx, server_hostname="api.test")
        writer.write(
            f"GET /bytes/{size} HTTP/1.1\r\nHost: api.test:{port}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        response_head = await reader.readuntil(b"\r\n\r\n")
        assert response_head.startswith(b"HTTP/1.1 200"), response_head
        assert f"content-length: {size}\r\n".encode() in response_head.lower()
        digest, got = hashlib.sha256(), 0
        for pause_after in (512 * 1024, 4 * 1024 * 1024, 10 * 1024 * 1024):
            while got < pause_after:
                piece = await reader.read(1 << 20)
                assert piece, got
                digest.update(piece)
                got += len(piece)
            await asyncio.sleep(1.5)  # a slow reader: the whole chain must hold and resume
        while got < size:
            piece = await reader.read(min(1 << 18, size - got))
            assert piece, got
            digest.update(piece)
            got += len(piece)
            if got % (4 * 1024 * 1024) < len(piece):
                await asyncio.sleep(0.05)  # and trickles on
    assert digest.hexdigest() == hashlib.sha256(pattern_bytes(size)).hexdigest()
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 5)


# -- the tail of a download to a client that paused ----------------------------------------


@pytest.fixture(params=["ws", "wss"])
async def either_hop(
    request: pytest.FixtureRequest, tls: TLSFiles, egress: EgressServer
) -> AsyncIterator[Relay]:
    """A relay reaching its egress over ws:// or wss://."""
    if request.param == "ws":
        relay = Relay(RelayConfig(egress_url=egress.url, session_id=SESSION, token=Secret(TOKEN)))
        await relay.start()
        yield relay
        await relay.stop()
        return
    tls_end = tls_egress(tls)
    await tls_end.start()
    relay = wss_relay(tls_end, tls)
    await relay.start()
    yield relay
    await relay.stop()
    await tls_end.stop()


@pytest.fixture
async def short_download() -> AsyncIterator[tuple[int, int]]:
    """An origin that sends 4 MiB at once and closes: all of it fits in the chain's buffers,
    so the tunnel ends (origin-closed, egress-closed) long before a paused client read it."""
    size = 4 * 1024 * 1024 + 1

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(pattern_bytes(size))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], size
    server.close()
    await server.wait_closed()


async def test_a_paused_client_still_gets_the_tail_of_an_ended_download(
    either_hop: Relay, short_download: tuple[int, int]
) -> None:
    """Regression: the relay reset its client one second (CLOSE_GRACE) after the egress
    closed, with megabytes the client had not read yet - a slow but live reader lost them."""
    port, size = short_download
    reader, writer, head = await connect_via(either_hop.port, f"127.0.0.1:{port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    await asyncio.sleep(4)  # reads nothing while the tunnel ends behind it
    got = bytearray()
    async with asyncio.timeout(30):
        while piece := await reader.read(1 << 20):
            got += piece
    assert len(got) == size
    assert got == pattern_bytes(size)
    writer.close()


async def test_a_client_that_leaves_during_the_tail_is_let_go_at_once(
    tls: TLSFiles, short_download: tuple[int, int]
) -> None:
    """... while one that is gone (a reset) is not waited for."""
    port, _ = short_download
    egress = tls_egress(tls)
    await egress.start()
    relay = wss_relay(egress, tls, pool_size=0)
    await relay.start()
    try:
        baseline = await settled_fds()
        _, writer, head = await connect_via(relay.port, f"127.0.0.1:{port}")
        assert head.startswith(b"HTTP/1.1 200"), head
        await asyncio.sleep(3)  # the origin is done; the relay holds the tail for the client
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
        writer.transport.abort()
        took = await fds_back_to(baseline, 20)
        assert took < 8, took  # the hang-up check, not the 60 s write deadline
    finally:
        await relay.stop()
        await egress.stop()


# -- a link on an in-memory transport (the interception engine's stream pair) ---------------


class _Owner:
    def __init__(self) -> None:
        self.writable = 0

    def local_data(self, data: memoryview) -> None:
        pass

    def local_eof(self) -> None:
        pass

    def local_writable(self) -> None:
        self.writable += 1


async def test_a_link_taking_an_in_memory_transport_with_unsent_bytes_is_told_when_they_left() -> (
    None
):
    """Regression: ``set_protocol`` forgot the transport was paused, so a link that took it
    with bytes still unsent was never sent ``resume_writing`` - every later write of the
    tunnel stayed unconfirmed until the write deadline ended it."""
    from upstreamproxy.memstream import stream_pair
    from upstreamproxy.tunnel.links import LocalLink

    (reader, writer), (_, peer) = stream_pair()
    peer.transport.pause_reading()
    writer.write(b"x" * 10)  # unsent: the other end is not reading
    owner = _Owner()
    link = LocalLink(owner)
    link.take(reader, writer)
    assert link.write_paused
    peer.transport.resume_reading()
    async with asyncio.timeout(5):
        while link.write_paused:
            await asyncio.sleep(0.01)
    assert owner.writable == 1
