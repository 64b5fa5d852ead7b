"""``start --egress-proxy`` (and ``UPSTREAMPROXY_EGRESS_PROXY``): the relay reaches the egress
through a corporate forward proxy, here a real squid on loopback.

squid sees every WebSocket as a ``CONNECT`` to the egress and the CA fetch at start as a
plain GET; once squid is gone the session can no longer reach the egress, which proves
there is no other path.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tools_fixtures
from tools_fixtures import HELLO, READY_PREFIX, World, clean_env, cli, start_session, write_token

world = tools_fixtures.world

SQUID_CONF = """
http_port 127.0.0.1:{port}
acl localhost src 127.0.0.1/32
http_access allow localhost
http_access deny all
cache deny all
pid_filename none
access_log stdio:{base}/access.log
cache_log {base}/cache.log
cache_store_log none
coredump_dir {base}
netdb_filename none
shutdown_lifetime 0 seconds
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Squid:
    def __init__(self) -> None:
        # squid started as root drops to its own user, which cannot enter pytest's 0700 dirs.
        self.base = Path(tempfile.mkdtemp(prefix="upstreamproxy-squid-"))
        self.base.chmod(0o755)
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("proxy")
                os.chown(self.base, user.pw_uid, user.pw_gid)
            except KeyError:
                pass
        self.port = free_port()
        self.conf = self.base / "squid.conf"
        self.conf.write_text(SQUID_CONF.format(port=self.port, base=self.base))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["squid", "-N", "-f", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"squid exited: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"squid did not listen: {self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        path = self.base / "cache.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def access(self) -> str:
        path = self.base / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def squid() -> Iterator[Squid]:
    if shutil.which("squid") is None:
        pytest.skip("squid not installed")
    proxy = Squid()
    proxy.start()
    yield proxy
    proxy.stop()
    shutil.rmtree(proxy.base, ignore_errors=True)


def test_start_reaches_the_egress_through_squid(world: World, squid: Squid, tmp_path: Path) -> None:
    egress = world.egress_url.split("//", 1)[1].split("/", 1)[0]
    env = clean_env(tmp_path, UPSTREAMPROXY_EGRESS_PROXY=squid.url)
    started = start_session(world, tmp_path / "s", env=env)
    try:
        assert started.ready_line.startswith(READY_PREFIX), started.stop()
        tool_env = started.tool_env(tmp_path)
        for url in (world.url(), world.plain_url()):
            done = subprocess.run(
                ["curl", "-sS", "--max-time", "20", url],
                env=tool_env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout == HELLO

        # squid logs a CONNECT when it ends, and WebSockets that carried a tunnel stay open
        # for the next one (reuse, in the relay's pool): count those open through it too.
        def through_squid() -> int:
            logged = squid.access().count(f"CONNECT {egress}")
            open_now = subprocess.run(
                ["ss", "-Htn", "state", "established", f"( sport = :{squid.port} )"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.count("\n")
            return logged + open_now

        deadline = time.monotonic() + 10
        while through_squid() < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        access = squid.access()
        assert through_squid() >= 2, access
        assert "/v1/code/upstreamproxy/ca-cert" in access  # the CA was fetched through it too

        squid.stop()  # no other way to the egress
        done = subprocess.run(
            [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "20",
                world.url(),
            ],
            env=tool_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        assert "502" in done.stderr or "CONNECT" in done.stderr, done.stderr
    finally:
        started.stop()


@pytest.mark.parametrize(
    ("proxy", "message"),
    [
        ("ftp://proxy.example:21", "must be an http://"),
        ("http://", "needs a host"),
        *(
            [("socks5://proxy.example:1080", "python-socks")]
            if importlib.util.find_spec("python_socks") is None
            else []
        ),
    ],
)
def test_bad_egress_proxy_is_a_start_failure(
    world: World, tmp_path: Path, proxy: str, message: str
) -> None:
    token = write_token(tmp_path / "token")
    done = cli(
        "start",
        "--fail-closed",
        "--token-file",
        str(token),
        "--session-id",
        "s",
        "--egress-url",
        world.egress_url,
        "--state-dir",
        str(tmp_path / "state"),
        "--egress-proxy",
        proxy,
        env=clean_env(tmp_path),
    )
    assert done.returncode == 1
    assert "--egress-proxy: " in done.stderr and message in done.stderr, done.stderr
    assert token.exists()  # kept for a retry
