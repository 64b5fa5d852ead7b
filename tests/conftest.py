"""Shared fixtures: a throwaway CA, a real HTTPS origin, and the real egress and relay on port 0."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from testpki import TestCA, make_ca

from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.policy import PolicyStore, policy_from_allow_list
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.relay import Relay, RelayConfig
from upstreamproxy.secret import Secret

TOKEN = "tok-0123456789abcdef-SECRET"
SESSION = "sess-test"


def pattern_bytes(size: int) -> bytes:
    """Deterministic, non-repeating-looking data of ``size`` bytes."""
    block = hashlib.sha256(b"upstreamproxy").digest() * 2048  # 64 KiB
    whole, part = divmod(size, len(block))
    return block * whole + block[:part]


@dataclass
class TLSFiles:
    ca: TestCA
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    base = tmp_path_factory.mktemp("tls")
    ca = make_ca("upstreamproxy test CA")
    leaf = ca.issue(["localhost", "127.0.0.1", "::1"])
    (base / "ca.pem").write_bytes(ca.cert_pem())
    (base / "leaf.pem").write_bytes(leaf.chain_pem())
    (base / "leaf.key").write_bytes(leaf.key_pem())
    return TLSFiles(ca, base / "ca.pem", base / "leaf.pem", base / "leaf.key")


def origin_app() -> web.Application:
    """An origin with the endpoints the tests need."""

    async def data(request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["size"])
        body = pattern_bytes(size)
        return web.Response(body=body, headers={"X-Sha256": hashlib.sha256(body).hexdigest()})

    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        total = 0
        async for piece in request.content.iter_chunked(64 * 1024):
            digest.update(piece)
            total += len(piece)
        return web.json_response({"sha256": digest.hexdigest(), "size": total})

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello from origin\n")

    app = web.Application(client_max_size=1024**3)
    app.router.add_get("/", hello)
    app.router.add_get("/bytes/{size:\\d+}", data)
    app.router.add_post("/upload", upload)
    return app


@contextlib.asynccontextmanager
async def tcp_origin(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A plain TCP origin on 127.0.0.1 serving each connection with ``handle``; its port."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An origin's handler that sends back what it receives, until its client leaves."""
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A TCP echo origin on 127.0.0.1 (:func:`echo`); its port."""
    async with tcp_origin(echo) as port:
        yield port


@dataclass
class Origin:
    port: int
    url: str


async def _serve(
    app: web.Application, ssl_context: ssl.SSLContext | None, host: str = "127.0.0.1"
) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


@pytest.fixture
async def https_origin(tls: TLSFiles) -> AsyncIterator[Origin]:
    runner, port = await _serve(origin_app(), tls.server_context())
    yield Origin(port, f"https://localhost:{port}")
    await runner.cleanup()


def loopback_policy(*extra: str) -> PolicyStore:
    """Loopback explicitly allowed: it is where the tests' origins live."""
    return PolicyStore(
        policy_from_allow_list(
            ["localhost:*", "127.0.0.1:*", "[::1]:*", *extra], ["127.0.0.0/8", "::1/128"]
        )
    )


@pytest.fixture
async def egress(tls: TLSFiles) -> AsyncIterator[EgressServer]:
    config = EgressConfig(ca_cert_pem=tls.ca.cert_pem())
    server = EgressServer(config, StaticTokens({TOKEN: Session(SESSION)}), loopback_policy())
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def relay(egress: EgressServer) -> AsyncIterator[Relay]:
    r = Relay(RelayConfig(egress_url=egress.url, session_id=SESSION, token=Secret(TOKEN)))
    await r.start()
    yield r
    await r.stop()


@dataclass
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes


async def run(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 60, stdin: bytes | None = None
) -> Completed:
    """Run a real program without blocking the event loop that serves the relay/egress."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else None,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Completed(proc.returncode, out, err)


async def connect_via(
    proxy_port: int, target: str, *, extra: bytes = b"", headers: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Open a raw CONNECT through the relay; return the stream and the status head it got."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{headers}\r\n".encode() + extra)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    return reader, writer, head


async def raw_request(proxy_port: int, data: bytes, read_timeout: float = 10) -> bytes:
    """Send ``data`` to the relay as a client would and return everything it answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), read_timeout)
    finally:
        writer.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def curl_via(proxy_url: str, url: str, ca_file: Path | str, *extra: str) -> Completed:
    """Real curl through the relay (``-x ... -p``), trusting ``ca_file``."""
    return await run("curl", "-sS", "--cacert", str(ca_file), "-x", proxy_url, "-p", *extra, url)


@pytest.fixture(scope="session", autouse=True)
def _relay_user_can_run_python() -> Iterator[None]:
    """As root, ``start`` runs the relay as the unprivileged ``upstreamproxy`` user, which must
    be able to run this interpreter. A pyenv under a private ``/root`` (0700) is not: grant
    search (x, not read) on the private directories on the way for the session, then restore."""
    import os
    import stat
    import sys

    changed: list[tuple[Path, int]] = []
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        for path in (Path(sys.executable).resolve(), Path(__file__).resolve()):
            for parent in reversed(path.parents):
                mode = stat.S_IMODE(parent.stat().st_mode)
                if not mode & stat.S_IXOTH:
                    parent.chmod(mode | stat.S_IXOTH)
                    changed.append((parent, mode))
    yield
    for parent, mode in reversed(changed):
        parent.chmod(mode)
