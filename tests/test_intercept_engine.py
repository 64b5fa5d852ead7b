"""serve_intercepted end to end: a real TLS client on one end of a socket pair, a real aiohttp
HTTPS origin (own throwaway CA) behind it, and real curl through a loopback listener."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest
from aiohttp import web
from conftest import pattern_bytes, rss_kib, run
from prometheus_client import generate_latest
from testpki import TestCA, make_ca

from upstreamproxy.egress.intercept import (
    InterceptEnv,
    InterceptResult,
    InterceptRule,
    InterceptTimeouts,
    LeafCache,
    PrometheusInterceptMetrics,
    SecretStore,
    make_upstream_context,
    parse_intercept_rule,
    serve_intercepted,
)
from upstreamproxy.egress.intercept.clienthello import NeedMore, NotClientHello, offered_alpn

HOST = "api.example.test"
TOKEN_VALUE = "ghp_SUPERSECRET_0123456789abcdef"
KEY_VALUE = "key-VERY-SECRET-42"
RULE = parse_intercept_rule(
    {
        "inject": [
            {"header": "Authorization", "value": "Bearer {secret:github-token}"},
            {"header": "X-Api-Key", "value": "{secret:api-key}"},
        ]
    },
    "github",
    "rules[0].intercept",
)
MISSING_RULE = parse_intercept_rule(
    {"inject": [{"header": "Authorization", "value": "token {secret:not-there}"}]},
    "broken",
    "rules[1].intercept",
)


def write_k8s_secrets(directory: Path, values: dict[str, str]) -> None:
    """The layout a kubelet writes for a Secret volume."""
    stamp = directory / "..2024_01_01_00_00_00.000000001"
    stamp.mkdir(parents=True)
    for name, value in values.items():
        (stamp / name).write_text(value)
    (directory / "..data").symlink_to(stamp.name)
    for name in values:
        (directory / name).symlink_to(f"..data/{name}")


# -- the origin ------------------------------------------------------------------------------


@dataclass
class OriginState:
    requests: list[dict[str, object]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)


def origin_app(state: OriginState) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for piece in request.content.iter_chunked(64 * 1024):
            digest.update(piece)
            size += len(piece)
        record = {
            "method": request.method,
            "path": request.path_qs,
            "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
            "size": size,
            "sha256": digest.hexdigest(),
        }
        state.requests.append(record)
        response = web.json_response(record)
        response.headers["X-Origin-Hop"] = "drop-me"
        response.headers["X-Origin-Kept"] = "keep-me"
        response.headers["Keep-Alive"] = "timeout=5"
        response.headers["Connection"] = "X-Origin-Hop"
        return response

    async def stream(request: web.Request) -> web.StreamResponse:
        state.requests.append({"path": request.path_qs})
        size = int(request.match_info["size"])
        response = web.StreamResponse()
        if request.query.get("length"):
            response.content_length = size
        await response.prepare(request)
        if request.method == "HEAD":
            await response.write_eof()
            return response
        block = pattern_bytes(64 * 1024)
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def hang(request: web.Request) -> web.Response:
        state.requests.append({"path": request.path_qs})
        await state.release.wait()
        return web.Response(text="late\n")

    async def closing(request: web.Request) -> web.Response:
        state.requests.append({"path": request.path_qs})
        response = web.Response(text="bye\n")
        response.force_close()
        return response

    async def early(request: web.Request) -> web.Response:
        state.requests.append({"path": request.path_qs})
        return web.Response(status=413, text="too big\n")

    async def big_head(request: web.Request) -> web.Response:
        state.requests.append({"path": request.path_qs})
        return web.Response(text="big\n", headers={"X-Big": "b" * int(request.match_info["size"])})

    app = web.Application(client_max_size=1024**3)
    app.router.add_get("/bighead/{size:\\d+}", big_head)
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_get("/stream/{size:\\d+}", stream)
    app.router.add_post("/early", early)
    app.router.add_get("/hang", hang)
    app.router.add_get("/close", closing)
    return app


async def start_origin(
    state: OriginState, cert_dir: Path, ca: TestCA, **runner_kwargs: float
) -> tuple[web.AppRunner, int]:
    leaf = ca.issue([HOST, "localhost", "127.0.0.1"])
    (cert_dir / "origin.pem").write_bytes(leaf.chain_pem())
    (cert_dir / "origin.key").write_bytes(leaf.key_pem())
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_dir / "origin.pem", cert_dir / "origin.key")
    runner = web.AppRunner(origin_app(state), access_log=None, **runner_kwargs)  # type: ignore[arg-type]
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port: int = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


# -- the harness -----------------------------------------------------------------------------


@dataclass
class Harness:
    ca_file: Path
    env: InterceptEnv
    origin: OriginState
    dials: list[tuple[str, int]]
    audit: list[dict[str, object]]
    metrics: PrometheusInterceptMetrics
    results: list[InterceptResult]
    tasks: list[asyncio.Task[InterceptResult]]

    def serve(
        self,
        rule: InterceptRule = RULE,
        connect_host: str = HOST,
        connect_port: int = 443,
        sock: socket.socket | None = None,
    ) -> socket.socket | None:
        """Start serve_intercepted on a new socket pair; return the client's end."""
        client_end = None
        if sock is None:
            sock, client_end = socket.socketpair()

        async def serve() -> InterceptResult:
            result = await serve_intercepted(sock, connect_host, connect_port, rule, self.env)
            self.results.append(result)
            return result

        self.tasks.append(asyncio.get_running_loop().create_task(serve()))
        return client_end

    async def result(self) -> InterceptResult:
        return await asyncio.wait_for(self.tasks[-1], 10)

    def counter(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"upstreamproxy_intercept_{name}", labels)
        return value or 0.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    base = tmp_path_factory.mktemp("intercept-pki")
    intercept_ca = make_ca("intercept test egress CA")
    upstream_ca = make_ca("intercept test upstream CA")
    rogue_ca = make_ca("someone else's CA")
    (base / "egress-ca.pem").write_bytes(intercept_ca.cert_pem())
    (base / "upstream-ca.pem").write_bytes(upstream_ca.cert_pem())
    return {
        "dir": base,
        "intercept_ca": intercept_ca,
        "upstream_ca": upstream_ca,
        "rogue_ca": rogue_ca,
        "leaves": LeafCache(intercept_ca.product()),
    }


