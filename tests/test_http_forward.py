"""Plain-HTTP forwarding (absolute-form requests) through the real relay and egress.

The pure part (target parsing, header rewriting) is tested case by case and by property;
the asyncio layer through the real relay with real curl and raw sockets, and directly with
a plain-TCP ``open_tunnel`` (a real stream to a real origin, no egress) where a test needs
small timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import h11
import pytest
from aiohttp import web
from conftest import SESSION, TOKEN, _serve, origin_app, pattern_bytes, rss_kib, run
from hypothesis import given, settings
from hypothesis import strategies as st

from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.policy import PolicyStore, parse_policy_document
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.forward_request import (
    MAX_REQUEST_HEAD,
    ForwardRefused,
    TunnelRefused,
    direct_route_hint,
    is_forward_request,
    parse_forward_target,
    rewrite_request,
    rewrite_response,
)
from upstreamproxy.http_forward import ForwardLimits, serve_forward
from upstreamproxy.relay import Relay, RelayConfig
from upstreamproxy.secret import Secret

# -- pure part ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", True),
        (b"POST HTTP://EXAMPLE.COM:8080/x HTTP/1.1\r\n\r\n", True),
        (b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", False),
        (b"CONNECT http://example.com/ HTTP/1.1\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", False),
        (b"GET https://example.com/ HTTP/1.1\r\n\r\n", False),
        (b"GET http://example.com/\r\n\r\n", False),
        (b"", False),
    ],
)
def test_is_forward_request(head: bytes, expected: bool) -> None:
    assert is_forward_request(head) is expected


@pytest.mark.parametrize(
    ("raw", "host", "port", "path", "host_header"),
    [
        (b"http://example.com", "example.com", 80, b"/", "example.com"),
        (b"http://Example.COM/a/b?q=1&r=2", "example.com", 80, b"/a/b?q=1&r=2", "example.com"),
        (b"http://api:8080/v1", "api", 8080, b"/v1", "api:8080"),
        (b"http://10.0.0.5:80/", "10.0.0.5", 80, b"/", "10.0.0.5"),
        (b"http://[::1]:8080/x", "::1", 8080, b"/x", "[::1]:8080"),
        (
            b"http://deb.debian.org/debian/dists/x?y",
            "deb.debian.org",
            80,
            b"/debian/dists/x?y",
            "deb.debian.org",
        ),
    ],
)
def test_parse_forward_target(
    raw: bytes, host: str, port: int, path: bytes, host_header: str
) -> None:
    target = parse_forward_target(raw)
    assert (target.host, target.port, target.path, target.host_header) == (
        host,
        port,
        path,
        host_header,
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"https://example.com/", "CONNECT"),
        (b"ftp://example.com/", "only http://"),
        (b"http://user:pw@example.com/", "userinfo"),
        (b"http:///path", "no host"),
        (b"http://example.com:99999/", "Port"),
        (b"http://example.com:0/", "port"),
        (b"http://exa mple.com/", "forbidden"),
        (b"http://ex\xc3\xa4mple.com/", "non-ASCII"),
        (b"http://[::1/", "malformed"),
    ],
)
def test_parse_forward_target_refuses(raw: bytes, reason: str) -> None:
    with pytest.raises(ForwardRefused) as caught:
        parse_forward_target(raw)
    assert caught.value.status == 400
    assert reason in caught.value.reason


@given(st.binary(max_size=200))
def test_parse_forward_target_parses_or_refuses(raw: bytes) -> None:
    try:
        target = parse_forward_target(b"http://" + raw)
    except ForwardRefused as exc:
        assert exc.status == 400
    else:
        assert 1 <= target.port <= 65535
        assert target.path.startswith(b"/")
        assert b" " not in target.path


def test_rewrite_request_drops_hop_by_hop_and_proxy_credentials() -> None:
    request = h11.Request(
        method="POST",
        target="http://api:8080/items?x=1",
        headers=[
            ("Host", "elsewhere.example"),
            ("Proxy-Authorization", "Basic c2VjcmV0OnNlY3JldA=="),
            ("Proxy-Connection", "keep-alive"),
            ("Connection", "keep-alive, X-Private"),
            ("X-Private", "drop me"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Upgrade", "websocket"),
            ("Transfer-Encoding", "chunked"),
            ("X-Kept", "yes"),
        ],
    )
    target, forwarded = rewrite_request(request)
    assert (target.host, target.port) == ("api", 8080)
    assert forwarded.target == b"/items?x=1"
    names = [name for name, _ in forwarded.headers]
    assert names[0] == b"host"
    assert dict(forwarded.headers)[b"host"] == b"api:8080"
    assert names.count(b"host") == 1
    for dropped in (
        b"proxy-authorization",
        b"proxy-connection",
        b"connection",
        b"x-private",
        b"keep-alive",
        b"te",
        b"upgrade",
    ):
        assert dropped not in names
    assert dict(forwarded.headers)[b"x-kept"] == b"yes"
    assert dict(forwarded.headers)[b"transfer-encoding"] == b"chunked"


def test_rewrite_request_drops_content_length_beside_transfer_encoding() -> None:
    request = h11.Request(
        method="POST",
        target="http://a.example/",
        headers=[("Host", "a.example"), ("Transfer-Encoding", "chunked")],
    )
    # h11 itself refuses to parse both, so build the conflicting list by hand.
    _, forwarded = rewrite_request(request)
    assert b"content-length" not in [name for name, _ in forwarded.headers]


def test_rewrite_response_drops_hop_by_hop() -> None:
    response = h11.Response(
        status_code=200,
        headers=[
            ("Connection", "close, X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"),
            ("Content-Length", "3"),
            ("ETag", '"abc"'),
        ],
    )
    rewritten = rewrite_response(response)
    assert isinstance(rewritten, h11.Response)
    assert [name for name, _ in rewritten.headers] == [b"content-length", b"etag"]


# -- through the real relay and egress ---------------------------------------------------------


def echo_app() -> web.Application:
    app = origin_app()

    async def headers(request: web.Request) -> web.Response:
        return web.json_response(
            {"headers": [[k, v] for k, v in request.headers.items()], "path": request.path_qs}
        )

    async def slow_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(3):
            await response.write(f"part {i}\n".encode())
            await asyncio.sleep(0.05)
        await response.write_eof()
        return response

    app.router.add_get("/headers", headers)
    app.router.add_get("/chunked", slow_stream)
    return app


@dataclass
class PlainWorld:
    origin_port: int
    other_port: int
    relay: Relay
    egress: EgressServer

    def url(self, path: str = "/", port: int | None = None) -> str:
        return f"http://127.0.0.1:{port or self.origin_port}{path}"

    def allowed(self) -> float:
        value = self.egress.metrics.registry.get_sample_value(
            "upstreamproxy_tunnels_total", {"decision": "allow"}
        )
        return value or 0.0


@pytest.fixture
async def plain() -> AsyncIterator[PlainWorld]:
    runner, port = await _serve(echo_app(), None)
    other_runner, other_port = await _serve(echo_app(), None)
    # Both plain origins allowed by port (as a policy lists port 80), nothing else.
    policy = PolicyStore(
        parse_policy_document(
            {
                "policies": {
                    "default": {
                        "rules": [
                            {"id": "plain", "hosts": ["127.0.0.1"], "ports": [port, other_port]}
                        ],
                        "allow_cidrs": ["127.0.0.0/8"],
                    }
                }
            }
        )
    )
    egress = EgressServer(EgressConfig(), StaticTokens({TOKEN: Session(SESSION)}), policy)
    await egress.start()
    relay = Relay(RelayConfig(egress_url=egress.url, session_id=SESSION, token=Secret(TOKEN)))
    await relay.start()
    yield PlainWorld(port, other_port, relay, egress)
    await relay.stop()
    await egress.stop()
    await runner.cleanup()
    await other_runner.cleanup()


CLEAN = {"PATH": "/usr/bin:/bin"}


async def test_curl_fetches_plain_http_through_relay(plain: PlainWorld) -> None:
    before = plain.allowed()
    done = await run("curl", "-sS", "-x", plain.relay.proxy_url, plain.url(), env=CLEAN)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"hello from origin\n"
    await _until(lambda: plain.allowed() == before + 1)


async def test_large_download_streams_intact(plain: PlainWorld) -> None:
    size = 24 * 1024 * 1024 + 7
    done = await run(
        "curl", "-sS", "-x", plain.relay.proxy_url, plain.url(f"/bytes/{size}"), env=CLEAN
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) == size
    assert done.stdout == pattern_bytes(size)


async def test_chunked_upload_streams_intact(plain: PlainWorld) -> None:
    size = 8 * 1024 * 1024 + 3
    body = pattern_bytes(size)
    done = await run(
        "curl",
        "-sS",
        "-x",
        plain.relay.proxy_url,
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        "@-",
        plain.url("/upload"),
        env=CLEAN,
        stdin=body,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer == {"sha256": hashlib.sha256(body).hexdigest(), "size": size}


async def test_chunked_response_is_relayed(plain: PlainWorld) -> None:
    done = await run("curl", "-sS", "-x", plain.relay.proxy_url, plain.url("/chunked"), env=CLEAN)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"part 0\npart 1\npart 2\n"


async def test_origin_never_sees_proxy_credentials_or_hop_by_hop(plain: PlainWorld) -> None:
    done = await run(
        "curl",
        "-sS",
        "-x",
        plain.relay.proxy_url,
        "--proxy-user",
        "someone:hunter2",
        "-H",
        "Connection: X-Private",
        "-H",
        "X-Private: no",
        "-H",
        "X-Public: yes",
        "-H",
        "Host: spoofed.example",
        plain.url("/headers?a=1"),
        env=CLEAN,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    names = {name.lower(): value for name, value in seen["headers"]}
    assert "proxy-authorization" not in names
    assert "x-private" not in names
    assert "proxy-connection" not in names
    assert names["x-public"] == "yes"
    assert names["host"] == f"127.0.0.1:{plain.origin_port}"
    assert seen["path"] == "/headers?a=1"
    assert b"hunter2" not in done.stdout


async def test_keep_alive_reuses_the_tunnel_and_switches_targets(plain: PlainWorld) -> None:
    before = plain.allowed()
    reader, writer = await asyncio.open_connection("127.0.0.1", plain.relay.port)
    try:
        client = h11.Connection(h11.CLIENT)
        for port in (plain.origin_port, plain.origin_port, plain.other_port, plain.origin_port):
            url = plain.url("/", port)
            writer.write(
                client.send(
                    h11.Request(method="GET", target=url, headers=[("Host", f"127.0.0.1:{port}")])
                )
            )
            writer.write(client.send(h11.EndOfMessage()))
            await writer.drain()
            body = b""
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await asyncio.wait_for(reader.read(65536), 10))
                    continue
                if isinstance(event, h11.Response):
                    assert event.status_code == 200
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert body == b"hello from origin\n"
            client.start_next_cycle()
    finally:
        writer.close()
    # Same target twice: one tunnel; then a switch, and a switch back: three tunnels.
    await _until(lambda: plain.allowed() == before + 3)


async def test_policy_denial_reaches_the_client(plain: PlainWorld) -> None:
    done = await run(
        "curl", "-sS", "-i", "-x", plain.relay.proxy_url, "http://127.0.0.1:1/", env=CLEAN
    )
    assert done.returncode == 0, done.stderr
    head = done.stdout.decode()
    assert head.startswith("HTTP/1.1 403")
    assert "X-Upstreamproxy-Reason: " in head
    reason = head.split("X-Upstreamproxy-Reason: ", 1)[1].split("\r\n", 1)[0]
    assert reason  # the egress's machine-readable reason, passed through
    assert plain.relay.active_tunnels == 0 or await _until(lambda: plain.relay.active_tunnels == 0)


async def test_https_absolute_form_is_refused(plain: PlainWorld) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", plain.relay.port)
    writer.write(b"GET https://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    # Not an http:// absolute-form request: the CONNECT parser refuses the method, and says
    # what to do instead (not "only tunnels CONNECT": http:// URLs are forwarded).
    assert answer.startswith(b"HTTP/1.1 405")
    assert b"https:// URLs must be tunnelled with CONNECT" in answer
    assert b"only tunnels CONNECT" not in answer


async def test_malformed_second_request_gets_400_and_close(plain: PlainWorld) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", plain.relay.port)
    url = plain.url()
    writer.write(
        f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\nGET {url} HTTP/1.1\r\nBad Header\r\n\r\n".encode()
    )
    await writer.drain()
    data = b""
    while chunk := await asyncio.wait_for(reader.read(65536), 10):
        data += chunk
    writer.close()
    assert data.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 400" in data
    assert b"X-Upstreamproxy-Reason: malformed request" in data


async def test_client_gone_mid_response_releases_the_tunnel(plain: PlainWorld) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", plain.relay.port)
    writer.write(f"GET {plain.url('/bytes/50000000')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    await asyncio.wait_for(reader.readexactly(100_000), 10)
    writer.transport.abort()
    assert await _until(lambda: plain.relay.active_tunnels == 0)
    # What stays open at the egress is the relay's pre-opened sockets, no tunnel.
    assert await _until(lambda: len(plain.egress.active) <= plain.relay.config.pool_size)


async def test_client_resetting_between_requests_is_a_lost_connection(
    plain: PlainWorld, caplog: pytest.LogCaptureFixture
) -> None:
    """A keep-alive client that resets its connection after a whole response (while the
    forwarder waits for its next request) is a lost connection, logged as such: it was an
    unexpected failure with a traceback, which any process could repeat to flood the log."""
    reader, writer = await asyncio.open_connection("127.0.0.1", plain.relay.port)
    writer.write(f"GET {plain.url()} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    answer = b""
    while not answer.endswith(b"hello from origin\n"):
        answer += await asyncio.wait_for(reader.read(65536), 10)
    assert answer.startswith(b"HTTP/1.1 200")
    with caplog.at_level(logging.INFO, logger="upstreamproxy.relay"):
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # with SO_LINGER 0: a reset
        assert await _until(lambda: plain.relay.active_tunnels == 0)
    lines = [r.getMessage() for r in caplog.records if r.name == "upstreamproxy.relay"]
    assert not any("unexpectedly" in line or "internal-error" in line for line in lines), lines
    assert any("plain-http: connection-lost (ConnectionResetError)" in line for line in lines)


async def _until(check: object, timeout: float = 10.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
    return True


# -- the asyncio layer with a direct TCP "tunnel" -----------------------------------------------


class TcpStream:
    """A real TCP connection as a TunnelStream (the forwarder without relay and egress)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.closed = False

    async def receive(self, max_bytes: int) -> bytes:
        return await self.reader.read(max_bytes)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def aclose(self) -> None:
        self.closed = True
        self.writer.close()

    def buffered(self) -> int:
        return len(getattr(self.reader, "_buffer", b""))


