"""Fault tests with real processes: the egress and relay under pre-auth floods and fd exhaustion.

Real ``python -m upstreamproxy egress`` and ``relay`` processes, a plain TCP echo origin in
the test, and attackers that are raw sockets bound to other loopback addresses (127.0.x.y)
so per-peer caps see them as other peers. Every wait is bounded; each test checks that real
tunnels keep working (or work again), that logs stay small and traceback-free, and that the
processes' descriptor counts return to their baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import SESSION, TOKEN, echo

from upstreamproxy.fdlimit import raise_nofile_limit

PING = b"ping-through-the-tunnel"


@dataclass
class Proc:
    proc: asyncio.subprocess.Process
    url: str
    lines: list[bytes] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    @property
    def log(self) -> bytes:
        return b"".join(self.lines)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 20)
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self.drain is not None:
            await asyncio.wait_for(self.drain, 10)


async def start(*argv: str, ready: bytes, nofile: int | None = None) -> Proc:
    def limit() -> None:
        if nofile is not None:  # soft AND hard: the process may only raise soft to hard
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "upstreamproxy",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=limit,
    )
    assert proc.stdout is not None and proc.stderr is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if ready not in line:
        proc.kill()
        _, err = await proc.communicate()
        raise AssertionError(f"{argv[0]} did not start: {line!r} {err.decode()[-2000:]}")
    started = Proc(proc, line.decode().strip().rsplit(" ", 1)[-1])

    async def drain(stream: asyncio.StreamReader) -> None:
        # Always read the log: a full pipe would block the process on its next log line.
        while chunk := await stream.readline():
            started.lines.append(chunk)

    started.drain = asyncio.get_running_loop().create_task(drain(proc.stderr))
    return started


@dataclass
class Stack:
    egress: Proc
    relay: Proc
    origin_port: int
    relay_port: int


@contextlib.asynccontextmanager
async def stack(
    tmp_path: Path, *egress_args: str, nofile: int | None = None
) -> AsyncIterator[Stack]:
    raise_nofile_limit("tests")  # the test's own sockets must not be what runs out
    origin = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=4096)
    origin_port = origin.sockets[0].getsockname()[1]
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{SESSION} {TOKEN}\n")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    egress = await start(
        "egress",
        "--port",
        "0",
        "--static-tokens",
        str(tokens),
        "--allow",
        f"127.0.0.1:{origin_port}",
        "--allow-cidr",
        "127.0.0.0/8",
        "--max-session-tunnels",
        "5000",
        "--session-rate",
        "10000",
        "--session-burst",
        "5000",
        *egress_args,
        ready=b"egress listening on",
        nofile=nofile,
    )
    relay = await start(
        "relay",
        "--egress-url",
        egress.url,
        "--session-id",
        SESSION,
        "--token-file",
        str(token_file),
        "--port",
        "0",
        ready=b"relay listening on",
        nofile=nofile,
    )
    relay_port = int(relay.url.rsplit(":", 1)[1])
    try:
        yield Stack(egress, relay, origin_port, relay_port)
    finally:
        await relay.stop()
        await egress.stop()
        origin.close()


async def open_tunnel(
    s: Stack, timeout: float = 30
) -> tuple[bytes, asyncio.StreamReader | None, asyncio.StreamWriter | None]:
    """CONNECT through the relay; the status line (b"" if closed unanswered) and the stream."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", s.relay_port), timeout
    )
    writer.write(f"CONNECT 127.0.0.1:{s.origin_port} HTTP/1.1\r\n\r\n".encode())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
        return b"", None, None
    status = head.split(b"\r\n", 1)[0]
    if not status.startswith(b"HTTP/1.1 200"):
        writer.close()
        return status, None, None
    return status, reader, writer


async def tunnel_works(s: Stack, timeout: float = 30) -> float:
    """One real tunnel end to end; returns how long it took."""
    started = time.monotonic()
    status, reader, writer = await open_tunnel(s, timeout)
    assert reader is not None and writer is not None, status
    writer.write(PING)
    assert await asyncio.wait_for(reader.readexactly(len(PING)), timeout) == PING
    writer.close()
    return time.monotonic() - started


async def fds_settle(proc: Proc, baseline: int, slack: int = 3, within: float = 20) -> int:
    deadline = time.monotonic() + within
    while True:
        count = proc.fds()
        if count <= baseline + slack or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.2)


def assert_quiet_log(proc: Proc, max_lines: int) -> None:
    assert b"Traceback" not in proc.log, proc.log.decode(errors="replace")[-3000:]
    assert len(proc.lines) <= max_lines, (len(proc.lines), b"".join(proc.lines[-20:]))


async def warm(s: Stack) -> tuple[int, int]:
    """Baseline descriptor counts once everything has run one tunnel."""
    await tunnel_works(s)
    await asyncio.sleep(0.5)
    return s.egress.fds(), s.relay.fds()


