"""Faults with real processes: the relay and the egress started from the console script, an
egress frozen (SIGSTOP) mid-transfer and while idle, an origin that never reads while its client
uploads and then leaves, an egress killed (-9) and restarted. Each asserts a prompt, specific
error and that both processes' open file descriptors come back to their baseline.

Liveness settings are short here (ping after 0.5 s of silence, dead 1 s later) so the suite
stays fast; the defaults (20 s + 20 s) bound detection at 40 s the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SESSION, TOKEN, connect_via

LIVENESS = ["--ping-interval", "0.5", "--ping-timeout", "1"]


@dataclass
class Proc:
    proc: asyncio.subprocess.Process
    address: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


async def spawn(log: Path, ready: bytes, *argv: str) -> Proc:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPSTREAMPROXY_")}
    with log.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "upstreamproxy",
            "--log-level",
            "INFO",
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,  # a file: a full pipe must not be what stalls a process
            env=env,
        )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if ready not in line:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"did not start: {line!r} {log.read_text()[-2000:]}")
    return Proc(proc, line.decode().split()[-1], log)


async def stop(proc: Proc) -> None:
    if proc.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.proc.send_signal(signal.SIGCONT)
            proc.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.proc.wait(), 20)
        except TimeoutError:
            proc.proc.kill()
            await proc.proc.wait()


@dataclass
class Rig:
    tmp: Path
    egress: Proc
    relay: Proc
    egress_port: int

    @property
    def relay_port(self) -> int:
        return int(self.relay.address.rsplit(":", 1)[1])

    async def start_egress(self) -> Proc:
        self.egress = await spawn(
            self.tmp / "egress.log",
            b"egress listening on",
            "egress",
            "--port",
            str(self.egress_port),
            "--static-tokens",
            str(self.tmp / "tokens"),
            "--allow",
            "127.0.0.1:*",
            "--allow-cidr",
            "127.0.0.0/8",
            *LIVENESS,
        )
        return self.egress


async def log_shows(proc: Proc, text: str, timeout: float = 10.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while text not in proc.log.read_text():
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"{text!r} not in {proc.log.read_text()[-2000:]}") from None


async def baseline(proc: Proc, settle: float = 1.0) -> int:
    """The fd count once it stopped moving (pre-opened sockets filled, and so on)."""
    last, stable_since = proc.fds(), time.monotonic()
    async with asyncio.timeout(20):
        while time.monotonic() - stable_since < settle:
            await asyncio.sleep(0.1)
            now = proc.fds()
            if now != last:
                last, stable_since = now, time.monotonic()
    return last


async def back_to(proc: Proc, count: int, timeout: float = 20.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while proc.fds() > count:
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"{proc.pid}: {proc.fds()} fds, baseline {count}") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    (tmp_path / "tokens").write_text(f"{SESSION} {TOKEN}\n")
    (tmp_path / "token").write_text(TOKEN + "\n")
    rig = Rig(tmp_path, None, None, free_port())  # type: ignore[arg-type]
    await rig.start_egress()
    rig.relay = await spawn(
        tmp_path / "relay.log",
        b"relay listening on",
        "relay",
        "--egress-url",
        rig.egress.address,
        "--session-id",
        SESSION,
        "--token-file",
        str(tmp_path / "token"),
        "--port",
        "0",
        "--handshake-timeout",
        "3",
        *LIVENESS,
    )
    yield rig
    await stop(rig.relay)
    await stop(rig.egress)
    assert TOKEN not in (tmp_path / "relay.log").read_text()
    assert TOKEN not in (tmp_path / "egress.log").read_text()


@pytest.fixture
async def streaming_origin() -> AsyncIterator[int]:
    """Sends data for as long as anyone reads it."""

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(100_000):
                writer.write(b"d" * 65536)
                await writer.drain()
        writer.transport.abort()

    server = await asyncio.start_server(stream, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Read (and drop) until EOF or reset; returns how long that took."""
    started = time.monotonic()
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    return time.monotonic() - started


