"""The real ``upstreamproxy start`` process, and ``env``, ``exec`` and the env/ hooks around it."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
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
    ROOT,
    SESSION_ID,
    TOKEN,
    UNTRUSTED,
    Started,
    World,
    clean_env,
    cli,
    start_session,
    write_token,
)

from upstreamproxy.bootstrap.ca_bundle import find_system_bundle
from upstreamproxy.bootstrap.hardening import HardeningError, is_dumpable

# Fixtures shared by the bootstrap tests (conftest.py belongs to the spine tests).
started = tools_fixtures.started
world = tools_fixtures.world

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

HOOK = ROOT / "env" / "upstreamproxy-start.sh"
PROFILE = ROOT / "env" / "profile.d" / "upstreamproxy.sh"
ENV_FILES = ("env.sh", "env.json", "start.pid")


def core_limits(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError("no core limit line")


def assert_not_dumpable(pid: int) -> None:
    try:
        assert is_dumpable(pid) is False
    except HardeningError as exc:  # a root target on a kernel without PIDFD_INFO_COREDUMP
        pytest.skip(str(exc))


def warnings_and_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port: int = server.getsockname()[1]
    return port


def process_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):  # a zombie waiting for a reaper that may never come
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def daemons() -> Iterator[list[int]]:
    """Pids of --background daemons a test started; terminated at the end whatever happens."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        process_gone(pid)


# -- readiness, hardening, the token ----------------------------------------------------------


