"""Memory a busy tunnel holds in each process, measured on the real processes.

"Busy": the sender is faster than the receiver, so every buffer on the path fills up to its
bound - a client that reads nothing from a firehose origin (download), and an origin that reads
nothing from a client that keeps uploading (upload). The bounds asserted are the documented
ones (README, "Backpressure and memory") with room for allocator noise.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import test_tunnel_faults
from conftest import connect_via
from test_tunnel_faults import Rig, rig  # noqa: F401  (the fixture)

TUNNELS = 40
#: Documented ceilings per busy tunnel (KiB of RSS), per process and direction. The aim is
#: 128 KiB and the measured figures sit at 10-105 KiB; the margin is for allocator noise.
CEILING_KIB = {"download": 160, "upload": 160}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def default_liveness(monkeypatch: pytest.MonkeyPatch) -> None:
    # Default pings (20 s + 20 s): a peer stuck behind a full buffer answers no ping, and
    # the fault tests' 1 s bound would end these tunnels before they are measured.
    monkeypatch.setattr(test_tunnel_faults, "LIVENESS", [])


@pytest.mark.parametrize("direction", ["download", "upload"])
async def test_memory_per_busy_tunnel(
    default_liveness: None,
    rig: Rig,  # noqa: F811
    direction: str,
) -> None:
    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(100_000):
                writer.write(b"d" * 65536)
                await writer.drain()

    deaf_writers: list[asyncio.StreamWriter] = []

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.pause_reading()
        deaf_writers.append(writer)

    fire = await asyncio.start_server(firehose, "127.0.0.1", 0)
    sink = await asyncio.start_server(deaf, "127.0.0.1", 0)
    procs = {"relay": rig.relay.pid, "egress": rig.egress.pid}
    results: dict[str, dict[str, float]] = {}
    try:
        port = (fire if direction == "download" else sink).sockets[0].getsockname()[1]
        for _ in range(1):  # fresh processes per direction: RSS deltas stay comparable
            await asyncio.sleep(1)
            before = {name: rss_kib(pid) for name, pid in procs.items()}
            tunnels = []
            for _ in range(TUNNELS):
                reader, writer, head = await connect_via(rig.relay_port, f"127.0.0.1:{port}")
                assert head.startswith(b"HTTP/1.1 200")
                tunnels.append((reader, writer))
            if direction == "download":
                for _, writer in tunnels:
                    writer.transport.pause_reading()  # the client reads nothing
                await asyncio.sleep(3)
            else:

                async def push(writer: asyncio.StreamWriter) -> None:
                    with contextlib.suppress(TimeoutError, ConnectionError):
                        for _ in range(1000):
                            writer.write(b"u" * 65536)
                            await asyncio.wait_for(writer.drain(), 2)

                await asyncio.gather(*(push(w) for _, w in tunnels))
            after = {name: rss_kib(pid) for name, pid in procs.items()}
            results[direction] = {name: (after[name] - before[name]) / TUNNELS for name in procs}
            for _, writer in tunnels:
                writer.transport.abort()
            await asyncio.sleep(1)
    finally:
        for writer in deaf_writers:
            writer.transport.abort()
        fire.close()
        sink.close()
    print("KiB per busy tunnel:", results)
    for direction, per_process in results.items():
        for name, kib in per_process.items():
            assert kib <= CEILING_KIB[direction], (direction, name, kib, results)
