"""Helpers for CLI options that can also come from ``UPSTREAMPROXY_*`` environment variables."""

from __future__ import annotations

import argparse
import os
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
    """Add ``flag`` whose default is read from ``UPSTREAMPROXY_<env>``; help names the variable."""
    value = env_default(env, default)
    if "type" in kwargs and value is not None and isinstance(value, str):
        value = kwargs["type"](value)
    parser.add_argument(flag, default=value, help=f"{help} (env UPSTREAMPROXY_{env})", **kwargs)


def env_flag(name: str) -> bool:
    return os.environ.get(f"UPSTREAMPROXY_{name}", "").lower() in ("1", "true", "yes", "on")


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
