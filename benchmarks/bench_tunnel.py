#!/usr/bin/env python3
"""Benchmark the tunnel (client -> relay -> WebSocket -> egress -> origin) against direct TCP.

One run measures the same workloads twice, directly against a local origin and through the
tunnel, and prints tunnel/direct ratios:

1. single-stream throughput, download and upload (plain TCP; plus a TLS download row);
2. time to first byte over sequential *new* connections (the tunnel's CONNECT and WebSocket
   set-up included: that is the honest cost a tool pays per connection);
3. many concurrent connections, each doing one small request-response, and one 64 KiB one;
4. CPU time and resident memory (VmRSS, VmHWM) of the relay and egress processes per phase.

Process layout (four processes, so nothing shares an event loop with what it measures):

* this process: the load generator (blocking sockets for the sequential phases, asyncio for
  the concurrent phase) and the ``/proc`` sampler;
* the origin: this script re-run with ``--origin-only`` (an asyncio TCP server with a tiny
  line protocol: ``GET n`` streams ``n`` bytes, ``PUT n`` reads ``n`` bytes and answers ``OK n``);
* ``python -m upstreamproxy egress`` and ``python -m upstreamproxy relay``, as shipped.

Everything listens on 127.0.0.1 only. Every loop is bounded in count and by a global deadline;
the children are stopped with SIGTERM (then SIGKILL) on exit, on an exception and on Ctrl-C,
and die with this process if it is killed (``PR_SET_PDEATHSIG``).

Usage::

    python benchmarks/bench_tunnel.py            # full run (about 15-30 s)
    python benchmarks/bench_tunnel.py --quick    # small sizes, < 30 s (smoke test)
    python benchmarks/bench_tunnel.py --json results.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import platform
import re
import select
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
HOST: Final = "127.0.0.1"
SESSION: Final = "sess-bench"
TOKEN: Final = "tok-bench-0123456789abcdef"  # a throwaway token, loopback only

#: The origin streams from (and the client uploads from) one block of this size.
BLOCK_SIZE: Final = 1024 * 1024
#: Largest transfer the origin accepts in one command (a bound, not a target).
MAX_TRANSFER: Final = 64 * 1024**3
#: Longest command line the origin accepts.
MAX_COMMAND: Final = 64
#: Longest HTTP head the client accepts from the relay.
MAX_HEAD: Final = 16 * 1024
#: Upper bound for any single blocking socket operation.
OP_TIMEOUT: Final = 30.0
#: Seconds a child may take to print its "listening on" line.
READY_TIMEOUT: Final = 20.0
#: Interval of the /proc sampler thread.
SAMPLE_INTERVAL: Final = 0.02
SMALL_RESPONSE: Final = 256
MB: Final = 1_000_000


class BenchError(Exception):
    """The benchmark cannot go on (a child died, a transfer failed, time ran out)."""


# -- origin ---------------------------------------------------------------------------------


async def _origin_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    block = memoryview(bytes(range(256)) * (BLOCK_SIZE // 256))
    try:
        while True:
            line = await reader.readline()
            if not line or len(line) > MAX_COMMAND:
                return
            verb, _, arg = line.strip().partition(b" ")
            size = int(arg)
            if not 0 <= size <= MAX_TRANSFER:
                return
            if verb == b"GET":
                remaining = size
                while remaining > 0:
                    piece = min(remaining, BLOCK_SIZE)
                    writer.write(block[:piece])
                    remaining -= piece
                    await writer.drain()
            elif verb == b"PUT":
                remaining = size
                while remaining > 0:
                    data = await reader.read(min(remaining, BLOCK_SIZE))
                    if not data:
                        return
                    remaining -= len(data)
                writer.write(b"OK %d\n" % size)
                await writer.drain()
            else:
                return
    except (ConnectionError, ValueError, ssl.SSLError):
        return
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


async def _run_origin(tls_cert: str | None, tls_key: str | None) -> int:
    plain = await asyncio.start_server(_origin_session, HOST, 0, limit=BLOCK_SIZE, backlog=1024)
    tls_server = None
    tls_port = 0
    if tls_cert and tls_key:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls_cert, tls_key)
        tls_server = await asyncio.start_server(
            _origin_session, HOST, 0, limit=BLOCK_SIZE, backlog=1024, ssl=context
        )
        tls_port = tls_server.sockets[0].getsockname()[1]
    plain_port = plain.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"origin listening on {HOST} {plain_port} {tls_port}", flush=True)
    await stop.wait()
    for server in (plain, tls_server):
        if server is not None:
            server.close()
    return 0


# -- child processes ------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it if the benchmark process dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB (empty once it has exited)."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    values[key] = int(value.split()[0])
    except (OSError, ValueError):
        return {}
    return values


def _proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used by ``pid`` so far."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return math.nan, math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


def _listen_overflows() -> int:
    """Host-wide TcpExt ListenOverflows: SYNs dropped because an accept queue was full."""
    try:
        with open("/proc/net/netstat") as netstat:
            lines = netstat.read().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


class Child:
    """One server process: started, waited on for its ready line, sampled, stopped."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready: re.Pattern[bytes]) -> re.Match[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                cwd=REPO_ROOT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        buffer = b""
        fd = self.proc.stdout.fileno()
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(
                    f"{self.name} did not report ready within {READY_TIMEOUT}s{self.log_tail()}"
                )
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                data = os.read(fd, 4096)
                if not data:
                    raise BenchError(
                        f"{self.name} exited with {self.proc.wait()} before "
                        f"it was ready{self.log_tail()}"
                    )
                buffer += data
        line = buffer.split(b"\n", 1)[0]
        match = ready.search(line)
        if match is None:
            raise BenchError(f"{self.name}: unexpected first line {line!r}{self.log_tail()}")
        return match

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.proc.returncode}{self.log_tail()}")

    def memory(self) -> dict[str, int]:
        return _proc_status(self.pid) if self.proc is not None else {}

    def cpu(self) -> float:
        return _proc_cpu_seconds(self.pid) if self.proc is not None else math.nan

    def stop(self, timeout: float = 8.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "".join(f"\n    {self.name}: {line}" for line in text)


class Sampler(threading.Thread):
    """Samples VmRSS of the servers every SAMPLE_INTERVAL and keeps each phase's peak."""

    def __init__(self, children: Sequence[Child]) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.children = children
        self.phase = "startup"
        self.peaks: dict[str, dict[str, int]] = {}
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._halt.wait(SAMPLE_INTERVAL):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            phase = self.peaks.setdefault(self.phase, {})
            for child in self.children:
                rss = child.memory().get("VmRSS")
                if rss is not None:
                    phase[child.name] = max(phase.get(child.name, 0), rss)

    def set_phase(self, name: str) -> None:
        self.sample()
        with self._lock:
            self.phase = name

    def halt(self) -> None:
        self._halt.set()
        self.join(2)


# -- client helpers -------------------------------------------------------------------------


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def check(self, what: str) -> None:
        if self.remaining() <= 0:
            raise BenchError(
                f"time limit of {self.seconds:.0f}s reached during {what}; "
                "use --max-seconds or smaller sizes"
            )

    def op_timeout(self) -> float:
        return max(0.1, min(OP_TIMEOUT, self.remaining()))


@dataclass(frozen=True)
class Route:
    """How the client reaches the origin: directly, or via the relay's CONNECT."""

    name: str
    origin_port: int
    relay_port: int | None = None

    @property
    def connect_request(self) -> bytes:
        authority = f"{HOST}:{self.origin_port}"
        return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()


def _check_status(head: bytes) -> None:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or parts[1] != "200":
        reasons = [line for line in lines[1:] if line.lower().startswith("x-upstreamproxy-")]
        raise BenchError(f"relay refused the CONNECT: {lines[0]} {' '.join(reasons)}".rstrip())


class Conn:
    """A blocking connection to the origin, possibly through the tunnel."""

    def __init__(self, sock: socket.socket, pending: bytes = b"") -> None:
        self.sock = sock
        self.pending = pending

    @classmethod
    def open(
        cls, route: Route, deadline: Deadline, tls: ssl.SSLContext | None = None
    ) -> tuple[Conn, float]:
        """Connect (and CONNECT); returns the connection and the seconds set-up took."""
        started = time.perf_counter()
        port = route.relay_port if route.relay_port is not None else route.origin_port
        sock = socket.create_connection((HOST, port), timeout=deadline.op_timeout())
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pending = b""
            if route.relay_port is not None:
                sock.sendall(route.connect_request)
                buffer = b""
                while b"\r\n\r\n" not in buffer:
                    deadline.check("CONNECT")
                    if len(buffer) > MAX_HEAD:
                        raise BenchError("relay answer head too large")
                    data = sock.recv(4096)
                    if not data:
                        raise BenchError("relay closed the connection during CONNECT")
                    buffer += data
                head, pending = buffer.split(b"\r\n\r\n", 1)
                _check_status(head)
            if tls is not None:
                if pending:
                    raise BenchError("unexpected bytes before the TLS handshake")
                sock = tls.wrap_socket(sock, server_hostname="localhost")
        except BaseException:
            sock.close()
            raise
        return cls(sock, pending), time.perf_counter() - started

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def recv_exactly(self, size: int, deadline: Deadline, buffer: memoryview) -> float:
        """Receive ``size`` bytes; returns perf_counter() at the first byte."""
        got = min(len(self.pending), size)
        first = time.perf_counter() if got else math.nan
        self.pending = self.pending[got:]
        while got < size:
            deadline.check("receive")
            count = self.sock.recv_into(buffer, min(len(buffer), size - got))
            if count == 0:
                raise BenchError(f"connection closed after {got} of {size} bytes")
            if got == 0:
                first = time.perf_counter()
            got += count
        return first

    def recv_line(self, deadline: Deadline) -> bytes:
        buffer = self.pending
        while b"\n" not in buffer:
            deadline.check("receive line")
            if len(buffer) > MAX_COMMAND:
                raise BenchError("origin answer too long")
            data = self.sock.recv(256)
            if not data:
                raise BenchError("connection closed before the origin answered")
            buffer += data
        line, self.pending = buffer.split(b"\n", 1)
        return line


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (pct in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * pct / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# -- workloads ------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    deadline: Deadline
    routes: dict[str, Route]
    tls_routes: dict[str, Route]
    tls_client: ssl.SSLContext | None
    children: dict[str, Child]
    sampler: Sampler
    results: dict[str, Any] = field(default_factory=dict)
    _buffer: memoryview = field(default_factory=lambda: memoryview(bytearray(BLOCK_SIZE)))

    def check_children(self) -> None:
        for child in self.children.values():
            child.check_alive()

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until relay and egress are idle (the last run's tunnels are torn down).

        Teardown work left over from a tunnel run would otherwise steal CPU from the next
        (direct) run on a small machine. Bounded by ``timeout``.
        """
        servers = [self.children[name] for name in ("relay", "egress")]
        end = time.monotonic() + min(timeout, max(0.0, self.deadline.remaining()))
        last = sum(child.cpu() for child in servers)
        while time.monotonic() < end:
            time.sleep(0.05)
            now = sum(child.cpu() for child in servers)
            if now - last < 0.005:  # not one clock tick in 50 ms
                return
            last = now

    def cpu_snapshot(self) -> dict[str, float]:
        snapshot = {name: child.cpu() for name, child in self.children.items()}
        snapshot["client"] = time.process_time()
        return snapshot

    @contextlib.contextmanager
    def cpu_measure(self, into: dict[str, float]) -> Iterator[None]:
        """Add the CPU seconds each process spends inside the block to ``into``."""
        before = self.cpu_snapshot()
        try:
            yield
        finally:
            after = self.cpu_snapshot()
            for name, value in after.items():
                into[name] = into.get(name, 0.0) + value - before[name]

    def phase_done(self, phase: str) -> None:
        self.check_children()
        self.sampler.set_phase(f"after-{phase}")
        memory = {
            name: child.memory()
            for name, child in self.children.items()
            if name in ("relay", "egress")
        }
        self.results.setdefault("memory_after_phase", {})[phase] = memory

    # 1. throughput ------------------------------------------------------------------------

    def download(self, route: Route, size: int, tls: ssl.SSLContext | None = None) -> float:
        conn, _ = Conn.open(route, self.deadline, tls)
        try:
            started = time.perf_counter()
            conn.sock.sendall(b"GET %d\n" % size)
            conn.recv_exactly(size, self.deadline, self._buffer)
            return time.perf_counter() - started
        finally:
            conn.close()

    def upload(self, route: Route, size: int) -> float:
        block = bytes(range(256)) * (BLOCK_SIZE // 256)
        conn, _ = Conn.open(route, self.deadline)
        try:
            started = time.perf_counter()
            conn.sock.sendall(b"PUT %d\n" % size)
            remaining = size
            while remaining > 0:
                self.deadline.check("upload")
                piece = min(remaining, BLOCK_SIZE)
                conn.sock.sendall(block[:piece] if piece < BLOCK_SIZE else block)
                remaining -= piece
            answer = conn.recv_line(self.deadline)
            if answer != b"OK %d" % size:
                raise BenchError(f"origin answered {answer!r} to the upload")
            return time.perf_counter() - started
        finally:
            conn.close()

    def throughput(self) -> None:
        size = self.args.size_mib * 1024 * 1024
        workloads: list[tuple[str, Callable[[Route], float], dict[str, Route]]] = [
            ("down", lambda route: self.download(route, size), self.routes),
            ("up", lambda route: self.upload(route, size), self.routes),
        ]
        if self.tls_client is not None:
            tls = self.tls_client
            workloads.append(
                ("tls_down", lambda route: self.download(route, size, tls), self.tls_routes)
            )
        out = self.results.setdefault("throughput", {})
        for name, run, routes in workloads:
            self.sampler.set_phase(f"throughput-{name}")
            entry: dict[str, Any] = {"bytes": size}
            for path in ("direct", "tunnel"):
                entry[path] = {"mb_s": [], "cpu_s": {}}
            # Interleave direct and tunnel runs so drifting background load hits both alike.
            for _ in range(self.args.reps):
                for path in ("direct", "tunnel"):
                    self.deadline.check(f"throughput {name}")
                    with self.cpu_measure(entry[path]["cpu_s"]):
                        seconds = run(routes[path])
                        self.settle()
                    entry[path]["mb_s"].append(size / seconds / MB)
            for path in ("direct", "tunnel"):
                result = entry[path]
                result["median_mb_s"] = statistics.median(result["mb_s"])
                gib = size * self.args.reps / 1024**3
                result["cpu_s_per_gib"] = {k: v / gib for k, v in result["cpu_s"].items()}
            entry["ratio"] = entry["tunnel"]["median_mb_s"] / entry["direct"]["median_mb_s"]
            out[name] = entry
        self.phase_done("throughput")

    # 2. time to first byte ----------------------------------------------------------------

    def ttfb(self) -> None:
        self.sampler.set_phase("ttfb")
        count = self.args.ttfb_count
        samples: dict[str, dict[str, list[float]]] = {
            path: {"setup": [], "ttfb": []} for path in ("direct", "tunnel")
        }
        cpu: dict[str, dict[str, float]] = {"direct": {}, "tunnel": {}}
        for path in ("direct", "tunnel"):
            self.settle()
            with self.cpu_measure(cpu[path]):
                for _ in range(count):
                    self.deadline.check("time to first byte")
                    started = time.perf_counter()
                    conn, setup = Conn.open(self.routes[path], self.deadline)
                    try:
                        conn.sock.sendall(b"GET %d\n" % SMALL_RESPONSE)
                        first = conn.recv_exactly(SMALL_RESPONSE, self.deadline, self._buffer)
                    finally:
                        conn.close()
                    samples[path]["setup"].append(setup)
                    samples[path]["ttfb"].append(first - started)
        out: dict[str, Any] = {"count": count, "response_bytes": SMALL_RESPONSE}
        for path in ("direct", "tunnel"):
            ttfb, setup = samples[path]["ttfb"], samples[path]["setup"]
            out[path] = {
                "p50_ms": percentile(ttfb, 50) * 1000,
                "p95_ms": percentile(ttfb, 95) * 1000,
                "max_ms": max(ttfb) * 1000,
                "setup_p50_ms": percentile(setup, 50) * 1000,
                "cpu_ms_per_conn": {k: v / count * 1000 for k, v in cpu[path].items()},
            }
        out["ratio_p50"] = out["tunnel"]["p50_ms"] / out["direct"]["p50_ms"]
        out["ratio_p95"] = out["tunnel"]["p95_ms"] / out["direct"]["p95_ms"]
        self.results["ttfb"] = out
        self.phase_done("ttfb")

    # 3. concurrency -----------------------------------------------------------------------

    async def _one_request(self, route: Route, size: int, go: asyncio.Event) -> float:
        await go.wait()
        started = time.perf_counter()
        port = route.relay_port if route.relay_port is not None else route.origin_port
        async with asyncio.timeout(OP_TIMEOUT):
            reader, writer = await asyncio.open_connection(HOST, port, limit=BLOCK_SIZE)
            try:
                if route.relay_port is not None:
                    writer.write(route.connect_request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    _check_status(head)
                writer.write(b"GET %d\n" % size)
                await reader.readexactly(size)
                elapsed = time.perf_counter() - started
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)
        return elapsed

    async def _round(self, route: Route, size: int) -> tuple[float, list[float], list[str]]:
        go = asyncio.Event()
        tasks = [
            asyncio.ensure_future(self._one_request(route, size, go))
            for _ in range(self.args.concurrency)
        ]
        await asyncio.sleep(0)
        started = time.perf_counter()
        go.set()
        budget = max(1.0, min(OP_TIMEOUT * 2, self.deadline.remaining()))
        done, pending = await asyncio.wait(tasks, timeout=budget)
        wall = time.perf_counter() - started
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        latencies: list[float] = []
        errors: list[str] = []
        for task in done:
            exc = task.exception()
            if exc is None:
                latencies.append(task.result())
            else:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
        errors.extend("timed out (phase budget)" for _ in pending)
        return wall, latencies, errors

    def concurrency(self) -> None:
        out = self.results.setdefault("concurrent", {})
        sizes = {"small": SMALL_RESPONSE, "64k": self.args.transfer_kib * 1024}
        for label, size in sizes.items():
            self.sampler.set_phase(f"concurrent-{label}")
            entry: dict[str, Any] = {
                "connections": self.args.concurrency,
                "rounds": self.args.rounds,
                "response_bytes": size,
            }
            raw: dict[str, dict[str, Any]] = {
                path: {
                    "walls": [],
                    "latencies": [],
                    "errors": [],
                    "cpu_s": {},
                    "listen_overflows": 0,
                }
                for path in ("direct", "tunnel")
            }
            for _ in range(self.args.rounds):
                for path in ("direct", "tunnel"):
                    self.deadline.check(f"concurrent {label}")
                    with self.cpu_measure(raw[path]["cpu_s"]):
                        before = _listen_overflows()
                        wall, latencies, errors = asyncio.run(self._round(self.routes[path], size))
                        self.settle()
                    raw[path]["listen_overflows"] += _listen_overflows() - before
                    raw[path]["walls"].append(wall)
                    raw[path]["latencies"].extend(latencies)
                    raw[path]["errors"].extend(errors)
            for path, data in raw.items():
                latencies = data["latencies"]
                if not latencies:
                    raise BenchError(
                        f"every concurrent {path} request failed: {data['errors'][:3]}"
                    )
                entry[path] = {
                    "wall_ms": statistics.median(data["walls"]) * 1000,
                    "walls_ms": [wall * 1000 for wall in data["walls"]],
                    "p50_ms": percentile(latencies, 50) * 1000,
                    "p95_ms": percentile(latencies, 95) * 1000,
                    "max_ms": max(latencies) * 1000,
                    "over_1s": sum(1 for value in latencies if value >= 1.0),
                    "errors": len(data["errors"]),
                    "listen_overflows": data["listen_overflows"],
                    "error_examples": sorted(set(data["errors"]))[:3],
                    "cpu_s_per_round": {k: v / self.args.rounds for k, v in data["cpu_s"].items()},
                }
            entry["ratio_wall"] = entry["tunnel"]["wall_ms"] / entry["direct"]["wall_ms"]
            entry["ratio_p50"] = entry["tunnel"]["p50_ms"] / entry["direct"]["p50_ms"]
            entry["ratio_p95"] = entry["tunnel"]["p95_ms"] / entry["direct"]["p95_ms"]
            out[label] = entry
        self.phase_done("concurrent")


# -- report ---------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def render(results: dict[str, Any]) -> str:
    lines: list[str] = []
    env = results["environment"]
    lines.append("")
    lines.append("upstreamproxy tunnel benchmark")
    lines.append(
        f"  machine: {env['cpus']} CPUs, Python {env['python']}, "
        f"load average before {env['load_before']}, after {env['load_after']}"
    )
    lines.append("  layout: load generator, origin, relay and egress are 4 separate processes;")
    lines.append("  the tunnel path keeps 4 busy processes on the CPUs, the direct path only 2,")
    lines.append("  so on a machine with fewer than 4 CPUs the tunnel numbers include CPU")
    lines.append("  contention; background load (other test runs) makes all numbers noisy.")
    load = env.get("load")
    if load:
        cpus = env["cpus"] or 1
        share = load["other_processes_cpu_seconds"] / (load["measured_seconds"] * cpus) * 100
        lines.append(
            f"  other processes used {load['other_processes_cpu_seconds']:.1f} CPU-s "
            f"({share:.0f}% of the machine) while this ran "
            f"{load['measured_seconds']:.1f} s; steal {load['steal_cpu_seconds']:.1f} "
            f"CPU-s; the benchmark itself used {load['benchmark_cpu_seconds']:.1f} CPU-s"
        )
    lines.append(
        f"  extra egress args: {' '.join(env['egress_args']) or '-'}; extra relay "
        f"args: {' '.join(env['relay_args']) or '-'}"
    )
    lines.append(
        f"  child log level: {env['child_log_level']}"
        f"{'  (PROFILED under cProfile: timings inflated)' if env['profile'] else ''}"
    )
    lines.append("")
    header = f"{'workload':<40}{'direct':>14}{'tunnel':>14}{'tunnel/direct':>15}"
    lines.append(header)
    lines.append("-" * len(header))

    def row(label: str, direct: float, tunnel: float, unit: str, ratio: float) -> None:
        lines.append(
            f"{label:<40}{_fmt(direct) + ' ' + unit:>14}"
            f"{_fmt(tunnel) + ' ' + unit:>14}{_fmt(ratio, 2):>15}"
        )

    for name, entry in results.get("throughput", {}).items():
        mib = entry["bytes"] // (1024 * 1024)
        label = {
            "down": "throughput down",
            "up": "throughput up",
            "tls_down": "throughput down, TLS",
        }[name]
        row(
            f"{label} ({mib} MiB, 1 stream)",
            entry["direct"]["median_mb_s"],
            entry["tunnel"]["median_mb_s"],
            "MB/s",
            entry["ratio"],
        )
    ttfb = results.get("ttfb")
    if ttfb:
        label = f"TTFB new conn, {ttfb['count']} seq."
        row(
            f"{label} p50",
            ttfb["direct"]["p50_ms"],
            ttfb["tunnel"]["p50_ms"],
            "ms",
            ttfb["ratio_p50"],
        )
        row(
            f"{label} p95",
            ttfb["direct"]["p95_ms"],
            ttfb["tunnel"]["p95_ms"],
            "ms",
            ttfb["ratio_p95"],
        )
    for label, entry in results.get("concurrent", {}).items():
        what = (
            f"{entry['connections']} concurrent x "
            f"{'256 B' if label == 'small' else str(entry['response_bytes'] // 1024) + ' KiB'}"
        )
        row(
            f"{what} wall",
            entry["direct"]["wall_ms"],
            entry["tunnel"]["wall_ms"],
            "ms",
            entry["ratio_wall"],
        )
        row(
            f"{what} p50",
            entry["direct"]["p50_ms"],
            entry["tunnel"]["p50_ms"],
            "ms",
            entry["ratio_p50"],
        )
        row(
            f"{what} p95",
            entry["direct"]["p95_ms"],
            entry["tunnel"]["p95_ms"],
            "ms",
            entry["ratio_p95"],
        )
    lines.append("")
    lines.append("Ratios: for throughput below 1 means the tunnel is slower; for times above 1.")

    lines.append("")
    for name, entry in results.get("throughput", {}).items():
        lines.append(
            f"throughput {name}: direct {_fmt(entry['direct']['median_mb_s'], 0)} MB/s, "
            f"tunnel {_fmt(entry['tunnel']['median_mb_s'], 0)} MB/s, "
            f"ratio {_fmt(entry['ratio'], 2)}   (runs, MB/s: direct "
            f"{', '.join(_fmt(v, 0) for v in entry['direct']['mb_s'])}; tunnel "
            f"{', '.join(_fmt(v, 0) for v in entry['tunnel']['mb_s'])})"
        )
    if ttfb:
        lines.append(
            f"ttfb: direct p50 {_fmt(ttfb['direct']['p50_ms'], 2)} ms, tunnel p50 "
            f"{_fmt(ttfb['tunnel']['p50_ms'], 2)} ms, ratio {_fmt(ttfb['ratio_p50'], 2)}"
            f"; tunnel set-up (connect + CONNECT + WebSocket + dial) p50 "
            f"{_fmt(ttfb['tunnel']['setup_p50_ms'], 2)} ms, max "
            f"{_fmt(ttfb['tunnel']['max_ms'], 1)} ms"
        )
    for label, entry in results.get("concurrent", {}).items():
        for path in ("direct", "tunnel"):
            data = entry[path]
            if data["errors"] or data["over_1s"] or data["listen_overflows"]:
                lines.append(
                    f"concurrent {label} {path}: {data['errors']} errors, "
                    f"{data['over_1s']} requests >= 1 s, host ListenOverflows "
                    f"+{data['listen_overflows']} {data['error_examples']}"
                )
                if data["over_1s"] and data["listen_overflows"]:
                    lines.append(
                        "  (a full accept queue drops the SYN; the client retries "
                        "after 1 s: see README, 'accept backlog')"
                    )

    lines.append("")
    lines.append("CPU seconds per GiB moved (all four processes; shows where the time goes):")
    for name, entry in results.get("throughput", {}).items():
        for path in ("direct", "tunnel"):
            cpu = entry[path]["cpu_s_per_gib"]
            lines.append(
                f"  {name:<9}{path:<7} "
                + "  ".join(
                    f"{proc} {_fmt(cpu.get(proc, math.nan), 2)}"
                    for proc in ("client", "origin", "relay", "egress")
                    if proc in cpu
                )
            )
    if ttfb:
        lines.append(
            "CPU milliseconds per new tunnel (TTFB phase): "
            + "  ".join(
                f"{proc} {_fmt(value, 2)}"
                for proc, value in ttfb["tunnel"]["cpu_ms_per_conn"].items()
            )
        )

    memory = results.get("memory")
    if memory:
        lines.append("")
        lines.append("Memory (KiB): VmRSS after each phase / peak VmRSS sampled during it")
        phases = memory["phase_peaks"]
        for proc in ("relay", "egress"):
            parts = []
            for phase, values in results.get("memory_after_phase", {}).items():
                rss = values.get(proc, {}).get("VmRSS")
                peak = max(
                    (
                        v.get(proc, 0)
                        for k, v in phases.items()
                        if k.startswith((phase, f"{phase}-"))
                    ),
                    default=0,
                )
                parts.append(f"{phase} {_fmt(rss or math.nan, 0)}/{_fmt(peak or math.nan, 0)}")
            lines.append(
                f"  {proc:<7} idle {_fmt(memory['idle'].get(proc, math.nan), 0)}; "
                + "; ".join(parts)
            )
        lines.append(
            f"peak RSS (VmHWM): relay {_fmt(memory['peak_kib']['relay'] / 1024, 1)} MiB,"
            f" egress {_fmt(memory['peak_kib']['egress'] / 1024, 1)} MiB"
        )
    lines.append(f"total run time {_fmt(results['environment']['seconds'], 1)} s")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the relay/egress tunnel against direct TCP on 127.0.0.1."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and counts; finishes in under 30 s (smoke test)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--size-mib", type=int, help="bytes per throughput run (default 256)")
    parser.add_argument("--reps", type=int, help="throughput runs per path (default 3)")
    parser.add_argument(
        "--ttfb-count", type=int, help="sequential new connections per path (default 200)"
    )
    parser.add_argument("--concurrency", type=int, help="concurrent connections (default 200)")
    parser.add_argument("--rounds", type=int, help="concurrent rounds per path (default 3)")
    parser.add_argument(
        "--transfer-kib",
        type=int,
        default=64,
        help="response size of the second concurrent workload (default 64)",
    )
    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure a TLS download (default: on, off with --quick)",
    )
    parser.add_argument(
        "--child-log-level",
        default="INFO",
        help="--log-level of relay and egress (default INFO, as shipped: "
        "one audit line per tunnel)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        help="hard limit for the whole run (default 600, 60 with --quick)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="run relay and egress under cProfile, writing DIR/{relay,egress}"
        ".prof (slows them down; for finding hot spots)",
    )
    parser.add_argument(
        "--egress-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for 'upstreamproxy egress' (repeatable; "
        "use --egress-arg=--flag for values starting with '-')",
    )
    parser.add_argument(
        "--relay-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for 'upstreamproxy relay' (repeatable)",
    )
    parser.add_argument("--origin-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tls-cert", help=argparse.SUPPRESS)
    parser.add_argument("--tls-key", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = {
        "size_mib": (256, 32),
        "reps": (3, 1),
        "ttfb_count": (200, 50),
        "concurrency": (200, 50),
        "rounds": (3, 1),
        "tls": (True, False),
        "max_seconds": (600.0, 60.0),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("size_mib", "reps", "ttfb_count", "concurrency", "rounds", "transfer_kib"):
        if not 1 <= getattr(args, name) <= 100_000:
            parser.error(f"--{name.replace('_', '-')} must be between 1 and 100000")
    return args


def _make_tls(workdir: Path) -> tuple[Path, Path, ssl.SSLContext]:
    sys.path.insert(0, str(REPO_ROOT))
    from upstreamproxy.certs import create_ca, issue_leaf

    ca = create_ca("upstreamproxy benchmark CA")
    leaf = issue_leaf(ca, ["localhost", HOST])
    (workdir / "ca.pem").write_bytes(ca.cert_pem())
    (workdir / "leaf.pem").write_bytes(leaf.chain_pem())
    (workdir / "leaf.key").write_bytes(leaf.key_pem())
    client = ssl.create_default_context(cafile=str(workdir / "ca.pem"))
    return workdir / "leaf.pem", workdir / "leaf.key", client


#: Egress options the benchmark passes when this egress version has them: the origin is on
#: loopback (a special-purpose range the policy blocks by default), and admission limits are
#: raised so the run measures the data path rather than rate limiting (the checks still run).
OPTIONAL_EGRESS_ARGS: Final = (
    ("--allow-cidr", "127.0.0.0/8"),
    ("--max-tunnels", "100000"),
    ("--max-session-tunnels", "100000"),
    ("--session-rate", "1000000"),
    ("--session-burst", "1000000"),
)


def _egress_extra_args() -> list[str]:
    """The OPTIONAL_EGRESS_ARGS this egress's ``--help`` lists."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    try:
        help_text = subprocess.run(
            [sys.executable, "-m", "upstreamproxy", "egress", "--help"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=READY_TIMEOUT,
            check=False,
        ).stdout
    except subprocess.TimeoutExpired:
        return []
    extra: list[str] = []
    for flag, value in OPTIONAL_EGRESS_ARGS:
        if re.search(rf"(^|\s){re.escape(flag)}\b", help_text):
            extra += [flag, value]
    return extra


def _python(profile: str | None, name: str) -> list[str]:
    if profile is None:
        return [sys.executable]
    return [sys.executable, "-m", "cProfile", "-o", str(Path(profile) / f"{name}.prof")]


def run_benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    deadline = Deadline(args.max_seconds)
    results: dict[str, Any] = {
        "environment": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
            "child_log_level": args.child_log_level,
            "profile": bool(args.profile),
        },
        "config": {
            k: v for k, v in vars(args).items() if k not in ("origin_only", "tls_cert", "tls_key")
        },
    }
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    (workdir / "tokens").write_text(f"{SESSION} {TOKEN}\n")
    (workdir / "token").write_text(TOKEN + "\n")
    tls_client = None
    origin_argv = [sys.executable, str(Path(__file__).resolve()), "--origin-only"]
    if args.tls:
        cert, key, tls_client = _make_tls(workdir)
        origin_argv += ["--tls-cert", str(cert), "--tls-key", str(key)]

    children: dict[str, Child] = {}
    sampler: Sampler | None = None
    try:
        children["origin"] = Child("origin", origin_argv, workdir / "origin.log")
        match = children["origin"].start(re.compile(rb"origin listening on \S+ (\d+) (\d+)"))
        origin_port, origin_tls_port = int(match[1]), int(match[2])
        level = ["--log-level", args.child_log_level]
        egress_args = [*_egress_extra_args(), *args.egress_arg]
        relay_args = list(args.relay_arg)
        results["environment"]["egress_args"] = egress_args
        results["environment"]["relay_args"] = relay_args
        children["egress"] = Child(
            "egress",
            [
                *_python(args.profile, "egress"),
                "-m",
                "upstreamproxy",
                *level,
                "egress",
                "--host",
                HOST,
                "--port",
                "0",
                "--static-tokens",
                str(workdir / "tokens"),
                "--allow",
                f"{HOST}:*",
                *egress_args,
            ],
            workdir / "egress.log",
        )
        egress_url = (
            children["egress"].start(re.compile(rb"egress listening on (ws://\S+)"))[1].decode()
        )
        children["relay"] = Child(
            "relay",
            [
                *_python(args.profile, "relay"),
                "-m",
                "upstreamproxy",
                *level,
                "relay",
                "--egress-url",
                egress_url,
                "--session-id",
                SESSION,
                "--token-file",
                str(workdir / "token"),
                "--listen-host",
                HOST,
                "--port",
                "0",
                *relay_args,
            ],
            workdir / "relay.log",
        )
        relay_port = int(
            children["relay"].start(re.compile(rb"relay listening on http://[^:]+:(\d+)"))[1]
        )

        sampler = Sampler([children["relay"], children["egress"]])
        sampler.start()
        time.sleep(0.2)  # let the servers settle before taking the idle baseline
        idle = {name: children[name].memory().get("VmRSS", 0) for name in ("relay", "egress")}
        bench = Bench(
            args=args,
            deadline=deadline,
            routes={
                "direct": Route("direct", origin_port),
                "tunnel": Route("tunnel", origin_port, relay_port),
            },
            tls_routes={
                "direct": Route("direct", origin_tls_port),
                "tunnel": Route("tunnel", origin_tls_port, relay_port),
            },
            tls_client=tls_client,
            children=children,
            sampler=sampler,
            results=results,
        )
        machine_before = _machine_cpu_seconds()
        ours_before = sum(bench.cpu_snapshot().values())
        wall_before = time.monotonic()
        # Warm-up: one tunnel each way, so first-use imports and allocations are not measured.
        bench.download(bench.routes["tunnel"], 1024 * 1024)
        bench.upload(bench.routes["tunnel"], 1024 * 1024)
        bench.throughput()
        bench.ttfb()
        bench.concurrency()
        machine_after = _machine_cpu_seconds()
        ours = sum(bench.cpu_snapshot().values()) - ours_before
        measured = time.monotonic() - wall_before
        foreign = machine_after[0] - machine_before[0] - ours
        results["environment"]["load"] = {
            "measured_seconds": measured,
            "benchmark_cpu_seconds": ours,
            "other_processes_cpu_seconds": max(0.0, foreign),
            "steal_cpu_seconds": machine_after[1] - machine_before[1],
        }
        time.sleep(0.2)
        sampler.set_phase("end")
        results["memory"] = {
            "idle": idle,
            "phase_peaks": sampler.peaks,
            "peak_kib": {
                name: children[name].memory().get("VmHWM", 0) for name in ("relay", "egress")
            },
        }
        bench.check_children()
    finally:
        if sampler is not None:
            sampler.halt()
        for name in ("relay", "egress", "origin"):
            if name in children:
                children[name].stop()
    results["environment"]["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    results["environment"]["seconds"] = time.monotonic() - started
    return results


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.origin_only:
        return asyncio.run(_run_origin(args.tls_cert, args.tls_key))
    # SIGTERM (and SIGINT, even where a shell started us with it ignored) unwinds like
    # Ctrl-C, so the finally blocks stop the children.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-tunnel-") as tmp:
            results = run_benchmark(args, Path(tmp))
    except BenchError as exc:
        print(f"bench_tunnel: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_tunnel: interrupted; children stopped", file=sys.stderr)
        return 130
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
