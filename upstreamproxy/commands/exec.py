"""``upstreamproxy exec -- CMD ARGS...``: run a command with the session's environment.

The environment is the caller's, with the proxy plan recomputed against it (so the caller's
own NO_PROXY entries and CA files are merged, as ``start`` did with its own), minus any
variable that names or carries the session token. The command replaces this process
(``execvpe``), so its exit status is the status of ``exec``.

Exit status of ``exec`` itself, as for env(1): 125 when it cannot run the command under
``--fail-closed`` (no session), 126 when the command is not executable, 127 when it is not
found. Without ``--fail-closed`` a missing session is a warning and the command runs without
the proxy (fail-open, like ``start``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..bootstrap.proxy_env import Action
from ..bootstrap.state import (
    NoSession,
    child_environment,
    default_state_dir,
    load_session,
    session_env,
)
from ..errors import ConfigError
from ..options import add_state_dir_option, env_flag

HELP = "run a command with the running session's proxy environment"

log = logging.getLogger("upstreamproxy.exec")

EXIT_CANNOT_RUN = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


def configure(parser: argparse.ArgumentParser) -> None:
    add_state_dir_option(parser, "state directory of the session")
    parser.add_argument(
        "--fail-closed",
        action="store_true",
        default=env_flag("FAIL_CLOSED"),
        help="refuse to run the command when no session is running "
        "(env UPSTREAMPROXY_FAIL_CLOSED=1)",
    )
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]", help="the command to run"
    )


def build_environment(state_dir: Path, fail_closed: bool) -> dict[str, str] | None:
    """The command's environment, or None when it must not run (fail-closed)."""
    try:
        loaded = load_session(state_dir)
    except NoSession as exc:
        if fail_closed:
            log.error("%s; not running the command (--fail-closed)", exc.reason)
            return None
        log.warning("%s; running the command without the proxy", exc.reason)
        return child_environment(os.environ)
    try:
        plan, env = session_env(loaded, os.environ)
    except ConfigError as exc:
        log.error("the session's environment is unusable: %s", exc)
        return None if fail_closed else child_environment(os.environ)
    for var in plan.variables:
        if var.action is Action.REPLACED:
            log.warning("%s: %s", var.name, var.reason)
    return env


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print(
            "upstreamproxy exec: no command given; usage: upstreamproxy exec -- CMD [ARGS...]",
            file=sys.stderr,
        )
        return 2
    env = build_environment(args.state_dir or default_state_dir(), args.fail_closed)
    if env is None:
        return EXIT_CANNOT_RUN
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(command[0], command, env)  # noqa: S606 (running CMD is the point)
    except FileNotFoundError:
        print(f"upstreamproxy exec: {command[0]}: command not found", file=sys.stderr)
        return EXIT_NOT_FOUND
    except PermissionError:
        print(f"upstreamproxy exec: {command[0]}: permission denied", file=sys.stderr)
        return EXIT_NOT_EXECUTABLE
    except OSError as exc:
        print(f"upstreamproxy exec: {command[0]}: {exc.strerror}", file=sys.stderr)
        return EXIT_NOT_EXECUTABLE
    return EXIT_CANNOT_RUN  # not reached: execvpe replaced this process
