"""``upstreamproxy start``: the full session bootstrap (see upstreamproxy/bootstrap/start.py).

``--background`` is the daemon mode for shell hooks: the process forks, the child runs the
bootstrap (its log goes to ``<state-dir>/start.log``) and reports the outcome over a pipe;
the parent waits for that report, prints the env file path on stdout (nothing when the proxy
is disabled) and exits with the child's status. So ``f=$(upstreamproxy start --background)``
never hangs on the daemon's open stdout, and the hook can ``. "$f"``.

What the person who started it must know reaches the parent's stderr, not only start.log:
every WARNING the daemon logged before it reported (token file too open, token not deleted
from a read-only mount, incomplete hardening, CA problems, ...), one line each, then one
line with the outcome (ready, already running, or why the proxy is disabled).

No zombies, even under a PID 1 that never reaps (``sleep infinity`` as a container's
command): a daemon that does not go on serving (the proxy is disabled, the start failed, or a
session already runs) exits right after its report and the parent waits for it, so it is
reaped here. Only the daemon that serves the session outlives the parent; it is in its own
session (``setsid``), and what becomes of it when it ends is up to the container's init.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import NoReturn

from ..bootstrap.start import Readiness, StartOptions, run_session
from ..bootstrap.state import default_state_dir, prepare_state_dir
from ..cli import as_flag
from ..errors import ConfigError
from ..fdlimit import raise_nofile_limit
from ..options import add_list_option, add_option, add_state_dir_option, env_flag, port
from .lock import add_lock_options, add_relay_user_options

HELP = "bootstrap the sandbox: token, hardening, CA bundle, relay, environment for tools"

log = logging.getLogger("upstreamproxy.start")

#: How long ``--background`` waits for a daemon that reported and is exiting (to reap it).
REAP_WAIT = 10.0
MAX_REPORTED_WARNINGS = 20
MAX_WARNING_LENGTH = 1000


def configure(parser: argparse.ArgumentParser) -> None:
    add_option(
        parser,
        "--token-file",
        "TOKEN_FILE",
        "file holding the session token; deleted once the relay listens",
    )
    add_option(parser, "--session-id", "SESSION_ID", "session id sent in Proxy-Authorization")
    add_option(
        parser,
        "--egress-url",
        "EGRESS_URL",
        "egress WebSocket URL (ws:// or wss://), e.g. "
        "wss://egress.example/v1/code/upstreamproxy/ws",
    )
    add_option(
        parser,
        "--ca-url",
        "CA_URL",
        "URL of the egress CA certificate (default: derived from --egress-url, "
        "path /v1/code/upstreamproxy/ca-cert)",
    )
    add_option(
        parser,
        "--ca-file",
        "CA_FILE",
        "egress CA certificate file, or a pipe such as <(cat ca.pem), instead of fetching it",
        type=Path,
    )
    add_option(
        parser,
        "--ca-timeout",
        "CA_TIMEOUT",
        "seconds allowed to fetch the CA, or to read --ca-file when it is a pipe",
        default=5.0,
        type=float,
    )
    add_state_dir_option(parser, "directory for ca-bundle.pem, env.sh, env.json and the pid file")
    add_list_option(
        parser,
        "--no-proxy",
        "NO_PROXY",
        "extra NO_PROXY entry, added to the defaults and the user's own",
        "HOST",
    )
    add_option(
        parser, "--port", "PORT", "relay port on 127.0.0.1 (0: any free port)", default=0, type=port
    )
    add_option(
        parser,
        "--egress-ca-file",
        "EGRESS_CA_FILE",
        "PEM CA file to verify a wss:// egress and its https CA URL (default: system trust "
        "store); it must load even where neither uses it",
    )
    add_option(
        parser,
        "--egress-proxy",
        "EGRESS_PROXY",
        "outbound proxy the relay uses to reach the egress (http://, https:// or socks5://), "
        "e.g. a corporate proxy",
    )
    parser.add_argument(
        "--no-http-proxy",
        dest="plain_http",
        action="store_false",
        default=not env_flag("NO_HTTP_PROXY"),
        help="do not export HTTP_PROXY/http_proxy: plain http:// keeps its own route, as in "
        "CCR (env UPSTREAMPROXY_NO_HTTP_PROXY=1)",
    )
    parser.add_argument(
        "--fail-closed",
        action="store_true",
        default=env_flag("FAIL_CLOSED"),
        help="exit non-zero on any failure instead of continuing without the "
        "proxy (env UPSTREAMPROXY_FAIL_CLOSED=1)",
    )
    parser.add_argument(
        "--background",
        action="store_true",
        default=env_flag("BACKGROUND"),
        help="daemonize once ready; print the env file path and exit "
        "(env UPSTREAMPROXY_BACKGROUND=1)",
    )
    add_relay_user_options(parser)
    parser.add_argument(
        "--lock",
        action="store_true",
        default=env_flag("LOCK"),
        help="root: install the network lock (see `upstreamproxy lock`) while the session runs, "
        "removed when it stops (env UPSTREAMPROXY_LOCK=1)",
    )
    add_lock_options(parser)
    add_option(
        parser,
        "--ready-timeout",
        "READY_TIMEOUT",
        "with --background: seconds to wait for the daemon to be ready",
        default=30.0,
        type=float,
    )
    parser.error = _usage_error  # type: ignore[method-assign]


def _usage_error(message: str) -> NoReturn:
    """A bad flag or ``UPSTREAMPROXY_*`` value is a start failure like any other: fail open
    (exit 0, the session carries on without the proxy) unless --fail-closed was asked for."""
    fail_closed = env_flag("FAIL_CLOSED") or "--fail-closed" in sys.argv
    print(f"upstreamproxy start: {message}", file=sys.stderr)
    if fail_closed:
        sys.exit(2)
    print(
        "upstreamproxy start: continuing without the proxy (--fail-closed would make this fatal)",
        file=sys.stderr,
    )
    sys.exit(0)


def options_from_args(args: argparse.Namespace) -> StartOptions:
    return StartOptions(
        token_file=Path(args.token_file) if args.token_file else None,
        session_id=args.session_id,
        egress_url=args.egress_url,
        state_dir=args.state_dir or default_state_dir(),
        ca_url=args.ca_url,
        ca_file=args.ca_file,
        ca_timeout=args.ca_timeout,
        no_proxy=tuple(args.no_proxy or ()),
        port=args.port,
        egress_ca_file=args.egress_ca_file,
        fail_closed=args.fail_closed,
        relay_user=args.relay_user or None,
        relay_uid=args.relay_uid,
        lock=args.lock,
        lock_allow_to=tuple(args.lock_allow_to or ()),
        lock_allow_dns=args.lock_allow_dns,
        egress_proxy=args.egress_proxy,
        plain_http=args.plain_http,
        describe_error=lambda exc: as_flag(exc, args),
    )


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    if not args.background:
        raise_nofile_limit("start")
        return run_session(options)  # its log (with any notes) is on stderr already
    return _background(options, args.ready_timeout)


def _notes_to_stderr(readiness: Readiness) -> None:
    """What the caller must see even when the log goes elsewhere (e.g. an unused token)."""
    for note in readiness.notes:
        print(f"upstreamproxy start: {note}", file=sys.stderr, flush=True)


# -- daemon mode ---------------------------------------------------------------------------------


def _background(options: StartOptions, ready_timeout: float) -> int:
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        code = 1
        try:
            code = _daemon(options, write_fd)
        except BaseException:
            log.exception("the start daemon failed")
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(write_fd)
    try:
        with _interruptible():
            received = _wait_for_report(read_fd, ready_timeout)
    except _Interrupted as exc:
        # Whoever waits for the start gave up on it (Ctrl-C, a supervisor's SIGTERM): so
        # does the daemon, which is in a session of its own and got no signal. Stopped
        # before readiness, it keeps the token file for a retry.
        _stop_child(pid)
        log.error("start interrupted (%s): the daemon (pid %d) was stopped", exc.name, pid)
        return 128 + exc.signum
    finally:
        os.close(read_fd)
    if received is None:
        with_kill = _stop_child(pid)
        reason = (
            f"the daemon (pid {pid}) did not report readiness within {ready_timeout:g}s"
            if with_kill
            else f"the daemon (pid {pid}) exited without reporting"
        )
        return _parent_give_up(options, reason)
    report, warnings = received
    # The daemon already wrote these lines to its log; the caller must see them too.
    for warning in warnings:
        if warning != report.message and warning not in report.notes:
            log.warning("%s", warning)
    _notes_to_stderr(report)
    if report.serving:
        _reap_if_exited(pid)
    else:
        _reap_if_exited(pid, wait=REAP_WAIT)
    if report.status == "ready":
        log.info("ready: %s", report.message)
        print(report.env_file, flush=True)
        return 0
    level = logging.ERROR if report.exit_code else logging.WARNING
    log.log(level, "%s", report.message)
    return report.exit_code


def _daemon(options: StartOptions, write_fd: int) -> int:
    # Like any daemon: own session (no controlling terminal, no SIGHUP from it), and cwd "/"
    # so it holds no directory busy; so paths given relative to the caller's cwd go first.
    options = replace(
        options,
        token_file=options.token_file.absolute() if options.token_file else None,
        state_dir=options.state_dir.absolute(),
        ca_file=options.ca_file.absolute() if options.ca_file else None,
        egress_ca_file=os.path.abspath(options.egress_ca_file) if options.egress_ca_file else None,
    )
    os.setsid()
    os.chdir("/")
    _redirect_output(options.state_dir)
    raise_nofile_limit("start")  # logged to start.log: stderr gets warnings and the outcome
    warnings = _WarningCollector()
    logging.getLogger().addHandler(warnings)

    def notify(readiness: Readiness) -> None:
        logging.getLogger().removeHandler(warnings)  # later warnings: start.log only
        document = asdict(readiness)
        document["warnings"] = warnings.lines[:MAX_REPORTED_WARNINGS]
        os.write(write_fd, (json.dumps(document) + "\n").encode())
        os.close(write_fd)

    try:
        return run_session(options, notify)
    finally:
        logging.getLogger().removeHandler(warnings)


class _WarningCollector(logging.Handler):
    """Keeps the text of every WARNING-or-worse record, each flattened to one line."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = " ".join(record.getMessage().split())
        except Exception:  # a bad format string must not break the start
            return
        if len(self.lines) < MAX_REPORTED_WARNINGS:
            self.lines.append(text[:MAX_WARNING_LENGTH])


