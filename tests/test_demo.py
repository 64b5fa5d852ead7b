"""``upstreamproxy demo``, the README's first command, as a user runs it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tools_fixtures import ROOT, clean_env

GREETING = "hello from the demo origin: you came through the relay and the egress"


def run_demo(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "upstreamproxy", "demo", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def demo_dir(output: str) -> Path:
    match = re.search(r"in (/\S*upstreamproxy-demo-\S+)", output)
    assert match, output
    return Path(match.group(1))


def test_demo_with_curl(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    started = time.monotonic()
    done = run_demo(clean_env(tmp_path), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - started < 20
    out = done.stdout
    assert GREETING in out
    assert "HTTP/1.1 403 Forbidden" in out and "X-Upstreamproxy-Reason: no-matching-rule" in out
    assert "non-dumpable" in out and "token file deleted" in out
    assert "exec -- curl" in out and "env.sh" in out and "demo --serve" in out
    assert re.search(r"allow +hello\.demo\.test:\d+", out)
    assert re.search(r"deny +blocked\.demo\.test:443", out)
    assert "demo OK" in out
    assert not demo_dir(out).exists()  # cleaned up
    assert done.stderr == ""  # quiet: everything a user needs is on stdout


def test_demo_without_curl_uses_python(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # a PATH with no curl on it
    bin_dir.mkdir()
    done = run_demo(clean_env(tmp_path, PATH=str(bin_dir)), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "curl is not installed" in done.stdout
    assert GREETING in done.stdout
    assert "403 Forbidden" in done.stdout and "demo OK" in done.stdout


def test_demo_serve_until_interrupted(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    proc = subprocess.Popen(
        [sys.executable, "-m", "upstreamproxy", "demo", "--serve"],
        env=clean_env(tmp_path),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving until Ctrl-C"):
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert serving.wait(30), "".join(lines)
        output = "".join(lines)
        # The printed "try it yourself" command, run from another shell.
        command = next(line.strip() for line in lines if line.strip().startswith(". "))
        done = subprocess.run(
            ["sh", "-c", command + " -sS --max-time 20"],
            env={"PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.stdout.strip() == GREETING, done.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
    assert not demo_dir(output).exists()