def test_ready_hardened_and_token_deleted(started: Started) -> None:
    state = started.state_dir
    assert started.ready_line == f"{READY_PREFIX}{state / 'env.sh'}\n"
    assert not started.token_file.exists()
    for name in ("env.sh", "env.json", "ca-bundle.pem", "start.pid"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o644, name
    assert (state / "start.pid").read_text().split()[0] == str(started.pid)
    assert started.document()["session"]["pid"] == started.pid
    # PR_SET_DUMPABLE read back from the running process, and no core dumps.
    assert_not_dumpable(started.pid)
    assert core_limits(started.pid) == ("0", "0")


def test_the_start_lock_is_made_private(world: World, tmp_path: Path) -> None:
    # Anyone who can open start.lock can flock it and keep every later start waiting: a lock
    # file left readable (an older version, a restored backup) is made 0600 again.
    state = tmp_path / "session" / "state"
    state.mkdir(parents=True, mode=0o755)
    (state / "start.lock").touch()
    (state / "start.lock").chmod(0o644)
    session = start_session(world, tmp_path / "session")
    try:
        assert session.ready_line.startswith(READY_PREFIX), session.stop()
        assert stat.S_IMODE((state / "start.lock").stat().st_mode) == 0o600
    finally:
        session.stop()


def test_token_never_in_argv_title_environment_or_files(started: Started) -> None:
    proc = Path(f"/proc/{started.pid}")
    for name in ("cmdline", "comm", "environ"):
        assert TOKEN.encode() not in (proc / name).read_bytes(), name
    for path in started.state_dir.iterdir():
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path.name


def test_token_never_in_logs_even_at_debug(world: World, tmp_path: Path) -> None:
    session = start_session(world, tmp_path / "s", log_level="DEBUG")
    try:
        assert session.ready_line.startswith(READY_PREFIX)
        done = subprocess.run(
            ["curl", "-sS", "--max-time", "20", world.url()],
            env=session.tool_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.stdout == HELLO, done.stderr
    finally:
        log = session.stop()
    assert "relay listening" in log  # DEBUG logging was on; websockets frames are never logged
    assert TOKEN not in log
    assert TOKEN[:12] not in log


def test_stop_closes_tunnels_and_removes_env_files(world: World, started: Started) -> None:
    port = int(started.exports()["HTTPS_PROXY"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as tunnel:
        target = f"hello.test:{world.port}"
        tunnel.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert tunnel.recv(1024).startswith(b"HTTP/1.1 200")
        log = started.stop()
        assert started.proc.returncode == 0
        tunnel.settimeout(10)
        assert tunnel.recv(1024) == b""  # the relay closed the open tunnel
    for name in ENV_FILES:
        assert not (started.state_dir / name).exists(), name
    assert (started.state_dir / "ca-bundle.pem").exists()
    assert "received SIGTERM" in log


def test_a_closed_stdout_does_not_stop_the_session(world: World, tmp_path: Path) -> None:
    """The ready line is printed after the token file is deleted: a stdout whose reader had
    gone (EPIPE) ended the start there, so the token was gone and no session ran."""
    token = write_token(tmp_path / "token")
    state = tmp_path / "state"
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read the ready line
    argv = [sys.executable, "-m", "upstreamproxy", "start", "--token-file", str(token)]
    argv += ["--session-id", SESSION_ID, "--egress-url", world.egress_url]
    argv += ["--state-dir", str(state)]
    with (tmp_path / "start.log").open("w") as log:
        proc = subprocess.Popen(argv, env=clean_env(tmp_path), stdout=write_end, stderr=log)
    os.close(write_end)
    try:
        deadline = time.monotonic() + 30
        while not (state / "start.pid").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "start never wrote its session files"
            time.sleep(0.05)
        time.sleep(0.5)  # past the ready line
        assert proc.poll() is None, (tmp_path / "start.log").read_text()
        assert not token.exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log_text = (tmp_path / "start.log").read_text()
    assert "received SIGTERM" in log_text
    assert "Traceback" not in log_text and "Exception ignored" not in log_text, log_text


# -- failures: the token stays, fail-open vs fail-closed ---------------------------------------


@pytest.mark.parametrize(
    "failure", ["ca-url-unreachable", "port-in-use", "ca-file-not-a-ca", "ca-file-fifo-unwritten"]
)
@pytest.mark.parametrize("fail_closed", [False, True], ids=["fail-open", "fail-closed"])
def test_failed_start_keeps_the_token(
    world: World, tmp_path: Path, failure: str, fail_closed: bool
) -> None:
    args: list[str] = ["--fail-closed"] if fail_closed else []
    if failure == "ca-url-unreachable":
        args += ["--ca-url", f"http://127.0.0.1:{closed_port()}/ca-cert", "--ca-timeout", "2"]
    elif failure == "ca-file-not-a-ca":
        leaf = tmp_path / "leaf.pem"
        leaf.write_bytes(
            (world.base / "origin.pem").read_bytes().split(b"-----END")[0]
            + b"-----END CERTIFICATE-----\n"
        )
        args += ["--ca-file", str(leaf)]
    elif failure == "ca-file-fifo-unwritten":  # blocked start for ever
        os.mkfifo(tmp_path / "ca.fifo")
        args += ["--ca-file", str(tmp_path / "ca.fifo"), "--ca-timeout", "1"]
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        if failure == "port-in-use":
            args += ["--port", str(busy.getsockname()[1])]
        session = start_session(world, tmp_path / "s", *args)
        session.proc.wait(30)
    finally:
        busy.close()
    log = session.stop()
    assert session.ready_line == ""
    assert session.proc.returncode == (1 if fail_closed else 0)
    assert session.token_file.read_text() == TOKEN + "\n"
    lines = warnings_and_errors(log)
    assert len(lines) == 1, log
    assert (" ERROR " if fail_closed else " WARNING ") in lines[0]
    assert f"the token file {session.token_file} was left in place for a retry" in lines[0]
    if not fail_closed:
        assert "the session continues without it" in lines[0]
    expected = {
        "ca-url-unreachable": "--ca-url: ",  # the flag, not the setting (ca_url)
        "port-in-use": "cannot listen",
        "ca-file-not-a-ca": "--ca-file: ",
        "ca-file-fifo-unwritten": f"--ca-file: {tmp_path / 'ca.fifo'} did not finish within 1 s",
    }[failure]
    assert expected in lines[0]
    for name in ENV_FILES:
        assert not (session.state_dir / name).exists()
    assert TOKEN not in log


@pytest.mark.parametrize("fail_closed", [False, True], ids=["fail-open", "fail-closed"])
def test_missing_token_disables_the_proxy(world: World, tmp_path: Path, fail_closed: bool) -> None:
    args = ["--fail-closed"] if fail_closed else []
    session = start_session(world, tmp_path / "s", *args, token=None)
    session.proc.wait(30)
    log = session.stop()
    assert session.proc.returncode == (1 if fail_closed else 0)
    lines = warnings_and_errors(log)
    assert len(lines) == 1 and "proxy disabled" in lines[0] and "does not exist" in lines[0]


def test_second_start_reports_the_running_session(
    world: World, started: Started, tmp_path: Path
) -> None:
    token = write_token(tmp_path / "other-token")
    done = cli(
        "start",
        "--token-file",
        str(token),
        "--session-id",
        "x",
        "--egress-url",
        world.egress_url,
        "--state-dir",
        str(started.state_dir),
        env=clean_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == started.ready_line
    # Not used, so deleted (a live credential nobody would clean up), and said so on stderr.
    assert not token.exists()
    assert "already running" in done.stderr
    assert f"the token file {token} was not used" in done.stderr
    assert "was deleted" in done.stderr
    assert TOKEN not in done.stderr


# -- env and exec -------------------------------------------------------------------------------


def test_env_formats(started: Started, tmp_path: Path) -> None:
    env = clean_env(tmp_path, UPSTREAMPROXY_STATE_DIR=str(started.state_dir))
    exports = started.exports()

    sh = cli("env", env=env)
    assert sh.returncode == 0, sh.stderr
    sourced = subprocess.run(
        ["sh", "-c", ". /dev/stdin; env -0"],
        input=sh.stdout,
        capture_output=True,
        text=True,
        env={"PATH": env["PATH"]},
        timeout=10,
    )
    values = dict(item.split("=", 1) for item in sourced.stdout.split("\0") if item)
    assert {k: values[k] for k in exports} == exports

    dotenv = cli("env", "--format", "dotenv", env=env)
    lines = [line for line in dotenv.stdout.splitlines() if line and not line.startswith("#")]
    parsed = dict(line.split("=", 1) for line in lines)
    # Values with spaces (JAVA_TOOL_OPTIONS) are single-quoted in the dotenv dialect.
    parsed = {k: v[1:-1] if v[:1] == v[-1:] == "'" else v for k, v in parsed.items()}
    assert parsed == exports

    as_json = cli("env", "--format", "json", "--state-dir", str(started.state_dir), env=env)
    assert json.loads(as_json.stdout) == started.document()


def test_env_refuses_a_damaged_session_file_in_one_line(started: Started, tmp_path: Path) -> None:
    """A value with a NUL (JSON can hold one, no environment can) or a name no shell takes:
    `--format sh` ended in a traceback; it says what is wrong, as `--format dotenv` did."""
    env = clean_env(tmp_path, UPSTREAMPROXY_STATE_DIR=str(started.state_dir))
    path = started.state_dir / "env.json"
    original = path.read_text()
    for field, damage, problem in (
        ("value", "http://127.0.0.1:1\x00x", "contains NUL"),
        ("name", "HTTPS_PROXY;id", "not a valid environment variable name"),
    ):
        document = json.loads(original)
        document["variables"][0][field] = damage
        path.write_text(json.dumps(document))
        for form in ("sh", "dotenv"):
            done = cli("env", "--format", form, env=env)
            assert done.returncode == 1 and done.stdout == "", (form, done)
            assert "Traceback" not in done.stderr and problem in done.stderr, (form, done)
            assert len(done.stderr.splitlines()) == 1, (form, done.stderr)
    path.write_text(original)


def test_a_session_file_that_is_a_fifo_is_no_session(started: Started, tmp_path: Path) -> None:
    """env.json was read with a plain blocking open: a FIFO there hung `env`, `exec` and
    `doctor` (and a login shell's `exec`) until someone wrote to it."""
    env = clean_env(tmp_path, UPSTREAMPROXY_STATE_DIR=str(started.state_dir))
    path = started.state_dir / "env.json"
    original = path.read_text()
    path.unlink()
    os.mkfifo(path)
    try:
        done = cli("env", env=env, timeout=10)
        assert done.returncode == 1 and done.stdout == "", done
        assert "is not a session file (not a regular file)" in done.stderr, done.stderr
    finally:
        path.unlink()
        path.write_text(original)


@pytest.mark.parametrize(
    ("field", "damage", "problem"),
    [
        ("pid", "abc", "pid is str"),
        ("pid", True, "pid is bool"),
        ("pid", -1, "pid -1"),
        ("proxy_url", "http://127.0.0.1", "proxy URL without a port"),
        ("proxy_url", 8080, "proxy_url is int"),
        ("no_proxy_extra", "a,b", "no_proxy_extra is not a list of strings"),
        ("merged_ca_files", [1], "merged_ca_files is not a list of strings"),
        ("boot_id", {}, "boot_id is dict"),
    ],
)
def test_a_session_record_of_the_wrong_types_is_no_session(
    started: Started, tmp_path: Path, field: str, damage: object, problem: str
) -> None:
    """A pid of "abc" reached os.kill, a proxy URL without a port doctor's urlsplit: each
    ended in a traceback. Each is now "not a session file", in one line, for every reader."""
    env = clean_env(tmp_path, UPSTREAMPROXY_STATE_DIR=str(started.state_dir))
    path = started.state_dir / "env.json"
    original = path.read_text()
    document = json.loads(original)
    document["session"][field] = damage
    document["session"].pop("pid_start", None)  # as in files from before it was recorded
    path.write_text(json.dumps(document))
    try:
        for command in (("env",), ("exec", "--fail-closed", "--", "true")):
            done = cli(*command, env=env)
            assert done.returncode in (1, 125), (command, done)
            assert "Traceback" not in done.stderr and problem in done.stderr, (command, done)
            assert "is not a session file" in done.stderr, (command, done)
    finally:
        path.write_text(original)


def test_env_json_prints_the_session_file_it_checked(
    started: Started, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--format json` read env.json a second time, by path, after the checks: a file
    replaced meanwhile (by another start, or in a swapped directory) was printed unchecked."""
    import argparse

    from upstreamproxy.bootstrap import state
    from upstreamproxy.commands import env as env_command

    real_load = state.load_session
    path = started.state_dir / "env.json"

    def load_then_replace(directory: Path) -> state.LoadedSession:
        loaded = real_load(directory)
        path.write_text(json.dumps({"env": {"HTTPS_PROXY": "http://attacker:1"}}))
        return loaded

    monkeypatch.setattr(env_command, "load_session", load_then_replace)
    checked = started.document()
    args = argparse.Namespace(format="json", state_dir=started.state_dir)
    assert env_command.run(args) == 0
    assert json.loads(capsys.readouterr().out) == checked


def test_env_without_a_session(tmp_path: Path, started: Started) -> None:
    env = clean_env(tmp_path)
    none = cli("env", "--state-dir", str(tmp_path / "nothing"), env=env)
    assert none.returncode == 1
    assert "no session is running" in none.stderr and none.stdout == ""
    started.stop()
    stale = cli("env", "--state-dir", str(started.state_dir), env=env)
    assert stale.returncode == 1 and "no session is running" in stale.stderr


def test_exec_runs_the_command_with_the_environment(started: Started, tmp_path: Path) -> None:
    env = clean_env(tmp_path, UPSTREAMPROXY_STATE_DIR=str(started.state_dir))
    done = cli("exec", "--", "sh", "-c", 'printf %s "$HTTPS_PROXY"; exit 7', env=env)
    assert done.returncode == 7
    assert done.stdout == started.exports()["HTTPS_PROXY"]
    missing = cli("exec", "--", "no-such-command-xyz", env=env)
    assert missing.returncode == 127 and "command not found" in missing.stderr


def test_exec_warns_only_when_the_callers_ca_file_is_really_lost(
    started: Started, tmp_path: Path, world: World
) -> None:
    # The system bundle's roots are in the super bundle: naming it loses nothing.
    system = find_system_bundle()
    assert system is not None
    show = ("exec", "--", "sh", "-c", 'printf %s "$SSL_CERT_FILE"')
    base = {"UPSTREAMPROXY_STATE_DIR": str(started.state_dir)}
    quiet = cli(*show, env=clean_env(tmp_path, **base, SSL_CERT_FILE=str(system)))
    assert quiet.returncode == 0 and quiet.stdout == started.exports()["SSL_CERT_FILE"]
    assert "no longer trusted" not in quiet.stderr, quiet.stderr
    # A CA file start never saw is lost, and exec says so.
    mine = tmp_path / "mine.pem"
    mine.write_bytes(world.other_ca.cert_pem())
    lost = cli(*show, env=clean_env(tmp_path, **base, SSL_CERT_FILE=str(mine)))
    assert lost.returncode == 0 and "no longer trusted" in lost.stderr


def test_exec_child_environment_has_no_token(started: Started, tmp_path: Path) -> None:
    env = clean_env(
        tmp_path,
        UPSTREAMPROXY_STATE_DIR=str(started.state_dir),
        UPSTREAMPROXY_TOKEN=TOKEN,
        UPSTREAMPROXY_TOKEN_FILE=str(started.token_file),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "upstreamproxy", "exec", "--", "sleep", "30"], env=env, cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 15
        while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline, "exec did not replace itself with the command"
            time.sleep(0.02)
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    finally:
        proc.kill()
        proc.wait()
    variables = dict(item.split(b"=", 1) for item in environ.split(b"\0") if item)
    assert variables[b"HTTPS_PROXY"] == started.exports()["HTTPS_PROXY"].encode()
    assert TOKEN.encode() not in environ and TOKEN.encode() not in cmdline
    assert b"UPSTREAMPROXY_TOKEN" not in variables
    assert b"UPSTREAMPROXY_TOKEN_FILE" not in variables


def test_exec_without_a_session_follows_the_failure_policy(tmp_path: Path) -> None:
    env = clean_env(tmp_path, UPSTREAMPROXY_STATE_DIR=str(tmp_path / "none"))
    open_ = cli("exec", "--", "sh", "-c", 'printf %s "${HTTPS_PROXY-unset}"', env=env)
    assert open_.returncode == 0 and open_.stdout == "unset"
    assert "running the command without the proxy" in open_.stderr
    closed = cli("exec", "--fail-closed", "--", "true", env=env)
    assert closed.returncode == 125 and "--fail-closed" in closed.stderr


# -- the user's own values are merged, not clobbered ----------------------------------------------


def test_user_no_proxy_and_ca_file_are_merged(world: World, tmp_path: Path) -> None:
    user_ca = tmp_path / "user-ca.pem"
    user_ca.write_bytes(world.other_ca.cert_pem())
    env = clean_env(tmp_path, NO_PROXY="corp.example,.internal", SSL_CERT_FILE=str(user_ca))
    session = start_session(world, tmp_path / "s", "--no-proxy", "extra.example", env=env)
    try:
        assert session.ready_line.startswith(READY_PREFIX), session.stop()
        document = session.document()
        no_proxy = document["env"]["NO_PROXY"].split(",")
        assert no_proxy[:2] == ["corp.example", ".internal"]
        assert "127.0.0.1" in no_proxy and no_proxy[-1] == "extra.example"
        assert document["env"]["no_proxy"] == document["env"]["NO_PROXY"]
        actions = {v["name"]: v["action"] for v in document["variables"]}
        assert actions["NO_PROXY"] == "merged" and actions["SSL_CERT_FILE"] == "merged"
        bundle = (session.state_dir / "ca-bundle.pem").read_bytes()
        assert world.other_ca.cert_pem() in bundle and world.ca.cert_pem() in bundle
        # The user's CA still works, now through the relay: curl trusts the untrusted origin.
        done = subprocess.run(
            ["curl", "-sS", "--max-time", "20", world.url(UNTRUSTED)],
            env=session.tool_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0 and done.stdout == HELLO, done.stderr
        # exec merges the *caller's* NO_PROXY the same way.
        caller = clean_env(
            tmp_path, UPSTREAMPROXY_STATE_DIR=str(session.state_dir), no_proxy="mine.example"
        )
        shown = cli("exec", "--", "sh", "-c", 'printf %s "$NO_PROXY"', env=caller)
        assert shown.stdout.split(",")[0] == "mine.example"
        assert "127.0.0.1" in shown.stdout.split(",")
    finally:
        session.stop()


def test_ca_file_from_process_substitution(world: World, tmp_path: Path) -> None:
    # --ca-file <(cat ca.pem) names a pipe (/dev/fd/63): read without blocking, to its end.
    ca = tmp_path / "egress-ca.pem"
    ca.write_bytes(world.ca.cert_pem())
    via = ["bash", "-c", 'exec "$@" --ca-file <(cat "$0")', str(ca)]
    session = start_session(world, tmp_path / "s", via=via)
    try:
        assert session.ready_line.startswith(READY_PREFIX), session.stop()
        bundle = (session.state_dir / "ca-bundle.pem").read_bytes()
        assert world.ca.cert_pem() in bundle
    finally:
        log = session.stop()
    assert "1 custom (/dev/fd/" in log, log


# -- --background ---------------------------------------------------------------------------------


def test_background_returns_once_ready(world: World, tmp_path: Path, daemons: list[int]) -> None:
    token = write_token(tmp_path / "token")
    state = tmp_path / "state"
    started_at = time.monotonic()
    done = cli(
        "start",
        "--background",
        "--token-file",
        str(token),
        "--session-id",
        SESSION_ID,
        "--egress-url",
        world.egress_url,
        "--state-dir",
        str(state),
        env=clean_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started_at < 20
    assert done.stdout == f"{state / 'env.sh'}\n"
    pid = json.loads((state / "env.json").read_text())["session"]["pid"]
    daemons.append(pid)
    assert not token.exists()
    assert_not_dumpable(pid)
    assert TOKEN.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert "ready" in (state / "start.log").read_text()
    os.kill(pid, signal.SIGTERM)
    assert process_gone(pid)
    for name in ENV_FILES:
        assert not (state / name).exists()
    assert TOKEN not in (state / "start.log").read_text()
    assert (state / "start.log").stat().st_mode & 0o777 == 0o600  # may hold details of the session


@pytest.mark.parametrize("fail_closed", [False, True], ids=["fail-open", "fail-closed"])
def test_background_failure(world: World, tmp_path: Path, fail_closed: bool) -> None:
    token = write_token(tmp_path / "token")
    args = ["--fail-closed"] if fail_closed else []
    done = cli(
        "start",
        "--background",
        "--token-file",
        str(token),
        "--session-id",
        SESSION_ID,
        "--egress-url",
        world.egress_url,
        "--state-dir",
        str(tmp_path / "state"),
        "--ca-url",
        f"http://127.0.0.1:{closed_port()}/",
        *args,
        env=clean_env(tmp_path),
    )
    assert done.returncode == (1 if fail_closed else 0)
    assert done.stdout == ""
    assert "left in place for a retry" in done.stderr
    assert token.exists()


# -- env/ hooks in real shells --------------------------------------------------------------------


def shim_path(tmp_path: Path) -> str:
    """A PATH whose ``upstreamproxy`` runs this checkout, as an installed console script would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "upstreamproxy"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m upstreamproxy "$@"\n')
    shim.chmod(0o755)
    return f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"


def shell_env(shell: str, script: str, env: dict[str, str]) -> tuple[int, dict[str, str], str]:
    done = subprocess.run(
        [shell, "-c", script + '\nrc=$?; env -0; exit "$rc"'],
        env=env,
        capture_output=True,
        timeout=60,
        cwd=ROOT,
    )
    values = {}
    for item in done.stdout.split(b"\0"):
        name, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            values[name.strip()] = value
    return done.returncode, values, done.stderr.decode(errors="replace")


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_start_hook_in_a_real_shell(
    world: World, tmp_path: Path, shell: str, daemons: list[int]
) -> None:
    token = write_token(tmp_path / "token")
    state = tmp_path / "state"
    env = clean_env(
        tmp_path,
        PATH=shim_path(tmp_path),
        UPSTREAMPROXY_TOKEN_FILE=str(token),
        UPSTREAMPROXY_SESSION_ID=SESSION_ID,
        UPSTREAMPROXY_EGRESS_URL=world.egress_url,
        UPSTREAMPROXY_STATE_DIR=str(state),
    )
    script = f'. "{HOOK}" && curl -sS --max-time 20 -o "{tmp_path}/out" "{world.url()}"'
    rc, values, err = shell_env(shell, script, env)
    if (state / "env.json").exists():
        daemons.append(json.loads((state / "env.json").read_text())["session"]["pid"])
    assert rc == 0, err
    assert (tmp_path / "out").read_text() == HELLO
    exports = json.loads((state / "env.json").read_text())["env"]
    for name, value in exports.items():
        assert values[name] == value, name
    assert not any(k.startswith("_upstreamproxy") for k in values)


@pytest.mark.parametrize("fail_closed", [False, True], ids=["fail-open", "fail-closed"])
def test_start_hook_without_upstreamproxy_installed(tmp_path: Path, fail_closed: bool) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    if fail_closed:
        env["UPSTREAMPROXY_FAIL_CLOSED"] = "1"
    env["UPSTREAMPROXY_BIN"] = "upstreamproxy-not-installed"
    rc, values, err = shell_env("sh", f'. "{HOOK}"', env)
    assert rc == (1 if fail_closed else 0)
    assert "continuing without the proxy" in err
    assert "HTTPS_PROXY" not in values


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_profile_snippet_sources_a_running_session(
    started: Started, tmp_path: Path, shell: str
) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "UPSTREAMPROXY_STATE_DIR": str(started.state_dir),
    }
    rc, values, err = shell_env(shell, f'. "{PROFILE}"', env)
    assert rc == 0 and err == ""
    for name, value in started.exports().items():
        assert values[name] == value, name
    # Found through the default location as well (HOME/.cache/upstreamproxy).
    default = tmp_path / ".cache" / "upstreamproxy"
    default.parent.mkdir(parents=True)
    default.symlink_to(started.state_dir)
    rc, values, _ = shell_env(
        shell, f'. "{PROFILE}"', {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    )
    assert values.get("HTTPS_PROXY") == started.exports()["HTTPS_PROXY"]


def test_profile_snippet_ignores_a_dead_session(started: Started, tmp_path: Path) -> None:
    env_sh = (started.state_dir / "env.sh").read_text()
    started.stop()
    # What a SIGKILLed session leaves behind: env files and the pid of a dead process.
    (started.state_dir / "env.sh").write_text(env_sh)
    (started.state_dir / "start.pid").write_text(f"{started.pid}\n")
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "UPSTREAMPROXY_STATE_DIR": str(started.state_dir),
    }
    rc, values, err = shell_env("sh", f'. "{PROFILE}"', env)
    assert rc == 0 and err == ""
    assert "HTTPS_PROXY" not in values
