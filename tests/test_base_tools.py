"""Base command-line tools with only the injected environment: wget, plain HTTP, NO_PROXY.

Like test_tools.py: every origin name exists only in the egress's pinned resolver and every
HTTPS origin is signed by the egress CA, so a tool that succeeds went through relay and egress
and verified TLS against the super bundle. No test passes a CA or proxy flag to a tool.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tools_fixtures
from aiohttp import web
from tools_fixtures import HELLO, READY_PREFIX, UNTRUSTED, Started, World, start_session

world = tools_fixtures.world

PYTHON_GET = (
    "import sys, urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1], timeout=20) as r:\n"
    "    sys.stdout.write(r.read().decode())\n"
)


def need(tool: str) -> None:
    # .ci/run installs every tool used here; a developer machine without one skips it.
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")


@pytest.fixture(scope="module")
def session(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    started = start_session(world, tmp_path_factory.mktemp("base-tools"))
    assert started.ready_line.startswith(READY_PREFIX), started.stop()
    yield started
    started.stop()


def run_tool(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def tunnels(world: World) -> float:
    value = world.egress.metrics.registry.get_sample_value(
        "upstreamproxy_tunnels_total", {"decision": "allow"}
    )
    return value or 0.0


def settle(check: Callable[[], bool]) -> bool:
    """The egress counts a tunnel when it closes, just after the client is done."""
    deadline = time.monotonic() + 10
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- wget: GnuTLS, reads WGETRC, not SSL_CERT_FILE -------------------------------------------------


def test_wget_https_verifies_against_the_bundle(
    world: World, session: Started, tmp_path: Path
) -> None:
    need("wget")
    env = session.tool_env(tmp_path)
    done = run_tool(["wget", "-q", "-O", "-", "--tries=1", world.url()], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == HELLO


def test_wget_needs_the_wgetrc(world: World, session: Started, tmp_path: Path) -> None:
    """Without WGETRC, SSL_CERT_FILE & co. are not enough: wget fails verification (exit 5)."""
    need("wget")
    env = session.tool_env(tmp_path)
    del env["WGETRC"]
    done = run_tool(["wget", "-q", "-O", "-", "--tries=1", world.url()], env, tmp_path)
    assert done.returncode == 5, done.stderr


def test_wget_rejects_an_untrusted_origin(world: World, session: Started, tmp_path: Path) -> None:
    need("wget")
    done = run_tool(
        ["wget", "-q", "-O", "-", "--tries=1", world.url(UNTRUSTED)],
        session.tool_env(tmp_path),
        tmp_path,
    )
    assert done.returncode == 5, done.stderr


def test_wget_keeps_the_users_wgetrc(world: World, tmp_path: Path) -> None:
    need("wget")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".wgetrc").write_text("user_agent = my-own-agent\n")
    env = tools_fixtures.clean_env(home)
    started = start_session(world, tmp_path / "s", env=env)
    try:
        assert started.ready_line.startswith(READY_PREFIX)
        rc = Path(started.exports()["WGETRC"]).read_text()
        assert rc.index("user_agent = my-own-agent") < rc.index("ca_certificate = ")
    finally:
        started.stop()


# -- plain HTTP through the relay ------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["curl", "wget", "python"])
def test_plain_http_through_the_relay(
    world: World, session: Started, tmp_path: Path, tool: str
) -> None:
    argv = {
        "curl": ["curl", "-sS", "--max-time", "20"],
        "wget": ["wget", "-q", "-O", "-", "--tries=1"],
        "python": [sys.executable, "-I", "-c", PYTHON_GET],
    }[tool]
    need(argv[0])
    before = tunnels(world)
    done = run_tool([*argv, world.plain_url()], session.tool_env(tmp_path), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == HELLO
    assert settle(lambda: tunnels(world) == before + 1)


def test_plain_http_denial_shows_the_egress_reason(
    world: World, session: Started, tmp_path: Path
) -> None:
    need("curl")
    done = run_tool(
        ["curl", "-sS", "-i", "--max-time", "20", f"http://blocked.test:{world.plain_port}/"],
        session.tool_env(tmp_path),
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("HTTP/1.1 403 ")
    assert "X-Upstreamproxy-Reason: " in done.stdout


def test_no_http_proxy_gives_ccr_environment(world: World, tmp_path: Path) -> None:
    started = start_session(world, tmp_path / "s", "--no-http-proxy")
    try:
        assert started.ready_line.startswith(READY_PREFIX), started.stop()
        exports = started.exports()
        assert "HTTPS_PROXY" in exports
        for name in ("HTTP_PROXY", "http_proxy", "npm_config_proxy"):
            assert name not in exports
        assert "-Dhttp.proxyHost" not in exports["JAVA_TOOL_OPTIONS"]
    finally:
        started.stop()


# -- what keeps its direct route -------------------------------------------------------------------


def test_single_label_name_goes_through_the_relay_by_default(
    world: World, session: Started, tmp_path: Path
) -> None:
    """``svc`` is not in NO_PROXY: the relay forwards it and the egress decides (allowed here)."""
    need("curl")
    before = tunnels(world)
    done = run_tool(
        ["curl", "-sS", "--max-time", "20", world.plain_url("svc")],
        session.tool_env(tmp_path),
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == HELLO
    assert settle(lambda: tunnels(world) == before + 1)


def test_single_label_name_in_no_proxy_goes_direct(world: World, tmp_path: Path) -> None:
    """``start --no-proxy svc``: the tool connects directly (a compose service), no tunnel."""
    need("curl")
    started = start_session(world, tmp_path / "s", "--no-proxy", "svc")
    try:
        assert started.ready_line.startswith(READY_PREFIX), started.stop()
        env = started.tool_env(tmp_path)
        assert "svc" in env["NO_PROXY"].split(",")
        non_proxy = env["JAVA_TOOL_OPTIONS"].split("-Dhttp.nonProxyHosts=")[1].split(" ")[0]
        assert "svc" in non_proxy.split("|")
        before = tunnels(world)
        # The sandbox's own resolver would know "svc"; --resolve stands in for it.
        done = run_tool(
            [
                "curl",
                "-sS",
                "--max-time",
                "20",
                "--resolve",
                f"svc:{world.plain_port}:127.0.0.1",
                world.plain_url("svc"),
            ],
            env,
            tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == HELLO
        time.sleep(0.3)
        assert tunnels(world) == before
    finally:
        started.stop()


class SideOrigin:
    """An origin on a loopback address, in a thread: plain HTTP, or TLS with ``ssl_context``."""

    def __init__(self, host: str = "127.0.0.2", ssl_context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.ssl_context = ssl_context
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _start(self) -> None:
        app = web.Application()

        async def hello(request: web.Request) -> web.Response:
            return web.Response(text="direct\n")

        app.router.add_get("/", hello)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def __enter__(self) -> SideOrigin:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def test_address_in_a_no_proxy_cidr_goes_direct_for_cidr_aware_tools(
    world: World, session: Started, tmp_path: Path
) -> None:
    """127.0.0.2 matches only the ``127.0.0.0/8`` entry (not a literal one): curl goes direct.

    The same holds for 10/8, 172.16/12 and 192.168/16; Python's urllib and wget compare
    strings and would send such a URL to the relay (see the README's tool table).
    """
    need("curl")
    with SideOrigin() as side:
        before = tunnels(world)
        done = run_tool(
            ["curl", "-sS", "--max-time", "20", f"http://127.0.0.2:{side.port}/"],
            session.tool_env(tmp_path),
            tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "direct\n"
        time.sleep(0.3)
        assert tunnels(world) == before


# -- the survey: other HTTPS clients of Debian/Ubuntu images ---------------------------------------


@pytest.mark.parametrize(
    ("tool", "argv"),
    [
        ("lynx", ["lynx", "-dump"]),  # reads SSL_CERT_FILE itself
        ("w3m", ["w3m", "-dump"]),  # OpenSSL default paths: SSL_CERT_FILE
        ("http", ["http", "--body", "--ignore-stdin"]),  # httpie: requests, REQUESTS_CA_BUNDLE
    ],
)
def test_clients_covered_by_the_ca_variables(
    world: World, session: Started, tmp_path: Path, tool: str, argv: list[str]
) -> None:
    need(tool)
    env = session.tool_env(tmp_path)
    done = run_tool([*argv, world.url()], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert HELLO.strip() in done.stdout
    refused = run_tool([*argv, world.url(UNTRUSTED)], env, tmp_path)
    assert HELLO.strip() not in refused.stdout  # verification is on


def test_aria2_with_the_documented_option(world: World, session: Started, tmp_path: Path) -> None:
    """aria2 (GnuTLS) reads no CA variable nor a config file an environment variable could
    name; the README gives ``--ca-certificate="$SSL_CERT_FILE"``, which works through the relay."""
    need("aria2c")
    env = session.tool_env(tmp_path)
    argv = ["aria2c", "-q", "--allow-overwrite=true", "-d", str(tmp_path), "-o", "out"]
    bare = run_tool([*argv, world.url()], env, tmp_path)
    assert bare.returncode != 0  # as surveyed: the system store only
    done = run_tool([*argv, f"--ca-certificate={env['SSL_CERT_FILE']}", world.url()], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out").read_text() == HELLO


def test_wget2_trusts_the_bundle_through_wget2rc(
    world: World, session: Started, tmp_path: Path
) -> None:
    """wget2 reads WGET2RC, not SSL_CERT_FILE. Debian 12's wget2 (1.99) cannot tunnel https
    through a proxy at all (no CONNECT), so this checks the CA on a direct connection to an
    origin in NO_PROXY (127.0.0.1), signed by the egress CA that only the bundle holds."""
    need("wget2")
    leaf = world.ca.issue(["127.0.0.1"])
    (tmp_path / "leaf.pem").write_bytes(leaf.chain_pem())
    (tmp_path / "leaf.key").write_bytes(leaf.key_pem())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    env = session.tool_env(tmp_path)
    with SideOrigin("127.0.0.1", context) as side:
        url = f"https://127.0.0.1:{side.port}/"
        argv = ["wget2", "-q", "--tries=1", "--no-ocsp", "-O", str(tmp_path / "out"), url]
        done = run_tool(argv, env, tmp_path)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "out").read_text() == "direct\n"
        del env["WGET2RC"]
        assert run_tool(argv, env, tmp_path).returncode == 5  # TLS verification failed
