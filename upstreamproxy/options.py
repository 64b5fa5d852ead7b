"""Helpers for CLI options that can also come from ``UPSTREAMPROXY_*`` environment variables."""

from __future__ import annotations

import argparse
import os
from typing import Any


def env_default(name: str, default: Any = None) -> Any:
    """The value of ``UPSTREAMPROXY_<NAME>`` if set, else ``default``."""
    return os.environ.get(f"UPSTREAMPROXY_{name}", default)


def add_option(parser: argparse._ActionsContainer, flag: str, env: str, help: str,
               default: Any = None, **kwargs: Any) -> None:
    """Add ``flag`` whose default is read from ``UPSTREAMPROXY_<env>``; help names the variable."""
    value = env_default(env, default)
    if "type" in kwargs and value is not None and isinstance(value, str):
        value = kwargs["type"](value)
    parser.add_argument(flag, default=value, help=f"{help} (env UPSTREAMPROXY_{env})", **kwargs)


def env_flag(name: str) -> bool:
    return os.environ.get(f"UPSTREAMPROXY_{name}", "").lower() in ("1", "true", "yes", "on")
