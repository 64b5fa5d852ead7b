"""The spine end to end: real relay, real egress, real origins, real curl."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from conftest import (
    SESSION,
    TOKEN,
    Origin,
    TLSFiles,
    _serve,
    connect_via,
    curl_via,
    loopback_policy,
    origin_app,
    pattern_bytes,
    raw_request,
    rss_kib,
    run,
)

from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.dialer import DialError, Upstream
from upstreamproxy.egress.resolver import StaticResolver
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.egress.tunnel import TunnelTimeouts
from upstreamproxy.errors import ConfigError
from upstreamproxy.relay import Relay, RelayConfig
from upstreamproxy.secret import Secret


def make_relay(url: str, **kwargs: object) -> Relay:
    return Relay(RelayConfig(egress_url=url, session_id=SESSION, token=Secret(TOKEN), **kwargs))  # type: ignore[arg-type]


def curl_env() -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}


# -- real curl --------------------------------------------------------------------------


async def test_curl_with_https_proxy_env(relay: Relay, https_origin: Origin, tls: TLSFiles) -> None:
    env = curl_env() | {"HTTPS_PROXY": relay.proxy_url, "CURL_CA_BUNDLE": str(tls.ca_file)}
    result = await run("curl", "-sS", "-v", https_origin.url + "/", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello from origin\n"
    assert b"CONNECT localhost:" in result.stderr  # curl really used the proxy


async def test_curl_large_download_checksum(
    relay: Relay, https_origin: Origin, tls: TLSFiles, tmp_path: Path
) -> None:
    size = 48 * 1024 * 1024
    out = tmp_path / "down.bin"
    result = await run(
        "curl",
        "-sS",
        "--cacert",
        str(tls.ca_file),
        "-x",
        relay.proxy_url,
        "-p",
        "-D",
        "-",
        "-o",
        str(out),
        f"{https_origin.url}/bytes/{size}",
    )
    assert result.returncode == 0, result.stderr
    expected = hashlib.sha256(pattern_bytes(size)).hexdigest()
    assert f"x-sha256: {expected}".encode() in result.stdout.lower()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected


async def test_curl_large_upload_checksum(
    relay: Relay, https_origin: Origin, tls: TLSFiles, tmp_path: Path
) -> None:
    data = pattern_bytes(40 * 1024 * 1024 + 17)
    src = tmp_path / "up.bin"
    src.write_bytes(data)
    result = await run(
        "curl",
        "-sS",
        "--cacert",
        str(tls.ca_file),
        "-x",
        relay.proxy_url,
        "-p",
        "--data-binary",
        f"@{src}",
        f"{https_origin.url}/upload",
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


@pytest.mark.parametrize("pool_size", [0, 2])
async def test_wss_between_relay_and_egress_carries_both_ways_intact(
    https_origin: Origin, tls: TLSFiles, tmp_path: Path, pool_size: int
) -> None:
    """The links over TLS transports (the production hop): a large download and upload
    with checksums, through real curl, pooled and fresh sockets."""
    config = EgressConfig(tls_cert_file=str(tls.cert_file), tls_key_file=str(tls.key_file))
    egress = EgressServer(config, StaticTokens({TOKEN: Session(SESSION)}), loopback_policy())
    await egress.start()
    assert egress.url.startswith("wss://")
    relay = make_relay(egress.url, egress_ca_file=str(tls.ca_file), pool_size=pool_size)
    await relay.start()
    try:
        size = 24 * 1024 * 1024 + 5
        out = tmp_path / "down.bin"
        down = await run(
            "curl", "-sS", "--cacert", str(tls.ca_file), "-x", relay.proxy_url, "-p",
            "-o", str(out), f"{https_origin.url}/bytes/{size}",
        )  # fmt: skip
        assert down.returncode == 0, down.stderr
        assert out.read_bytes() == pattern_bytes(size)
        data = pattern_bytes(16 * 1024 * 1024 + 3)
        src = tmp_path / "up.bin"
        src.write_bytes(data)
        up = await run(
            "curl", "-sS", "--cacert", str(tls.ca_file), "-x", relay.proxy_url, "-p",
            "--data-binary", f"@{src}", f"{https_origin.url}/upload",
        )  # fmt: skip
        assert up.returncode == 0, up.stderr
        assert json.loads(up.stdout) == {
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
    finally:
        await relay.stop()
        await egress.stop()


async def test_ipv6_target(relay: Relay, tls: TLSFiles) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        runner, port = await _serve(origin_app(), tls.server_context(), host="::1")
    except OSError:
        pytest.skip("::1 not configured")
    try:
        result = await curl_via(relay.proxy_url, f"https://[::1]:{port}/", tls.ca_file)
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"hello from origin\n"
    finally:
        await runner.cleanup()


# -- many tunnels, early data ---------------------------------------------------------


async def _https_get(proxy_port: int, origin_port: int, ctx: ssl.SSLContext, path: str) -> bytes:
    reader, writer, head = await connect_via(proxy_port, f"localhost:{origin_port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    await writer.start_tls(ctx, server_hostname="localhost")
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    return response


async def test_many_concurrent_tunnels(relay: Relay, https_origin: Origin, tls: TLSFiles) -> None:
    ctx = tls.client_context()
    count = 120
    responses = await asyncio.wait_for(
        asyncio.gather(
            *(_https_get(relay.port, https_origin.port, ctx, "/bytes/65536") for _ in range(count))
        ),
        60,
    )
    expected = pattern_bytes(65536)
    assert all(r.startswith(b"HTTP/1.1 200") and r.endswith(expected) for r in responses)


async def test_bytes_sent_with_the_connect_head_are_kept(relay: Relay) -> None:
    # A plain-TCP echo origin; the client pipelines data right behind its CONNECT head.
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer, head = await connect_via(
            relay.port, f"127.0.0.1:{port}", extra=b"early-bytes"
        )
        assert head.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.readexactly(11), 5) == b"early-bytes"
        writer.close()
    finally:
        server.close()


# -- backpressure and bounded memory ----------------------------------------------------


@pytest.fixture
async def firehose() -> AsyncIterator[tuple[int, list[int]]]:
    """An origin that writes as fast as it is allowed to; counts what it managed to send."""
    sent = [0]
    block = b"x" * 65536

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                writer.write(block)
                await writer.drain()
                sent[0] += len(block)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], sent
    server.close()


async def test_slow_client_reader_pauses_origin(
    relay: Relay, firehose: tuple[int, list[int]]
) -> None:
    port, sent = firehose
    rss_before = rss_kib(os.getpid())
    reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{port}")
    assert head.startswith(b"HTTP/1.1 200")
    await asyncio.sleep(2.0)  # the client reads nothing
    stalled_at = sent[0]
    await asyncio.sleep(1.0)
    # The origin was stopped by backpressure: it sent a bounded amount, and no more since.
    assert stalled_at < 64 * 1024 * 1024, stalled_at
    assert sent[0] - stalled_at <= 1024 * 1024
    assert rss_kib(os.getpid()) - rss_before < 64 * 1024
    # ... and the stream resumes when the client reads again.
    got = 0
    while got < stalled_at + 4 * 1024 * 1024:
        got += len(await asyncio.wait_for(reader.read(1 << 20), 10))
    writer.close()


async def test_slow_origin_reader_pauses_client(relay: Relay) -> None:
    received = [0]
    reading = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reading.wait()
        while data := await reader.read(1 << 20):
            received[0] += len(data)
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer, head = await connect_via(relay.port, f"127.0.0.1:{port}")
        assert head.startswith(b"HTTP/1.1 200")
        written = 0
        block = b"y" * 65536
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(3.0):
                while True:
                    writer.write(block)
                    await writer.drain()
                    written += len(block)
        assert written < 64 * 1024 * 1024, written
        reading.set()
        await asyncio.sleep(0.5)
        assert received[0] > 0
        writer.close()
    finally:
        server.close()


async def test_upload_tail_reaches_a_slow_origin_after_the_client_finished(relay: Relay) -> None:
    """A client that uploads and closes (as ``nc host port < file`` does) ends the tunnel
    (SPEC §8), while a slow origin still has megabytes to take: it must get all of them, not
    a reset a second later."""
    size = 12 * 1024 * 1024
    payload = pattern_bytes(size)
    got = hashlib.sha256()
    received = [0]
    done = asyncio.Event()

    async def slow_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(64 * 1024):
                got.update(data)
                received[0] += len(data)
                await asyncio.sleep(0.02)  # about 3 MB/s: the tail takes seconds
        except ConnectionError:
            pass
        finally:
            done.set()
            writer.close()

    server = await asyncio.start_server(slow_sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer, head = await connect_via(relay.port, f"127.0.0.1:{port}")
        assert head.startswith(b"HTTP/1.1 200")
        writer.write(payload)
        async with asyncio.timeout(30):
            await writer.drain()
        writer.close()  # the client is done: FIN
        async with asyncio.timeout(30):
            await done.wait()
        assert received[0] == size
        assert got.hexdigest() == hashlib.sha256(payload).hexdigest()
    finally:
        server.close()


async def test_upload_to_a_deaf_origin_then_a_clean_close_is_bounded_by_the_write_stall(
    tls: TLSFiles,
) -> None:
    """The patience an upload's tail gets is bounded: an origin that reads nothing while the
    client finished cleanly is let go once nothing moved for the write-stall time."""
    held: list[asyncio.StreamWriter] = []

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.pause_reading()
        held.append(writer)

    server = await asyncio.start_server(deaf, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    egress = EgressServer(
        EgressConfig(ca_cert_pem=tls.ca.cert_pem(), timeouts=TunnelTimeouts(write_stall=2.0)),
        StaticTokens({TOKEN: Session(SESSION)}),
        loopback_policy(),
    )
    await egress.start()
    relay = make_relay(egress.url, write_stall_timeout=2.0, pool_size=0)
    await relay.start()
    try:
        before = len(os.listdir("/proc/self/fd"))
        _, writer, head = await connect_via(relay.port, f"127.0.0.1:{port}")
        assert head.startswith(b"HTTP/1.1 200")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                while True:  # upload until the tunnel pushes back
                    writer.write(b"u" * 65536)
                    await writer.drain()
        writer.close()  # a clean close: the tail is owed to the origin - while it moves
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(15):
            while len(os.listdir("/proc/self/fd")) > before + len(held):
                await asyncio.sleep(0.1)
        # write stall (2 s) plus a grace check (1 s) at each end, not the 60 s default
        assert asyncio.get_running_loop().time() - started < 8
    finally:
        for w in held:
            w.transport.abort()
        server.close()
        await relay.stop()
        await egress.stop()


# -- the relay's own answers -----------------------------------------------------------


async def test_relay_400_malformed_head(relay: Relay) -> None:
    answer = await raw_request(relay.port, b"CONNECT nonsense HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"X-Upstreamproxy-Reason: CONNECT target needs an explicit port" in answer


async def test_relay_400_oversized_head(relay: Relay) -> None:
    head = b"CONNECT localhost:443 HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n"
    answer = await raw_request(relay.port, head)
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"exceeds 8192 bytes" in answer


async def test_relay_405_non_connect(relay: Relay) -> None:
    # Origin-form: not a proxy request (absolute-form http:// is forwarded, see http_forward).
    answer = await raw_request(relay.port, b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405")


async def test_relay_closes_silent_client_after_head_timeout(egress: EgressServer) -> None:
    async with make_relay(egress.url, head_timeout=0.3) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(b"CONNECT localhost:443 HTTP/1.1\r\n")  # never finishes the head
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_relay_502_when_egress_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    async with make_relay(f"ws://127.0.0.1:{port}/v1/code/upstreamproxy/ws") as relay:
        answer = await raw_request(relay.port, b"CONNECT localhost:443 HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 502")
    assert b"cannot reach the egress" in answer


async def test_relay_504_on_websocket_handshake_timeout() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never answers the upgrade

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with make_relay(f"ws://127.0.0.1:{port}/ws", handshake_timeout=0.3) as relay:
            answer = await raw_request(relay.port, b"CONNECT localhost:443 HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 504")
    finally:
        server.close()


async def test_relay_502_when_egress_closes_before_status() -> None:
    # A stand-in egress (named so: it only accepts the upgrade and hangs up) for this path.
    async def hang_up(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/ws", hang_up)
    runner, port = await _serve(app, None)
    try:
        async with make_relay(f"ws://127.0.0.1:{port}/ws") as relay:
            answer = await raw_request(relay.port, b"CONNECT localhost:443 HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 502")
        assert b"before establishing" in answer
    finally:
        await runner.cleanup()


async def test_relay_502_when_token_refused(egress: EgressServer) -> None:
    relay = Relay(
        RelayConfig(egress_url=egress.url, session_id=SESSION, token=Secret("wrong-token"))
    )
    async with relay:
        answer = await raw_request(relay.port, b"CONNECT localhost:443 HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 502")
    assert b"HTTP 401" in answer


async def test_relay_refuses_non_loopback_listen() -> None:
    with pytest.raises(ConfigError) as info:
        make_relay("ws://127.0.0.1:1/ws", listen_host="0.0.0.0")
    assert info.value.field == "listen_host"
    make_relay("ws://127.0.0.1:1/ws", listen_host="0.0.0.0", allow_non_loopback=True)


async def test_stop_closes_every_tunnel(
    egress: EgressServer, firehose: tuple[int, list[int]]
) -> None:
    port, _ = firehose
    relay = make_relay(egress.url)
    await relay.start()
    streams = [await connect_via(relay.port, f"127.0.0.1:{port}") for _ in range(5)]
    assert relay.active_tunnels == 5
    await asyncio.wait_for(relay.stop(), 10)
    assert relay.active_tunnels == 0
    for reader, writer, _ in streams:
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            async with asyncio.timeout(10):
                while await reader.read(1 << 20):
                    pass
                raise asyncio.IncompleteReadError(b"", None)  # EOF reached: closed
        writer.close()


async def test_keepalives_keep_an_idle_tunnel_usable(
    egress: EgressServer, https_origin: Origin, tls: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    async with make_relay(egress.url, keepalive_interval=0.05) as relay:
        reader, writer, _ = await connect_via(relay.port, f"localhost:{https_origin.port}")
        await asyncio.sleep(0.5)  # ~10 keepalives cross while idle
        await writer.start_tls(tls.client_context(), server_hostname="localhost")
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).endswith(b"hello from origin\n")
        writer.close()
    assert "protocol error" not in caplog.text


async def test_relay_reaches_egress_through_outbound_proxy(
    egress: EgressServer, https_origin: Origin, tls: TLSFiles
) -> None:
    seen: list[bytes] = []

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        dst.close()

    async def corporate_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n")[0])
        host, port = head.split()[1].decode().rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(corporate_proxy, "127.0.0.1", 0)
    proxy_port = server.sockets[0].getsockname()[1]
    try:
        async with make_relay(egress.url, egress_proxy=f"http://127.0.0.1:{proxy_port}") as relay:
            result = await curl_via(relay.proxy_url, https_origin.url + "/", tls.ca_file)
        assert result.returncode == 0, result.stderr
        # Every WebSocket (pre-opened ones too) went through the proxy, and only to the egress.
        assert seen and set(seen) == {f"CONNECT 127.0.0.1:{egress.port} HTTP/1.1".encode()}
    finally:
        server.close()


# -- the egress's answers inside the tunnel ---------------------------------------------


async def test_egress_403_for_target_not_allowed(relay: Relay) -> None:
    answer = await raw_request(relay.port, b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403")
    assert b"X-Upstreamproxy-Reason: no-matching-rule" in answer


async def test_egress_502_when_upstream_refuses(relay: Relay) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answer = await raw_request(relay.port, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 502")
    assert b"dial-failed" in answer


async def test_egress_504_when_dial_times_out(tls: TLSFiles) -> None:
    # A black-hole upstream: it never completes the TCP handshake (SYNs are dropped by a full
    # accept backlog is not portable), so the dial deadline is exercised with a dialer that
    # waits out its deadline exactly as a dial to an unroutable address would.
    async def black_hole(addresses: object, port: int, timeout: float) -> Upstream:
        await asyncio.sleep(timeout)
        raise DialError(504, "dial-timeout")

    server = EgressServer(
        EgressConfig(timeouts=TunnelTimeouts(dial=0.2)),
        StaticTokens({TOKEN: Session(SESSION)}),
        loopback_policy("slow.test:443"),
        resolver=StaticResolver({"slow.test": ["127.0.0.1"]}),
        dial=black_hole,
    )
    async with server, make_relay(server.url) as relay:
        answer = await raw_request(relay.port, b"CONNECT slow.test:443 HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 504")


async def test_egress_endpoints(egress: EgressServer, tls: TLSFiles) -> None:
    import aiohttp

    base = f"http://127.0.0.1:{egress.port}"
    async with aiohttp.ClientSession() as client:
        async with client.get(base + "/v1/code/upstreamproxy/ca-cert") as resp:
            assert resp.status == 200
            assert await resp.read() == tls.ca.cert_pem()
        async with client.get(base + "/healthz") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"
        async with client.get(base + "/v1/code/upstreamproxy/ws") as resp:
            assert resp.status == 401  # no token
        async with client.get(
            base + "/v1/code/upstreamproxy/ws", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as resp:
            assert resp.status == 400  # a token but no upgrade
    bare = EgressServer(EgressConfig(), StaticTokens({TOKEN: Session(SESSION)}), loopback_policy())
    async with bare, aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{bare.port}/v1/code/upstreamproxy/ca-cert"
        async with client.get(url) as r:
            assert r.status == 404


# -- secrets stay out of logs -----------------------------------------------------------


async def test_token_never_logged(
    egress: EgressServer, https_origin: Origin, tls: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with make_relay(egress.url) as relay:
        ok = await curl_via(relay.proxy_url, https_origin.url + "/", tls.ca_file)
        assert ok.returncode == 0
        await raw_request(relay.port, b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    bad = Relay(
        RelayConfig(egress_url=egress.url, session_id=SESSION, token=Secret(TOKEN + "-wrong"))
    )
    async with bad:
        await raw_request(bad.port, b"CONNECT localhost:443 HTTP/1.1\r\n\r\n")
    assert caplog.records, "expected log output"
    assert TOKEN not in caplog.text
    assert "tok-0123456789abcdef" not in caplog.text
    assert (
        repr(RelayConfig(egress_url="ws://x/", session_id="s", token=Secret(TOKEN))).count(TOKEN)
        == 0
    )
