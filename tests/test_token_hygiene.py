"""Token hygiene outside ``start``'s happy path: the standalone ``relay`` command hardens itself
and reads/deletes its token like ``start``; a traced process refuses to read the token."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SESSION, TOKEN, Origin, TLSFiles, curl_via, run

from upstreamproxy.bootstrap.hardening import (
    HardeningError,
    is_dumpable,
    refuse_if_traced,
    tracer_pid,
)
from upstreamproxy.egress.server import EgressServer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "LANG": "C.UTF-8"}


def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def relay_argv(egress: EgressServer, token: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "upstreamproxy",
        "relay",
        "--egress-url",
        egress.url,
        "--session-id",
        SESSION,
        "--token-file",
        str(token),
        *extra,
    ]


def core_limits(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError("no core limit line")


async def start_relay(
    argv: list[str],
) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    return proc, line


async def stop_relay(proc: asyncio.subprocess.Process) -> str:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    err = await asyncio.wait_for(proc.stderr.read(), 30)
    await asyncio.wait_for(proc.wait(), 30)
    return err.decode()


@pytest.mark.parametrize("keep", [False, True], ids=["deleted", "kept"])
async def test_relay_command_hardens_and_deletes_its_token(
    egress: EgressServer, https_origin: Origin, tls: TLSFiles, tmp_path: Path, keep: bool
) -> None:
    token = token_file(tmp_path)
    extra = ["--keep-token-file"] if keep else []
    proc, line = await start_relay(relay_argv(egress, token, *extra))
    try:
        assert line.startswith("relay listening on http://127.0.0.1:"), line
        proxy = line.rsplit(" ", 1)[1].strip()
        try:
            assert is_dumpable(proc.pid) is False
        except HardeningError as exc:  # a root target on a kernel without PIDFD_INFO_COREDUMP
            assert "PIDFD_INFO_COREDUMP" in str(exc)
        assert core_limits(proc.pid) == ("0", "0")
        assert token.exists() is keep
        done = await curl_via(proxy, f"{https_origin.url}/", tls.ca_file)
        assert done.stdout == b"hello from origin\n", done.stderr
    finally:
        err = await stop_relay(proc)
    assert "process hardened: " in err and "dumpable=no" in err
    assert ("token file" in err and "deleted" in err) is not keep
    assert TOKEN not in err


async def test_relay_command_refuses_a_symlinked_token(
    egress: EgressServer, tmp_path: Path
) -> None:
    real = token_file(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(real)
    done = await run(*relay_argv(egress, link), env=env(), timeout=30)
    assert done.returncode == 2
    assert b"is a symbolic link" in done.stderr
    assert real.exists() and link.is_symlink()
    assert TOKEN.encode() not in done.stderr


async def test_relay_command_with_a_bad_token_file_says_why(
    egress: EgressServer, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    done = await run(*relay_argv(egress, empty), env=env(), timeout=30)
    assert done.returncode == 2
    assert b"contains only whitespace" in done.stderr


def test_untraced_process_passes_the_check() -> None:
    assert tracer_pid() == 0  # pytest is not being traced
    refuse_if_traced()


GDB = shutil.which("gdb")


@pytest.mark.parametrize("command", ["relay", "start"])
async def test_a_traced_process_refuses_to_read_the_token(
    egress: EgressServer, tmp_path: Path, command: str
) -> None:
    """A debugger attached from the first instruction (gdb runs the program) is seen."""
    assert GDB is not None, "gdb is needed (Debian package gdb; .ci/run installs it)"
    token = token_file(tmp_path)
    if command == "relay":
        argv = relay_argv(egress, token)
    else:
        argv = [
            sys.executable,
            "-m",
            "upstreamproxy",
            "start",
            "--fail-closed",
            "--relay-user",
            "root" if os.geteuid() == 0 else str(os.geteuid()),
            "--token-file",
            str(token),
            "--session-id",
            SESSION,
            "--egress-url",
            egress.url,
            "--state-dir",
            str(tmp_path / "state"),
        ]
    done = await run(GDB, "-nx", "-batch", "-ex", "run", "--args", *argv, env=env(), timeout=120)
    output = done.stdout + done.stderr
    assert b"is tracing this one (TracerPid)" in output, output[-2000:]
    # relay: a configuration error (2); start --fail-closed: a failed start (1).
    expected = b"exited with code 02]" if command == "relay" else b"exited with code 01]"
    assert expected in output, output[-2000:]
    assert token.exists()  # never used, so kept for a retry
    assert TOKEN.encode() not in output


@pytest.mark.parametrize("command", ["start", "relay"])
def test_start_and_relay_harden_before_the_heavy_imports(tmp_path: Path, command: str) -> None:
    """The same-uid window is the time from execve to PR_SET_DUMPABLE: the CLI sets it before
    it builds its parser (which imports aiohttp, cryptography, websockets for every command)."""
    code = (
        "import sys\n"
        "import upstreamproxy.bootstrap.hardening as hardening\n"
        "real = hardening.make_non_dumpable\n"
        "def spy():\n"
        "    heavy = sorted(m for m in ('aiohttp', 'cryptography', 'websockets', 'yaml')\n"
        "                   if m in sys.modules)\n"
        "    print('hardened with', heavy, flush=True)\n"
        "    return real()\n"
        "hardening.make_non_dumpable = spy\n"
        "from upstreamproxy.cli import main\n"
        f"sys.exit(main([{command!r}, '--token-file', {str(tmp_path / 'none')!r}]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env(), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    first = done.stdout.splitlines()[0]
    assert first == "hardened with []", done.stdout + done.stderr
