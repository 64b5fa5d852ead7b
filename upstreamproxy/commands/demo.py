"""``upstreamproxy demo``: egress, origin, ``start`` and a real request, all on loopback."""

from __future__ import annotations

import argparse

HELP = "run the whole path on loopback, offline: egress, HTTPS origin, start, curl"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--serve",
        action="store_true",
        help="keep everything running until Ctrl-C and print commands to try from another shell",
    )


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo  # the egress and aiohttp are only needed here

    return run_demo(serve=args.serve)
