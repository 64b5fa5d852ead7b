"""What one WebSocket upgrade costs the egress: native upgrade vs aiohttp's.

A script, not a test. For each mode it starts an egress in a child process (this script with
``--serve MODE``), then from this process, over loopback with raw blocking sockets:

* **CPU per upgrade** -- ``--upgrades`` sequential upgrades (connect, send the relay's head,
  read the ``101``, close) after a warm-up; the egress process's user+system CPU from
  ``/proc/<pid>/stat`` divided by the count;
* **RSS per idle upgraded connection** -- ``--idle`` upgraded connections held open; the
  egress's ``VmRSS`` growth divided by the count.

Modes:

``native``        the native upgrade, with a runner that holds the connection until the peer
                  leaves (what a tunnel runner costs beyond that is the runner's, not this)
``aiohttp``       aiohttp's upgrade (``web.WebSocketResponse.prepare``) and a receive loop:
                  the same work done the old way
``aiohttp-tunnel`` the egress as it ships today: aiohttp's upgrade plus the ``Tunnel``

    python benchmarks/bench_upgrade.py [--upgrades 2000] [--idle 1000] [--modes native,aiohttp]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from aiohttp import web

from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.policy import PolicyStore, policy_from_allow_list
from upstreamproxy.egress.preauth import PreauthLimits
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.egress.tunnel import TunnelTimeouts
from upstreamproxy.ws_handshake import new_key

TOKEN = "bench-token-0123456789"
WS_PATH = "/v1/code/upstreamproxy/ws"
TICKS = os.sysconf("SC_CLK_TCK")


# -- the egress (child) ----------------------------------------------------------------------


class _Idle(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def hold_until_gone(
    transport: asyncio.Transport,
    leftover: bytes,
    session: Session,
    token: str,
    preopened: bool,
    reuse: bool = False,
) -> None:
    idle = _Idle()
    transport.set_protocol(idle)
    transport.resume_reading()
    await idle.lost


class BareAiohttp(EgressServer):
    """aiohttp's upgrade and receive loop, no Tunnel: the old path's upgrade cost alone."""

    async def _serve_tunnel(  # type: ignore[override]
        self, request: web.Request, ws: web.WebSocketResponse, session: Session, token: str
    ) -> web.WebSocketResponse:
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws


async def serve(mode: str, port_file: Path) -> None:
    config = EgressConfig(
        reload_interval=0,
        preauth=PreauthLimits(max_pending=100_000, max_pending_per_peer=100_000),
        timeouts=TunnelTimeouts(),
    )
    config.limits = type(config.limits)(
        max_tunnels=100_000, max_session_tunnels=100_000, session_rate=1e9, session_burst=10**9
    )
    tokens = StaticTokens({TOKEN: Session("bench")})
    policy = PolicyStore(policy_from_allow_list(["127.0.0.1:*"], ["127.0.0.0/8"]))
    server: EgressServer
    if mode == "native":
        server = EgressServer(config, tokens, policy, on_upgraded=hold_until_gone)
    elif mode == "aiohttp":
        server = BareAiohttp(config, tokens, policy)
    else:
        server = EgressServer(config, tokens, policy)
    await server.start()
    port_file.write_text(str(server.port))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop()


# -- the load (parent) -----------------------------------------------------------------------


def head() -> bytes:
    return (
        f"GET {WS_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {new_key()}\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/proto\r\n\r\n"
    ).encode()


def upgrade(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head())
    answer = b""
    while b"\r\n\r\n" not in answer:
        piece = sock.recv(4096)
        if not piece:
            raise RuntimeError(f"egress closed the connection: {answer!r}")
        answer += piece
    if not answer.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"not upgraded: {answer[:200]!r}")
    return sock


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def measure(mode: str, upgrades: int, idle: int, tmp: Path) -> dict[str, float]:
    port_file = tmp / f"port-{mode}"
    port_file.unlink(missing_ok=True)
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", mode, "--port-file", str(port_file)]
    )
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or child.poll() is not None:
                raise RuntimeError(f"{mode}: the egress did not start")
            time.sleep(0.05)
        port = int(port_file.read_text())
        for _ in range(200):  # warm-up
            upgrade(port).close()
        time.sleep(0.5)
        before = cpu_seconds(child.pid)
        started = time.perf_counter()
        for _ in range(upgrades):
            upgrade(port).close()
        wall = time.perf_counter() - started
        time.sleep(0.5)  # let the egress finish the last closes
        cpu = cpu_seconds(child.pid) - before
        rss_before = rss_kib(child.pid)
        held = [upgrade(port) for _ in range(idle)]
        time.sleep(1.0)
        rss_after = rss_kib(child.pid)
        for sock in held:
            sock.close()
        return {
            "cpu_ms_per_upgrade": cpu * 1000 / upgrades,
            "wall_ms_per_upgrade": wall * 1000 / upgrades,
            "rss_kib_per_idle": (rss_after - rss_before) / idle,
            "rss_kib_base": rss_before,
        }
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(20)
        except subprocess.TimeoutExpired:
            child.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upgrades", type=int, default=2000)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--modes", default="native,aiohttp,aiohttp-tunnel")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.port_file))
        return 0
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-upgrade-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    print(f"{'mode':<16}{'CPU ms/upgrade':>16}{'wall ms/upgrade':>17}{'RSS KiB/idle':>14}")
    for mode in args.modes.split(","):
        result = measure(mode, args.upgrades, args.idle, tmp)
        print(
            f"{mode:<16}{result['cpu_ms_per_upgrade']:>16.3f}"
            f"{result['wall_ms_per_upgrade']:>17.3f}{result['rss_kib_per_idle']:>14.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