async def make_harness(
    pki: dict[str, object], tmp_path: Path, *, origin_ca: str = "upstream_ca", **kw: object
) -> AsyncIterator[Harness]:
    base: Path = pki["dir"]  # type: ignore[assignment]
    secrets_dir = tmp_path / "secrets"
    write_k8s_secrets(secrets_dir, {"github-token": TOKEN_VALUE + "\n", "api-key": KEY_VALUE})
    state = OriginState()
    runner, port = await start_origin(state, tmp_path, pki[origin_ca], **kw)  # type: ignore[arg-type]
    dials: list[tuple[str, int]] = []

    async def connector(host: str, p: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        dials.append((host, p))
        return await asyncio.open_connection("127.0.0.1", port)

    audit: list[dict[str, object]] = []
    metrics = PrometheusInterceptMetrics()
    env = InterceptEnv(
        leaves=pki["leaves"],  # type: ignore[arg-type]
        secrets=SecretStore(secrets_dir),
        upstream_connector=connector,
        upstream_ssl_context=make_upstream_context(str(base / "upstream-ca.pem")),
        timeouts=InterceptTimeouts(handshake=5, connect=5, idle=10, keepalive=5),
        metrics=metrics,
        audit_request=audit.append,
    )
    harness = Harness(base / "egress-ca.pem", env, state, dials, audit, metrics, [], [])
    try:
        yield harness
    finally:
        for task in harness.tasks:
            task.cancel()
        await asyncio.gather(*harness.tasks, return_exceptions=True)
        state.release.set()
        await runner.cleanup()


@pytest.fixture
async def h(pki: dict[str, object], tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in make_harness(pki, tmp_path):
        yield harness


class Client:
    """A TLS client speaking HTTP/1.1 through h11 (or raw bytes) over the socket pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, h: Harness, sni: str | None = HOST, **serve_kw: object) -> Client:
        sock = h.serve(**serve_kw)  # type: ignore[arg-type]
        ctx = ssl.create_default_context(cafile=str(h.ca_file))
        if sni is None or sni == "":
            ctx.check_hostname = False
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=sni or ""), 10
        )
        return cls(reader, writer)

    async def send(self, *events: h11.Event) -> None:
        for event in events:
            self.writer.write(self.conn.send(event) or b"")
            await self.writer.drain()

    async def response(self) -> tuple[h11.Response, bytes]:
        head: h11.Response | None = None
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await asyncio.wait_for(self.reader.read(65536), 10))
                continue
            if isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return head, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("closed")

    async def get(
        self, path: str = "/echo", headers: list[tuple[str, str]] | None = None
    ) -> tuple[h11.Response, bytes]:
        await self.send(
            h11.Request(method="GET", target=path, headers=[("Host", HOST), *(headers or [])]),
            h11.EndOfMessage(),
        )
        return await self.response()

    async def raw(self, data: bytes) -> bytes:
        """Write raw bytes and read everything until the server closes."""
        self.writer.write(data)
        await self.writer.drain()
        out = bytearray()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while chunk := await asyncio.wait_for(self.reader.read(65536), 10):
                out += chunk
        return bytes(out)

    def close(self) -> None:
        self.writer.close()


def header(response: h11.Response, name: str) -> list[str]:
    return [v.decode() for k, v in response.headers if k == name.lower().encode()]


def origin_headers(record: dict[str, object], name: str) -> list[str]:
    pairs: list[list[str]] = record["headers"]  # type: ignore[assignment]
    return [v for k, v in pairs if k.lower() == name.lower()]


# -- credential injection, keep-alive, bodies -------------------------------------------------


async def test_origin_receives_injected_credentials_never_the_clients(h: Harness) -> None:
    client = await Client.connect(h)
    response, body = await client.get(
        "/echo?x=1",
        [
            ("Authorization", "Bearer sandbox-own"),
            ("authorization", "Basic again"),
            ("X-Api-Key", "mine"),
            ("Accept", "*/*"),
        ],
    )
    assert response.status_code == 200
    record = json.loads(body)
    assert origin_headers(record, "Authorization") == [f"Bearer {TOKEN_VALUE}"]
    assert origin_headers(record, "X-Api-Key") == [KEY_VALUE]
    assert origin_headers(record, "Accept") == ["*/*"]
    assert origin_headers(record, "Host") == [HOST]
    assert h.dials == [(HOST, 443)]
    # the sandbox saw a certificate for the real name, from the egress CA
    cert = client.writer.get_extra_info("peercert")
    assert ("DNS", HOST) in cert["subjectAltName"]
    assert client.writer.get_extra_info("ssl_object").selected_alpn_protocol() in (None, "http/1.1")
    client.close()
    result = await h.result()
    assert result.requests == 1 and result.sni == HOST
    [line] = h.audit
    assert line["method"] == "GET" and line["path"] == "/echo" and line["status"] == 200
    assert line["rule"] == "github" and line["injected"] == ["github-token", "api-key"]
    assert h.counter("rewrites_total", rule="github", header="authorization") == 1
    assert h.counter("requests_total", rule="github", code="200") == 1


async def test_keep_alive_many_requests_one_upstream_connection(h: Harness) -> None:
    client = await Client.connect(h)
    for i in range(5):
        response, body = await client.get(f"/echo/{i}")
        assert response.status_code == 200 and json.loads(body)["path"] == f"/echo/{i}"
    # HEAD keeps the connection usable too
    await client.send(
        h11.Request(method="HEAD", target="/stream/10?length=1", headers=[("Host", HOST)]),
        h11.EndOfMessage(),
    )
    response, body = await client.response()
    assert (
        response.status_code == 200 and body == b"" and header(response, "content-length") == ["10"]
    )
    response, _ = await client.get("/echo/last")
    assert response.status_code == 200
    client.close()
    result = await h.result()
    assert result.requests == 7
    assert result.upstream_connections == 1 and len(h.dials) == 1


async def test_pipelined_requests_answered_in_order(h: Harness) -> None:
    client = await Client.connect(h)
    data = (
        b"".join(f"GET /echo/{i} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode() for i in range(3))
        + f"GET /echo/end HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
    )
    out = await client.raw(data)
    assert out.count(b"HTTP/1.1 200") == 4
    positions = [out.index(f'"/echo/{i}"'.encode()) for i in (0, 1, 2, "end")]
    assert positions == sorted(positions)


async def test_chunked_request_and_response_bodies(h: Harness) -> None:
    client = await Client.connect(h)
    pieces = [b"a" * 10, b"b" * 70000, b"c"]
    await client.send(
        h11.Request(
            method="POST",
            target="/echo",
            headers=[("Host", HOST), ("Transfer-Encoding", "chunked")],
        ),
        *(h11.Data(data=p) for p in pieces),
        h11.EndOfMessage(),
    )
    response, body = await client.response()
    record = json.loads(body)
    assert record["size"] == 70011
    assert record["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert origin_headers(record, "Transfer-Encoding") == ["chunked"]
    assert origin_headers(record, "Content-Length") == []
    response, body = await client.get("/stream/200000")
    assert header(response, "transfer-encoding") == ["chunked"]
    assert body == pattern_bytes(200000)
    client.close()


async def test_expect_100_continue_is_relayed(h: Harness) -> None:
    client = await Client.connect(h)
    client.writer.write(
        f"PUT /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\n"
        "Expect: 100-continue\r\n\r\n".encode()
    )
    interim = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    client.writer.write(b"hello")
    rest = await asyncio.wait_for(client.reader.readuntil(b"}"), 5)
    assert b"HTTP/1.1 200" in rest and b'"size": 5' in rest
    client.close()


async def test_early_response_closes_without_waiting_for_the_body(h: Harness) -> None:
    client = await Client.connect(h)
    await client.send(
        h11.Request(
            method="POST",
            target="/early",
            headers=[("Host", HOST), ("Content-Length", str(50 * 1024 * 1024))],
        ),
        h11.Data(data=b"x" * 65536),
    )
    response, body = await client.response()
    assert response.status_code == 413 and body == b"too big\n"
    result = await h.result()
    assert result.requests == 1


async def test_large_bodies_stream_both_ways_in_bounded_memory(h: Harness) -> None:
    size = 64 * 1024 * 1024
    client = await Client.connect(h)
    peak = baseline = rss_kib(os.getpid())
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(os.getpid()))
            await asyncio.sleep(0.01)

    sampler = asyncio.get_running_loop().create_task(sample())
    block = pattern_bytes(256 * 1024)
    await client.send(
        h11.Request(
            method="POST", target="/echo", headers=[("Host", HOST), ("Content-Length", str(size))]
        )
    )
    for _ in range(size // len(block)):
        await client.send(h11.Data(data=block))
    await client.send(h11.EndOfMessage())
    _, body = await client.response()
    record = json.loads(body)
    assert record["size"] == size
    assert record["sha256"] == hashlib.sha256(block * (size // len(block))).hexdigest()

    await client.send(
        h11.Request(method="GET", target=f"/stream/{size}", headers=[("Host", HOST)]),
        h11.EndOfMessage(),
    )
    received = 0
    digest = hashlib.sha256()
    while True:
        event = client.conn.next_event()
        if event is h11.NEED_DATA:
            client.conn.receive_data(await asyncio.wait_for(client.reader.read(262144), 10))
        elif isinstance(event, h11.Data):
            received += len(event.data)
            digest.update(event.data)
        elif isinstance(event, h11.EndOfMessage):
            break
    done.set()
    await sampler
    assert received == size
    growth_mib = (peak - baseline) / 1024
    print(f"RSS growth {growth_mib:.1f} MiB")
    assert growth_mib < 32, f"RSS grew {growth_mib:.0f} MiB for 2 x 64 MiB bodies"
    client.close()


# -- TLS name checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sni", "reason"), [(None, "sni-missing"), ("other.example.test", "sni-mismatch")]
)
async def test_bad_sni_refuses_the_handshake(h: Harness, sni: str | None, reason: str) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await Client.connect(h, sni=sni)
    result = await h.result()
    assert result.close_cause == f"handshake-refused ({reason})"
    assert h.counter("sni_mismatches_total", reason=reason) == 1
    assert h.dials == []


async def test_sni_is_case_insensitive(h: Harness) -> None:
    client = await Client.connect(h, sni="API.Example.TEST", connect_host="api.example.test.")
    response, _ = await client.get(headers=[])
    assert response.status_code == 200
    client.close()


async def test_ip_literal_host_needs_no_sni(h: Harness) -> None:
    client = await Client.connect(h, sni=None, connect_host="127.0.0.1")
    assert ("IP Address", "127.0.0.1") in client.writer.get_extra_info("peercert")["subjectAltName"]
    await client.send(
        h11.Request(method="GET", target="/echo", headers=[("Host", "127.0.0.1")]),
        h11.EndOfMessage(),
    )
    response, _ = await client.response()
    assert response.status_code == 200
    client.close()


async def test_sni_mismatch_without_refusal_answers_421(h: Harness) -> None:
    h.env.refuse_unlisted_sni = False
    sock = h.serve()
    ctx = ssl.create_default_context(cafile=str(h.ca_file))
    ctx.check_hostname = False  # the leaf is for the CONNECT host, not the name we asked
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=ctx, server_hostname="other.example.test"
    )
    client = Client(reader, writer)
    out = await client.raw(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 421 ") and b"sni-mismatch" in out
    assert h.dials == []


# -- hostile requests: refused, nothing goes upstream ----------------------------------------


HOSTILE = [
    (b"GET / HTTP/1.1\r\nHost: evil.example.test\r\n\r\n", 400, b"host-mismatch"),
    (f"GET / HTTP/1.1\r\nHost: {HOST}:8443\r\n\r\n".encode(), 400, b"host-mismatch"),
    (f"GET / HTTP/1.1\r\nHost: {HOST}\r\nHost: {HOST}\r\n\r\n".encode(), 400, b""),
    (b"GET / HTTP/1.1\r\n\r\n", 400, b""),
    (
        f"GET https://{HOST}/ HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode(),
        400,
        b"absolute-form-refused",
    ),
    (
        f"GET http://evil.test/ HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode(),
        400,
        b"absolute-form-refused",
    ),
    (
        f"CONNECT evil.test:443 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode(),
        501,
        b"connect-not-supported",
    ),
    (
        f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\n"
        "Upgrade: websocket\r\n\r\n".encode(),
        501,
        b"upgrade-not-supported",
    ),
    (
        f"POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked"
        "\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n".encode(),
        400,
        b"conflicting-framing",
    ),
    (
        f"POST / HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4"
        "\r\n\r\n0\r\n\r\n".encode(),
        400,
        b"conflicting-framing",
    ),
    (
        f"POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 4\r\n"
        "Content-Length: 5\r\n\r\nabcd".encode(),
        400,
        b"",
    ),
    (
        f"POST / HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".encode(),
        501,
        b"",
    ),
    (f"POST / HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding : chunked\r\n\r\n".encode(), 400, b""),
    (f"POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: -1\r\n\r\n".encode(), 400, b""),
    (f"GET / HTTP/1.1\r\nHost: {HOST}\r\nX: {'a' * 200000}\r\n\r\n".encode(), 431, b""),
]


@pytest.mark.parametrize(
    ("data", "status", "reason"), HOSTILE, ids=[f"case{i}" for i in range(len(HOSTILE))]
)
async def test_hostile_request_is_refused_before_the_upstream(
    h: Harness, data: bytes, status: int, reason: bytes
) -> None:
    client = await Client.connect(h)
    out = await client.raw(data)
    assert out.startswith(f"HTTP/1.1 {status} ".encode()), out[:200]
    assert reason in out
    assert h.dials == [] and h.origin.requests == []
    await h.result()


@pytest.mark.parametrize(("size", "status"), [(60_000, 200), (70_000, 431), (130_000, 431)])
async def test_request_head_limit_is_exact(h: Harness, size: int, status: int) -> None:
    # Regression: a 130 kB head passed the "64 KiB" limit (h11 only bounds incomplete heads).
    client = await Client.connect(h)
    pad = "".join(f"X-Pad-{i}: {'p' * 3986}\r\n" for i in range(size // 4000))  # 4000 B each
    head = f"GET /echo HTTP/1.1\r\nHost: {HOST}\r\n{pad}\r\n".encode()
    client.writer.write(head)
    out = bytearray()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while b"\r\n\r\n" not in out and (
            chunk := await asyncio.wait_for(client.reader.read(65536), 10)
        ):
            out += chunk
    assert out.startswith(f"HTTP/1.1 {status} ".encode()), bytes(out[:100])
    assert len(h.origin.requests) == (1 if status == 200 else 0)
    client.close()


@pytest.mark.parametrize(("size", "status"), [(60_000, 200), (66_000, 502), (90_000, 502)])
async def test_response_head_limit_is_exact(h: Harness, size: int, status: int) -> None:
    # Regression: a 90 kB response head passed.
    client = await Client.connect(h)
    response, _ = await client.get(f"/bighead/{size}")
    assert response.status_code == status
    if status == 502:
        assert header(response, "x-upstreamproxy-reason") == ["upstream-head-too-large"]
    client.close()


async def test_host_mismatch_is_counted(h: Harness) -> None:
    client = await Client.connect(h)
    await client.raw(b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n")
    await h.result()
    assert h.counter("host_mismatches_total", rule="github") == 1
    assert h.audit[-1]["status"] == 400 and h.audit[-1]["error"] == "host-mismatch"


async def test_hop_by_hop_and_connection_listed_headers_are_stripped(h: Harness) -> None:
    client = await Client.connect(h)
    response, body = await client.get(
        "/echo",
        [
            ("Connection", "keep-alive, X-Private, Authorization"),
            ("X-Private", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "X-T"),
            ("X-Kept", "yes"),
        ],
    )
    record = json.loads(body)
    sent = {k.lower() for k, _ in record["headers"]}
    for name in (
        "x-private",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ):
        assert name not in sent
    assert origin_headers(record, "X-Kept") == ["yes"]
    assert origin_headers(record, "Authorization") == [f"Bearer {TOKEN_VALUE}"]
    # and on the way back
    assert header(response, "x-origin-hop") == [] and header(response, "keep-alive") == []
    assert header(response, "x-origin-kept") == ["keep-me"]
    client.close()


async def test_missing_secret_is_502_and_nothing_goes_upstream(h: Harness) -> None:
    client = await Client.connect(h, rule=MISSING_RULE)
    response, body = await client.get(headers=[("Authorization", "mine")])
    assert response.status_code == 502
    assert b"secret-missing" in body and b"not-there" in body
    assert h.dials == [] and h.origin.requests == []
    await h.result()
    assert h.audit[-1]["error"] == "secret-missing"


async def test_bad_chunked_body_is_400(h: Harness) -> None:
    client = await Client.connect(h)
    out = await client.raw(
        f"POST /echo HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n"
        "zz\r\nhello\r\n".encode()
    )
    assert out.startswith(b"HTTP/1.1 400 ")


# -- the upstream side -------------------------------------------------------------------------


async def test_untrusted_upstream_certificate_fails_instead_of_sending(
    pki: dict[str, object], tmp_path: Path
) -> None:
    async for h in make_harness(pki, tmp_path, origin_ca="rogue_ca"):
        client = await Client.connect(h)
        response, _ = await client.get()
        assert response.status_code == 502
        assert header(response, "x-upstreamproxy-reason") == ["upstream-certificate-invalid"]
        assert h.origin.requests == []


async def test_stale_keep_alive_upstream_is_replaced(
    pki: dict[str, object], tmp_path: Path
) -> None:
    async for h in make_harness(pki, tmp_path, keepalive_timeout=0.2):
        client = await Client.connect(h)
        assert (await client.get("/echo/1"))[0].status_code == 200
        await asyncio.sleep(0.6)  # the origin closes its idle connection
        assert (await client.get("/echo/2"))[0].status_code == 200
        client.close()
        result = await h.result()
        assert result.requests == 2 and result.upstream_connections == 2


@dataclass
class FlakyOrigin:
    """Answers the first request on each connection, then closes on the next one unanswered:
    a kept-alive connection the origin dropped just as the engine reused it."""

    seen: list[bytes] = field(default_factory=list)
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for index in range(2):
                head = await reader.readuntil(b"\r\n\r\n")
                self.seen.append(head.split(b"\r\n", 1)[0])
                if index == 1:
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.transport.abort()


async def flaky_origin(h: Harness, tmp_path: Path) -> tuple[FlakyOrigin, asyncio.Server]:
    origin = FlakyOrigin()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "origin.pem", tmp_path / "origin.key")
    server = await asyncio.start_server(origin.handle, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]

    async def connector(host: str, p: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", port)

    h.env.upstream_connector = connector
    return origin, server


async def test_stale_upstream_retries_an_idempotent_request(h: Harness, tmp_path: Path) -> None:
    origin, server = await flaky_origin(h, tmp_path)
    client = await Client.connect(h)
    assert (await client.get("/one"))[0].status_code == 200
    response, body = await client.get("/two")  # the reused connection dies: sent again
    assert (response.status_code, body) == (200, b"ok")
    assert origin.seen == [b"GET /one HTTP/1.1", b"GET /two HTTP/1.1", b"GET /two HTTP/1.1"]
    client.close()
    server.close()


async def test_stale_upstream_never_resends_a_post(h: Harness, tmp_path: Path) -> None:
    # Regression: a POST with Content-Length: 0 counted as "bodiless" and was sent twice.
    # RFC 9110 §9.2.2: the origin may have acted on it before the connection dropped.
    origin, server = await flaky_origin(h, tmp_path)
    client = await Client.connect(h)
    assert (await client.get("/one"))[0].status_code == 200
    await client.send(
        h11.Request(
            method="POST", target="/pay", headers=[("Host", HOST), ("Content-Length", "0")]
        ),
        h11.EndOfMessage(),
    )
    response, _ = await client.response()
    assert response.status_code == 502
    assert origin.seen == [b"GET /one HTTP/1.1", b"POST /pay HTTP/1.1"]
    assert origin.connections == 1
    client.close()
    server.close()


async def test_upstream_connection_close_is_not_passed_to_the_client(h: Harness) -> None:
    client = await Client.connect(h)
    for _ in range(2):
        response, body = await client.get("/close")
        assert response.status_code == 200 and body == b"bye\n"
        assert header(response, "connection") == []
    client.close()
    result = await h.result()
    assert result.requests == 2 and result.upstream_connections == 2


async def test_unreachable_upstream_is_502(h: Harness) -> None:
    async def refuse(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise ConnectionRefusedError(111, "Connection refused")

    h.env.upstream_connector = refuse
    client = await Client.connect(h)
    response, _ = await client.get()
    assert response.status_code == 502
    assert header(response, "x-upstreamproxy-reason") == ["upstream-connect-failed"]


# -- timeouts and vanishing peers ----------------------------------------------------------------


async def test_silent_client_times_out_in_the_handshake(h: Harness) -> None:
    h.env.timeouts = InterceptTimeouts(handshake=0.2)
    sock = h.serve()
    result = await h.result()
    assert result.close_cause == "handshake-timeout"
    assert sock is not None and sock.recv(10) == b""  # our end was closed


async def test_idle_client_connection_times_out(h: Harness) -> None:
    h.env.timeouts = InterceptTimeouts(keepalive=0.2)
    client = await Client.connect(h)
    assert (await client.get())[0].status_code == 200
    result = await h.result()
    assert result.close_cause == "keepalive-timeout" and result.requests == 1


async def test_a_trickled_request_head_is_408_after_the_head_timeout(h: Harness) -> None:
    # Each byte arrives well within the per-read timeout; the head as a whole does not.
    h.env.timeouts = InterceptTimeouts(idle=5, keepalive=5, head=0.6)
    client = await Client.connect(h)
    started = time.monotonic()
    head = f"GET /echo HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: {'a' * 200}\r\n\r\n".encode()
    answer = bytearray()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        for i in range(len(head)):
            client.writer.write(head[i : i + 1])
            await client.writer.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    answer += await client.reader.read(65536)
            if answer or time.monotonic() - started > 5:
                break
        async with asyncio.timeout(5):
            while chunk := await client.reader.read(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"x-upstreamproxy-reason: request-head-timeout" in answer.lower()
    assert time.monotonic() - started < 3
    result = await h.result()
    assert result.close_cause == "client-head-timeout" and result.upstream_connections == 0
    assert h.audit[-1]["status"] == 408 and h.audit[-1]["error"] == "request-head-timeout"
    assert h.dials == []


async def test_silent_upstream_is_504(h: Harness) -> None:
    h.env.timeouts = InterceptTimeouts(idle=0.3)
    client = await Client.connect(h)
    response, _ = await client.get("/hang")
    assert response.status_code == 504
    assert header(response, "x-upstreamproxy-reason") == ["upstream-timeout"]


async def test_client_vanishing_mid_body_closes_cleanly(h: Harness) -> None:
    client = await Client.connect(h)
    await client.send(
        h11.Request(
            method="POST", target="/echo", headers=[("Host", HOST), ("Content-Length", "1000000")]
        ),
        h11.Data(data=b"x" * 1000),
    )
    await asyncio.sleep(0.1)
    client.writer.transport.abort()
    result = await h.result()
    assert result.close_cause == "client-closed"
    assert result.upstream_connections == 1


# -- secrets never leak ----------------------------------------------------------------------


async def test_secret_values_never_reach_logs_audit_or_metrics(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await Client.connect(h)
    await client.get(headers=[("Authorization", "mine")])
    await client.raw(f"GET https://{HOST}/ HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    client = await Client.connect(h, rule=MISSING_RULE)
    await client.get()
    h.env.secrets.reload()
    text = caplog.text + json.dumps(h.audit) + generate_latest(h.metrics.registry).decode()
    text += repr(h.env.secrets) + repr(RULE) + repr(h.env.secrets.get("github-token"))
    assert "intercept" in caplog.text
    for value in (TOKEN_VALUE, KEY_VALUE, "SUPERSECRET"):
        assert value not in text


# -- real curl --------------------------------------------------------------------------------


@pytest.fixture
async def listener(h: Harness) -> AsyncIterator[int]:
    """A loopback TCP listener handing each accepted socket to serve_intercepted."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    loop = asyncio.get_running_loop()

    async def accept() -> None:
        while True:
            sock, _ = await loop.sock_accept(server)
            h.serve(connect_port=port, sock=sock)

    task = loop.create_task(accept())
    yield port
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    server.close()


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


def curl_args(h: Harness, port: int, *extra: str) -> list[str]:
    return [
        "curl",
        "-sS",
        "--max-time",
        "20",
        "--resolve",
        f"{HOST}:{port}:127.0.0.1",
        "--cacert",
        str(h.ca_file),
        *extra,
    ]


@needs_curl
async def test_curl_gets_injected_credentials_over_keep_alive(h: Harness, listener: int) -> None:
    url = f"https://{HOST}:{listener}/echo"
    done = await run(
        *curl_args(
            h,
            listener,
            "-v",
            "-H",
            "Authorization: Bearer curl-own",
            "-H",
            "X-Api-Key: curl-key",
            url,
            url + "/2",
            url + "/3",
        ),
        env={**os.environ, "SSL_CERT_FILE": "/nonexistent"},
    )
    assert done.returncode == 0, done.stderr.decode()
    records = [json.loads(line) for line in done.stdout.decode().replace("}{", "}\n{").split("\n")]
    assert len(records) == 3
    for record in records:
        assert origin_headers(record, "Authorization") == [f"Bearer {TOKEN_VALUE}"]
        assert origin_headers(record, "X-Api-Key") == [KEY_VALUE]
        assert origin_headers(record, "Host") == [f"{HOST}:{listener}"]
    assert b"Re-using existing connection" in done.stderr or b"Reusing existing" in done.stderr
    result = await h.result()
    assert len(h.tasks) == 1 and result.requests == 3
    assert len(h.dials) == 1


@needs_curl
async def test_curl_chunked_upload_and_download(h: Harness, listener: int, tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(pattern_bytes(3 * 1024 * 1024 + 7))
    done = await run(
        *curl_args(
            h,
            listener,
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            f"@{payload}",
            f"https://{HOST}:{listener}/echo",
        )
    )
    assert done.returncode == 0, done.stderr.decode()
    record = json.loads(done.stdout)
    assert record["size"] == payload.stat().st_size
    assert record["sha256"] == hashlib.sha256(payload.read_bytes()).hexdigest()
    done = await run(
        *curl_args(
            h, listener, "-o", str(tmp_path / "down"), f"https://{HOST}:{listener}/stream/1000000"
        )
    )
    assert done.returncode == 0, done.stderr.decode()
    assert (tmp_path / "down").read_bytes() == pattern_bytes(1000000)


@needs_curl
async def test_curl_with_an_untrusted_bundle_fails_verification(
    h: Harness, listener: int, pki: dict[str, object]
) -> None:
    base: Path = pki["dir"]  # type: ignore[assignment]
    args = curl_args(h, listener, f"https://{HOST}:{listener}/echo")
    args[args.index("--cacert") + 1] = str(base / "upstream-ca.pem")
    done = await run(*args)
    assert done.returncode == 60, done.stderr.decode()
    assert h.origin.requests == []


@needs_curl
async def test_curl_host_header_mismatch_is_400(h: Harness, listener: int) -> None:
    done = await run(
        *curl_args(
            h,
            listener,
            "-H",
            "Host: evil.example.test",
            "-w",
            "%{http_code}",
            "-o",
            "/dev/null",
            f"https://{HOST}:{listener}/echo",
        )
    )
    assert done.stdout == b"400"
    assert h.origin.requests == []


# -- ALPN (RFC 7301 §3.2) -------------------------------------------------------------------------


async def alpn_connect(
    h: Harness, offer: list[str] | None
) -> tuple[asyncio.StreamWriter, str | None]:
    sock = h.serve()
    ctx = ssl.create_default_context(cafile=str(h.ca_file))
    if offer is not None:
        ctx.set_alpn_protocols(offer)
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=HOST), 10
    )
    return writer, writer.get_extra_info("ssl_object").selected_alpn_protocol()


async def test_h2_only_client_gets_the_no_application_protocol_alert(h: Harness) -> None:
    # Regression: the handshake completed and the client was answered HTTP/1.1 400.
    with pytest.raises(ssl.SSLError) as info:
        await alpn_connect(h, ["h2"])
    assert "no application protocol" in str(info.value)
    result = await h.result()
    assert result.close_cause == "handshake-refused (no-application-protocol)"
    assert h.counter("alpn_refusals_total") == 1


@pytest.mark.parametrize(
    ("offer", "selected"),
    [(["h2", "http/1.1"], "http/1.1"), (None, None), (["http/1.1"], "http/1.1")],
)
async def test_clients_offering_http11_or_nothing_are_served(
    h: Harness, offer: list[str] | None, selected: str | None
) -> None:
    writer, alpn = await alpn_connect(h, offer)
    assert alpn == selected
    writer.close()
    assert h.counter("alpn_refusals_total") == 0


@pytest.mark.parametrize("cut", [0, 5, 40, 200])
def test_client_hello_parser_handles_truncation(cut: int) -> None:
    hello = captured_client_hello(["h2", "http/1.1"])
    assert offered_alpn(hello) == [b"h2", b"http/1.1"]
    with pytest.raises(NeedMore):
        offered_alpn(hello[:cut])
    assert offered_alpn(captured_client_hello(None)) is None
    with pytest.raises(NotClientHello):
        offered_alpn(b"GET / HTTP/1.1\r\n\r\n")


def captured_client_hello(offer: list[str] | None) -> bytes:
    """The bytes Python's own TLS client sends first (through memory BIOs, no socket)."""
    ctx = ssl.create_default_context()
    if offer is not None:
        ctx.set_alpn_protocols(offer)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=HOST)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()
