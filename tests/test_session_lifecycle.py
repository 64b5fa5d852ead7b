"""Session lifecycle on the host: liveness whatever pid reuse does, stale files, what
``start --background`` tells its caller, and no zombies under a parent that never reaps.

The same behaviour in real containers (``docker restart``, a SIGKILLed relay under a
``sleep infinity`` PID 1) is in tests/test_devcontainer.py (marker ``containers``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tools_fixtures import (
    SESSION_ID,
    TOKEN,
    Started,
    World,
    clean_env,
    cli,
    start_session,
    world,
    write_token,
)

from upstreamproxy.bootstrap.state import (
    SessionInfo,
    StatePaths,
    load_session,
    process_identity,
    remove_stale_session,
    session_alive,
)

__all__ = ["world"]  # a fixture, used by name

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "env" / "profile.d" / "upstreamproxy.sh"
#: POSIX shells the snippet must work in: Debian's dash, bash, zsh (as sh, like the Feature's
#: zshrc line) and busybox ash (Alpine's); .ci/run installs them.
SHELLS = [s for s in ("sh", "dash", "bash", "zsh", "busybox") if shutil.which(s)]


def sourced(shell: str, state_dir: Path, before: str = "", after: str = "") -> dict[str, str]:
    """Source the profile snippet in ``shell`` (zsh as sh, like the Feature's zshrc line)."""
    source = f'. "{PROFILE}"'
    if shell == "zsh":
        source = f"emulate sh -c '{source}'"
    script = f'{before}\n{source}\n{after}\nprintf "%s\\n" "HTTPS_PROXY=${{HTTPS_PROXY-unset}}"'
    argv = ["busybox", "sh", "-c", script] if shell == "busybox" else [shell, "-c", script]
    done = subprocess.run(
        argv,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": "/nonexistent",
            "UPSTREAMPROXY_STATE_DIR": str(state_dir),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    values = {}
    for line in done.stdout.splitlines():
        name, _, value = line.partition("=")
        values[name] = value
    return values


def kill_hard(session: Started) -> None:
    """SIGKILL: what a container stop or the OOM killer does; nothing gets cleaned up."""
    session.proc.kill()
    session.proc.wait(10)
    if session.proc.stdout is not None:
        session.proc.stdout.close()


def rewrite_pid(
    state_dir: Path, pid: int, ticks: int | None = None, boot: str | None = None
) -> None:
    """Make the session files name ``pid`` (keeping the recorded start time and boot id)."""
    document = json.loads((state_dir / "env.json").read_text())
    session = document["session"]
    session["pid"] = pid
    if ticks is not None:
        session["pid_start"] = ticks
    if boot is not None:
        session["boot_id"] = boot
    (state_dir / "env.json").write_text(json.dumps(document))
    (state_dir / "start.pid").write_text(f"{pid} {session['pid_start']} {session['boot_id']}\n")


@pytest.fixture
def session(world: World, tmp_path: Path) -> Iterator[Started]:
    started = start_session(world, tmp_path / "session")
    yield started
    started.stop()


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that has nothing to do with upstreamproxy."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


# -- liveness -------------------------------------------------------------------------------------


def test_a_live_session_is_sourced_without_touching_the_callers_shell(session: Started) -> None:
    for shell in SHELLS:
        values = sourced(
            shell,
            session.state_dir,
            before="set -eu; set -- one 'two three'; IFS=:",
            after='printf "ARGS=%s|%s|%s\\n" "$#" "$1" "$2"; printf "IFS=%s\\n" "$IFS"',
        )
        assert values["HTTPS_PROXY"] == session.exports()["HTTPS_PROXY"], shell
        assert values["ARGS"] == "2|one|two three", shell
        assert values["IFS"] == ":", shell
    info = session.document()["session"]
    assert info["pid_start"] == process_identity(session.pid).start_ticks  # type: ignore[union-attr]
    assert (session.state_dir / "start.pid").read_text() == (
        f"{session.pid} {info['pid_start']} {info['boot_id']}\n"
    )


def test_a_reused_pid_is_not_the_session(
    session: Started, bystander: subprocess.Popen[bytes]
) -> None:
    kill_hard(session)
    state = session.state_dir

    def nobody_trusts_it() -> None:
        for shell in SHELLS:
            assert sourced(shell, state)["HTTPS_PROXY"] == "unset", shell
        done = cli("env", "--state-dir", str(state), env=clean_env(state))
        assert done.returncode != 0 and "has ended" in done.stderr

    # Another process now has "the" pid: the files name it, with the relay's start time.
    rewrite_pid(state, bystander.pid)
    nobody_trusts_it()
    # The right start time, but recorded on another boot: not this process either.
    ticks = process_identity(bystander.pid).start_ticks  # type: ignore[union-attr]
    rewrite_pid(state, bystander.pid, ticks, "00000000-0000-0000-0000-000000000000")
    nobody_trusts_it()
    # Sanity: with its real identity, the bystander *would* count as the session.
    rewrite_pid(state, bystander.pid, ticks, process_identity(bystander.pid).boot_id)  # type: ignore[union-attr]
    assert sourced("sh", state)["HTTPS_PROXY"] != "unset"
    # Files damaged or from an older version (pid only): nothing is trusted, even under
    # `set -eu` with a last line that has no newline.
    for damaged in (f"{bystander.pid}\n", f"{bystander.pid} x", "", "\n\n"):
        (state / "start.pid").write_text(damaged)
        for shell in SHELLS:
            assert sourced(shell, state, before="set -eu")["HTTPS_PROXY"] == "unset", shell


def test_a_state_directory_others_can_write_is_no_session(session: Started) -> None:
    """Anyone who can write the directory can rewrite env.json (proxy, CA), so `env` and
    `exec` use it no more than `start` would (the other-uid cases: test_privsep.py)."""
    state = session.state_dir
    env = clean_env(state)
    assert cli("env", "--state-dir", str(state), env=env).returncode == 0  # control
    state.chmod(0o777)
    try:
        done = cli("env", "--state-dir", str(state), env=env)
        assert done.returncode == 1 and done.stdout == "", done
        assert "others can write to it (mode 0777)" in done.stderr, done.stderr
        done = cli("exec", "--fail-closed", "--state-dir", str(state), "--", "true", env=env)
        assert done.returncode == 125 and "others can write to it" in done.stderr, done
    finally:
        state.chmod(0o755)


def test_the_profile_snippet_trusts_only_a_directory_its_user_or_root_owns(
    session: Started,
) -> None:
    """The snippet sourced env.sh from any directory with a live start.pid: whoever could
    write the directory (another user's, or one others may write) chose what a login shell -
    root's too - ran. Now it sources only what `env` would trust."""
    state = session.state_dir
    mode, owner = stat.S_IMODE(state.stat().st_mode), state.stat().st_uid
    proxy = session.exports()["HTTPS_PROXY"]
    assert all(sourced(shell, state)["HTTPS_PROXY"] == proxy for shell in SHELLS)  # control
    try:
        for writable in (0o777, 0o775, 0o757):  # others, the group, others without group
            state.chmod(writable)
            for shell in SHELLS:
                assert sourced(shell, state)["HTTPS_PROXY"] == "unset", (shell, oct(writable))
        state.chmod(mode)
        if os.geteuid() == 0:
            os.chown(state, 54321, -1)  # another user's directory, this one left as it was
            for shell in SHELLS:
                assert sourced(shell, state)["HTTPS_PROXY"] == "unset", shell
    finally:
        os.chown(state, owner, -1)
        state.chmod(mode)
    assert all(sourced(shell, state)["HTTPS_PROXY"] == proxy for shell in SHELLS)


def test_the_profile_snippet_cannot_be_raced_by_whoever_writes_the_parent(
    tmp_path: Path,
) -> None:
    """Whoever can write the state directory's parent flips a symlink between a directory
    everyone trusts (/, root's, mode 0755) and their own (a live start.pid, their env.sh).
    A check by name followed by reads by name sourced their env.sh whenever the flips lined
    up; the snippet now checks and reads one open directory."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    theirs.chmod(0o777)  # untrusted: others can write it
    (theirs / "env.sh").write_text("export HTTPS_PROXY=http://attacker.invalid:1\n")
    identity = process_identity(os.getpid())
    assert identity is not None
    (theirs / "start.pid").write_text(f"{os.getpid()} {identity.start_ticks} {identity.boot_id}\n")
    link, spare = tmp_path / "state", tmp_path / "flip"
    link.symlink_to(theirs)
    stop = threading.Event()

    def flip() -> None:
        targets = ("/", str(theirs))
        for flips in range(10**7):  # bounded; stopped long before
            if stop.is_set():
                return
            with contextlib.suppress(FileNotFoundError):
                spare.unlink()
            spare.symlink_to(targets[flips % 2])
            spare.rename(link)  # atomic: the name always exists

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + 60
        for _ in range(60):
            for shell in SHELLS:
                seen.add(sourced(shell, link)["HTTPS_PROXY"])
            assert time.monotonic() < deadline
    finally:
        stop.set()
        flipper.join(10)
    assert seen == {"unset"}, seen


def test_a_zombie_is_not_alive(tmp_path: Path) -> None:
    """A killed relay under a PID 1 that never reaps stays a zombie: /proc/PID still exists."""
    child = subprocess.Popen(["sleep", "300"])
    try:
        identity = process_identity(child.pid)
        assert identity is not None
        info = SessionInfo(
            pid=child.pid,
            proxy_url="http://127.0.0.1:9",
            ca_bundle="/nonexistent",
            state_dir=str(tmp_path),
            env_file=str(tmp_path / "env.sh"),
            session_id=SESSION_ID,
            egress_url="ws://127.0.0.1:9/",
            pid_start=identity.start_ticks,
            boot_id=identity.boot_id,
        )
        assert session_alive(info)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not process_identity(child.pid).zombie:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert Path(f"/proc/{child.pid}").exists()
        assert not session_alive(info)
    finally:
        child.kill()
        child.wait()


def test_the_next_start_removes_a_killed_sessions_files(
    world: World, session: Started, tmp_path: Path
) -> None:
    kill_hard(session)
    for name in ("env.sh", "env.json", "start.pid"):
        assert (session.state_dir / name).exists()  # SIGKILL cleans nothing up
    assert remove_stale_session(StatePaths(session.state_dir)) is not None
    assert not (session.state_dir / "env.json").exists()
    # The same through a real start on the same state directory.
    again = start_session(world, tmp_path / "session")
    try:
        kill_hard(again)
        third = start_session(world, tmp_path / "session")
        try:
            assert third.ready_line.startswith("upstreamproxy ready")
            assert load_session(third.state_dir).info.pid == third.pid
            log = third.stop()
            assert "removed the files of an earlier session" in log
        finally:
            third.stop()
    finally:
        again.stop()


def test_a_live_sessions_files_are_never_removed_as_stale(session: Started) -> None:
    assert remove_stale_session(StatePaths(session.state_dir)) is None
    assert load_session(session.state_dir).info.pid == session.pid


# -- what start --background tells its caller -----------------------------------------------------


def background(
    world: World, base: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return cli(
        "start",
        "--background",
        "--token-file",
        str(base / "token"),
        "--session-id",
        SESSION_ID,
        "--egress-url",
        world.egress_url,
        "--state-dir",
        str(base / "state"),
        *extra,
        env=env or clean_env(base),
        timeout=60,
    )


def stop_daemon(state_dir: Path) -> None:
    try:
        pid = json.loads((state_dir / "env.json").read_text())["session"]["pid"]
    except FileNotFoundError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while (identity := process_identity(pid)) is not None and not identity.zombie:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def test_background_warnings_and_outcome_on_stderr(world: World, tmp_path: Path) -> None:
    write_token(tmp_path / "token").chmod(0o644)
    try:
        done = background(world, tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"{tmp_path / 'state' / 'env.sh'}\n"
        assert len(lines_with(done.stderr, "readable by group or others")) == 1, done.stderr
        assert len(lines_with(done.stderr, "ready: relay http://127.0.0.1:")) == 1, done.stderr
        assert TOKEN not in done.stderr
        # A second start says, in one line, that a session already runs.
        again = background(world, tmp_path)
        assert again.returncode == 0
        assert len(lines_with(again.stderr, "a session is already running")) == 1, again.stderr
        assert again.stdout == done.stdout
    finally:
        stop_daemon(tmp_path / "state")


def test_background_says_why_the_proxy_is_disabled(world: World, tmp_path: Path) -> None:
    done = background(world, tmp_path)  # no token provisioned
    assert done.returncode == 0 and done.stdout == ""
    (line,) = lines_with(done.stderr, "proxy disabled")
    assert "does not exist" in line
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_background_never_logs_into_a_state_dir_it_refuses(world: World, tmp_path: Path) -> None:
    """The daemon opened start.log before the state directory was checked, and followed a
    link: whoever can write the directory (its owner, or here its group) aimed a root
    start's log at any file, appending to it or creating it."""
    write_token(tmp_path / "token")
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o775)  # writable by the group: the bootstrap refuses it
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    (state / "start.log").symlink_to(victim)
    done = background(world, tmp_path)
    assert done.returncode == 0 and done.stdout == ""
    (line,) = lines_with(done.stderr, "proxy disabled")
    assert "writable by group or others" in line
    assert victim.read_text() == "untouched\n"
    assert (tmp_path / "token").exists()


def _daemon_pids(state: Path) -> list[int]:
    """Processes running ``start`` for ``state`` (the daemon; the parent is gone by then)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = (Path("/proc") / pid / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"start" in argv and str(state).encode() in argv:
            found.append(int(pid))
    return found


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_background_start_stops_its_daemon(
    world: World, tmp_path: Path, signum: int
) -> None:
    """Ctrl-C (or a supervisor's SIGTERM) while ``start --background`` waits: the daemon, in
    a session of its own, got no signal and went on to delete the token and serve. Now the
    parent stops it and says so; the token stays for a retry."""
    write_token(tmp_path / "token")
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)  # the daemon blocks reading it: a start that is still starting
    state = tmp_path / "state"
    argv = [sys.executable, "-m", "upstreamproxy", "start", "--background"]
    argv += ["--token-file", str(tmp_path / "token"), "--session-id", SESSION_ID]
    argv += ["--egress-url", world.egress_url, "--state-dir", str(state), "--ca-file", str(fifo)]
    parent = subprocess.Popen(
        argv, env=clean_env(tmp_path), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 20
        while len(_daemon_pids(state)) < 2:  # the parent and its forked daemon
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.05)
        time.sleep(0.3)
        parent.send_signal(signum)
        _, stderr = parent.communicate(timeout=20)
    finally:
        if parent.poll() is None:
            parent.kill()
        daemons = _daemon_pids(state)
        for pid in daemons:  # (only if the test fails: do not leave them blocked on the FIFO)
            os.kill(pid, signal.SIGKILL)
    assert parent.returncode == 128 + signum, stderr
    assert b"start interrupted" in stderr and b"was stopped" in stderr, stderr
    assert daemons == []
    assert (tmp_path / "token").exists()
    assert not (state / "env.sh").exists()


def test_a_start_waiting_on_one_that_fails_takes_over(world: World, tmp_path: Path) -> None:
    """Another start holds the state directory's lock and then ends without a session (it
    failed): the waiting start takes the lock and starts the session at once, instead of
    waiting its full 30 s and reporting a start "that did not become ready"."""
    write_token(tmp_path / "token")
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    fd: int | None = os.open(state / "start.lock", os.O_RDWR | os.O_CREAT, 0o600)
    assert fd is not None
    fcntl.flock(fd, fcntl.LOCK_EX)  # "another start", still starting
    try:
        argv = [sys.executable, "-m", "upstreamproxy", "start", "--background"]
        argv += ["--token-file", str(tmp_path / "token"), "--session-id", SESSION_ID]
        argv += ["--egress-url", world.egress_url, "--state-dir", str(state)]
        waiting = subprocess.Popen(
            argv, env=clean_env(tmp_path), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        time.sleep(1.0)
        assert waiting.poll() is None  # it waits for the other one
        started = time.monotonic()
        os.close(fd)  # the other start ends without a session
        fd = None  # never closed twice: by then the number may be another thread's socket
        stdout, stderr = waiting.communicate(timeout=25)
        assert waiting.returncode == 0, stderr
        assert stdout == f"{state / 'env.sh'}\n".encode(), stderr
        assert time.monotonic() - started < 10
    finally:
        if fd is not None:
            os.close(fd)
        stop_daemon(state)


NO_REAPER = textwrap.dedent(
    """
    # A parent that never reaps, like `sleep infinity` as a container's PID 1: a subreaper,
    # so every orphan of the starts below becomes its child, and nothing ever waits for them.
    import ctypes, json, os, subprocess, sys, time
    PR_SET_CHILD_SUBREAPER = 36
    assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    argvs = json.loads(sys.argv[1])
    for argv in argvs:
        subprocess.run(argv, capture_output=True, timeout=60)  # reaps only its own child
    time.sleep(1.0)
    me, zombies, children = os.getpid(), [], []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == me:
            (zombies if fields[0] == "Z" else children).append(int(pid))
    print(json.dumps({"zombies": zombies, "children": children}))
    """
)


def test_repeated_starts_leave_no_zombies_under_a_parent_that_never_reaps(
    world: World, tmp_path: Path
) -> None:
    write_token(tmp_path / "token")
    base = [sys.executable, "-m", "upstreamproxy", "start", "--background"]
    common = ["--session-id", SESSION_ID, "--egress-url", world.egress_url]
    serving = [*base, *common, "--token-file", str(tmp_path / "token")]
    serving += ["--state-dir", str(tmp_path / "state")]
    disabled = [*base, *common, "--token-file", str(tmp_path / "none")]
    disabled += ["--state-dir", str(tmp_path / "other")]
    argvs = [serving] * 4 + [disabled] * 2
    try:
        done = subprocess.run(
            [sys.executable, "-c", NO_REAPER, json.dumps(argvs)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**clean_env(tmp_path), "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["zombies"] == []
        pid = json.loads((tmp_path / "state" / "env.json").read_text())["session"]["pid"]
        assert result["children"] == [pid]  # only the daemon that serves the session
    finally:
        stop_daemon(tmp_path / "state")
