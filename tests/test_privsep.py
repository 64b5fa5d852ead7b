"""The recommended deployment for real: ``start`` as root, the relay under its own uid, and an
attacker of the sandbox's uid who watches /proc from before the session starts.

Real users are created with ``useradd`` (and removed), privileges are dropped with ``setpriv``
(util-linux), and the attacker is ``ptrace_attacker.py``: PTRACE_SEIZE, /proc/PID/mem,
environ and the token file, against every upstreamproxy process from the moment it appears.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tools_fixtures
import users_fixtures
from tools_fixtures import (
    HELLO,
    READY_PREFIX,
    SESSION_ID,
    TOKEN,
    Started,
    World,
    clean_env,
    cli,
    start_session,
    write_token,
)
from users_fixtures import User, as_user, free_uid, make_user, relay_name

from upstreamproxy.bootstrap.hardening import is_dumpable
from upstreamproxy.bootstrap.privsep import resolve_relay_user
from upstreamproxy.bootstrap.state import process_identity
from upstreamproxy.errors import ConfigError

world = tools_fixtures.world

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="privilege separation needs Linux and root",
)

HERE = Path(__file__).resolve().parent
names = users_fixtures.names
sandbox_user = users_fixtures.sandbox_user
shared_base = users_fixtures.shared_base


def status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def relay_pid(log: str) -> int:
    match = re.search(r"relay runs as \S+ \(uid \d+, gid \d+\), pid (\d+)", log)
    assert match, log
    return int(match.group(1))


# -- the attacker --------------------------------------------------------------------------------


def test_same_uid_attacker_started_first_gets_nothing(
    world: World, sandbox_user: User, names: list[str], shared_base: Path
) -> None:
    relay = relay_name()
    names.append(relay)
    relay_uid = free_uid()
    stop_file = shared_base / "stop-attacker"
    attacker = subprocess.Popen(
        as_user(
            sandbox_user,
            sys.executable,
            str(HERE / "ptrace_attacker.py"),
            TOKEN,
            str(stop_file),
            "90",
            str(shared_base / "session" / "token"),
            str(shared_base / "session" / "token"),  # the marker: in start's command line
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
        env={"PATH": os.environ["PATH"]},
    )
    try:
        assert attacker.stdout is not None
        assert attacker.stdout.readline() == "watching\n", attacker.stderr.read()  # type: ignore[union-attr]
        session = start_session(
            world,
            shared_base / "session",
            "--relay-user",
            relay,
            "--relay-uid",
            str(relay_uid),
        )
        try:
            assert session.ready_line.startswith(READY_PREFIX), session.stop()
            log = session.log_file.read_text()
            child = relay_pid(log)
            # The relay process: its own uid and group, no supplementary groups, hardened.
            status = status_fields(child)
            assert status["Uid"].split() == [str(relay_uid)] * 4
            assert status["Gid"].split()[0] == str(pwd.getpwnam(relay).pw_gid)
            assert status["Groups"] == ""
            assert status["TracerPid"] == "0"
            assert is_dumpable(child) is False
            for name in ("cmdline", "environ"):
                assert TOKEN.encode() not in Path(f"/proc/{child}/{name}").read_bytes()
            # The sandbox user still finds the session (root's state directory) and its relay:
            # by sourcing env.sh, and through `upstreamproxy exec`.
            env_sh = session.state_dir / "env.sh"
            for command in (
                ["sh", "-c", f'. "{env_sh}" && exec curl -sS --max-time 20 "{world.url()}"'],
                [
                    sys.executable,
                    "-m",
                    "upstreamproxy",
                    "exec",
                    "--state-dir",
                    str(session.state_dir),
                    "--",
                    "curl",
                    "-sS",
                    "--max-time",
                    "20",
                    world.url(),
                ],
            ):
                done = subprocess.run(
                    as_user(sandbox_user, *command),
                    env=clean_env(shared_base),
                    capture_output=True,
                    text=True,
                    timeout=60,
                    cwd="/",
                )
                assert done.stdout == HELLO, (command, done.stderr)
            time.sleep(1.0)  # let the attacker take a few more passes at the running relay
        finally:
            log = session.stop()
        stop_file.touch()
        out, err = attacker.communicate(timeout=60)
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
    report = json.loads(out.strip().splitlines()[-1])
    assert report["uid"] == sandbox_user.uid
    # The attacker's tools work: on a same-uid process it seizes and finds the secret ...
    if report["ptrace_scope"] < 2:
        assert report["control"] == {"seize_errno": 0, "mem_errno": 0, "found": True}
    # ... and on the session it saw the supervisor and the relay from the start, and got nothing.
    processes = report["processes"]
    assert str(session.pid) in processes and str(child) in processes, report
    # The relay process was attacked from whenever the attacker first saw it (as the forked
    # root supervisor image, or already exec'd as the relay user) until it stopped.
    assert "relay_child" in processes[str(child)]["cmdlines"][-1], report
    assert report["attempts"] >= 10, report
    assert report["successes"] == [], report
    for info in report["processes"].values():
        assert set(info["seize_errnos"]) <= {1, 3}, info  # EPERM (ESRCH once it has exited)
        assert 0 not in info["mem_errnos"], info
    assert 0 not in report["token_file_errnos"]
    assert TOKEN not in log and TOKEN not in err


# -- the relay user ------------------------------------------------------------------------------


def test_relay_user_is_created_with_the_uid_asked_for(names: list[str]) -> None:
    name = relay_name()
    names.append(name)
    uid = free_uid(24000)
    user = resolve_relay_user(name, uid)
    assert user is not None and (user.name, user.uid) == (name, uid)
    entry = pwd.getpwnam(name)
    assert entry.pw_shell.endswith(("nologin", "false")) and entry.pw_dir == "/nonexistent"
    # Found, not created, the second time; a different uid for it is refused.
    assert resolve_relay_user(name) == user
    with pytest.raises(ConfigError, match="not the requested"):
        resolve_relay_user(name, uid + 1)


def test_root_and_uid_zero_are_refused_or_mean_no_separation() -> None:
    assert resolve_relay_user("root") is None
    assert resolve_relay_user("0") is None
    with pytest.raises(ConfigError, match="no such user"):
        resolve_relay_user("no-such-user-here", create=False)


def test_without_root_another_relay_user_is_refused(sandbox_user: User, tmp_path: Path) -> None:
    code = (
        "from upstreamproxy.bootstrap.privsep import resolve_relay_user\n"
        "from upstreamproxy.errors import ConfigError\n"
        "import os, pwd\n"
        "assert resolve_relay_user(None) is None\n"
        "assert resolve_relay_user(pwd.getpwuid(os.getuid()).pw_name) is None\n"
        "try:\n"
        "    resolve_relay_user('upstreamproxy')\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        as_user(sandbox_user, sys.executable, "-c", code),
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(HERE.parent)},
    )
    assert done.returncode == 0, done.stderr
    assert "needs `start` to run as root" in done.stdout


def test_relay_user_root_runs_the_relay_in_start(world: World, tmp_path: Path) -> None:
    session = start_session(world, tmp_path / "s", "--relay-user", "root")
    try:
        assert session.ready_line.startswith(READY_PREFIX), session.stop()
    finally:
        log = session.stop()
    assert "relay runs as" not in log


def test_relay_process_dying_stops_the_session(
    world: World, names: list[str], tmp_path: Path
) -> None:
    name = relay_name()
    names.append(name)
    session = start_session(world, tmp_path / "s", "--relay-user", name)
    try:
        assert session.ready_line.startswith(READY_PREFIX), session.stop()
        child = relay_pid(session.log_file.read_text())
        os.kill(child, 9)
        session.proc.wait(30)
    finally:
        log = session.stop()
    assert session.proc.returncode == 1
    assert "the relay process exited" in log
    assert not (tmp_path / "s" / "state" / "env.sh").exists()


def relay_child_of(pid: int) -> int | None:
    """The relay process ``pid`` started, once it runs the relay's module (after its exec)."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid and b"relay_child" in cmdline:
            return int(entry)
    return None


