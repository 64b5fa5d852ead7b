"""The state directory of a running session: where ``start`` leaves what the others read.

Public API::

    default_state_dir(env: Mapping[str, str] = os.environ) -> Path
    class StatePaths(directory)      # .bundle .env_sh .env_json .pid_file .log_file
    prepare_state_dir(path: Path) -> StatePaths      # create 0755, refuse unsafe ownership
    write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None
    class SessionInfo                # what env.json records about the session
    write_session(paths, info, plan) -> None         # env.sh, env.json, pid file
    load_session(state_dir: Path) -> LoadedSession  # raises NoSession with a clear reason
    remove_session_files(paths, pid) -> None         # only if they still belong to ``pid``
    session_env(loaded, base_env) -> (EnvPlan, dict[str, str])   # what exec/doctor run with
    child_environment(env) -> dict[str, str]         # without token-bearing variables

Layout of ``<state-dir>`` (default ``$XDG_RUNTIME_DIR/upstreamproxy``, else
``~/.cache/upstreamproxy``)::

    ca-bundle.pem   the CA super bundle (0644), kept after the session ends
    env.sh          ``export NAME='value'`` lines to source (0644)
    env.json        render_json(plan) plus a "session" object (pid, proxy URL, bundle, ...)
    start.pid       the pid of the process serving the relay
    start.log       the log of a ``start --background`` daemon

None of these ever holds the token. env.json is the source of truth for ``env``, ``exec``
and ``doctor``; env.sh and start.pid exist for shells (env/profile.d) that cannot parse JSON.
A session is *running* when the pid in env.json is alive and its relay port accepts
connections; anything else is stale state from a session that was killed.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

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

    @property
    def proxy_port(self) -> int:
        port = urllib.parse.urlsplit(self.proxy_url).port
        if port is None:
            raise ValueError("proxy URL without a port")
        return port

    @property
    def proxy_host(self) -> str:
        return urllib.parse.urlsplit(self.proxy_url).hostname or "127.0.0.1"


def write_session(paths: StatePaths, info: SessionInfo, plan: EnvPlan) -> None:
    """Write env.json, env.sh and the pid file, each atomically (0644)."""
    document = json.loads(render_json(plan))
    document["session"] = asdict(info)
    write_text_atomic(paths.env_json, json.dumps(document, indent=2) + "\n")
    write_text_atomic(paths.env_sh, render_sh(plan))
    write_text_atomic(paths.pid_file, f"{info.pid}\n")


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


@dataclass(frozen=True)
class LoadedSession:
    info: SessionInfo
    plan: EnvPlan
    paths: StatePaths


def _plan_from_document(document: Mapping[str, Any]) -> EnvPlan:
    variables = tuple(
        EnvVar(str(v["name"]), str(v["value"]), Action(v["action"]), str(v["reason"]))
        for v in document["variables"]
    )
    return EnvPlan(variables, tuple(str(n) for n in document.get("notes", ())))


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

    ``check_alive``: the pid in env.json must be a live upstreamproxy process.
    ``check_relay``: the relay port must also accept a connection (the relay logs each such
    probe as a tunnel, so only ``doctor`` asks for it).
    """
    paths = StatePaths(state_dir.expanduser())
    try:
        raw = paths.env_json.read_text()
    except FileNotFoundError:
        raise NoSession(
            f"no session is running (no {paths.env_json}); start one with "
            "`upstreamproxy start`, or pass the --state-dir it used"
        ) from None
    except OSError as exc:
        raise NoSession(f"cannot read {paths.env_json}: {exc.strerror}") from None
    try:
        document = json.loads(raw)
        session = dict(document["session"])
        session["no_proxy_extra"] = tuple(session.get("no_proxy_extra", ()))
        session["merged_ca_files"] = tuple(session.get("merged_ca_files", ()))
        info = SessionInfo(**session)
        plan = _plan_from_document(document)
    except (ValueError, KeyError, TypeError) as exc:
        raise NoSession(f"{paths.env_json} is not a session file ({exc})") from None
    if check_alive and not (pid_alive(info.pid) and _runs_upstreamproxy(info.pid)):
        raise NoSession(
            f"no session is running: the one that wrote {paths.env_json} (pid {info.pid}) "
            "has ended; start a new one with `upstreamproxy start`"
        )
    if check_relay and not relay_answers(info.proxy_host, info.proxy_port):
        raise NoSession(
            f"the session's relay at {info.proxy_url} (pid {info.pid}) does not accept connections"
        )
    return LoadedSession(info, plan, paths)


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
