"""``upstreamproxy env``: print the running session's environment for tools."""

from __future__ import annotations

import argparse
import json
import sys

from ..bootstrap.proxy_env import render_dotenv, render_sh
from ..bootstrap.state import NoSession, default_state_dir, load_session
from ..options import add_state_dir_option

HELP = "print the running session's environment (sh, dotenv or json)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=("sh", "dotenv", "json"),
        default="sh",
        help="sh: export lines to eval or source (default); dotenv: NAME=value "
        "lines; json: env.json as written by start",
    )
    add_state_dir_option(parser, "state directory of the session")


def run(args: argparse.Namespace) -> int:
    try:
        loaded = load_session(args.state_dir or default_state_dir())
    except NoSession as exc:
        print(f"upstreamproxy env: {exc.reason}", file=sys.stderr)
        return 1
    if args.format == "json":
        # The document that was checked, not the file read again (by then another start's,
        # or, in a directory whose parent others can write, anyone's).
        print(json.dumps(loaded.document, indent=2))
        return 0
    try:  # a damaged env.json (a NUL in a value, a bad name) is refused in one line
        text = render_dotenv(loaded.plan) if args.format == "dotenv" else render_sh(loaded.plan)
    except ValueError as exc:
        print(f"upstreamproxy env: {exc}", file=sys.stderr)
        return 1
    print(text, end="")  # (print: a closed stdout is no traceback)
    return 0