async def echo_works(rig: Rig, port: int) -> None:
    reader, writer, head = await connect_via(rig.relay_port, f"127.0.0.1:{port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    writer.write(b"hello")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
    writer.close()
    await writer.wait_closed()


async def test_egress_frozen_during_a_transfer(rig: Rig, streaming_origin: int) -> None:
    relay_fds, egress_fds = await baseline(rig.relay), await baseline(rig.egress)
    reader, writer, head = await connect_via(rig.relay_port, f"127.0.0.1:{streaming_origin}")
    assert head.startswith(b"HTTP/1.1 200")
    await reader.readexactly(1024 * 1024)  # the transfer is running
    rig.egress.proc.send_signal(signal.SIGSTOP)
    try:
        assert await closed_within(reader, 15) < 10  # 0.5 s + 1 s, with room
    finally:
        rig.egress.proc.send_signal(signal.SIGCONT)
    writer.close()
    await log_shows(rig.relay, "egress-unresponsive")  # logged as the handler finishes
    await back_to(rig.relay, relay_fds)
    await back_to(rig.egress, egress_fds)


async def test_egress_frozen_with_an_idle_tunnel(rig: Rig, echo_port: int) -> None:
    relay_fds, egress_fds = await baseline(rig.relay), await baseline(rig.egress)
    reader, writer, head = await connect_via(rig.relay_port, f"127.0.0.1:{echo_port}")
    assert head.startswith(b"HTTP/1.1 200")
    rig.egress.proc.send_signal(signal.SIGSTOP)
    try:
        assert await closed_within(reader, 15) < 10
        # A CONNECT while it is frozen gets a prompt 502/504, never a hang.
        started = time.monotonic()
        _, w2, head2 = await connect_via(rig.relay_port, f"127.0.0.1:{echo_port}")
        assert head2.startswith((b"HTTP/1.1 502", b"HTTP/1.1 504")), head2
        assert time.monotonic() - started < 10
        w2.close()
    finally:
        rig.egress.proc.send_signal(signal.SIGCONT)
    writer.close()
    await echo_works(rig, echo_port)  # and it works again once the egress thaws
    await back_to(rig.relay, relay_fds)
    await back_to(rig.egress, egress_fds)


async def test_origin_never_reads_and_the_client_leaves(rig: Rig) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.pause_reading()
        accepted.append(writer)

    origin = await asyncio.start_server(deaf, "127.0.0.1", 0)
    port = origin.sockets[0].getsockname()[1]
    relay_fds, egress_fds = await baseline(rig.relay), await baseline(rig.egress)
    _, writer, head = await connect_via(rig.relay_port, f"127.0.0.1:{port}")
    assert head.startswith(b"HTTP/1.1 200")
    with contextlib.suppress(TimeoutError, ConnectionError):
        for _ in range(10_000):  # upload until the tunnel pushes back
            writer.write(b"u" * 65536)
            await asyncio.wait_for(writer.drain(), 1.0)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()  # the client leaves (a killed tool: a reset)
    started = time.monotonic()
    # The egress's socket to the origin is gone (its fds back to baseline) long before any
    # write deadline (60 s by default), and the relay's too.
    await back_to(rig.egress, egress_fds, timeout=15)
    await back_to(rig.relay, relay_fds, timeout=15)
    assert time.monotonic() - started < 12
    for w in accepted:
        w.transport.abort()
    origin.close()


async def test_egress_killed_and_restarted(rig: Rig, echo_port: int) -> None:
    relay_fds = await baseline(rig.relay)
    reader, writer, head = await connect_via(rig.relay_port, f"127.0.0.1:{echo_port}")
    assert head.startswith(b"HTTP/1.1 200")
    rig.egress.proc.send_signal(signal.SIGKILL)
    await rig.egress.proc.wait()
    assert await closed_within(reader, 15) < 10
    writer.close()
    # While it is down: a prompt 502, not a hang.
    started = time.monotonic()
    _, w2, head2 = await connect_via(rig.relay_port, f"127.0.0.1:{echo_port}")
    assert head2.startswith(b"HTTP/1.1 502"), head2
    assert time.monotonic() - started < 10
    w2.close()
    await rig.start_egress()  # same port
    for _ in range(3):
        await echo_works(rig, echo_port)
    await back_to(rig.relay, relay_fds, timeout=40)  # the pool refills after its back-off


# -- tunnel reuse: a peer that fails in the middle of the end-of-tunnel exchange --------------


async def test_egress_frozen_while_a_tunnel_ends(rig: Rig, echo_port: int) -> None:
    """The relay sent its end-of-tunnel message to an egress that froze just then: no answer
    comes, so the socket is closed (not handed to the next tunnel) within the close grace."""
    await echo_works(rig, echo_port)  # a reused socket or two in the pool
    relay_fds, egress_fds = await baseline(rig.relay), await baseline(rig.egress)
    reader, writer, head = await connect_via(rig.relay_port, f"127.0.0.1:{echo_port}")
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
    rig.egress.proc.send_signal(signal.SIGSTOP)
    try:
        writer.close()  # the relay ends the tunnel: its end-of-tunnel message goes unanswered
        assert await closed_within(reader, 10) < 5
        await back_to(rig.relay, relay_fds - 1, timeout=10)  # that socket is gone
    finally:
        rig.egress.proc.send_signal(signal.SIGCONT)
    for _ in range(3):
        await echo_works(rig, echo_port)
    await back_to(rig.relay, relay_fds)
    await back_to(rig.egress, egress_fds)
    # The frozen tunnel's socket was lost as its tunnel ended (the end-of-tunnel message and
    # the close in one read): its runner waited for ever on the next tunnel, counted active,
    # and held the egress's shutdown for its whole drain grace. With the relay gone, none is.
    await stop(rig.relay)
    async with asyncio.timeout(10):
        while await active_tunnels(rig):
            await asyncio.sleep(0.1)


async def active_tunnels(rig: Rig) -> int:
    """The egress's count of running tunnel tasks (its /healthz)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.egress_port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: egress\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    count: int = json.loads(answer.split(b"\r\n\r\n", 1)[1])["active_tunnels"]
    return count


async def test_relay_frozen_while_the_egress_ends_a_tunnel(rig: Rig) -> None:
    """The origin ends the tunnel; the egress sends its end-of-tunnel message to a relay that
    froze: the egress lets the socket go within the close grace, without waiting for the
    relay. Thawed, the relay still hands its client every byte, then a clean EOF."""
    release = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    origin = await asyncio.start_server(held, "127.0.0.1", 0)
    port = origin.sockets[0].getsockname()[1]
    try:
        relay_fds, egress_fds = await baseline(rig.relay), await baseline(rig.egress)
        reader, writer, head = await connect_via(rig.relay_port, f"127.0.0.1:{port}")
        assert head.startswith(b"HTTP/1.1 200")
        rig.relay.proc.send_signal(signal.SIGSTOP)
        try:
            release.set()
            # The origin's socket and the unanswered WebSocket both go.
            await back_to(rig.egress, egress_fds - 1, timeout=10)
        finally:
            rig.relay.proc.send_signal(signal.SIGCONT)
        assert await asyncio.wait_for(reader.read(), 10) == b"bye"
        writer.close()
        for _ in range(3):
            await echo_works_plain(rig)
        await back_to(rig.relay, relay_fds)
        await back_to(rig.egress, egress_fds)
    finally:
        origin.close()


async def echo_works_plain(rig: Rig) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        await echo_works(rig, server.sockets[0].getsockname()[1])
    finally:
        server.close()
