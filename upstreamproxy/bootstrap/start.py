"""The session bootstrap (``upstreamproxy start``): the DESIGN.md steps, in order, with the policy.

Public API::

    class StartOptions                          # everything ``start`` needs; no token
    derive_ca_url(egress_url: str) -> str       # ws(s)://h/.../upstreamproxy/ws -> http(s)://h/.../ca-cert
    run_session(options, notify=None) -> int    # the whole thing; returns the exit status
    class Readiness                             # what ``notify`` receives, once

Order (each step's module documents the step itself):

0. make the process non-dumpable, with core dumps off (:mod:`.hardening`). This is done
   *before* the token is read, one step earlier than DESIGN.md's list, so the token is never
   in the memory of a dumpable process; it cannot fail in a way that loses anything;
1. the state directory and its lock (one ``start`` per state directory; a second one reports
   the running session instead of starting another, and deletes its own unused token file);
2. refuse if a tracer is attached, then read the token (:mod:`.token_file`); none means
   "proxy disabled";
3. the relay user (:mod:`.privsep`): as root, the relay runs as a dedicated unprivileged user
   (``--relay-user``, default ``upstreamproxy``, created if missing); otherwise in-process;
4. the CA super bundle (:mod:`.ca_bundle`), with the user's own CA files merged in;
4b. with ``lock``, the network lock (:mod:`.netlock`): only the relay's uid may leave; removed
   again when ``start`` stops or fails;
4c. start the relay on loopback: in this process, or as the relay user's process, which gets
   the token over a pipe only after it dropped privileges and hardened itself;
5. write env.sh / env.json / start.pid atomically (:mod:`.state`);
6. delete the token file, now that the relay listens and nothing else can fail;
7. report readiness (``notify`` and one line on stdout), serve until SIGTERM/SIGINT/SIGHUP,
   then stop the relay (closing every tunnel) and remove the env files.

Steps 5 and 6 are in this order so that a failure to write the environment still leaves the
token for a retry; a failure to delete the token (a read-only secret mount) is a warning,
never fatal, since the relay already works.

Failure policy: with ``fail_closed`` False (the default), any failure ends ``start`` with
exit status 0 and exactly one WARNING line that says why and that the token file was left
for a retry: the session continues without the proxy. With ``fail_closed`` True the same
line is an ERROR and the exit status is 1. Incomplete hardening is a WARNING under the
default policy (the relay still runs) and a failure under ``fail_closed``.

The token is never logged, never put in the environment or argv, and never written anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import importlib.util
import logging
import os
import signal
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, Literal

from ..cli import discard_stdout
from ..errors import ConfigError, UpstreamProxyError
from ..relay import Relay, RelayConfig, egress_tls_context, tuning_from_env
from ..secret import Secret
from .ca_bundle import prepare_ca_bundle, redact_url
from .hardening import HardeningError, make_non_dumpable, ptrace_scope, refuse_if_traced
from .netlock import LockSpec, NetLockError, lock, spec_for, unlock
from .privsep import RelayChildFailed, RelayUser, SeparateRelay, resolve_relay_user
from .proxy_env import proxy_environment, single_label_names, user_ca_files
from .state import (
    LoadedSession,
    NoSession,
    SessionInfo,
    StatePaths,
    load_session,
    prepare_state_dir,
    remove_session_files,
    remove_stale_session,
    shared_session,
    write_session,
)
from .token_file import delete_token_file, read_token
from .tool_files import write_tool_files

log = logging.getLogger("upstreamproxy.start")

CA_CERT_PATH: Final = "/v1/code/upstreamproxy/ca-cert"
READY_PREFIX: Final = "upstreamproxy ready: source "

Status = Literal["ready", "disabled", "failed"]


@dataclass(frozen=True)
class StartOptions:
    token_file: Path | None
    session_id: str | None
    egress_url: str | None
    state_dir: Path
    ca_url: str | None = None
    ca_file: Path | None = None
    ca_timeout: float = 5.0
    no_proxy: tuple[str, ...] = ()
    port: int = 0
    egress_ca_file: str | None = None
    fail_closed: bool = False
    #: Outbound proxy the relay uses to reach the egress (``relay --egress-proxy``).
    egress_proxy: str | None = None
    #: Export HTTP_PROXY (the relay forwards plain HTTP); False: CCR's exact environment.
    plain_http: bool = True
    #: Where the single-label names that keep their direct route are read from.
    hosts_file: Path = Path("/etc/hosts")
    #: How long to wait for another ``start`` holding the state directory to become ready.
    wait_for_other: float = 30.0
    #: The relay's user when ``start`` runs as root (None: the default, see privsep).
    relay_user: str | None = None
    relay_uid: int | None = None
    #: Install the network lock (root only) and remove it when ``start`` stops.
    lock: bool = False
    lock_allow_to: tuple[str, ...] = ()
    lock_allow_dns: bool = False
    #: How a ConfigError reads in the failure line: the CLI names the flag or variable the
    #: user set (``cli.as_flag``); the default names the setting (``pool_size: ...``).
    describe_error: Callable[[ConfigError], str] = field(default=str, repr=False, compare=False)


@dataclass(frozen=True)
class Readiness:
    """The outcome of a start, as reported to ``notify`` (and over the --background pipe)."""

    status: Status
    exit_code: int
    message: str
    env_file: str | None = None
    proxy_url: str | None = None
    pid: int = field(default_factory=os.getpid)
    #: Things the caller must also see on stderr (e.g. an unused token file deleted).
    notes: tuple[str, ...] = ()
    #: True only from the process that goes on serving the session: ``start --background``
    #: waits for (and so reaps) every other daemon, which exits right after reporting.
    serving: bool = False


Notify = Callable[[Readiness], None]


class _Failure(Exception):
    """A bootstrap step failed; ``reason`` is safe to log (it never holds the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def derive_ca_url(egress_url: str) -> str:
    """The egress's ca-cert endpoint: same host, ``ws`` -> ``http``, ``wss`` -> ``https``.

    An egress URL ending in ``.../upstreamproxy/ws`` keeps its prefix (a fronting proxy may
    mount the egress under one); any other path maps to the standard endpoint at the root.
    """
    parts = urllib.parse.urlsplit(egress_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme)
    if scheme is None:
        raise ConfigError("egress_url", "must start with ws:// or wss://")
    netloc = parts.netloc.rpartition("@")[2]
    path = parts.path
    path = path[: -len("ws")] + "ca-cert" if path.endswith("/upstreamproxy/ws") else CA_CERT_PATH
    return urllib.parse.urlunsplit((scheme, netloc, path, "", ""))


# ---------------------------------------------------------------------------------------------


def run_session(options: StartOptions, notify: Notify | None = None) -> int:
    """Run ``start`` in this process; returns the exit status. See the module docstring."""
    hardening = make_non_dumpable()
    try:
        paths = prepare_state_dir(options.state_dir)
        lock = _lock_state_dir(paths)
    except ConfigError as exc:
        shared = shared_session(options.state_dir)
        if shared is not None:  # e.g. a user's own hook in a container root started
            return _report_shared(shared, notify)
        return _give_up(options, _reason(options, exc), notify)
    if lock is None:
        waited = _report_other(options, paths, notify)
        if not isinstance(waited, _Lock):
            return waited
        lock = waited.fd  # the other start ended without a session: this one goes on
    try:
        stale = remove_stale_session(paths)  # what a killed session left: we hold the lock
        if stale:
            log.info("%s", stale)
        return _run_locked(options, paths, hardening.ok, hardening.describe(), notify)
    finally:
        os.close(lock)


def _report_shared(loaded: LoadedSession, notify: Notify | None) -> int:
    """Root's live session in a directory this user cannot run one in: report it for use.

    E.g. a user's own start-up hook in a dev container whose entrypoint started the session as
    root in the Dev Container Feature's ``/run/upstreamproxy`` (see ``state.shared_session``).
    """
    info = loaded.info
    message = (
        f"a session started by root is already running in {info.state_dir} "
        f"(pid {info.pid}, relay {info.proxy_url})"
    )
    log.info("%s", message)
    _announce(Readiness("ready", 0, message, info.env_file, info.proxy_url, info.pid), notify)
    _print_ready(info.env_file)
    return 0


def _lock_state_dir(paths: StatePaths) -> int | None:
    """An fd holding an exclusive flock on ``start.lock``, or None if another start holds it.

    The lock lives as long as the serving process, so "held" means "a session is running or
    starting here". It is released by the kernel however the process ends.
    """
    path = paths.directory / "start.lock"
    try:
        # 0600: nobody else needs it, and anyone who can open it could hold it and so keep
        # every later start waiting.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)
    except OSError as exc:
        raise ConfigError("state_dir", f"cannot open {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@dataclass(frozen=True)
class _Lock:
    fd: int


def _report_other(options: StartOptions, paths: StatePaths, notify: Notify | None) -> int | _Lock:
    """Another ``start`` holds the state directory: report its session once it is ready,
    or take the lock (returned) if that start ends without one (it failed, or was stopped)."""
    deadline = time.monotonic() + options.wait_for_other
    reason = "another upstreamproxy start holds it"
    lock: int | None = None
    while True:
        try:
            loaded = load_session(paths.directory)
        except NoSession as exc:
            reason = exc.reason
            with contextlib.suppress(ConfigError):  # (then wait on, as for a held lock)
                lock = _lock_state_dir(paths)
            if lock is not None:
                log.info("the other start in %s ended without a session", paths.directory)
                return _Lock(lock)
        else:
            message = (
                f"a session is already running in {paths.directory} "
                f"(pid {loaded.info.pid}, relay {loaded.info.proxy_url})"
            )
            log.info("%s", message)
            notes = _discard_unused_token(options)
            _announce(
                Readiness(
                    "ready",
                    0,
                    message,
                    loaded.info.env_file,
                    loaded.info.proxy_url,
                    loaded.info.pid,
                    notes=notes,
                ),
                notify,
            )
            _print_ready(loaded.info.env_file)
            return 0
        if time.monotonic() >= deadline:
            return _give_up(
                options,
                f"state directory {paths.directory} is locked by another "
                f"upstreamproxy start that did not become ready: {reason}",
                notify,
            )
        time.sleep(0.1)


def _discard_unused_token(options: StartOptions) -> tuple[str, ...]:
    """A second ``start`` on a running session does not use its token: delete it, and say so.

    Left on disk it would be a live credential nobody holds responsible for. The note goes to
    the log and, through :class:`Readiness`, to the caller's stderr.
    """
    if not options.token_file:
        return ()
    path = options.token_file
    try:
        deleted = delete_token_file(path)
    except OSError as exc:
        note = (
            f"the token file {path} was not used (a session is already running) and could "
            f"not be deleted ({exc.strerror or exc}): delete it yourself"
        )
        log.warning("%s", note)
        return (note,)
    if not deleted:
        return ()
    note = f"the token file {path} was not used (a session is already running) and was deleted"
    log.warning("%s", note)
    return (note,)


def _run_locked(
    options: StartOptions, paths: StatePaths, hardened: bool, hardening: str, notify: Notify | None
) -> int:
    if not options.token_file:
        return _disabled(
            options, "no token file configured (--token-file or UPSTREAMPROXY_TOKEN_FILE)", notify
        )
    try:
        refuse_if_traced()
        token_file = read_token(options.token_file)
    except (ConfigError, HardeningError) as exc:
        return _give_up(options, _reason(options, exc), notify)
    for warning in token_file.warnings:
        log.warning("%s", warning)
    if token_file.token is None:
        return _disabled(options, token_file.reason or "no token", notify)

    if hardened:
        log.info("process hardened: %s", hardening)
    elif options.fail_closed:
        return _give_up(options, f"process hardening incomplete: {hardening}", notify)
    else:
        log.warning(
            "process hardening incomplete, continuing (--fail-closed would refuse): %s", hardening
        )

    try:
        config = _relay_config(options, token_file.token)
        # The lock's destinations first: one that does not resolve must not leave a new
        # system user behind.
        lock_spec = _lock_spec(options)
        user = resolve_relay_user(options.relay_user, options.relay_uid)
        if user is None and os.geteuid() != 0:
            _warn_same_uid()
        if user is not None and token_file.owner_uid not in (0, user.uid):
            log.warning(
                "the token file %s belongs to uid %s, who could read it before start deleted "
                "it; for the hardened deployment make it root's, mode 0600",
                options.token_file,
                token_file.owner_uid,
            )
        bundle, merged = _prepare_bundle(options, paths)
        with _network_lock(lock_spec, user):
            return asyncio.run(_serve(options, paths, config, user, bundle, merged, notify))
    except _Failure as exc:
        return _give_up(options, exc.reason, notify)
    except UpstreamProxyError as exc:  # ConfigError and friends from any step
        return _give_up(options, _reason(options, exc), notify)
    except Exception as exc:  # a bug must not break the session either (fail-open)
        log.debug("unexpected error in start", exc_info=True)
        return _give_up(options, f"unexpected {type(exc).__name__}: {exc}", notify)


def _relay_config(options: StartOptions, token: Secret) -> RelayConfig:
    if not options.egress_url:
        raise ConfigError("egress_url", "required (--egress-url or UPSTREAMPROXY_EGRESS_URL)")
    if not options.session_id:
        raise ConfigError("session_id", "required (--session-id or UPSTREAMPROXY_SESSION_ID)")
    config = RelayConfig(
        egress_url=options.egress_url,
        session_id=options.session_id,
        token=token,
        listen_host="127.0.0.1",
        listen_port=options.port,
        egress_ca_file=options.egress_ca_file,
        egress_proxy=_check_egress_proxy(options.egress_proxy),
        **tuning_from_env(os.environ),
    )
    config.validate()  # a CA file that cannot be used is an error, used or not
    if config.egress_ca_file and not config.egress_url.startswith("wss://"):
        if not (options.ca_url or "").startswith("https://"):
            log.warning(
                "--egress-ca-file %s is not used: the egress URL is ws://, without TLS, and "
                "the CA is not fetched over https://",
                config.egress_ca_file,
            )
        # Nor by the relay, whose user (as root) may not even be able to read it.
        config = replace(config, egress_ca_file=None)
    return config


def _warn_same_uid() -> None:
    """Started as the sandbox's own user: say what remains open, and what would close it."""
    scope = ptrace_scope()
    if scope is not None and scope >= 1:
        log.info("relay runs as uid %d; Yama ptrace_scope=%d", os.geteuid(), scope)
        return
    log.warning(
        "the relay runs as uid %d, like the sandbox's tools, and %s: a process of that uid "
        "that attached during start-up could read the token; run start as root (the relay "
        "then gets its own user) or set kernel.yama.ptrace_scope=1",
        os.geteuid(),
        "Yama is absent" if scope is None else "Yama ptrace_scope=0",
    )


def _lock_spec(options: StartOptions) -> LockSpec | None:
    """With ``options.lock``: the lock's destinations, resolved now (its uid is set later)."""
    if not options.lock:
        return None
    if os.geteuid() != 0:
        raise _Failure("--lock needs start to run as root")
    assert options.egress_url is not None
    try:
        return spec_for(
            os.geteuid(),
            options.egress_url,
            options.egress_proxy,
            options.lock_allow_to,
            options.lock_allow_dns,
        )
    except NetLockError as exc:
        raise _Failure(str(exc)) from None


@contextlib.contextmanager
def _network_lock(destinations: LockSpec | None, user: RelayUser | None) -> Iterator[None]:
    """With a lock spec: only the relay's uid may leave while ``start`` runs."""
    if destinations is None:
        yield
        return
    uid = user.uid if user is not None else os.geteuid()
    if user is None:
        log.warning("network lock: the relay runs as root, so every root process may leave")
    spec = dataclasses.replace(destinations, relay_uid=uid)
    try:
        lock(spec)
    except NetLockError as exc:
        raise _Failure(str(exc)) from None
    log.info(
        "network lock installed: only uid %d may leave, to %s",
        uid,
        ", ".join(str(d) for d in spec.destinations),
    )
    try:
        yield
    finally:
        try:
            unlock()
        except NetLockError as exc:
            log.warning("%s", exc)
        else:
            log.info("network lock removed")


def _check_egress_proxy(url: str | None) -> str | None:
    if not url:
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https", "socks5", "socks5h", "socks4", "socks4a"):
        raise ConfigError("egress_proxy", "must be an http://, https:// or socks5:// URL")
    if not parts.hostname:
        raise ConfigError("egress_proxy", "needs a host")
    if parts.scheme.startswith("socks") and importlib.util.find_spec("python_socks") is None:
        # websockets opens SOCKS connections with python-socks; without it every tunnel
        # would fail, so fail here, once, with the fix.
        raise ConfigError(
            "egress_proxy", "a socks proxy needs python-socks: pip install 'python-socks[asyncio]'"
        )
    return url


def _prepare_bundle(options: StartOptions, paths: StatePaths) -> tuple[Path, tuple[str, ...]]:
    """Build the super bundle; returns its path and the CA files whose certificates it holds
    (the user's extra bundles, then the system bundle)."""
    assert options.egress_url is not None
    ca_url = options.ca_url
    if ca_url is None and options.ca_file is None:
        ca_url = derive_ca_url(options.egress_url)
    context = None
    if ca_url is not None and ca_url.startswith("https://") and options.egress_ca_file:
        context = egress_tls_context(options.egress_ca_file)  # ConfigError if unusable
    report = prepare_ca_bundle(
        paths.bundle,
        ca_url=ca_url,
        ca_file=options.ca_file,
        timeout=options.ca_timeout,
        extra_bundles=user_ca_files(os.environ, exclude=paths.bundle),
        ssl_context=context,
        # The CA endpoint is on the egress: reach it the way the relay does.
        proxy=options.egress_proxy if (options.egress_proxy or "").startswith("http") else None,
    )
    for warning in report.warnings:
        log.warning("CA bundle: %s", warning)
    log.info("CA bundle: %s", report.describe())
    # The system roots are in the bundle too: a caller of `exec` whose SSL_CERT_FILE names the
    # system bundle loses nothing, so it is "merged", not "replaced" with a warning.
    return paths.bundle, tuple(dict.fromkeys((*report.extra_sources, report.system_source)))


async def _serve(
    options: StartOptions,
    paths: StatePaths,
    config: RelayConfig,
    user: RelayUser | None,
    bundle: Path,
    merged: tuple[str, ...],
    notify: Notify | None,
) -> int:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def _stop(signum: int) -> None:
        if not stop.done():
            stop.set_result(signum)

    # Installed before readiness is announced, so a supervisor's SIGTERM right after it
    # still goes through the orderly shutdown below.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, _stop, signum)

    relay: Relay | SeparateRelay
    if user is None:
        relay = Relay(config)  # (ConfigError if the CA file went since _relay_config)
    else:
        relay = SeparateRelay(config, user, log_level=logging.getLogger().getEffectiveLevel())
    try:
        await relay.start()
    except OSError as exc:
        raise _Failure(
            f"relay cannot listen on 127.0.0.1:{options.port}: {exc.strerror or exc}"
        ) from None
    except RelayChildFailed as exc:
        raise _Failure(exc.reason) from None
    pid = os.getpid()
    status = 0
    try:
        if stop.done():
            # Stopped while the relay was starting: not a session, so neither readiness nor
            # a deleted token (the supervisor may retry with it).
            raise _Failure(
                f"received {signal.Signals(stop.result()).name} before the session was ready"
            )
        tool_files, problems = write_tool_files(paths.directory, bundle, os.environ)
        for problem in problems:
            log.warning("tool files: %s", problem)
        no_proxy = (*_hosts_names(options.hosts_file), *options.no_proxy)
        plan = proxy_environment(
            relay.proxy_url,
            bundle,
            no_proxy,
            base_env=os.environ,
            merged_ca_files=merged,
            plain_http=options.plain_http,
            tool_files=tool_files,
        )
        info = SessionInfo(
            pid=pid,
            proxy_url=relay.proxy_url,
            ca_bundle=str(bundle),
            state_dir=str(paths.directory),
            env_file=str(paths.env_sh),
            session_id=config.session_id,
            egress_url=redact_url(config.egress_url),
            no_proxy_extra=no_proxy,
            merged_ca_files=merged,
            plain_http=options.plain_http,
            wgetrc=_str(tool_files.wgetrc),
            apt_config=_str(tool_files.apt_config),
            java_truststore=_str(tool_files.java_truststore),
            wget2rc=_str(tool_files.wget2rc),
        )
        for var in plan.variables:
            if var.action.value != "set":
                log.info("env: %s %s: %s", var.name, var.action.value, var.reason)
        for note in plan.notes:
            log.warning("env: %s", note)
        try:
            write_session(paths, info, plan)
        except (OSError, ValueError) as exc:
            raise _Failure(
                f"cannot write the environment files in {paths.directory}: "
                f"{getattr(exc, 'strerror', None) or exc}"
            ) from None
    except BaseException:
        remove_session_files(paths, pid)
        await relay.stop()
        raise

    try:
        _delete_token(options)
        message = f"relay {relay.proxy_url} -> {info.egress_url}, environment in {paths.env_sh}"
        _announce(
            Readiness("ready", 0, message, str(paths.env_sh), relay.proxy_url, pid, serving=True),
            notify,
        )
        _print_ready(str(paths.env_sh))
        ended = relay.ended if isinstance(relay, SeparateRelay) else None
        waiting = [f for f in (stop, ended) if f is not None]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if stop.done():
            log.info("received %s, stopping", signal.Signals(stop.result()).name)
        else:
            assert ended is not None
            log.error("the relay process exited (status %s); stopping", ended.result())
            status = 1
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        remove_session_files(paths, pid)
        await relay.stop()
    return status


def _str(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def _hosts_names(path: Path) -> list[str]:
    try:
        return single_label_names(path.read_text(errors="replace")[:1_000_000])
    except OSError:
        return []


def _delete_token(options: StartOptions) -> None:
    assert options.token_file is not None
    try:
        deleted = delete_token_file(options.token_file)
    except OSError as exc:
        log.warning(
            "could not delete the token file %s (%s); the relay runs anyway, but the "
            "token stays on disk",
            options.token_file,
            exc.strerror or exc,
        )
        return
    if deleted:
        log.info("token file %s deleted", options.token_file)


def _print_ready(env_file: str) -> None:
    """The ready line on stdout. A reader that has gone (a closed pipe) must not stop the
    session: the token file is already deleted by then, so a retry could not start another."""
    try:
        print(f"{READY_PREFIX}{env_file}", flush=True)
    except OSError:
        discard_stdout()


def _announce(readiness: Readiness, notify: Notify | None) -> None:
    if readiness.status == "ready":
        log.info("ready (pid %d): %s", readiness.pid, readiness.message)
    if notify is not None:
        with contextlib.suppress(Exception):  # a vanished parent must not stop the relay
            notify(readiness)


def _disabled(options: StartOptions, reason: str, notify: Notify | None) -> int:
    if options.fail_closed:
        message = f"proxy disabled, refusing to continue (--fail-closed): {reason}"
        log.error("%s", message)
        _announce(Readiness("disabled", 1, message), notify)
        return 1
    message = f"proxy disabled, the session continues without it: {reason}"
    log.warning("%s", message)
    _announce(Readiness("disabled", 0, message), notify)
    return 0


def _reason(options: StartOptions, exc: Exception) -> str:
    """Why a step failed, a configuration error naming what the user set."""
    return options.describe_error(exc) if isinstance(exc, ConfigError) else str(exc)


def _give_up(options: StartOptions, reason: str, notify: Notify | None) -> int:
    """The one line a failed start logs, per the failure policy."""
    kept = (
        f"; the token file {options.token_file} was left in place for a retry"
        if options.token_file and Path(options.token_file).exists()
        else ""
    )
    if options.fail_closed:
        message = f"start failed (--fail-closed): {reason}{kept}"
        log.error("%s", message)
        _announce(Readiness("failed", 1, message), notify)
        return 1
    message = (
        f"proxy disabled, the session continues without it: {reason}{kept} "
        "(--fail-closed would make this fatal)"
    )
    log.warning("%s", message)
    _announce(Readiness("failed", 0, message), notify)
    return 0