def test_a_stop_while_the_relay_starts_keeps_the_token_and_announces_nothing(
    world: World, names: list[str], tmp_path: Path
) -> None:
    """SIGTERM while start waited for its relay process was only acted on after readiness:
    the token file was deleted and the ready line printed, for a session that then ended."""
    name = relay_name()
    names.append(name)
    base = tmp_path / "s"
    base.mkdir()
    token = write_token(base / "token")
    argv = [sys.executable, "-m", "upstreamproxy", "start", "--token-file", str(token)]
    argv += ["--session-id", SESSION_ID, "--egress-url", world.egress_url]
    argv += ["--state-dir", str(base / "state"), "--relay-user", name]
    proc = subprocess.Popen(
        argv, env=clean_env(base), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    child = None
    try:
        deadline = time.monotonic() + 30
        while child is None and time.monotonic() < deadline and proc.poll() is None:
            child = relay_child_of(proc.pid)
            time.sleep(0.002)
        assert child is not None, "no relay process appeared"
        os.kill(child, signal.SIGSTOP)  # it cannot answer "ready" before start got SIGTERM
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        os.kill(child, signal.SIGCONT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out == ""
    assert "received SIGTERM before the session was ready" in err
    assert token.exists()
    assert not (base / "state" / "env.sh").exists()
    assert process_identity(child) is None  # stopped and reaped by start


def test_relay_failure_in_the_child_is_reported_and_keeps_the_token(
    world: World, names: list[str], tmp_path: Path
) -> None:
    import socket

    name = relay_name()
    names.append(name)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        session = start_session(world, tmp_path / "s", "--relay-user", name, "--port", str(port))
        session.proc.wait(30)
    log = session.stop()
    assert session.ready_line == ""
    assert "the relay process failed: relay cannot listen" in log
    assert session.token_file.exists()
    assert TOKEN not in log


def test_background_second_start_reports_its_deleted_token_on_stderr(
    world: World, names: list[str], tmp_path: Path
) -> None:
    name = relay_name()
    names.append(name)
    session = start_session(world, tmp_path / "s", "--relay-user", name)
    try:
        assert session.ready_line.startswith(READY_PREFIX), session.stop()
        other = tools_fixtures.write_token(tmp_path / "other-token")
        done = cli(
            "start",
            "--background",
            "--token-file",
            str(other),
            "--session-id",
            "x",
            "--egress-url",
            world.egress_url,
            "--state-dir",
            str(session.state_dir),
            env=clean_env(tmp_path),
        )
    finally:
        session.stop()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(session.state_dir / "env.sh")
    assert f"the token file {other} was not used" in done.stderr
    assert not other.exists()


def test_start_as_the_sandbox_user_runs_in_process_and_names_the_residual_risk(
    world: World, sandbox_user: User, shared_base: Path
) -> None:
    from upstreamproxy.bootstrap.hardening import ptrace_scope

    base = shared_base / "own"
    base.mkdir()
    token = tools_fixtures.write_token(base / "token")
    os.chown(base, sandbox_user.uid, sandbox_user.gid)
    os.chown(token, sandbox_user.uid, sandbox_user.gid)
    argv = as_user(
        sandbox_user,
        sys.executable,
        "-m",
        "upstreamproxy",
        "start",
        "--token-file",
        str(token),
        "--session-id",
        "s",
        "--egress-url",
        world.egress_url,
        "--state-dir",
        str(base / "state"),
    )
    proc = subprocess.Popen(
        argv,
        env=clean_env(base),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(READY_PREFIX), proc.communicate(timeout=30)
        assert status_fields(proc.pid)["Uid"].split()[0] == str(sandbox_user.uid)
        assert is_dumpable(proc.pid) is False
        assert not token.exists()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert not re.search(r"relay runs as \S+ \(uid", err)  # in-process: no relay child
    scope = ptrace_scope()
    if scope is None or scope == 0:
        assert " WARNING " in err and "run start as root" in err, err
    else:
        assert f"Yama ptrace_scope={scope}" in err, err
    assert TOKEN not in err


def test_a_token_file_a_sandbox_user_owns_is_flagged(
    world: World, sandbox_user: User, names: list[str], tmp_path: Path
) -> None:
    relay = relay_name()
    names.append(relay)
    base = tmp_path / "s"
    base.mkdir()
    token = tools_fixtures.write_token(base / "token")
    os.chown(token, sandbox_user.uid, sandbox_user.gid)
    session = start_session(world, base, "--relay-user", relay, token=None)
    try:
        assert session.ready_line.startswith(READY_PREFIX), session.stop()
    finally:
        log = session.stop()
    assert f"belongs to uid {sandbox_user.uid}" in log and "make it root's" in log


@dataclass(frozen=True)
class Planted:
    """A live session in a root-owned state directory, and a victim user with a home."""

    session: Started
    victim: User
    home: Path

    def run_as(self, user: User | None, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """``argv`` as ``user`` (None: root), from the victim's clean environment."""
        return subprocess.run(
            as_user(user, *argv) if user is not None else argv,
            env=clean_env(self.home),
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
        )


@pytest.fixture
def planted(world: World, names: list[str], shared_base: Path) -> Iterator[Planted]:
    relay = relay_name()
    names.append(relay)
    victim = make_user(names, "upvic")
    session = start_session(world, shared_base / "planted", "--relay-user", relay)
    home = shared_base / "victim-home"
    home.mkdir(mode=0o755)
    yield Planted(session, victim, home)
    with contextlib.suppress(OSError):
        os.chown(session.state_dir, 0, 0)
        session.state_dir.chmod(0o755)
    session.stop()


def test_a_state_directory_another_user_controls_is_never_used_or_reported(
    world: World, sandbox_user: User, planted: Planted
) -> None:
    """Another user plants a state directory (theirs, or one they can write) holding a live
    session: a `start` refuses to run in it, and the only foreign session it reports (for the
    hook to source) is one in a root-owned directory nobody else can write."""
    session, victim, home = planted.session, planted.victim, planted.home
    state = session.state_dir
    argv = [sys.executable, "-m", "upstreamproxy", "start", "--state-dir", str(state)]
    argv += ["--token-file", str(home / "no-token"), "--session-id", SESSION_ID]
    argv += ["--egress-url", world.egress_url]

    def start_as(user: User | None) -> subprocess.CompletedProcess[str]:
        return planted.run_as(user, argv)

    assert session.ready_line.startswith(READY_PREFIX), session.stop()
    reported = start_as(victim)  # control: root's own directory is reported
    assert reported.returncode == 0, reported
    assert reported.stdout == f"{READY_PREFIX}{state / 'env.sh'}\n", reported
    state.chmod(0o775)  # root's, but group-writable
    refused = start_as(victim)
    assert refused.stdout == "" and "already running" not in refused.stderr, refused
    state.chmod(0o755)
    os.chown(state, sandbox_user.uid, sandbox_user.gid)  # another user's
    refused = start_as(victim)
    assert refused.stdout == "" and "already running" not in refused.stderr, refused
    assert f"belongs to uid {sandbox_user.uid}" in refused.stderr
    refused = start_as(None)  # root does not use it either
    assert refused.stdout == "" and f"belongs to uid {sandbox_user.uid}" in refused.stderr


def test_env_exec_and_doctor_never_use_a_state_directory_another_user_controls(
    world: World, sandbox_user: User, planted: Planted
) -> None:
    """The readers apply `start`'s rule: a state directory another user owns (or anyone else
    can write) names their proxy and CA, so `env`, `exec` and `doctor` treat it as no
    session at all, for root and for every other user; root's own is everyone's."""
    session, victim = planted.session, planted.victim
    state = session.state_dir
    base = [sys.executable, "-m", "upstreamproxy"]
    commands = {
        "env": ["env", "--state-dir", str(state)],
        "exec": ["exec", "--fail-closed", "--state-dir", str(state), "--", "env"],
        "doctor": ["doctor", "--state-dir", str(state), "--url", world.url(), "--tools", "curl"],
    }

    def run_as(user: User | None, command: str) -> subprocess.CompletedProcess[str]:
        return planted.run_as(user, [*base, *commands[command]])

    proxy = f"HTTPS_PROXY={session.exports()['HTTPS_PROXY']}"
    assert session.ready_line.startswith(READY_PREFIX), session.stop()
    for user in (victim, None):  # control: root's own directory is everyone's session
        assert run_as(user, "env").returncode == 0
        used = run_as(user, "exec")
        assert used.returncode == 0 and proxy in used.stdout.splitlines(), used
        assert run_as(user, "doctor").returncode == 0
    for owner, mode, why in (
        (sandbox_user.uid, 0o755, f"belongs to uid {sandbox_user.uid}"),
        (0, 0o775, "others can write to it"),
    ):
        os.chown(state, owner, owner and sandbox_user.gid)
        state.chmod(mode)
        for user in (victim, None):
            for command, refused_with in (("env", 1), ("exec", 125), ("doctor", 1)):
                refused = run_as(user, command)
                assert refused.returncode == refused_with, (command, refused)
                assert why in refused.stderr, (command, refused)
                assert "HTTPS_PROXY" not in refused.stdout, (command, refused)


def test_same_uid_start_refuses_the_token_to_an_attacker_that_wins_the_race(
    world: World, sandbox_user: User, shared_base: Path
) -> None:
    """Started as the sandbox user, `start` races a same-uid attacker: whoever wins, the token
    never sits in a traced process (the attacker either gets EPERM, or `start` sees the tracer
    and refuses the token, keeping the file for a retry)."""
    outcomes = []
    for trial in range(3):
        base = shared_base / f"trial{trial}"
        base.mkdir()
        token = tools_fixtures.write_token(base / "token")
        os.chown(base, sandbox_user.uid, sandbox_user.gid)
        os.chown(token, sandbox_user.uid, sandbox_user.gid)
        stop_file = base / "stop"
        racer = subprocess.Popen(
            as_user(
                sandbox_user,
                sys.executable,
                str(HERE / "ptrace_racer.py"),
                str(token),
                str(stop_file),
                "60",
            ),
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
            env={"PATH": os.environ["PATH"]},
        )
        assert racer.stdout is not None and racer.stdout.readline() == "watching\n"
        start = subprocess.Popen(
            as_user(
                sandbox_user,
                sys.executable,
                "-m",
                "upstreamproxy",
                "start",
                "--token-file",
                str(token),
                "--session-id",
                "s",
                "--egress-url",
                world.egress_url,
                "--state-dir",
                str(base / "state"),
            ),
            env=clean_env(base),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        try:
            assert start.stdout is not None
            line = start.stdout.readline()  # the ready line, or EOF once start gave up
        finally:
            stop_file.touch()  # the racer detaches (exits) before start is signalled
            report = json.loads(racer.communicate(timeout=60)[0].strip().splitlines()[-1])
            start.terminate()
            _, err = start.communicate(timeout=30)
        assert report["pid"] == start.pid, report
        if report["errno"] == 0:  # the attacker got in before PR_SET_DUMPABLE
            assert line == "", line
            assert "is tracing this one (TracerPid)" in err, err
            assert token.exists()
        else:  # too late: the process was already non-dumpable
            assert report["errno"] == 1, report  # EPERM
            assert line.startswith(READY_PREFIX), err
            assert not token.exists()
        assert TOKEN not in err
        outcomes.append(report["errno"])
    print(f"attacker won the race {outcomes.count(0)} of {len(outcomes)} times")


def test_start_hook_as_root_defaults_the_state_dir_to_run(
    sandbox_user: User, shared_base: Path
) -> None:
    """The hook passes the environment to `start`; a stand-in binary records what it got."""
    hook = HERE.parent / "env" / "upstreamproxy-start.sh"
    fake = shared_base / "fake-upstreamproxy"
    seen = shared_base / "seen"
    fake.write_text(f'#!/bin/sh\necho "${{UPSTREAMPROXY_STATE_DIR:-unset}}" >> "{seen}"\n')
    fake.chmod(0o755)
    seen.touch()
    seen.chmod(0o666)
    env = {"PATH": os.environ["PATH"], "UPSTREAMPROXY_BIN": str(fake)}
    script = f'. "{hook}"'
    for prefix in ([], as_user(sandbox_user)):
        done = subprocess.run(
            [*prefix, "sh", "-c", script], env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
    given = {**env, "UPSTREAMPROXY_STATE_DIR": "/somewhere"}
    subprocess.run(["sh", "-c", script], env=given, check=True, timeout=30)
    assert seen.read_text().splitlines() == ["/run/upstreamproxy", "unset", "/somewhere"]


def test_out_of_range_relay_uid_is_refused() -> None:
    # (uid_t)-1 means "unchanged" to setresuid: the relay would have stayed root.
    for spec in ("4294967295", "99999999999"):
        with pytest.raises(ConfigError, match="out of range"):
            resolve_relay_user(spec)


def test_a_relay_uid_the_namespace_cannot_switch_to_is_a_clear_failure(
    world: World, tmp_path: Path
) -> None:
    """Root in a user namespace (rootless containers) without the relay's ids mapped, and
    with setgroups denied: start says so instead of "cannot listen" or a traceback."""
    unshare = shutil.which("unshare")
    assert unshare is not None, "unshare (util-linux) is needed"
    token = tools_fixtures.write_token(tmp_path / "token")
    done = subprocess.run(
        [
            unshare,
            "--user",
            "--map-root-user",
            sys.executable,
            "-m",
            "upstreamproxy",
            "start",
            "--fail-closed",
            "--relay-user",
            "12345",
            "--token-file",
            str(token),
            "--session-id",
            "s",
            "--egress-url",
            world.egress_url,
            "--state-dir",
            str(tmp_path / "state"),
        ],
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "cannot start the relay process as 12345 (uid 12345, gid 12345)" in done.stderr
    assert "user namespace" in done.stderr
    assert token.exists()
    assert TOKEN not in done.stderr


def test_spawn_failures_name_their_cause() -> None:
    from upstreamproxy.bootstrap.privsep import RelayUser, SeparateRelay
    from upstreamproxy.relay import RelayConfig
    from upstreamproxy.secret import Secret

    relay = SeparateRelay(
        RelayConfig(egress_url="ws://127.0.0.1:1/x", session_id="s", token=Secret(TOKEN)),
        RelayUser("relayer", 4321, 4321),
    )
    # execve refused (an interpreter under a private /root): subprocess names the executable.
    unreadable = relay._spawn_failure(PermissionError(13, "Permission denied", sys.executable))
    assert "cannot run" in unreadable and "not under a private home directory" in unreadable
    # setgroups/setresuid refused before the exec (subprocess names the cwd, or nothing).
    for exc in (
        PermissionError(1, "Operation not permitted", "/"),
        OSError(22, "Invalid argument"),
    ):
        message = relay._spawn_failure(exc)
        assert "cannot start the relay process as relayer (uid 4321, gid 4321)" in message
        assert "user namespace" in message
    assert TOKEN not in unreadable + message
