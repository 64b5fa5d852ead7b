"""An egress fleet on loopback: replicas (processes or containers), HAProxy in front, relays.

Used by the fleet and image tests. Everything listens on 127.0.0.1 only. The configuration is
laid out as the image expects it under ``/etc/upstreamproxy`` (policy, keys, ca), each directory
written the way the kubelet writes a ConfigMap or Secret volume: files are symlinks into
``..data``, itself a symlink swapped atomically to a new timestamped directory on every update.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp
import pytest
from aiohttp import web

from upstreamproxy.tokens import generate_key, issue_token, key_fingerprint, public_key_pem

ROOT = Path(__file__).resolve().parent.parent
ETC = "/etc/upstreamproxy"
AUDIENCE = "fleet.test"
WS_PATH = "/v1/code/upstreamproxy/ws"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPSTREAMPROXY_")}
    # Loopback only, and never through a proxy the developer may have set.
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        env.pop(name, None)
    return env


# -- ConfigMap/Secret-style volumes ------------------------------------------------------------


class ProjectedDir:
    """A directory updated as the kubelet updates a ConfigMap/Secret volume (atomic ``..data``).

    ``publish`` writes the new files into a fresh ``..<stamp>`` directory, points a temporary
    link at it, renames that link over ``..data`` (the one atomic step) and keeps one top-level
    symlink per file (``name -> ..data/name``), removing those of files no longer published.
    Readable by anyone: the container runs as another uid (public material only).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)
        self._version = 0

    def publish(self, files: dict[str, bytes]) -> None:
        self._version += 1
        stamp = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{os.getpid()}.{self._version}"
        target = self.path / stamp
        target.mkdir(mode=0o755)
        for name, content in files.items():
            (target / name).write_bytes(content)
            (target / name).chmod(0o644)
        old = os.readlink(self.path / "..data") if (self.path / "..data").is_symlink() else None
        tmp = self.path / "..data_tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(stamp)
        os.replace(tmp, self.path / "..data")
        for name in files:
            link = self.path / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")
        for entry in self.path.iterdir():
            if entry.is_symlink() and not entry.name.startswith(".") and entry.name not in files:
                entry.unlink()
        if old is not None:
            for stale in (self.path / old).iterdir():
                stale.unlink()
            (self.path / old).rmdir()


# -- keys, tokens, policy ----------------------------------------------------------------------


@dataclass
class SigningKey:
    kid: str
    private: object  # Ed25519PrivateKey
    public_pem: bytes

    @classmethod
    def new(cls) -> SigningKey:
        key = generate_key()
        return cls(key_fingerprint(key.public_key()), key, public_key_pem(key.public_key()))

    def token(self, session: str, policy: str = "default", ttl: int = 900) -> str:
        return issue_token(
            self.private,  # type: ignore[arg-type]
            self.kid,
            session,
            policy,
            AUDIENCE,
            ttl,
            time.time(),
        )


def policy_yaml(*hosts: str) -> bytes:
    """A policy allowing ``hosts`` on any port, loopback allowed (where the test origin lives)."""
    listed = ", ".join(f'"{h}"' for h in hosts)
    return (
        "version: 1\n"
        "policies:\n"
        "  default:\n"
        "    rules:\n"
        f"      - id: origin\n        hosts: [{listed}]\n        ports: '*'\n"
        "    allow_cidrs: [127.0.0.0/8]\n"
    ).encode()


@dataclass
class FleetConfig:
    """The three mounted directories of every replica, and what signs the tokens."""

    etc: Path
    policy: ProjectedDir
    keys: ProjectedDir
    ca: ProjectedDir
    signing: list[SigningKey]

    @classmethod
    def create(cls, base: Path, ca_pem: bytes, *policy_hosts: str) -> FleetConfig:
        etc = base / "etc-upstreamproxy"
        etc.mkdir(parents=True)
        base.chmod(0o755)
        etc.chmod(0o755)
        config = cls(
            etc,
            ProjectedDir(etc / "policy"),
            ProjectedDir(etc / "keys"),
            ProjectedDir(etc / "ca"),
            [SigningKey.new()],
        )
        config.policy.publish({"policy.yaml": policy_yaml(*policy_hosts)})
        config.publish_keys(config.signing)
        config.ca.publish({"ca.pem": ca_pem})
        return config

    def publish_keys(self, keys: list[SigningKey]) -> None:
        self.keys.publish({f"{k.kid}.public.pem": k.public_pem for k in keys})


# -- replicas ----------------------------------------------------------------------------------