class DirectTunnels:
    """``open_tunnel`` as direct TCP connections to ``port`` (whatever host:port is asked
    for), remembering every stream it opened."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.opened: list[TcpStream] = []

    async def __call__(self, host: str, port: int) -> TcpStream:
        stream = TcpStream(*await asyncio.open_connection("127.0.0.1", self.port))
        self.opened.append(stream)
        return stream


async def forward_once(
    request: bytes,
    open_tunnel: object,
    limits: ForwardLimits,
    read_timeout: float = 15,
    split_head: bool = True,
) -> tuple[bytes, float]:
    """Serve one raw client connection with ``serve_forward``; its answer and the time taken."""
    results: list[object] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head_end = await reader.readuntil(b"\r\n\r\n") if split_head else b""
            results.append(await serve_forward(reader, writer, head_end, open_tunnel, limits))  # type: ignore[arg-type]
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = b""
    async with asyncio.timeout(read_timeout):
        while chunk := await reader.read(65536):
            data += chunk
    elapsed = loop.time() - started
    writer.close()
    server.close()
    await server.wait_closed()
    return data, elapsed


async def test_silent_origin_gets_504_within_the_idle_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    streams: list[TcpStream] = []

    async def open_tunnel(host: str, p: int) -> TcpStream:
        stream = TcpStream(*await asyncio.open_connection(host, port))
        streams.append(stream)
        return stream

    answer, elapsed = await forward_once(
        b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n\r\n",
        open_tunnel,
        ForwardLimits(idle_timeout=0.5),
    )
    server.close()
    assert answer.startswith(b"HTTP/1.1 504")
    assert elapsed < 10
    assert streams and all(s.closed for s in streams)


async def test_origin_closing_without_answer_gets_502() -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.close()

    server = await asyncio.start_server(rude, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def open_tunnel(host: str, p: int) -> TcpStream:
        return TcpStream(*await asyncio.open_connection(host, port))

    answer, _ = await forward_once(
        b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n\r\n", open_tunnel, ForwardLimits()
    )
    server.close()
    assert answer.startswith(b"HTTP/1.1 502")
    assert b"without answering" in answer


async def test_garbage_from_origin_gets_502() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def open_tunnel(host: str, p: int) -> TcpStream:
        return TcpStream(*await asyncio.open_connection(host, port))

    answer, _ = await forward_once(
        b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n\r\n", open_tunnel, ForwardLimits()
    )
    server.close()
    assert answer.startswith(b"HTTP/1.1 502")


async def test_refused_tunnel_passes_status_reason_and_rule() -> None:
    async def refuse(host: str, port: int) -> TcpStream:
        raise TunnelRefused(
            403,
            "host-not-allowed",
            (
                ("X-Upstreamproxy-Reason", "host-not-allowed"),
                ("X-Upstreamproxy-Rule", "default-deny"),
                ("Set-Cookie", "no"),
            ),
        )

    answer, _ = await forward_once(
        b"GET http://blocked.example/ HTTP/1.1\r\nHost: x\r\n\r\n", refuse, ForwardLimits()
    )
    assert answer.startswith(b"HTTP/1.1 403")
    assert b"X-Upstreamproxy-Reason: host-not-allowed\r\n" in answer
    assert b"X-Upstreamproxy-Rule: default-deny\r\n" in answer
    assert b"Set-Cookie" not in answer


async def test_stalled_open_gets_504() -> None:
    async def stall(host: str, port: int) -> TcpStream:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    answer, elapsed = await forward_once(
        b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n\r\n", stall, ForwardLimits(open_timeout=0.3)
    )
    assert answer.startswith(b"HTTP/1.1 504")
    assert elapsed < 10


async def test_idle_keep_alive_client_is_closed() -> None:
    runner, port = await _serve(origin_app(), None)
    streams: list[TcpStream] = []

    async def open_tunnel(host: str, p: int) -> TcpStream:
        stream = TcpStream(*await asyncio.open_connection(host, p))
        streams.append(stream)
        return stream

    answer, elapsed = await forward_once(
        f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        open_tunnel,
        ForwardLimits(keepalive_timeout=0.5),
    )
    await runner.cleanup()
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b"hello from origin\n")
    assert elapsed < 10
    assert streams and all(s.closed for s in streams)


async def test_stale_keep_alive_tunnel_is_replaced_for_a_bodiless_request() -> None:
    """The origin closes its idle keep-alive connection; the next GET goes on a new tunnel."""

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
        await writer.drain()
        writer.close()  # without "Connection: close": the proxy believes it may reuse it

    server = await asyncio.start_server(once, "127.0.0.1", 0)
    tunnels = DirectTunnels(server.sockets[0].getsockname()[1])
    request = b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n\r\n"
    answer, _ = await forward_once(
        request + request.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1),
        tunnels,
        ForwardLimits(),
    )
    server.close()
    assert answer.count(b"HTTP/1.1 200 OK") == 2, answer
    assert len(tunnels.opened) == 2


@pytest.mark.parametrize(
    ("host", "hinted"),
    [
        ("api", True),
        ("db.", True),
        ("10.1.2.3", True),
        ("192.168.0.9", True),
        ("fe80::1", True),
        ("example.com", False),
        ("93.184.216.34", False),
    ],
)
def test_direct_route_hint(host: str, hinted: bool) -> None:
    hint = direct_route_hint(host)
    assert bool(hint) is hinted
    if hinted:
        assert f"--no-proxy {host}" in hint


async def test_refusal_of_a_single_label_name_carries_the_hint() -> None:
    async def refuse(host: str, port: int) -> TcpStream:
        raise TunnelRefused(
            403, "no-matching-rule", (("X-Upstreamproxy-Reason", "no-matching-rule"),)
        )

    answer, _ = await forward_once(
        b"GET http://api:8080/ HTTP/1.1\r\nHost: api\r\n\r\n", refuse, ForwardLimits()
    )
    assert answer.startswith(b"HTTP/1.1 403")
    assert b"X-Upstreamproxy-Reason: no-matching-rule\r\n" in answer
    assert b"--no-proxy api" in answer


async def test_request_fed_one_byte_at_a_time(plain: PlainWorld) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", plain.relay.port)
    request = (
        f"POST {plain.url('/upload')} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ).encode()
    for i in range(len(request)):
        writer.write(request[i : i + 1])
        await writer.drain()
    data = b""
    async with asyncio.timeout(15):
        while chunk := await reader.read(65536):
            data += chunk
    writer.close()
    assert data.startswith(b"HTTP/1.1 200")
    assert hashlib.sha256(b"hello").hexdigest().encode() in data


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_faults_release_every_descriptor(plain: PlainWorld) -> None:
    """Refusals, a vanished client and a garbage request leave no socket behind."""
    await run("curl", "-sS", "-x", plain.relay.proxy_url, plain.url(), env=CLEAN)  # warm up
    await _until(
        lambda: (
            plain.relay.active_tunnels == 0
            and len(plain.egress.active) <= plain.relay.config.pool_size
        )
    )
    baseline = open_fds()
    for _ in range(3):
        await run("curl", "-sS", "-x", plain.relay.proxy_url, "http://127.0.0.1:1/", env=CLEAN)
        await run("curl", "-sS", "-x", plain.relay.proxy_url, plain.url("/chunked"), env=CLEAN)
        reader, writer = await asyncio.open_connection("127.0.0.1", plain.relay.port)
        writer.write(f"GET {plain.url('/bytes/20000000')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        await asyncio.wait_for(reader.readexactly(10_000), 10)
        writer.transport.abort()
        reader, writer = await asyncio.open_connection("127.0.0.1", plain.relay.port)
        writer.write(b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(reader.read(65536), 10)).startswith(b"HTTP/1.1 400")
        writer.close()
    await _until(
        lambda: (
            plain.relay.active_tunnels == 0
            and len(plain.egress.active) <= plain.relay.config.pool_size
        )
    )
    await _until(lambda: open_fds() <= baseline)


@settings(max_examples=60, deadline=None)
@given(
    st.binary(max_size=300),
    st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT"]),
)
def test_any_request_bytes_get_an_answer_or_a_close(garbage: bytes, method: bytes) -> None:
    """Whatever follows a forwardable request line: an HTTP answer or a close, never a crash
    or a hang; the tunnel opened (if any) is closed."""

    async def scenario() -> None:
        runner, port = await _serve(origin_app(), None)
        streams: list[TcpStream] = []

        async def open_tunnel(host: str, p: int) -> TcpStream:
            stream = TcpStream(*await asyncio.open_connection("127.0.0.1", port))
            streams.append(stream)
            return stream

        try:
            request = method + b" http://127.0.0.1/ HTTP/1.1\r\n" + garbage
            answer, _ = await forward_once(
                request,
                open_tunnel,
                ForwardLimits(keepalive_timeout=0.3, idle_timeout=0.5),
                split_head=False,
            )
            assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:100]
            assert all(stream.closed for stream in streams)
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


async def test_unsolicited_switching_protocols_gets_502() -> None:
    async def switcher(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
        )
        await writer.drain()
        await asyncio.sleep(5)

    server = await asyncio.start_server(switcher, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def open_tunnel(host: str, p: int) -> TcpStream:
        return TcpStream(*await asyncio.open_connection(host, port))

    answer, elapsed = await forward_once(
        b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n\r\n", open_tunnel, ForwardLimits()
    )
    server.close()
    assert answer.startswith(b"HTTP/1.1 502")
    assert elapsed < 10


@pytest.fixture
async def firehose_http() -> AsyncIterator[tuple[int, list[int]]]:
    """A plain-HTTP origin whose chunked body never ends; counts what it managed to send."""
    sent = [0]
    block = b"x" * 65536
    chunk = b"%x\r\n" % len(block) + block + b"\r\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            while True:
                writer.write(chunk)
                await writer.drain()
                sent[0] += len(block)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], sent
    server.close()


async def test_slow_client_pauses_the_origin(firehose_http: tuple[int, list[int]]) -> None:
    """Streaming, not buffering: a client that stops reading stops the origin, end to end."""
    port, sent = firehose_http
    policy = PolicyStore(
        parse_policy_document(
            {
                "policies": {
                    "default": {
                        "rules": [{"id": "fire", "hosts": ["127.0.0.1"], "ports": [port]}],
                        "allow_cidrs": ["127.0.0.0/8"],
                    }
                }
            }
        )
    )
    egress = EgressServer(EgressConfig(), StaticTokens({TOKEN: Session(SESSION)}), policy)
    await egress.start()
    relay = Relay(RelayConfig(egress_url=egress.url, session_id=SESSION, token=Secret(TOKEN)))
    await relay.start()
    try:
        rss_before = rss_kib(os.getpid())
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        await asyncio.sleep(2.0)  # the client reads nothing
        stalled_at = sent[0]
        await asyncio.sleep(1.0)
        assert stalled_at < 64 * 1024 * 1024, stalled_at
        assert sent[0] - stalled_at <= 1024 * 1024
        assert rss_kib(os.getpid()) - rss_before < 64 * 1024
        got = 0  # ... and it resumes when the client reads again
        while got < stalled_at + 4 * 1024 * 1024:
            got += len(await asyncio.wait_for(reader.read(1 << 20), 10))
        writer.close()
    finally:
        await relay.stop()
        await egress.stop()


async def test_slow_origin_reader_pauses_the_uploading_client(relay: Relay) -> None:
    """A request body is streamed too: an origin that does not read stops the client."""
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
        _, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(
            f"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        block = b"y" * 65536
        chunk = b"%x\r\n" % len(block) + block + b"\r\n"
        written = 0
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(3.0):
                while True:
                    writer.write(chunk)
                    await writer.drain()
                    written += len(block)
        assert written < 64 * 1024 * 1024, written
        reading.set()
        await asyncio.sleep(0.5)
        assert received[0] > 0
        writer.close()
    finally:
        server.close()


async def test_client_leaving_mid_upload_releases_the_tunnel_at_once(plain: PlainWorld) -> None:
    """The origin still waits for the rest of the body; the relay must not wait with it
    (it used to hold the tunnel until the 120 s idle timeout)."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", plain.relay.port)
    writer.write(
        f"POST {plain.url('/upload')} HTTP/1.1\r\nHost: x\r\n"
        "Content-Length: 1000000\r\n\r\n".encode()
        + b"x" * 1000
    )
    await writer.drain()
    await _until(lambda: plain.relay.active_tunnels == 2)  # the client's and its tunnel
    writer.transport.abort()
    assert await _until(lambda: plain.relay.active_tunnels == 0, timeout=5)


