"""A bad setting given to ``start`` is refused in one line naming what the user set: the
flag (``--ca-url``), or the ``UPSTREAMPROXY_*`` variable where no flag sets it (``start``'s
relay tuning), never the setting's name in the code.

Every test runs the real CLI as a subprocess, with a clean environment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

ROOT = Path(__file__).resolve().parents[1]
#: A refusal comes at once; a process still running after this started to serve instead.
REFUSED_WITHIN = 20


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """No UPSTREAMPROXY_* variables, proxies or CA settings from the test runner."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(ROOT),
        **extra,
    }


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port: int = server.getsockname()[1]
    return port


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``upstreamproxy ARGS``; a process that is still running after a while failed to
    refuse (it serves with the bad setting) and fails the test."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "upstreamproxy", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=REFUSED_WITHIN,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"still running after {REFUSED_WITHIN}s instead of refusing: {exc.stderr!r}")


def serve_then_stop(args: list[str], env: dict[str, str]) -> tuple[str, str]:
    """Run ``upstreamproxy ARGS`` until its first line on stdout, then SIGTERM; both outputs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "upstreamproxy", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        rest, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return first + rest, stderr


def token_file(folder: Path) -> Path:
    path = folder / "token"
    path.write_text("a-session-token\n")
    path.chmod(0o600)
    return path


def relay_args(folder: Path, egress_url: str, *extra: str) -> list[str]:
    return [
        "relay",
        "--egress-url",
        egress_url,
        "--session-id",
        "s",
        "--token-file",
        str(token_file(folder)),
        "--keep-token-file",
        "--pool-size",
        "0",
        *extra,
    ]


def start_args(folder: Path, *extra: str, egress_url: str | None = None) -> list[str]:
    return [
        "start",
        "--token-file",
        str(token_file(folder)),
        "--session-id",
        "s",
        "--egress-url",
        egress_url or f"ws://127.0.0.1:{closed_port()}/v1/code/upstreamproxy/ws",
        "--state-dir",
        str(folder / "state"),
        "--fail-closed",
        *extra,
    ]


def problem_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " WARNING " in line or " ERROR " in line]


# -- start names the flag or variable ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "said"),
    [
        # the relay's tuning: start has no flags for it, only the variables
        ([], {"UPSTREAMPROXY_POOL_SIZE": "100"}, "UPSTREAMPROXY_POOL_SIZE: must be 0..64"),
        ([], {"UPSTREAMPROXY_PING_INTERVAL": "0"}, "UPSTREAMPROXY_PING_INTERVAL: must be a posit"),
        ([], {"UPSTREAMPROXY_KEEPALIVE": "-1"}, "UPSTREAMPROXY_KEEPALIVE: must be a positive"),
        ([], {"UPSTREAMPROXY_PING_TIMEOUT": "soon"}, "UPSTREAMPROXY_PING_TIMEOUT: 'soon' is not"),
        # flags start shares with relay
        (["--egress-url", "http://127.0.0.1:9/ws"], {}, "--egress-url: must start with ws://"),
        (["--egress-proxy", "ftp://proxy:21"], {}, "--egress-proxy: must be an http://"),
        # flags only start has
        (["--ca-url", "ftp://127.0.0.1/ca"], {}, "--ca-url: ftp://127.0.0.1/ca: only http and"),
        (["--state-dir", "{token}"], {}, "--state-dir: cannot create {token}"),
    ],
)
def test_start_names_the_flag_or_variable(
    tmp_path: Path, args: list[str], env: dict[str, str], said: str
) -> None:
    token = str(tmp_path / "token")
    args = [a.format(token=token) for a in args]
    said = said.format(token=token)
    done = run_cli(start_args(tmp_path) + args, clean_env(tmp_path, **env))
    assert done.returncode == 1, done.stderr
    lines = problem_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert f"start failed (--fail-closed): {said}" in lines[0], lines[0]


def test_start_background_names_the_variable_too(tmp_path: Path) -> None:
    """--background reports the daemon's failure line on the caller's stderr."""
    args = [*start_args(tmp_path), "--background"]
    done = run_cli(args, clean_env(tmp_path, UPSTREAMPROXY_POOL_SIZE="65"))
    assert done.returncode == 1, done.stderr
    assert "start failed (--fail-closed): UPSTREAMPROXY_POOL_SIZE: must be 0..64" in done.stderr
    assert "pool_size" not in done.stderr