class Replica(Protocol):
    name: str
    port: int
    metrics_port: int

    async def start(self) -> None: ...

    def terminate(self) -> None: ...

    async def wait_exit(self, timeout: float) -> int: ...

    async def kill(self) -> None: ...

    def logs(self) -> str: ...


#: Settings every replica of a test fleet runs with (on top of the image's defaults).
def replica_flags(drain_grace: float, drain_delay: float) -> list[str]:
    return [
        f"--drain-grace={drain_grace:g}",
        f"--drain-delay={drain_delay:g}",
        "--reload-interval=0.5",
        f"--ca-cert={ETC}/ca/ca.pem",
    ]


def replica_env(port: int, metrics_port: int) -> dict[str, str]:
    """The image's configuration variables, with the listeners moved to loopback."""
    return {
        "UPSTREAMPROXY_EGRESS_HOST": "127.0.0.1",
        "UPSTREAMPROXY_EGRESS_PORT": str(port),
        "UPSTREAMPROXY_METRICS_HOST": "127.0.0.1",
        "UPSTREAMPROXY_METRICS_PORT": str(metrics_port),
        "UPSTREAMPROXY_AUDIENCE": AUDIENCE,
        "UPSTREAMPROXY_LOG_LEVEL": "INFO",
    }


async def http_status(url: str, timeout: float = 3) -> int | None:
    assert url.startswith("http://127.0.0.1:"), url  # loopback only
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http,
            http.get(url) as response,
        ):
            await response.read()
            return response.status
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


async def wait_ready(replica: Replica, deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if await http_status(f"http://127.0.0.1:{replica.port}/readyz") == 200:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(
        f"{replica.name} not ready after {deadline:.0f}s:\n{replica.logs()[-3000:]}"
    )


class ProcessReplica:
    """``upstreamproxy egress`` as a local process, configured exactly like the image."""

    def __init__(
        self,
        name: str,
        config: FleetConfig,
        flags: list[str],
        log_dir: Path,
        image_env: dict[str, str],
    ) -> None:
        self.name, self.config, self.flags = name, config, flags
        self.port, self.metrics_port = free_port(), free_port()
        self.log_path = log_dir / f"{name}.log"
        self.image_env = image_env
        self.proc: asyncio.subprocess.Process | None = None

    def _remap(self, value: str) -> str:
        return value.replace(ETC, str(self.config.etc))

    async def start(self) -> None:
        env = clean_env()
        env |= {k: self._remap(v) for k, v in self.image_env.items()}
        env |= replica_env(self.port, self.metrics_port)
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "upstreamproxy",
                "egress",
                *(self._remap(f) for f in self.flags),
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=log,
            )
        await wait_ready(self)

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    async def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


async def docker_async(*args: str, timeout: float = 120) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def container_run_args(
    image: str, name: str, config: FleetConfig, port: int, metrics_port: int, flags: list[str]
) -> list[str]:
    """``docker run`` as the README shows it: non-root, read-only root, config mounted read-only.

    Host networking (the engine has no bridge here) with the listeners on 127.0.0.1 only.
    """
    env = replica_env(port, metrics_port)
    return [
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--user",
        "10001:10001",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "-v",
        f"{config.etc}/policy:{ETC}/policy:ro",
        "-v",
        f"{config.etc}/keys:{ETC}/keys:ro",
        "-v",
        f"{config.etc}/ca:{ETC}/ca:ro",
        *(a for k, v in env.items() for a in ("-e", f"{k}={v}")),
        image,
        *flags,
    ]


class ContainerReplica:
    """The image run with ``docker run``; rolled with ``docker kill -s TERM`` / ``docker start``."""

    def __init__(self, name: str, image: str, config: FleetConfig, flags: list[str]) -> None:
        self.name, self.image, self.config, self.flags = name, image, config, flags
        self.port, self.metrics_port = free_port(), free_port()
        self._created = False

    async def start(self) -> None:
        if not self._created:
            await docker_async("rm", "-f", self.name)
            args = container_run_args(
                self.image, self.name, self.config, self.port, self.metrics_port, self.flags
            )
            code, out = await docker_async(*args)
            assert code == 0, out
            self._created = True
        else:
            code, out = await docker_async("start", self.name)
            assert code == 0, out
        await wait_ready(self)

    def terminate(self) -> None:
        subprocess.run(
            ["docker", "kill", "--signal", "TERM", self.name],
            check=True,
            capture_output=True,
            timeout=30,
        )

    async def wait_exit(self, timeout: float) -> int:
        code, out = await docker_async("wait", self.name, timeout=timeout)
        assert code == 0, out
        return int(out.strip().splitlines()[-1])

    async def kill(self) -> None:
        if self._created:
            await docker_async("rm", "-f", self.name)

    def logs(self) -> str:
        proc = subprocess.run(
            ["docker", "logs", self.name], capture_output=True, text=True, timeout=30, check=False
        )
        return proc.stdout + proc.stderr


