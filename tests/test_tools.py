"""Real tools, with nothing but the environment ``upstreamproxy start`` exported, TLS verified.

Every origin name (``hello.test``, ``pkgs.test``, ...) exists only in the egress's pinned
resolver, and every origin certificate is signed by the egress CA, which the tools can only
trust through the CA super bundle. So a tool that succeeds here went through the relay and
the egress and verified TLS against the bundle; no test passes -k, --cacert or a proxy flag.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tools_fixtures
from tools_fixtures import (
    HELLO,
    READY_PREFIX,
    UNTRUSTED,
    Started,
    World,
    start_session,
)

# Fixtures shared by the bootstrap tests (conftest.py belongs to the spine tests).
world = tools_fixtures.world

NODE_CONNECT_CLIENT = r"""
// Node < 22.21 ignores HTTPS_PROXY, so this client does what a proxy agent does: CONNECT to
// the proxy from the environment, then TLS with the default roots + NODE_EXTRA_CA_CERTS.
const http = require('http'), tls = require('tls');
const target = new URL(process.argv[1]);
const proxy = new URL(process.env.HTTPS_PROXY);
const authority = `${target.hostname}:${target.port || 443}`;
const req = http.request({host: proxy.hostname, port: proxy.port, method: 'CONNECT',
                          path: authority, headers: {Host: authority}});
req.on('connect', (res, socket) => {
  if (res.statusCode !== 200) { console.error('CONNECT ' + res.statusCode); process.exit(2); }
  const s = tls.connect({socket, servername: target.hostname}, () => {
    s.write(`GET ${target.pathname} HTTP/1.1\r\nHost: ${target.host}\r\nConnection: close\r\n\r\n`);
  });
  let data = '';
  s.on('data', (d) => { data += d; });
  s.on('end', () => { process.stdout.write(data.split('\r\n\r\n').slice(1).join('')); });
  s.on('error', (e) => { console.error(e.code + ': ' + e.message); process.exit(1); });
});
req.on('error', (e) => { console.error(e.message); process.exit(1); });
req.end();
"""

NODE_FETCH_CLIENT = r"""
// Node >= 22.21 / 24.5: native fetch honours HTTPS_PROXY with NODE_USE_ENV_PROXY=1.
fetch(process.argv[1]).then(async (r) => process.stdout.write(await r.text()))
  .catch((e) => { console.error(String(e.cause || e)); process.exit(1); });
