"""The state directory of a running session: where ``start`` leaves what the others read.

Public API::

    default_state_dir(env: Mapping[str, str] = os.environ) -> Path
    class StatePaths(directory)      # .bundle .env_sh .env_json .pid_file .log_file
    prepare_state_dir(path: Path) -> StatePaths      # create 0755, refuse unsafe ownership
    write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None
    class SessionInfo                # what env.json records about the session
    write_session(paths, info, plan) -> None         # env.sh, env.json, pid file
    load_session(state_dir: Path) -> LoadedSession  # raises NoSession with a clear reason;
                                                    # only from a dir we or root control
    shared_session(state_dir: Path) -> LoadedSession | None  # root's live session, for others
    remove_session_files(paths, pid) -> None         # only if they still belong to ``pid``
    remove_stale_session(paths) -> str | None        # a dead session's files, at the next start
    class ProcessIdentity                            # pid + start time + boot id
    process_identity(pid) -> ProcessIdentity | None  # from /proc; None if gone (or a zombie)
    session_alive(info) -> bool                      # the recorded process is that very process
    session_env(loaded, base_env) -> (EnvPlan, dict[str, str])   # what exec/doctor run with
    child_environment(env) -> dict[str, str]         # without token-bearing variables

Layout of ``<state-dir>`` (default ``$XDG_RUNTIME_DIR/upstreamproxy``, else
``~/.cache/upstreamproxy``)::

    ca-bundle.pem   the CA super bundle (0644), kept after the session ends
    env.sh          ``export NAME='value'`` lines to source (0644)
    env.json        render_json(plan) plus a "session" object (pid, proxy URL, bundle, ...)
    start.pid       ``PID START_TICKS BOOT_ID``: the process serving the relay (one line)
    start.lock      held (flock) by the ``start`` process while it runs; 0600
    start.log       the log of a ``start --background`` daemon

None of these ever holds the token. env.json is the source of truth for ``env``, ``exec``
and ``doctor``; env.sh and start.pid exist for shells (env/profile.d) that cannot parse JSON.

Liveness, whatever pid reuse does. A session that was SIGKILLed (with its container, by the
OOM killer, ...) leaves env.sh, env.json and start.pid behind, and after a container restart
another process may well have its pid. So a pid is never trusted alone: the session records
the process's identity, ``(pid, start time, boot id)`` — the start time is field 22 of
``/proc/PID/stat`` (clock ticks since boot, fixed for the life of the process, different for
any later process with the same pid) and the boot id (``/proc/sys/kernel/random/boot_id``)
rules out a reboot. The session is alive only while ``/proc/PID/stat`` shows that start time
and the process is not a zombie (a killed relay under a PID 1 that never reaps stays one).
The check reads two world-readable files, works for a session of another user (``kill -0``
would say EPERM) and cannot be disturbed by anyone holding a lock; the profile snippet does
the same in POSIX sh. The recorded pid is the one whose death ends the proxy: the process that
serves the relay port. A ``start`` that finds such leftovers removes them before it begins
(:func:`remove_stale_session`); shells and ``env``/``exec``/``doctor`` ignore them meanwhile.
Where there is no ``/proc`` the pid check alone has to do.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from ..capped_file import CappedFileError, read_capped
from ..certs import write_private_file
from ..errors import ConfigError, UpstreamProxyError
from .proxy_env import (
    Action,
    EnvPlan,
    EnvVar,
    ToolFiles,
    proxy_environment,
    render_json,
    render_sh,
)

STATE_DIR_MODE: Final = 0o755
FILE_MODE: Final = 0o644
#: The largest env.json read: a session writes a few KiB (a hundred variables, some paths).
MAX_ENV_JSON: Final = 1024 * 1024
#: Variables that may carry the token or point at it; never passed to child processes.
TOKEN_VARIABLES: Final = ("UPSTREAMPROXY_TOKEN", "UPSTREAMPROXY_TOKEN_FILE")


class NoSession(UpstreamProxyError):
    """No running session in the state directory; ``reason`` says what was found instead."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def default_state_dir(env: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_RUNTIME_DIR/upstreamproxy`` if that is set, else ``~/.cache/upstreamproxy``."""
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_absolute():
        return Path(runtime) / "upstreamproxy"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".cache" / "upstreamproxy"


@dataclass(frozen=True)
class StatePaths:
    directory: Path

    @property
    def bundle(self) -> Path:
        return self.directory / "ca-bundle.pem"

    @property
    def env_sh(self) -> Path:
        return self.directory / "env.sh"

    @property
    def env_json(self) -> Path:
        return self.directory / "env.json"

    @property
    def pid_file(self) -> Path:
        return self.directory / "start.pid"

    @property
    def log_file(self) -> Path:
        return self.directory / "start.log"