# -- HAProxy ----------------------------------------------------------------------------------


HAPROXY_CFG = """\
global
    maxconn 4096
    stats socket {sock} mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 2s
    # A connection refused (a replica restarting) is retried on another server.
    retries 3
    option redispatch 1

frontend egress
    bind 127.0.0.1:{port}
    default_backend egress

backend egress
    # Tunnels are long-lived: balance on open connections, not turns.
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    # A replica is out after two failed checks (one slow answer on a busy machine must not
    # take it out) and back after two good ones. Its open connections are left alone when it
    # is marked down: they drain on the replica itself.
    default-server inter {inter}ms fastinter {inter}ms downinter {inter}ms fall 2 rise 2
{servers}
"""


class HAProxy:
    def __init__(self, base: Path, replicas: list[Replica], inter_ms: int = 300) -> None:
        self.port = free_port()
        self.sock = base / "haproxy.sock"
        self.cfg = base / "haproxy.cfg"
        self.log_path = base / "haproxy.log"
        servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port} check" for r in replicas)
        self.cfg.write_text(
            HAPROXY_CFG.format(sock=self.sock, port=self.port, inter=inter_ms, servers=servers)
        )
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{WS_PATH}"

    async def start(self) -> None:
        check = subprocess.run(
            ["haproxy", "-c", "-f", str(self.cfg)], capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0, check.stdout + check.stderr
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                "haproxy", "-db", "-f", str(self.cfg), stdout=log, stderr=log
            )
        end = time.monotonic() + 20
        while not self.sock.exists():
            assert time.monotonic() < end, self.log_path.read_text()
            await asyncio.sleep(0.1)

    async def command(self, line: str) -> str:
        reader, writer = await asyncio.open_unix_connection(str(self.sock))
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.read(), 5)).decode()
        finally:
            writer.close()

    async def servers(self) -> dict[str, dict[str, str]]:
        text = (await self.command("show stat")).lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == "egress" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    async def wait_status(self, name: str, status: str, deadline: float = 30) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if (await self.servers())[name]["status"].startswith(status):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"haproxy never saw {name} {status}")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# -- relays ----------------------------------------------------------------------------------


