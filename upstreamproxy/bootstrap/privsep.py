"""Privilege separation: a root ``start`` runs the relay under its own unprivileged uid.

Public API::

    DEFAULT_RELAY_USER = "upstreamproxy"
    class RelayUser(name, uid, gid)
    resolve_relay_user(spec, uid=None, *, create=True) -> RelayUser | None
    class SeparateRelay(config, user, log_level)   # start() / stop() / proxy_url / ended

Why: the relay holds the session token. ``PR_SET_DUMPABLE`` protects it only from the moment
it is set, and a process of the *same* uid can attach before that (see :mod:`.hardening`). A
process of *another* uid can never attach, whatever the flag, unless it has CAP_SYS_PTRACE.
So the recommended deployment runs ``start`` as root (a container start hook) and the relay
as a dedicated user that no sandbox process runs as:

* :func:`resolve_relay_user` finds that user, creating a system user (no home, no login shell)
  with ``useradd`` (or busybox ``adduser``) when it is missing. ``None`` means "no separation":
  ``start`` is not root, or was told ``--relay-user root``.
* :class:`SeparateRelay` starts ``python -m upstreamproxy.bootstrap.relay_child`` with the
  relay user's uid and gid and no supplementary groups, set by the forked child *before*
  ``execve`` (``subprocess``'s ``user``/``group``/``extra_groups``). From its first instruction
  the new process is that uid; before, it was root: at no moment can a sandbox uid trace it.
  The child makes itself non-dumpable, checks that nothing traces it, and only then reads
  its configuration and the token from its stdin, a pipe the supervisor writes *after* the
  exec succeeded. The token is never on argv, in the environment, or in a file the relay user
  can read. The child answers one JSON line on stdout (``ready`` with its proxy URL, or
  ``failed`` with a reason) and then serves until SIGTERM; it also exits if the supervisor
  dies (``PR_SET_PDEATHSIG``).

The supervisor (root) keeps the state directory, the env files and the optional network lock;
the relay user needs only to read the Python installation and ``--egress-ca-file``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Final

from ..errors import ConfigError
from ..relay import RelayConfig

log = logging.getLogger("upstreamproxy.start")

DEFAULT_RELAY_USER: Final = "upstreamproxy"
#: Values of ``--relay-user`` that mean "no separate user" (the relay runs as ``start`` does).
NO_SEPARATION: Final = ("root", "0")
CHILD_MODULE: Final = "upstreamproxy.bootstrap.relay_child"
#: (uid_t)-1 / (gid_t)-1: "no change" to the kernel, so never a valid relay uid or gid.
_NO_ID: Final = 2**32 - 1
#: Environment variables passed on to the child; nothing else (no token variables).
_CHILD_ENV: Final = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")


@dataclass(frozen=True)
class RelayUser:
    name: str
    uid: int
    gid: int


def resolve_relay_user(
    spec: str | None, uid: int | None = None, *, create: bool = True
) -> RelayUser | None:
    """The user the relay should run as, or None to run it in the ``start`` process itself.

    ``spec`` is a user name or a numeric uid; None means the default: ``upstreamproxy`` when
    running as root, no separation otherwise. ``uid`` is the uid to give a user created here
    (it must match an existing one). Raises ConfigError("relay_user") when the user cannot be
    used: not root but asked for another user, uid 0, creation failed, uid mismatch.
    """
    euid = os.geteuid()
    if euid != 0:
        if spec is None or spec == str(euid) or spec == _name_of(euid):
            return None
        raise ConfigError(
            "relay_user",
            f"running the relay as {spec!r} needs `start` to run as root "
            f"(it runs as uid {euid}); leave --relay-user unset to run it as yourself",
        )
    spec = spec or DEFAULT_RELAY_USER
    if spec in NO_SEPARATION:
        return None
    if spec.isdigit():
        number = int(spec)
        if number >= _NO_ID:
            raise ConfigError("relay_user", f"uid out of range: {spec}")
        try:
            entry = pwd.getpwuid(number)
        except KeyError:
            user = RelayUser(spec, number, number)  # a bare uid, with the same number as gid
        else:
            user = RelayUser(entry.pw_name, entry.pw_uid, entry.pw_gid)
    else:
        try:
            entry = pwd.getpwnam(spec)
        except KeyError:
            if not create:
                raise ConfigError("relay_user", f"no such user: {spec}") from None
            entry = _create_user(spec, uid)
        user = RelayUser(entry.pw_name, entry.pw_uid, entry.pw_gid)
    if not 0 <= user.uid < _NO_ID or not 0 <= user.gid < _NO_ID:
        # (uid_t)-1 means "leave unchanged" to setresuid(2): the relay would stay root.
        raise ConfigError("relay_user", f"uid/gid out of range: {user.uid}/{user.gid}")
    if uid is not None and user.uid != uid:
        raise ConfigError(
            "relay_uid", f"user {user.name} exists with uid {user.uid}, not the requested {uid}"
        )
    if user.uid == 0 or user.gid == 0:
        raise ConfigError(
            "relay_user", f"{user.name} has uid/gid 0; the relay user must be unprivileged"
        )
    return user


def _name_of(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _create_user(name: str, uid: int | None) -> pwd.struct_passwd:
    """Create a locked system user with its own group, no home directory and no shell."""
    shell = next(
        (s for s in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(s)), "/bin/false"
    )
    useradd = shutil.which("useradd")
    if useradd:
        argv = [useradd, "--system", "--user-group", "--no-create-home"]
        argv += ["--home-dir", "/nonexistent", "--shell", shell]
        if uid is not None:
            argv += ["--uid", str(uid)]
        argv.append(name)
    elif shutil.which("adduser"):  # busybox (Alpine)
        argv = ["adduser", "-S", "-D", "-H", "-h", "/nonexistent", "-s", shell]
        if uid is not None:
            argv += ["-u", str(uid)]
        argv.append(name)
    else:
        raise ConfigError(
            "relay_user", f"user {name} does not exist and neither useradd nor adduser is installed"
        )
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError("relay_user", f"cannot create user {name}: {exc}") from None
    if done.returncode != 0:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)  # another start created it at the same moment
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ConfigError(
            "relay_user",
            f"cannot create user {name}: {detail[-1] if detail else f'exit {done.returncode}'}",
        )
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError("relay_user", f"user {name} still missing after creating it") from None
    with contextlib.suppress(KeyError):
        log.info(
            "created relay user %s (uid %d, group %s)",
            name,
            entry.pw_uid,
            grp.getgrgid(entry.pw_gid).gr_name,
        )
    return entry


# ---------------------------------------------------------------------------------------------


def child_config(config: RelayConfig) -> dict[str, Any]:
    """RelayConfig as JSON-able fields, *without* the token (that goes alongside)."""
    return {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "token"
    }


class RelayChildFailed(Exception):
    """The relay child did not become ready; ``reason`` is safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SeparateRelay:
    """The relay in its own process under ``user``; the same start/stop/proxy_url as Relay."""

    def __init__(
        self,
        config: RelayConfig,
        user: RelayUser,
        *,
        log_level: int = logging.INFO,
        ready_timeout: float = 30.0,
    ) -> None:
        self.config = config
        self.user = user
        self.log_level = log_level
        self.ready_timeout = ready_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._proxy_url: str | None = None
        self.ended: asyncio.Future[int] | None = None

    @property
    def proxy_url(self) -> str:
        if self._proxy_url is None:
            raise RuntimeError("relay not started")
        return self._proxy_url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> None:
        env = {k: os.environ[k] for k in _CHILD_ENV if k in os.environ}
        env["HOME"] = "/nonexistent"
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # no current directory on sys.path
                "-m",
                CHILD_MODULE,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=None,  # the relay logs where start logs (terminal or start.log)
                cwd="/",
                env=env,
                user=self.user.uid,
                group=self.user.gid,
                extra_groups=[],
                close_fds=True,
            )
        except OSError as exc:
            raise RelayChildFailed(self._spawn_failure(exc)) from None
        # Only now, after the exec under the relay uid succeeded, does the token leave us.
        document = {
            "config": child_config(self.config),
            "token": self.config.token.reveal(),
            "log_level": self.log_level,
            "parent": os.getpid(),
        }
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(document).encode() + b"\n")
            await asyncio.wait_for(proc.stdin.drain(), self.ready_timeout)
        except (OSError, TimeoutError):
            pass  # the child died or hangs: its answer (or its absence) says why
        finally:
            proc.stdin.close()
        del document
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), self.ready_timeout)
        except TimeoutError:
            await self._kill()
            raise RelayChildFailed(
                f"the relay process did not report within {self.ready_timeout:g}s"
            ) from None
        answer = _parse_answer(line)
        if answer.get("status") != "ready" or not isinstance(answer.get("proxy_url"), str):
            await self._kill()
            field, problem = answer.get("field"), answer.get("problem")
            if isinstance(field, str) and isinstance(problem, str):
                # A setting start accepted that the relay user cannot use (a CA file only
                # root can read): a configuration error, named as the user set it.
                raise ConfigError(field, f"{problem}, for the relay user {self._who()}")
            reason = answer.get("reason") or f"exit status {proc.returncode}"
            raise RelayChildFailed(f"the relay process failed: {reason}")
        self._proxy_url = answer["proxy_url"]
        self.ended = asyncio.ensure_future(proc.wait())
        log.info(
            "relay runs as %s (uid %d, gid %d), pid %d",
            self.user.name,
            self.user.uid,
            self.user.gid,
            proc.pid,
        )

    def _who(self) -> str:
        return f"{self.user.name} (uid {self.user.uid}, gid {self.user.gid})"

    def _spawn_failure(self, exc: OSError) -> str:
        who = self._who()
        if exc.filename == sys.executable and isinstance(exc, PermissionError):  # execve refused
            return (
                f"the relay user {who} cannot run {sys.executable}: {exc.strerror}; install "
                "Python and upstreamproxy where other users can read them (not under a private "
                "home directory such as /root), or pass --relay-user root to run the relay in "
                "start itself"
            )
        # setgroups/setresgid/setresuid refused: EINVAL for a uid not mapped in this user
        # namespace, EPERM without CAP_SETUID/CAP_SETGID (or setgroups denied in a userns).
        return (
            f"cannot start the relay process as {who}: {exc.strerror or exc}; in a user "
            "namespace the relay's uid and gid must be mapped and setgroups allowed "
            "(--relay-uid picks another uid), or pass --relay-user root"
        )

    async def stop(self, grace: float = 10.0) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            await self._kill()

    async def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)


def _parse_answer(line: bytes) -> dict[str, Any]:
    if not line:
        return {"status": "failed", "reason": "it exited without answering (see the log above)"}
    try:
        answer = json.loads(line)
    except ValueError:
        return {"status": "failed", "reason": "it answered something that is not JSON"}
    return answer if isinstance(answer, dict) else {"status": "failed", "reason": "bad answer"}