def prepare_state_dir(path: Path) -> StatePaths:
    """Create ``path`` (0755) if needed and check that nobody else can write into it.

    The files in it are sourced by shells, so a directory another user can write to (or
    one owned by another user, e.g. squatted in /tmp) is refused: ConfigError("state_dir").
    """
    path = path.expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    try:
        path.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as exc:
        raise ConfigError("state_dir", f"cannot create {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError("state_dir", f"{path} is not a directory")
    if info.st_uid != os.geteuid():
        raise ConfigError("state_dir", f"{path} belongs to uid {info.st_uid}, not to us")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            "state_dir",
            f"{path} is writable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); use a private directory",
        )
    return StatePaths(path)


def write_text_atomic(path: Path, text: str, mode: int = FILE_MODE) -> None:
    """Write ``text`` to a temporary file next to ``path`` and rename it over ``path``."""
    write_private_file(path, text.encode("utf-8"), mode)


@dataclass(frozen=True)
class SessionInfo:
    """What a running ``start`` records in env.json under ``"session"`` (never the token)."""

    pid: int
    proxy_url: str
    ca_bundle: str
    state_dir: str
    env_file: str
    session_id: str
    egress_url: str  # credentials, query and fragment removed
    no_proxy_extra: tuple[str, ...] = ()
    merged_ca_files: tuple[str, ...] = ()
    started: float = field(default_factory=time.time)
    #: Plain HTTP through the relay (HTTP_PROXY exported), and the files written for tools.
    plain_http: bool = True
    wgetrc: str | None = None
    apt_config: str | None = None
    java_truststore: str | None = None
    wget2rc: str | None = None

    def tool_files(self) -> ToolFiles:
        def path(value: str | None) -> Path | None:
            return Path(value) if value else None

        return ToolFiles(
            path(self.wgetrc),
            path(self.apt_config),
            path(self.java_truststore),
            path(self.wget2rc),
        )

    #: ``pid``'s start time (clock ticks since boot) and the boot id, filled in by
    #: :func:`write_session`; None in files written before they were recorded.
    pid_start: int | None = None
    boot_id: str | None = None

    @property
    def proxy_port(self) -> int:
        port = urllib.parse.urlsplit(self.proxy_url).port
        if port is None:
            raise ValueError("proxy URL without a port")
        return port

    @property
    def proxy_host(self) -> str:
        return urllib.parse.urlsplit(self.proxy_url).hostname or "127.0.0.1"


def write_session(paths: StatePaths, info: SessionInfo, plan: EnvPlan) -> SessionInfo:
    """Write env.json, env.sh and the pid file, each atomically (0644).

    Records the identity of ``info.pid`` (start time, boot id) unless ``info`` has it, and
    returns the info as written. start.pid is written last: until it names a live process,
    shells ignore the other files.
    """
    if info.pid_start is None:
        identity = process_identity(info.pid)
        if identity is not None:
            info = replace(info, pid_start=identity.start_ticks, boot_id=identity.boot_id)
    document = json.loads(render_json(plan))
    document["session"] = asdict(info)
    write_text_atomic(paths.env_json, json.dumps(document, indent=2) + "\n")
    write_text_atomic(paths.env_sh, render_sh(plan))
    line = str(info.pid)
    if info.pid_start is not None:
        line += f" {info.pid_start} {info.boot_id or '-'}"
    write_text_atomic(paths.pid_file, line + "\n")
    return info