async def test_malformed_chunk_mid_upload_gets_400_at_once(plain: PlainWorld) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", plain.relay.port)
    writer.write(
        f"POST {plain.url('/upload')} HTTP/1.1\r\nHost: x\r\n"
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\n".encode()
    )
    await writer.drain()
    data = b""
    async with asyncio.timeout(5):
        while chunk := await reader.read(65536):
            data += chunk
    writer.close()
    assert data.startswith(b"HTTP/1.1 400"), data
    assert b"X-Upstreamproxy-Reason: malformed request body: illegal chunk header" in data
    assert await _until(lambda: plain.relay.active_tunnels == 0, timeout=5)


async def test_waiting_for_the_answer_after_an_upload_does_not_spin() -> None:
    """Body sent, answer late: the forwarder waits on the origin alone (no busy loop)."""

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\nhello")
        await asyncio.sleep(1.0)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(slow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def open_tunnel(host: str, p: int) -> TcpStream:
        return TcpStream(*await asyncio.open_connection(host, port))

    cpu = time.process_time()
    answer, elapsed = await forward_once(
        b"POST http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        open_tunnel,
        ForwardLimits(),
    )
    server.close()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok"), answer
    assert elapsed >= 1.0
    assert time.process_time() - cpu < 0.5


@pytest.mark.parametrize("late", [False, True], ids=["with-the-answer", "while-idle"])
async def test_bytes_after_a_bodiless_response_are_not_the_next_answer(
    relay: Relay, late: bool
) -> None:
    """An origin that sends a body on a 204 (or a HEAD answer) - with the answer, or later
    while the tunnel idles between requests: those bytes must not be read as the answer to the
    next request on the same tunnel; the next request gets a fresh one."""
    connections = [0]

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        first = connections[0] == 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                if first:
                    first = False
                    writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                    if late:
                        await writer.drain()
                        await asyncio.sleep(0.2)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nstray!")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\norigin")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(origin, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    second = f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode() + (b"" if late else second))
        await writer.drain()
        data = b""
        async with asyncio.timeout(10):
            if late:
                data = await reader.readuntil(b"\r\n\r\n")
                await asyncio.sleep(0.6)  # the stray bytes reach the relay meanwhile
                writer.write(second)
                await writer.drain()
            while chunk := await reader.read(65536):
                data += chunk
        writer.close()
    finally:
        server.close()
    assert data.startswith(b"HTTP/1.1 204")
    assert data.endswith(b"\r\n\r\norigin"), data
    assert b"stray!" not in data
    assert connections[0] == 2