def relay_pool_flags() -> list[str]:
    """The relay's pre-opened WebSocket pool flag, if this version has one (detected from
    ``relay --help``, never assumed): ``[]`` when the relay opens one WebSocket per CONNECT."""
    out = subprocess.run(
        [sys.executable, "-m", "upstreamproxy", "relay", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=clean_env(),
        check=True,
    ).stdout
    match = re.search(r"(--[\w-]*pool[\w-]*)(?:[ =]([A-Z_]+))?", out)
    if match is None:
        return []
    return [match[1], "4"] if match[2] else [match[1]]


class RelayProcess:
    """``upstreamproxy relay`` on the host, as a sandbox would run it."""

    def __init__(
        self, base: Path, name: str, egress_url: str, session: str, token: str, extra: list[str]
    ) -> None:
        self.token = token  # the relay deletes its token file once it listens
        self.token_file = base / f"{name}.token"
        self.token_file.write_text(token)
        self.token_file.chmod(0o600)
        self.log_path = base / f"{name}.log"
        self.argv = [
            sys.executable,
            "-m",
            "upstreamproxy",
            "relay",
            "--egress-url",
            egress_url,
            "--session-id",
            session,
            "--token-file",
            str(self.token_file),
            "--port",
            "0",
            *extra,
        ]
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=ROOT,
                env=clean_env(),
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        match = re.search(rb"http://127\.0\.0\.1:(\d+)", line)
        assert match, f"relay did not start: {line!r}\n{self.log_path.read_text()[-2000:]}"
        self.port = int(match[1])

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# -- origin and traffic -----------------------------------------------------------------------


def pattern(size: int) -> bytes:
    block = hashlib.sha256(b"fleet").digest() * 2048  # 64 KiB
    whole, part = divmod(size, len(block))
    return block * whole + block[:part]


def origin_app() -> web.Application:
    """``/bytes/N`` at once; ``/slow/SECONDS/N``: N bytes spread over SECONDS (a long download)."""

    async def data(request: web.Request) -> web.Response:
        return web.Response(body=pattern(int(request.match_info["size"])))

    async def slow(request: web.Request) -> web.StreamResponse:
        seconds, size = float(request.match_info["seconds"]), int(request.match_info["size"])
        body, pieces = pattern(size), 20
        response = web.StreamResponse(headers={"Content-Length": str(size)})
        await response.prepare(request)
        step = -(-size // pieces)
        for offset in range(0, size, step):
            await response.write(body[offset : offset + step])
            await asyncio.sleep(seconds / pieces)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/bytes/{size:\\d+}", data)
    app.router.add_get("/slow/{seconds:[0-9.]+}/{size:\\d+}", slow)
    return app


@contextlib.asynccontextmanager
async def https_origin(context: ssl.SSLContext) -> AsyncIterator[int]:
    runner = web.AppRunner(origin_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context, backlog=1024)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


@dataclass
class Figures:
    """What the clients saw."""

    opened: int = 0  # CONNECTs answered 200
    completed: int = 0  # transfers that finished with every byte right
    long_completed: int = 0
    failed: list[str] = field(default_factory=list)  # CONNECTs not answered 200
    cut: list[tuple[float, str]] = field(default_factory=list)  # (seconds established, why)

    def line(self) -> str:
        return (
            f"tunnels opened {self.opened}, failed {len(self.failed)}, transfers completed "
            f"{self.completed} (long {self.long_completed}), cut {len(self.cut)}"
        )


async def tunnel_get(
    relay_port: int,
    origin_port: int,
    path: str,
    client_tls: ssl.SSLContext,
    size: int,
    figures: Figures,
    timeout: float = 30,
) -> bool:
    """One CONNECT through the relay, then HTTPS GET ``path``; the outcome goes into figures."""
    target = f"localhost:{origin_port}"
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", relay_port), 10
        )
    except (OSError, TimeoutError) as exc:
        figures.failed.append(f"relay unreachable: {exc!r}")
        return False
    try:
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            figures.failed.append(f"no status head: {exc!r}")
            return False
        if not head.startswith(b"HTTP/1.1 200"):
            figures.failed.append(head.decode(errors="replace").strip())
            return False
        figures.opened += 1
        established = time.monotonic()
        try:
            await asyncio.wait_for(writer.start_tls(client_tls, server_hostname="localhost"), 10)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode()
            )
            response = await asyncio.wait_for(reader.read(-1), timeout)
            headers, _, body = response.partition(b"\r\n\r\n")
            if not headers.startswith(b"HTTP/1.1 200") or body != pattern(size):
                raise ValueError(f"bad response: {headers[:60]!r}, {len(body)}/{size} bytes")
        except (
            OSError,
            TimeoutError,
            ValueError,
            ssl.SSLError,
            asyncio.IncompleteReadError,
        ) as exc:
            figures.cut.append((time.monotonic() - established, repr(exc)[:200]))
            return False
        figures.completed += 1
        return True
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 5)


@dataclass
class Load:
    """Continuous traffic through relays: short tunnels plus long downloads, bounded."""

    relay_ports: list[int]
    origin_port: int
    client_tls: ssl.SSLContext
    short_workers: int = 6
    long_workers: int = 3
    long_seconds: float = 3.0
    max_tunnels: int = 20000
    figures: Figures = field(default_factory=Figures)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _worker(self, index: int, long: bool) -> None:
        relay = self.relay_ports[index % len(self.relay_ports)]
        while not self._stop.is_set() and self.figures.opened < self.max_tunnels:
            if long:
                size = 512 * 1024
                path = f"/slow/{self.long_seconds:g}/{size}"
                if await tunnel_get(
                    relay, self.origin_port, path, self.client_tls, size, self.figures
                ):
                    self.figures.long_completed += 1
            else:
                await tunnel_get(
                    relay, self.origin_port, "/bytes/4096", self.client_tls, 4096, self.figures
                )
                await asyncio.sleep(0.02)

    def start(self) -> None:
        for i in range(self.short_workers):
            self._tasks.append(asyncio.get_running_loop().create_task(self._worker(i, False)))
        for i in range(self.long_workers):
            self._tasks.append(asyncio.get_running_loop().create_task(self._worker(i, True)))

    async def stop(self, timeout: float = 60) -> Figures:
        self._stop.set()
        done, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        assert not pending, "the load did not stop in time"
        for task in done:
            task.result()
        return self.figures


def figures_report(
    capsys: pytest.CaptureFixture[str],
    title: str,
    figures: Figures,
    extra: Callable[[], str] | None = None,
) -> str:
    """Print the figures to the terminal even when pytest captures output (CI logs show them)."""
    text = f"[{title}] {figures.line()}"
    if extra is not None:
        text += f"; {extra()}"
    with capsys.disabled():
        print(f"\n{text}")
    return text