def _redirect_output(state_dir: Path) -> None:
    """stdin from /dev/null; stdout and stderr to ``<state-dir>/start.log`` (or /dev/null)."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    target = null
    try:
        # Only into a directory the session may use (the bootstrap refuses the others, but
        # this runs first), and never through a link: a root daemon would append to, or
        # create, whatever file the owner of the directory aimed start.log at.
        paths = prepare_state_dir(state_dir)
        target = os.open(
            paths.log_file,
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
        )
    except (OSError, ConfigError):
        pass
    os.dup2(target, 1)
    os.dup2(target, 2)
    if target != null:
        os.close(target)
    os.close(null)


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise :class:`_Interrupted` while the parent waits."""

    def interrupted(signum: int, _frame: object) -> None:
        raise _Interrupted(signum)

    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, interrupted) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _wait_for_report(fd: int, timeout: float) -> tuple[Readiness, list[str]] | None:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    if b"\n" not in data:
        return None
    try:
        document = json.loads(data.split(b"\n", 1)[0])
        warnings = [str(w) for w in document.pop("warnings", [])]
        document["notes"] = tuple(document.get("notes", ()))
        return Readiness(**document), warnings
    except (ValueError, TypeError, AttributeError):
        return None


def _reap_if_exited(pid: int, wait: float = 0.0) -> bool:
    """Reap ``pid`` if it has exited, waiting up to ``wait`` seconds; True once it is gone."""
    deadline = time.monotonic() + wait
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _stop_child(pid: int) -> bool:
    """Terminate (and reap) a daemon that never reported; True if it was still running."""
    if _reap_if_exited(pid):
        return False
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        if _reap_if_exited(pid, wait=REAP_WAIT):
            break
    return True


def _parent_give_up(options: StartOptions, reason: str) -> int:
    kept = (
        f"; the token file {options.token_file} was left in place for a retry"
        if options.token_file and options.token_file.exists()
        else ""
    )
    if options.fail_closed:
        log.error("start failed (--fail-closed): %s%s", reason, kept)
        return 1
    log.warning(
        "proxy disabled, the session continues without it: %s%s "
        "(--fail-closed would make this fatal)",
        reason,
        kept,
    )
    return 0