# -- one head limit for every request on a connection ------------------------------------------


async def read_to_close(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    """Everything the relay sends until it closes (within ``timeout``)."""
    data = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            data += chunk
    return data


def _padded_get(url: str, head_bytes: int) -> bytes:
    """A GET for ``url`` whose head is exactly ``head_bytes`` long (in fields of 4 KiB: the
    origin, aiohttp, takes lines of up to 8190 bytes)."""
    head = f"GET {url} HTTP/1.1\r\nHost: x\r\n".encode()
    while len(head) + 4096 + 2 < head_bytes:
        head += b"X-Pad: " + b"p" * (4096 - 9) + b"\r\n"
    head += b"X-End: "
    return head + b"p" * (head_bytes - len(head) - 4) + b"\r\n\r\n"


@pytest.mark.parametrize("first", [True, False], ids=["first-request", "later-request"])
@pytest.mark.parametrize(("size", "status"), [(MAX_REQUEST_HEAD, 200), (MAX_REQUEST_HEAD + 1, 431)])
async def test_request_head_limit_is_the_same_for_every_request(
    plain: PlainWorld, first: bool, size: int, status: int
) -> None:
    """A forwarded request's head may be 16 KiB whether it opens the connection (read by the
    tunnel core, which once capped it at the CONNECT limit of 8 KiB) or follows another (read
    by h11, which bounds only an incomplete head: one arriving whole in a read passed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", plain.relay.port)
    small = f"GET {plain.url()} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    big = _padded_get(plain.url(), size)
    writer.write(big if first else small + big)  # one write: the big head arrives whole
    await writer.drain()
    data = b""
    async with asyncio.timeout(10):
        while chunk := await reader.read(65536):
            data += chunk
            if status == 200 and data.count(b"hello from origin\n") == (1 if first else 2):
                break
    writer.close()
    answers = data.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == (1 if first else 2), data
    assert answers[-1].startswith(str(status).encode()), data
    if status == 431:
        assert f"request head exceeds {MAX_REQUEST_HEAD} bytes".encode() in data


async def test_connect_after_a_plain_request_is_refused_clearly(plain: PlainWorld) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", plain.relay.port)
    writer.write(
        f"GET {plain.url()} HTTP/1.1\r\nHost: x\r\n\r\n"
        f"CONNECT 127.0.0.1:{plain.origin_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    await writer.drain()
    data = await read_to_close(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 400" in data
    assert b"X-Upstreamproxy-Reason: CONNECT must be the first request on a connection" in data


async def test_a_timed_out_request_on_a_reused_tunnel_is_not_sent_again() -> None:
    """The origin answers the first GET and then says nothing: one 504 after one idle
    timeout, not a second request (and a second wait as long) on a new tunnel."""
    heads: list[bytes] = []

    async def answers_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
        await writer.drain()
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            await reader.read()  # silent from here on

    server = await asyncio.start_server(answers_once, "127.0.0.1", 0)
    tunnels = DirectTunnels(server.sockets[0].getsockname()[1])
    request = b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n\r\n"
    answer, elapsed = await forward_once(request * 2, tunnels, ForwardLimits(idle_timeout=0.5))
    server.close()
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer
    assert b"HTTP/1.1 504" in answer
    assert len(tunnels.opened) == 1 and len(heads) == 2
    assert elapsed < 0.95