def remove_session_files(paths: StatePaths, pid: int) -> None:
    """Remove env.json, env.sh and start.pid if they are still ``pid``'s.

    A newer session may already have replaced them; its files are left alone. The CA bundle
    stays: it is harmless, and tools holding its path keep working for direct connections.
    """
    try:
        document = json.loads(paths.env_json.read_text())
        owner = int(document["session"]["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        owner = pid
    if owner != pid:
        return
    for path in (paths.env_sh, paths.env_json, paths.pid_file):
        path.unlink(missing_ok=True)


def remove_stale_session(paths: StatePaths) -> str | None:
    """Remove what a dead session left (env.sh, env.json, start.pid); says what it removed.

    Called by ``start`` once it holds the state directory's lock, so no session can be
    starting or running here: files that still describe a live process are left alone all
    the same (that process is then not ours to judge), and None is returned.
    """
    if not any(p.exists() for p in (paths.env_sh, paths.env_json, paths.pid_file)):
        return None
    try:
        info = _read_info(paths)
    except NoSession:
        info = None
    if info is not None and session_alive(info):
        return None
    for path in (paths.env_sh, paths.env_json, paths.pid_file):
        path.unlink(missing_ok=True)
    if info is None:
        return f"removed unreadable session files from {paths.directory}"
    return f"removed the files of an earlier session (pid {info.pid}) that is no longer running"


@dataclass(frozen=True)
class LoadedSession:
    info: SessionInfo
    plan: EnvPlan
    paths: StatePaths
    #: env.json as read (once, from the checked directory): what ``env --format json`` prints.
    document: Mapping[str, Any] = field(default_factory=dict)


def _plan_from_document(document: Mapping[str, Any]) -> EnvPlan:
    variables = tuple(
        EnvVar(str(v["name"]), str(v["value"]), Action(v["action"]), str(v["reason"]))
        for v in document["variables"]
    )
    return EnvPlan(variables, tuple(str(n) for n in document.get("notes", ())))


BOOT_ID_FILE: Final = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class ProcessIdentity:
    """A process, told apart from any later process that gets the same pid."""

    pid: int
    start_ticks: int  # field 22 of /proc/PID/stat: clock ticks since boot
    boot_id: str  # "" where the kernel does not say
    zombie: bool = False


def boot_id() -> str:
    try:
        return BOOT_ID_FILE.read_text().strip()
    except OSError:
        return ""


def process_identity(pid: int) -> ProcessIdentity | None:
    """``pid``'s identity from /proc, or None if there is no such process (or no /proc).

    The command name (field 2) may hold spaces and parentheses, so fields are counted from
    the last ``)``. /proc/PID/stat is world-readable, also for a non-dumpable process.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        state, start = fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
        return None
    return ProcessIdentity(pid, start, boot_id(), zombie=state in ("Z", "X", "x"))


def session_alive(info: SessionInfo) -> bool:
    """Whether the process that wrote ``info`` is still running (see the module docstring)."""
    if info.pid_start is None or not Path("/proc/self/stat").exists():
        return pid_alive(info.pid) and _runs_upstreamproxy(info.pid)
    now = process_identity(info.pid)
    if now is None or now.zombie or now.start_ticks != info.pid_start:
        return False
    return not (info.boot_id and now.boot_id and info.boot_id != now.boot_id)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but belongs to someone else
        return True
    return True


def relay_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _runs_upstreamproxy(pid: int) -> bool:
    """Guards against a recycled pid: the process's command line must mention upstreamproxy.

    /proc/<pid>/cmdline stays readable (0444) for a non-dumpable process; where there is no
    /proc, the pid check alone has to do.
    """
    try:
        return b"upstreamproxy" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True


def load_session(
    state_dir: Path, *, check_alive: bool = True, check_relay: bool = False
) -> LoadedSession:
    """The running session in ``state_dir``; NoSession (with the reason) if there is none.

    Only a directory that we or root own and nobody else can write holds a session for us
    (:func:`_open_trusted_dir`).

    ``check_alive``: the process recorded in env.json must still be running
    (:func:`session_alive`).
    ``check_relay``: the relay port must also accept a connection (the relay logs each such
    probe as a tunnel, so only ``doctor`` asks for it).
    """
    paths = StatePaths(state_dir.expanduser())
    document = _read_document(paths)  # read once: start may replace the file meanwhile
    info = _parse_info(paths, document)
    try:
        plan = _plan_from_document(document)
    except (ValueError, KeyError, TypeError) as exc:
        raise NoSession(f"{paths.env_json} is not a session file ({exc})") from None
    if check_alive and not session_alive(info):
        raise NoSession(
            f"no session is running: the one that wrote {paths.env_json} (pid {info.pid}) "
            "has ended; start a new one with `upstreamproxy start`"
        )
    if check_relay and not relay_answers(info.proxy_host, info.proxy_port):
        raise NoSession(
            f"the session's relay at {info.proxy_url} (pid {info.pid}) does not accept connections"
        )
    return LoadedSession(info, plan, paths, document)


def _open_trusted_dir(directory: Path) -> int:
    """An fd of ``directory`` if only we or root can change what is in it, else NoSession.

    Its files are sourced by shells and name the proxy and CA every tool uses, so a
    directory another user owns or can write (planted in /tmp, say) is nobody's session
    for us, as it is for ``start``; root's (the Dev Container Feature's /run/upstreamproxy)
    is everyone's. The files are then read through this fd, so a directory swapped in
    after the check (by whoever can write its parent) is never read.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if info.st_uid not in (os.geteuid(), 0):
            raise NoSession(
                f"not using the session files in {directory}: the directory belongs to uid "
                f"{info.st_uid}, not to you or root, so they could point tools at any proxy "
                "and CA"
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise NoSession(
                f"not using the session files in {directory}: others can write to it (mode "
                f"{stat.S_IMODE(info.st_mode):04o}), so they could point tools at any proxy "
                "and CA"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_trusted(paths: StatePaths) -> str:
    fd = _open_trusted_dir(paths.directory)
    try:
        # A regular file, capped, through the checked directory's fd: never hangs on a FIFO.
        return read_capped(paths.env_json.name, MAX_ENV_JSON, dir_fd=fd).data.decode("utf-8")
    finally:
        os.close(fd)


def _read_document(paths: StatePaths) -> dict[str, Any]:
    try:
        raw = _read_trusted(paths)
    except FileNotFoundError:
        raise NoSession(
            f"no session is running (no {paths.env_json}); start one with "
            "`upstreamproxy start`, or pass the --state-dir it used"
        ) from None
    except NotADirectoryError:
        raise NoSession(f"no session is running ({paths.directory} is not a directory)") from None
    except OSError as exc:
        raise NoSession(f"cannot read {paths.env_json}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise NoSession(f"{paths.env_json} is not a session file ({exc})") from None
    except CappedFileError as exc:  # not a regular file, or larger than any session writes
        raise NoSession(f"{paths.env_json} is not a session file ({exc})") from None
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise NoSession(f"{paths.env_json} is not a session file ({exc})") from None
    if not isinstance(document, dict):
        raise NoSession(f"{paths.env_json} is not a session file (not an object)")
    return document


def _read_info(paths: StatePaths) -> SessionInfo:
    return _parse_info(paths, _read_document(paths))


#: The JSON type of each SessionInfo field (a damaged file fails here, in one line, not later
#: in os.kill or urlsplit with a traceback); None where null is allowed.
_FIELD_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "pid": (int,),
    "proxy_url": (str,),
    "ca_bundle": (str,),
    "state_dir": (str,),
    "env_file": (str,),
    "session_id": (str,),
    "egress_url": (str,),
    "started": (int, float),
    "plain_http": (bool,),
    "wgetrc": (str, type(None)),
    "apt_config": (str, type(None)),
    "java_truststore": (str, type(None)),
    "wget2rc": (str, type(None)),
    "pid_start": (int, type(None)),
    "boot_id": (str, type(None)),
}


def _parse_info(paths: StatePaths, document: Mapping[str, Any]) -> SessionInfo:
    try:
        session = dict(document["session"])
        for name in ("no_proxy_extra", "merged_ca_files"):
            values = session.get(name, ())
            if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
                raise TypeError(f"{name} is not a list of strings")
            session[name] = tuple(values)
        for name, value in session.items():
            expected = _FIELD_TYPES.get(name)
            # bool is an int: a pid of true is as damaged as one of "abc".
            if expected and (
                not isinstance(value, expected)
                or (isinstance(value, bool) and bool not in expected)
            ):
                raise TypeError(f"{name} is {type(value).__name__}")
        info = SessionInfo(**session)
        if info.pid <= 0:
            raise ValueError(f"pid {info.pid}")
        info.proxy_port  # noqa: B018 - a proxy URL without a port fails here, not in doctor
        return info
    except (ValueError, KeyError, TypeError) as exc:
        raise NoSession(f"{paths.env_json} is not a session file ({exc})") from None


def shared_session(state_dir: Path) -> LoadedSession | None:
    """The live session in a state directory that root runs for everyone, else None.

    A user whose ``start`` cannot use the directory (it belongs to root, as the Dev Container
    Feature's ``/run/upstreamproxy`` does) may still use root's session there, exactly as
    the profile snippet does. Only a root-owned directory that nobody else can write counts:
    a directory some other user owns could hold anything (a proxy of theirs, their CA).
    """
    path = state_dir.expanduser()
    if os.geteuid() == 0:
        return None
    try:
        info = path.stat()
    except OSError:
        return None
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != 0
        or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        return None
    try:
        return load_session(path)
    except NoSession:
        return None


def child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` without the variables that name or carry the session token."""
    return {k: v for k, v in env.items() if k not in TOKEN_VARIABLES}


def session_env(
    loaded: LoadedSession, base_env: Mapping[str, str]
) -> tuple[EnvPlan, dict[str, str]]:
    """The plan recomputed against ``base_env`` and the environment to run a command with.

    Recomputing (rather than replaying env.json) merges the *caller's* NO_PROXY and CA
    variables, which may differ from those ``start`` saw; for a shell that already sourced
    env.sh it yields the same values.
    """
    info = loaded.info
    base = child_environment(base_env)
    plan = proxy_environment(
        info.proxy_url,
        Path(info.ca_bundle),
        info.no_proxy_extra,
        base_env=base,
        merged_ca_files=info.merged_ca_files,
        plain_http=info.plain_http,
        tool_files=info.tool_files(),
    )
    env = dict(base)
    env.update(plan.exports())
    return plan, env
