"""A bad setting given to ``relay`` or ``start`` is refused at start-up, in one line naming
what the user set: the flag (``--egress-ca-file``), or the ``UPSTREAMPROXY_*`` variable where
no flag sets it (``start``'s relay tuning), never the setting's name in the code.

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
from testpki import make_ca

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


# -- --egress-ca-file --------------------------------------------------------------------------


def bad_ca_file(kind: str, folder: Path) -> Path:
    """A value of --egress-ca-file that no TLS context can load."""
    if kind == "missing":
        return folder / "no-such-ca.pem"  # a typo
    if kind == "directory":
        return folder
    path = folder / "ca.pem"
    if kind == "not-pem":
        path.write_text("this is not a certificate\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "fifo":
        os.mkfifo(path)  # nobody writes it: opening it to read would block for ever
    elif kind == "unreadable":
        path.write_bytes(make_ca().cert_pem())
        path.chmod(0)
    return path


#: Root reads any file: as root, a file the relay's own user cannot read is the case
#: (test_start_names_a_ca_file_the_relay_user_cannot_read below).
BAD_CA_FILES = ["missing", "directory", "not-pem", "empty", "fifo"] + (
    [] if os.geteuid() == 0 else ["unreadable"]
)


@pytest.mark.parametrize("scheme", ["ws", "wss"])
@pytest.mark.parametrize("kind", BAD_CA_FILES)
def test_relay_refuses_an_unusable_egress_ca_file(tmp_path: Path, kind: str, scheme: str) -> None:
    """With ws:// the file was silently ignored (the relay served); with wss:// the relay
    failed with a bare ``upstreamproxy: No such file or directory``, naming nothing."""
    ca_file = bad_ca_file(kind, tmp_path)
    egress = f"{scheme}://127.0.0.1:{closed_port()}/ws"
    done = run_cli(
        relay_args(tmp_path, egress, "--egress-ca-file", str(ca_file)), clean_env(tmp_path)
    )
    assert done.returncode == 2, done.stderr
    assert "listening" not in done.stdout
    said = f"upstreamproxy: invalid configuration: --egress-ca-file: {ca_file}"
    assert said in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("scheme", ["ws", "wss"])
@pytest.mark.parametrize("kind", BAD_CA_FILES)
def test_start_refuses_an_unusable_egress_ca_file(tmp_path: Path, kind: str, scheme: str) -> None:
    """Before anything else can fail (the CA fetch, the relay), in the one failure line."""
    ca_file = bad_ca_file(kind, tmp_path)
    egress = f"{scheme}://127.0.0.1:{closed_port()}/v1/code/upstreamproxy/ws"
    args = start_args(tmp_path, "--egress-ca-file", str(ca_file), egress_url=egress)
    done = run_cli(args, clean_env(tmp_path))
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    lines = problem_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert f"start failed (--fail-closed): --egress-ca-file: {ca_file}" in lines[0]
    assert "egress_ca_file" not in done.stderr
    assert (tmp_path / "token").exists()  # kept for a retry


def test_start_refuses_an_unusable_egress_ca_file_from_the_environment(tmp_path: Path) -> None:
    """The same from UPSTREAMPROXY_EGRESS_CA_FILE, and under the default fail-open policy."""
    missing = tmp_path / "missing.pem"
    args = [a for a in start_args(tmp_path) if a != "--fail-closed"]
    done = run_cli(args, clean_env(tmp_path, UPSTREAMPROXY_EGRESS_CA_FILE=str(missing)))
    assert done.returncode == 0, done.stderr
    lines = problem_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert "proxy disabled, the session continues without it: --egress-ca-file:" in lines[0]
    assert str(missing) in lines[0]


def test_relay_warns_that_a_usable_egress_ca_file_is_unused_with_ws(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(make_ca().cert_pem())
    egress = f"ws://127.0.0.1:{closed_port()}/ws"
    stdout, stderr = serve_then_stop(
        relay_args(tmp_path, egress, "--egress-ca-file", str(ca_file)), clean_env(tmp_path)
    )
    assert stdout.startswith("relay listening on http://127.0.0.1:"), stderr
    unused = [line for line in problem_lines(stderr) if "--egress-ca-file" in line]
    assert len(unused) == 1, stderr
    assert f"{ca_file} is not used" in unused[0] and "ws://" in unused[0]


def test_start_warns_that_a_usable_egress_ca_file_is_unused_with_ws(tmp_path: Path) -> None:
    """Neither the relay (ws://) nor the CA fetch (--ca-file, no https URL) would use it."""
    ca_file = tmp_path / "egress-ca.pem"
    ca_file.write_bytes(make_ca().cert_pem())
    own_ca = tmp_path / "own-ca.pem"
    own_ca.write_bytes(make_ca("egress CA").cert_pem())
    # As root, the relay runs as its own user, who cannot read tmp_path: start does not
    # hand it a file it would not use.
    args = start_args(tmp_path, "--egress-ca-file", str(ca_file), "--ca-file", str(own_ca))
    stdout, stderr = serve_then_stop(args, clean_env(tmp_path, UPSTREAMPROXY_POOL_SIZE="0"))
    assert stdout.startswith("upstreamproxy ready: "), stderr
    unused = [line for line in problem_lines(stderr) if "--egress-ca-file" in line]
    assert len(unused) == 1, stderr
    assert f"{ca_file} is not used" in unused[0] and "ws://" in unused[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="the relay gets its own user only as root")
def test_start_names_a_ca_file_the_relay_user_cannot_read(tmp_path: Path) -> None:
    """root reads it, so start accepts it; the relay, as its own user, could not: that was
    ``the relay process failed: unexpected PermissionError: ...``, naming no setting."""
    ca_file = tmp_path / "egress-ca.pem"
    ca_file.write_bytes(make_ca().cert_pem())
    ca_file.chmod(0o600)
    own_ca = tmp_path / "own-ca.pem"
    own_ca.write_bytes(make_ca("egress CA").cert_pem())
    egress = f"wss://127.0.0.1:{closed_port()}/v1/code/upstreamproxy/ws"
    args = start_args(
        tmp_path, "--egress-ca-file", str(ca_file), "--ca-file", str(own_ca), egress_url=egress
    )
    done = run_cli(args, clean_env(tmp_path))
    assert done.returncode == 1, done.stderr
    lines = problem_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    said = f"start failed (--fail-closed): --egress-ca-file: {ca_file}: Permission denied, for "
    assert said + "the relay user " in lines[0], lines[0]


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
