"""Helpers for CLI options that can also come from ``UPSTREAMPROXY_*`` environment variables."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def env_default(name: str, default: Any = None) -> Any:
    """The value of ``UPSTREAMPROXY_<NAME>`` if set, else ``default``."""
    return os.environ.get(f"UPSTREAMPROXY_{name}", default)


def add_option(
    parser: argparse._ActionsContainer,
    flag: str,
    env: str,
    help: str,
    default: Any = None,
    **kwargs: Any,
) -> None:
    """Add ``flag`` whose default is read from ``UPSTREAMPROXY_<env>``; help names the variable.

    An environment value stays a string until argparse converts it, which it does only for the
    subcommand actually run; a bad value is then reported naming both the flag and variable.
    """
    value = env_default(env, default)
    convert = kwargs.pop("type", None)
    if convert is not None:
        kwargs["type"] = _named_type(convert, flag, f"UPSTREAMPROXY_{env}")
    shown = _shown_default(default, help)
    parser.add_argument(
        flag, default=value, help=f"{help} ({shown}env UPSTREAMPROXY_{env})", **kwargs
    )


def _shown_default(default: Any, help: str) -> str:
    """``default: X; `` for the help text - unless there is none, or the text names it."""
    if default is None or default is False or "default" in help:
        return ""
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    text = ",".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
    return f"default: {text}; ".replace("%", "%%")  # (argparse %-formats help)


class _Invalid(ValueError):
    """A value that parsed but is out of bounds; its message is shown to the user."""


def port(text: str) -> int:
    """A TCP port, 0..65535: binding 70000 would silently listen on 70000 % 65536."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise _Invalid("a port must be 0..65535")
    return value


def _named_type(convert: Callable[[str], Any], flag: str, variable: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = convert(text)
            # "nan" passes every `<= 0` check and breaks deadline arithmetic; "inf" never fires.
            if isinstance(value, float) and not math.isfinite(value):
                raise _Invalid("not a finite number")
            return value
        except (TypeError, ValueError) as exc:
            why = f": {exc}" if isinstance(exc, _Invalid) else ""
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r} (from {flag} or {variable}){why}"
            ) from None

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``UPSTREAMPROXY_<name>`` (in ``environ``, default the process's) is set true."""
    value = (os.environ if environ is None else environ).get(f"UPSTREAMPROXY_{name}", "")
    return value.lower() in ("1", "true", "yes", "on")


def add_switch(parser: argparse._ActionsContainer, flag: str, env: str, help: str) -> None:
    """A ``store_true`` flag that ``UPSTREAMPROXY_<env>=1`` also sets."""
    parser.add_argument(
        flag,
        action="store_true",
        default=env_flag(env),
        help=f"{help} (env UPSTREAMPROXY_{env}=1)",
    )


def add_splice_option(parser: argparse._ActionsContainer) -> None:
    """``--no-splice``: the relay and the egress move download bytes through user space."""
    add_switch(
        parser,
        "--no-splice",
        "NO_SPLICE",
        "never splice(2) download bytes between sockets; read and write them instead",
    )


def add_reuse_option(parser: argparse._ActionsContainer) -> None:
    """``--no-reuse``: one WebSocket per tunnel, as CCR does (no tunnel reuse, SPEC §11)."""
    add_switch(
        parser,
        "--no-reuse",
        "NO_REUSE",
        "never reuse a WebSocket for a second tunnel: one per CONNECT, closed after it",
    )


class _AppendReplacingDefault(argparse.Action):
    """``append`` whose first use on the command line replaces the (environment) default."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        seen = f"_{self.dest}_from_cli"
        current = getattr(namespace, self.dest, None) if getattr(namespace, seen, False) else None
        setattr(namespace, self.dest, [*(current or []), values])
        setattr(namespace, seen, True)


def add_list_option(
    parser: argparse._ActionsContainer, flag: str, env: str, help: str, metavar: str
) -> None:
    """A repeatable flag; ``UPSTREAMPROXY_<env>`` (comma-separated) applies when it is absent."""
    raw = env_default(env)
    default = [v.strip() for v in raw.split(",") if v.strip()] if raw else None
    parser.add_argument(
        flag,
        action=_AppendReplacingDefault,
        metavar=metavar,
        default=default,
        help=f"{help}; repeatable (env UPSTREAMPROXY_{env}, comma-separated)",
    )


def add_state_dir_option(parser: argparse._ActionsContainer, purpose: str) -> None:
    """``--state-dir``, shared by every command that finds or creates a session's files."""
    add_option(
        parser,
        "--state-dir",
        "STATE_DIR",
        f"{purpose} (default: $XDG_RUNTIME_DIR/upstreamproxy, else ~/.cache/upstreamproxy)",
        type=Path,
    )
