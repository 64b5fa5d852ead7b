"""The ``upstreamproxy`` console script: ``main(argv) -> int``, one module per subcommand.

Each subcommand lives in ``upstreamproxy/commands/<name>.py`` and defines ``HELP`` (one line),
``configure(parser)`` and ``run(args) -> int``. Modules are imported only when listed here,
so a subcommand's heavy imports never slow the others down.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Final

from . import __version__
from .errors import ConfigError

COMMANDS: Final = (
    "egress",
    "relay",
    "start",
    "exec",
    "env",
    "token",
    "ca",
    "doctor",
    "demo",
    "lock",
    "unlock",
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, that subcommand alone (see :func:`chosen_command`)."""
    parser = argparse.ArgumentParser(
        prog="upstreamproxy",
        description="Egress relay for sandboxes: local CONNECT relay -> WebSocket -> egress.",
    )
    parser.add_argument("--version", action="version", version=f"upstreamproxy {__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        help="DEBUG, INFO, WARNING or ERROR (env UPSTREAMPROXY_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS if only is None else (only,):
        try:
            module = importlib.import_module(f"upstreamproxy.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"upstreamproxy.commands.{name}":
                raise
            continue
        child = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(child)
        child.set_defaults(_run=module.run)
    return parser


def chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` runs, if that is certain before parsing; else None.

    The relay imports its own subcommand only: the egress's modules (aiohttp, cryptography,
    prometheus) would add about 27 MiB to the RSS of every relay, for nothing. Anything other
    than ``--log-level LEVEL`` before the command (``--help``, ``--version``, a typo) gets
    the full parser, so help and errors are unchanged.
    """
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--log-level":
            index += 2
        elif arg.startswith("--log-level="):
            index += 1
        else:
            return arg if arg in COMMANDS else None
    return None


def configure_logging(level: str | None) -> None:
    chosen = (level or os.environ.get("UPSTREAMPROXY_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, chosen, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


#: Commands that hold the session token: made non-dumpable before anything else is imported.
_HOLD_THE_TOKEN: Final = ("start", "relay")


def _harden_early(argv: Sequence[str]) -> None:
    """``start``/``relay``: PR_SET_DUMPABLE 0 now, before the parser imports every subcommand
    (aiohttp, cryptography, ...): that shrinks the window in which a same-uid process can
    attach from about a second to the interpreter's own start-up (THREAT_MODEL.md)."""
    if any(arg in _HOLD_THE_TOKEN for arg in argv):
        from .bootstrap.hardening import make_non_dumpable

        make_non_dumpable()  # the command hardens again and reports the outcome


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    _harden_early(arguments)
    parser = build_parser(chosen_command(arguments))
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        result: int = args._run(args)
        if sys.stdout is not None:
            sys.stdout.flush()  # a write error shows here, not as a traceback at exit
    except ConfigError as exc:
        print(f"upstreamproxy: invalid configuration: {as_flag(exc, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout's reader left (`upstreamproxy env | head -1`): end quietly, as SIGPIPE would.
        discard_stdout()
        return 128 + signal.SIGPIPE
    except OSError as exc:
        # A full disk or device under stdout, say: one line, never a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"upstreamproxy: {where}{exc.strerror or exc}", file=sys.stderr)
        discard_stdout()
        return 1
    return result


#: Settings whose flag is named otherwise (``RelayConfig.keepalive_interval``: ``--keepalive``).
_FLAG_OF_SETTING: Final = {"keepalive_interval": "keepalive", "listen_port": "port"}


def as_flag(exc: ConfigError, args: argparse.Namespace) -> str:
    """The error, naming what the user set rather than the setting's name in the code
    (``pool_size``): the command's flag (``--pool-size``) where it has one, else the
    ``UPSTREAMPROXY_*`` variable that alone sets it (``start``'s relay tuning)."""
    dest = _FLAG_OF_SETTING.get(exc.field, exc.field)
    if dest.isidentifier() and hasattr(args, dest):
        return f"--{dest.replace('_', '-')}: {exc.problem}"
    from .relay import TUNING_ENV  # (here: the relay's modules are not every command's)

    for name, (setting, _) in TUNING_ENV.items():
        if setting == exc.field:
            return f"UPSTREAMPROXY_{name}: {exc.problem}"
    return str(exc)


def discard_stdout() -> None:
    """Point fd 1 at /dev/null, so the interpreter's flush at exit cannot fail again (Python's
    advice for EPIPE); never raises."""
    if sys.stdout is None:
        return
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
