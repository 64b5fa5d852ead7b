"""``upstreamproxy unlock``: remove the network lock ``lock`` or ``start --lock`` installed."""

from __future__ import annotations

import argparse
import os
import sys

from ..bootstrap.netlock import TABLE, NetLockError, unlock

HELP = "root: remove the network lock (the nft table inet upstreamproxy)"


def configure(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("upstreamproxy unlock: must run as root", file=sys.stderr)
        return 1
    try:
        was = unlock()
    except NetLockError as exc:
        print(f"upstreamproxy unlock: {exc}", file=sys.stderr)
        return 1
    print(
        f"unlocked: table inet {TABLE} removed" if was else "not locked: nothing to remove",
        file=sys.stderr,
    )
    return 0
