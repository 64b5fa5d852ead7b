"""make_non_dumpable() in real child processes, read back from outside."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from upstreamproxy.bootstrap import hardening
from upstreamproxy.bootstrap.hardening import (
    HardeningError,
    HardeningResult,
    is_dumpable,
    make_non_dumpable,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

ROOT = Path(__file__).resolve().parents[1]

# The child reports the result as one JSON line, then waits to be inspected.
HARDENED_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from upstreamproxy.bootstrap.hardening import make_non_dumpable
    r = make_non_dumpable()
    print(json.dumps({"mechanism": r.mechanism, "dumpable": r.dumpable, "ok": r.ok,
                      "core": r.core_limit, "problems": r.problems}), flush=True)
    time.sleep(60)
    """
)
PLAIN_CHILD = "import time; print('{}', flush=True); time.sleep(60)"
# Needs no upstreamproxy import, so it can run as another user.
RAW_CHILD = textwrap.dedent(
    """
    import ctypes, sys, time
    if sys.argv[1] == "off":
        assert ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) == 0
    print("{}", flush=True)
    time.sleep(60)
    """
)


@contextmanager
def child(
    code: str,
    *args: str,
    pythonpath: Path | None = None,
    executable: str = sys.executable,
    user: int | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (pythonpath, ROOT) if p)
    proc = subprocess.Popen(
        [executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        user=user,
        group=user,
        extra_groups=[] if user is not None else None,
        cwd="/",
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"child exited early with {proc.wait()}"
        yield proc.pid, json.loads(line)
    finally:
        proc.kill()
        proc.wait()


def core_limits(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError("no core limit line")


def test_child_becomes_non_dumpable_and_is_seen_so_from_outside() -> None:
    with child(HARDENED_CHILD) as (pid, report):
        assert report["ok"] is True
        assert report["dumpable"] is False
        assert report["problems"] == []
        # python-prctl is an optional extra; either mechanism is acceptable, never "unsupported".
        assert report["mechanism"] in ("python-prctl", "ctypes-libc")
        assert is_dumpable(pid) is False
        assert core_limits(pid) == ("0", "0")


def test_untouched_child_is_dumpable() -> None:
    with child(PLAIN_CHILD) as (pid, _):
        assert is_dumpable(pid) is True


def test_own_process_is_dumpable_until_hardened() -> None:
    # The test process itself is never hardened (that would be irreversible for the session).
    assert is_dumpable() is True
    assert is_dumpable(os.getpid()) is True


def test_python_prctl_is_preferred_when_importable(tmp_path: Path) -> None:
    # A stand-in for python-prctl that really issues the prctl, so the read-back agrees.
    (tmp_path / "prctl.py").write_text(
        "import ctypes\n"
        "calls = []\n"
        "def set_dumpable(flag):\n"
        "    calls.append(flag)\n"
        "    assert ctypes.CDLL(None).prctl(4, int(flag), 0, 0, 0) == 0\n"
    )
    with child(HARDENED_CHILD, pythonpath=tmp_path) as (pid, report):
        assert report["mechanism"] == "python-prctl"
        assert report["ok"] is True
        assert is_dumpable(pid) is False


def test_broken_python_prctl_falls_back_to_ctypes(tmp_path: Path) -> None:
    (tmp_path / "prctl.py").write_text(
        "def set_dumpable(flag):\n    raise RuntimeError('broken build')\n"
    )
    with child(HARDENED_CHILD, pythonpath=tmp_path) as (pid, report):
        assert report["mechanism"] == "ctypes-libc"
        assert report["dumpable"] is False
        assert any("python-prctl" in p for p in report["problems"])
        assert is_dumpable(pid) is False


def test_prctl_denied_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    real = hardening._libc_prctl

    def deny_set(option: int, arg2: int = 0) -> int:
        if option == hardening.PR_SET_DUMPABLE:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        return real(option, arg2)

    monkeypatch.setattr(hardening, "_libc_prctl", deny_set)
    monkeypatch.setattr(hardening, "_disable_core_dumps", lambda: ((0, 0), None))
    monkeypatch.setitem(sys.modules, "prctl", None)  # make "import prctl" fail
    result = make_non_dumpable()
    assert result.mechanism == "ctypes-libc"
    assert result.dumpable is True
    assert not result.ok
    assert any("Operation not permitted" in p for p in result.problems)
    assert any("still dumpable" in p for p in result.problems)


def test_non_linux_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardening, "_is_linux", lambda: False)
    monkeypatch.setattr(hardening, "_disable_core_dumps", lambda: ((0, 0), None))
    result = make_non_dumpable()
    assert result.mechanism == "unsupported"
    assert not result.supported
    assert not result.ok
    assert result.dumpable is None
    assert "unsupported" in result.describe()
    with pytest.raises(HardeningError):
        is_dumpable()


def test_describe_is_one_line() -> None:
    result = HardeningResult("ctypes-libc", False, (0, 0))
    assert result.ok
    assert result.describe() == "mechanism=ctypes-libc dumpable=no core_limit=0/0"
    bad = HardeningResult("ctypes-libc", None, None, ("a", "b"))
    assert (
        bad.describe() == "mechanism=ctypes-libc dumpable=unknown core_limit=unknown problems=a; b"
    )


def test_missing_process_raises() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(HardeningError, match="no such process"):
        is_dumpable(proc.pid)


def _interpreter_for(uid: int) -> str:
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            done = subprocess.run(
                [candidate, "-c", "pass"],
                user=uid,
                group=uid,
                extra_groups=[],
                cwd="/",
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return candidate
    pytest.skip(f"no Python interpreter usable by uid {uid}")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as another user")
@pytest.mark.parametrize("state", ["off", "on"])
def test_both_read_back_methods_agree_for_a_non_root_target(state: str) -> None:
    nobody = 65534
    with child(RAW_CHILD, state, executable=_interpreter_for(nobody), user=nobody) as (pid, _):
        expected = state == "on"
        assert hardening._via_proc_owner(pid) is expected
        assert hardening._via_pidfd(pid) in (expected, None)  # None on kernels < 6.16
        assert is_dumpable(pid) is expected


def test_root_target_on_an_old_kernel_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs a root target")
    monkeypatch.setattr(hardening, "_via_pidfd", lambda pid: None)
    with child(PLAIN_CHILD) as (pid, _), pytest.raises(HardeningError, match="runs as root"):
        is_dumpable(pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as another user")
def test_unprivileged_observer_reads_a_root_process() -> None:
    nobody = 65534
    observer = _interpreter_for(nobody)
    probe = (
        "import sys\n"
        "from upstreamproxy.bootstrap.hardening import HardeningError, is_dumpable\n"
        "try:\n    print(is_dumpable(int(sys.argv[1])))\n"
        "except HardeningError as exc:\n    print('unknown:', exc)\n"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "")}
    for code, expected in ((HARDENED_CHILD, "False"), (PLAIN_CHILD, "True")):
        with child(code) as (pid, _):
            done = subprocess.run(
                [observer, "-c", probe, str(pid)],
                user=nobody,
                group=nobody,
                extra_groups=[],
                cwd="/",
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert done.returncode == 0, done.stderr
            answer = done.stdout.strip()
            if answer.startswith("unknown:"):  # kernel < 6.16: a root target is unreadable
                assert "runs as root" in answer
            else:
                assert answer == expected