def attacker(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    sock.connect_ex(("127.0.0.1", port))
    return sock


async def closed_by_peer(sock: socket.socket, within: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        try:
            if sock.recv(4096) == b"":
                return True
        except BlockingIOError:
            pass
        except OSError:
            return True
        await asyncio.sleep(0.1)
    return False


UPGRADE_HALF = (
    b"GET /v1/code/upstreamproxy/ws HTTP/1.1\r\nHost: egress\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
)


async def test_slow_and_half_sent_upgrades_do_not_starve_tunnels(tmp_path: Path) -> None:
    async with stack(tmp_path, "--upgrade-timeout", "3") as s:
        egress_base, _ = await warm(s)
        port = int(s.egress.url.split(":")[2].split("/")[0])
        # 500 attackers on 4 peer addresses (125 each, under the per-peer cap): a third send
        # nothing, a third half an upgrade, a third trickle one byte every half second.
        socks = [attacker(f"127.0.1.{1 + i % 4}", port) for i in range(500)]
        await asyncio.sleep(0.5)
        for index, sock in enumerate(socks):
            if index % 3 == 1:
                with contextlib.suppress(OSError):
                    sock.send(UPGRADE_HALF)

        async def trickle() -> None:
            for byte in range(20):
                for sock in socks[2::3]:
                    with contextlib.suppress(OSError):
                        sock.send(UPGRADE_HALF[byte : byte + 1])
                await asyncio.sleep(0.5)

        trickling = asyncio.get_running_loop().create_task(trickle())
        # Real tunnels keep working meanwhile, promptly.
        times = await asyncio.gather(*(tunnel_works(s, 20) for _ in range(20)))
        assert max(times) < 10, times
        # Every attacker is cut off at the deadline (3 s), the trickling ones included.
        results = await asyncio.gather(*(closed_by_peer(sock, 15) for sock in socks))
        assert all(results), results.count(False)
        trickling.cancel()
        for sock in socks:
            sock.close()
        assert await fds_settle(s.egress, egress_base) <= egress_base + 3
        await tunnel_works(s)
    assert_quiet_log(s.egress, 300)


async def test_fd_limit_1024_with_more_tunnels_than_fds(tmp_path: Path) -> None:
    clients = 1100
    # Pre-auth caps out of the way: every relay connection comes from 127.0.0.1, and this
    # test is about descriptors, not about one peer bursting past its pre-auth share.
    caps = ("--max-preauth", "4096", "--max-preauth-per-peer", "4096")
    async with stack(tmp_path, *caps, nofile=1024) as s:
        assert b"file descriptor limit 1024" in s.egress.log + s.relay.log
        egress_base, relay_base = await warm(s)

        async def one() -> tuple[str, asyncio.StreamWriter | None]:
            try:
                status, reader, writer = await open_tunnel(s, 45)
            except (TimeoutError, OSError):
                return "timeout-or-error", None
            if reader is None or writer is None:
                return ("refused " + status.decode(errors="replace")).strip(), None
            writer.write(PING)
            try:
                echoed = await asyncio.wait_for(reader.readexactly(len(PING)), 45)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                return "broken", None
            return ("ok" if echoed == PING else "corrupt"), writer

        outcomes = await asyncio.gather(*(one() for _ in range(clients)))
        kinds: dict[str, int] = {}
        for kind, _ in outcomes:
            kinds[kind] = kinds.get(kind, 0) + 1
        print(f"[fd limit 1024] {clients} concurrent tunnels: {kinds}", flush=True)
        # All at once: some tunnels run, the rest are refused cleanly (502/503/close); none
        # hangs, breaks mid-stream or gets corrupted data.
        assert kinds.get("ok", 0) >= 100, kinds
        assert kinds.get("ok", 0) < clients, kinds
        assert set(kinds) <= {
            "ok",
            "refused",
            "refused HTTP/1.1 502 Bad Gateway",
            "refused HTTP/1.1 503 Service Unavailable",
        }, kinds
        for _, writer in outcomes:
            if writer is not None:
                writer.close()
        assert await fds_settle(s.egress, egress_base) <= egress_base + 3
        assert await fds_settle(s.relay, relay_base) <= relay_base + 3
        # Everything works again.
        for _ in range(5):
            await tunnel_works(s)
    # A bounded log: a few lines per tunnel at most, no traceback per accept.
    assert_quiet_log(s.relay, 4 * clients)
    assert_quiet_log(s.egress, 4 * clients)


async def test_ten_thousand_bare_connections_do_not_starve_tunnels(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = min(10_000, hard - 3000) if hard != resource.RLIM_INFINITY else 10_000
    async with stack(tmp_path) as s:
        egress_base, _ = await warm(s)
        port = int(s.egress.url.split(":")[2].split("/")[0])
        started = time.monotonic()
        socks: list[socket.socket] = []
        for index in range(count):
            socks.append(attacker(f"127.0.2.{1 + index % 40}", port))
            if index % 500 == 0:
                await asyncio.sleep(0)  # let the egress breathe as a real flood would
        flood_time = time.monotonic() - started
        peak = s.egress.fds()
        # The caps hold the egress far below one descriptor per attacker ...
        assert peak < egress_base + 1024 + 200, peak
        # ... and real tunnels still get through, promptly.
        times = await asyncio.gather(*(tunnel_works(s, 20) for _ in range(10)))
        assert max(times) < 10, times
        for sock in socks:
            sock.close()
        assert await fds_settle(s.egress, egress_base, within=30) <= egress_base + 3
        await tunnel_works(s)
        assert flood_time < 60
    assert_quiet_log(s.egress, 300)