"""

PYTHON_CLIENT = (
    "import sys, urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1], timeout=20) as r:\n"
    "    sys.stdout.write(r.read().decode())\n"
)


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")


@pytest.fixture(scope="module")
def session(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    started = start_session(world, tmp_path_factory.mktemp("tools-session"))
    assert started.ready_line.startswith(READY_PREFIX), started.stop()
    yield started
    started.stop()


def run_tool(
    argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_exported_environment_is_all_the_tools_get(session: Started, tmp_path: Path) -> None:
    env = session.tool_env(tmp_path)
    assert env["HTTPS_PROXY"].startswith("http://127.0.0.1:")
    assert env["SSL_CERT_FILE"] == str(session.state_dir / "ca-bundle.pem")
    assert not any(name.startswith("UPSTREAMPROXY") for name in env)


def test_curl(world: World, session: Started, tmp_path: Path) -> None:
    need("curl")
    done = run_tool(
        ["curl", "-sS", "--max-time", "20", world.url()], session.tool_env(tmp_path), tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == HELLO


def test_curl_verifies_tls_against_the_bundle(
    world: World, session: Started, tmp_path: Path
) -> None:
    need("curl")
    done = run_tool(
        ["curl", "-sS", "--max-time", "20", world.url(UNTRUSTED)],
        session.tool_env(tmp_path),
        tmp_path,
    )
    assert done.returncode == 60, done.stderr  # peer certificate cannot be authenticated
    assert "certificate" in done.stderr


def test_git_clone_over_https(world: World, session: Started, tmp_path: Path) -> None:
    need("git")
    env = session.tool_env(tmp_path, GIT_TERMINAL_PROMPT="0", GIT_CONFIG_NOSYSTEM="1")
    done = run_tool(
        ["git", "clone", "-q", world.url("git.test", "/repo.git"), "clone"], env, tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "clone" / "README").read_text() == "cloned through the relay\n"


def test_pip_install_from_https_index(world: World, session: Started, tmp_path: Path) -> None:
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip not installed")
    env = session.tool_env(
        tmp_path, PIP_CONFIG_FILE="/dev/null", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1"
    )
    target = tmp_path / "site"
    done = run_tool(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-cache-dir",
            "--no-deps",
            "--target",
            str(target),
            "--index-url",
            world.url("pkgs.test", "/simple/"),
            "demo-pkg",
        ],
        env,
        tmp_path,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (target / "demo_pkg" / "__init__.py").read_text() == (
        "GREETING = 'installed through the relay'\n"
    )


def test_npm_install_from_https_registry(world: World, session: Started, tmp_path: Path) -> None:
    need("npm")
    project = tmp_path / "project"
    project.mkdir()
    (project / "package.json").write_text('{"name": "t", "version": "1.0.0", "private": true}')
    npmrc = tmp_path / "npmrc"
    npmrc.write_text("")
    env = session.tool_env(
        tmp_path,
        npm_config_userconfig=str(npmrc),
        npm_config_cache=str(tmp_path / "npm-cache"),
        npm_config_update_notifier="false",
        npm_config_fund="false",
        npm_config_audit="false",
        npm_config_fetch_retries="0",
    )
    done = run_tool(
        ["npm", "install", "--registry", world.url("npm.test"), "demo-pkg"],
        env,
        project,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    installed = project / "node_modules" / "demo-pkg" / "index.js"
    assert installed.read_text() == "module.exports = 'installed through the relay';\n"


def node_version() -> tuple[int, int]:
    out = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=10).stdout
    major, minor, *_ = out.strip().lstrip("v").split(".")
    return int(major), int(minor)


def test_node_client(world: World, session: Started, tmp_path: Path) -> None:
    need("node")
    major, minor = node_version()
    native = (major == 22 and minor >= 21) or (major == 24 and minor >= 5) or major >= 25
    script = NODE_FETCH_CLIENT if native else NODE_CONNECT_CLIENT
    done = run_tool(["node", "-e", script, world.url()], session.tool_env(tmp_path), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == HELLO


def test_node_client_rejects_an_untrusted_origin(
    world: World, session: Started, tmp_path: Path
) -> None:
    need("node")
    done = run_tool(
        ["node", "-e", NODE_CONNECT_CLIENT, world.url(UNTRUSTED)],
        session.tool_env(tmp_path),
        tmp_path,
    )
    assert done.returncode == 1
    assert "UNABLE_TO_VERIFY_LEAF_SIGNATURE" in done.stderr or "certificate" in done.stderr


def test_python_client(world: World, session: Started, tmp_path: Path) -> None:
    done = run_tool(
        [sys.executable, "-I", "-c", PYTHON_CLIENT, world.url()],
        session.tool_env(tmp_path),
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == HELLO


def allowed_tunnels(world: World) -> float:
    value = world.egress.metrics.registry.get_sample_value(
        "upstreamproxy_tunnels_total", {"decision": "allow"}
    )
    return value or 0.0


def test_the_egress_carried_the_request(world: World, session: Started, tmp_path: Path) -> None:
    before = allowed_tunnels(world)
    done = run_tool(
        [sys.executable, "-I", "-c", PYTHON_CLIENT, world.url("pkgs.test")],
        session.tool_env(tmp_path),
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    # The audit record (and counter) is written when the tunnel closes, just after the client.
    for _ in range(100):
        if allowed_tunnels(world) > before:
            break
        time.sleep(0.02)
    assert allowed_tunnels(world) == before + 1
