"""``upstreamproxy lock``: only the relay's uid may leave the sandbox (nftables, root only)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from ..bootstrap.netlock import NetLockError, lock, render_ruleset, spec_for
from ..bootstrap.privsep import DEFAULT_RELAY_USER, resolve_relay_user
from ..errors import ConfigError
from ..options import add_list_option, add_option, env_flag

HELP = "root: let only the relay's uid reach the egress; reject every other outbound packet"


def add_relay_user_options(parser: argparse._ActionsContainer) -> None:
    """``--relay-user`` and ``--relay-uid``, shared by ``start`` and ``lock``."""
    add_option(
        parser,
        "--relay-user",
        "RELAY_USER",
        "user the relay runs as when start runs as root; created (system user, no home, no "
        f"shell) if missing; a name or uid; 'root' runs it in start itself (default as root: "
        f"{DEFAULT_RELAY_USER}; otherwise the user running start)",
    )
    add_option(
        parser,
        "--relay-uid",
        "RELAY_UID",
        "uid to create the relay user with (must match if the user exists)",
        type=int,
    )


def add_lock_options(parser: argparse._ActionsContainer) -> None:
    """The destinations and DNS options, shared by ``start --lock`` and ``lock``."""
    add_list_option(
        parser,
        "--lock-allow-to",
        "LOCK_ALLOW_TO",
        "another HOST:PORT the relay's uid may reach through the lock",
        "HOST:PORT",
    )
    parser.add_argument(
        "--lock-allow-dns",
        action="store_true",
        default=env_flag("LOCK_ALLOW_DNS"),
        help="let every uid query the resolvers of /etc/resolv.conf through the lock "
        "(env UPSTREAMPROXY_LOCK_ALLOW_DNS=1)",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--egress-url", "EGRESS_URL", "egress WebSocket URL the relay uses")
    add_option(
        parser,
        "--egress-proxy",
        "EGRESS_PROXY",
        "outbound proxy the relay uses to reach the egress: the lock allows it instead",
    )
    add_relay_user_options(parser)
    add_lock_options(parser)
    parser.add_argument(
        "--print", action="store_true", help="print the nft rules instead of applying them"
    )


def relay_uid(args: argparse.Namespace) -> int:
    user = resolve_relay_user(args.relay_user, args.relay_uid, create=not args.print)
    return os.geteuid() if user is None else user.uid


def run(args: argparse.Namespace) -> int:
    if not args.egress_url:
        raise ConfigError("egress_url", "required (--egress-url or UPSTREAMPROXY_EGRESS_URL)")
    if os.geteuid() != 0 and not args.print:
        print("upstreamproxy lock: must run as root (an init step or start hook)", file=sys.stderr)
        return 1
    try:
        # Destinations first: one that does not resolve must not leave a new system user behind.
        spec = spec_for(
            os.geteuid(),
            args.egress_url,
            args.egress_proxy,
            tuple(args.lock_allow_to or ()),
            args.lock_allow_dns,
        )
        spec = dataclasses.replace(spec, relay_uid=relay_uid(args))
        if args.print:
            print(render_ruleset(spec), end="")
            return 0
        lock(spec)
    except NetLockError as exc:
        print(f"upstreamproxy lock: {exc}", file=sys.stderr)
        return 1
    allowed = ", ".join(str(d) for d in spec.destinations)
    print(f"locked: only uid {spec.relay_uid} may leave, to {allowed}", file=sys.stderr)
    return 0
