"""``upstreamproxy relay``: the local CONNECT listener only (no CA bundle, no environment).

It treats the token as ``start`` does: the process makes itself non-dumpable (core dumps off)
before anything else, refuses to read the token if a tracer is attached, reads it with the
bootstrap's reader (:mod:`..bootstrap.token_file`: size, mode, symlink and character checks)
and deletes the token file once the relay listens, unless ``--keep-token-file``. Incomplete
hardening is a warning, or fatal with ``--fail-closed``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from ..bootstrap.hardening import HardeningError, make_non_dumpable, refuse_if_traced
from ..bootstrap.token_file import delete_token_file, read_token
from ..errors import ConfigError
from ..fdlimit import raise_nofile_limit
from ..options import add_option, add_reuse_option, add_splice_option, env_flag, port
from ..relay import Relay, RelayConfig
from ..secret import Secret
from ..tunnel import pipe
from ._serving import serve

HELP = "run the local CONNECT relay that tunnels to the egress over WebSocket"

log = logging.getLogger("upstreamproxy.relay")


def configure(parser: argparse.ArgumentParser) -> None:
    add_option(
        parser,
        "--egress-url",
        "EGRESS_URL",
        "egress WebSocket URL, e.g. wss://egress.example/v1/code/upstreamproxy/ws",
    )
    add_option(parser, "--session-id", "SESSION_ID", "session id sent in Proxy-Authorization")
    add_option(
        parser,
        "--token-file",
        "TOKEN_FILE",
        "file holding the session token; deleted once the relay listens",
    )
    parser.add_argument(
        "--keep-token-file",
        action="store_true",
        default=env_flag("KEEP_TOKEN_FILE"),
        help="do not delete the token file (env UPSTREAMPROXY_KEEP_TOKEN_FILE=1)",
    )
    parser.add_argument(
        "--fail-closed",
        action="store_true",
        default=env_flag("FAIL_CLOSED"),
        help="refuse to run if the process cannot be made non-dumpable "
        "(env UPSTREAMPROXY_FAIL_CLOSED=1)",
    )
    add_option(parser, "--listen-host", "LISTEN_HOST", "address to listen on", default="127.0.0.1")
    add_option(
        parser, "--port", "PORT", "port to listen on (0: any free port)", default=0, type=port
    )
    parser.add_argument(
        "--allow-non-loopback",
        action="store_true",
        default=env_flag("ALLOW_NON_LOOPBACK"),
        help="allow listening on a non-loopback address (env UPSTREAMPROXY_ALLOW_NON_LOOPBACK)",
    )
    add_option(
        parser,
        "--egress-ca-file",
        "EGRESS_CA_FILE",
        "PEM CA file to verify a wss:// egress (default: system trust store); it must load "
        "even with a ws:// egress, which does not use it",
    )
    add_option(
        parser,
        "--egress-proxy",
        "EGRESS_PROXY",
        "outbound proxy the relay uses to reach the egress (http://, https:// or socks5://)",
    )
    add_option(
        parser,
        "--handshake-timeout",
        "HANDSHAKE_TIMEOUT",
        "seconds allowed for the WebSocket handshake",
        default=10.0,
        type=float,
    )
    add_option(
        parser,
        "--keepalive",
        "KEEPALIVE",
        "seconds between keepalive chunks",
        default=30.0,
        type=float,
    )
    add_liveness_options(parser)
    add_splice_option(parser)
    add_reuse_option(parser)


def add_liveness_options(parser: argparse._ActionsContainer) -> None:
    """Liveness, write deadline and pool flags (see README "Liveness, deadlines, pool")."""
    add_option(
        parser,
        "--pool-size",
        "POOL_SIZE",
        "pre-opened WebSockets kept ready, 0..64 (0: one per CONNECT)",
        default=2,
        type=int,
    )
    add_option(
        parser,
        "--ping-interval",
        "PING_INTERVAL",
        "seconds without hearing from the egress before a WebSocket ping",
        default=20.0,
        type=float,
    )
    add_option(
        parser,
        "--ping-timeout",
        "PING_TIMEOUT",
        "seconds to wait for the pong before the egress counts as dead",
        default=20.0,
        type=float,
    )
    add_option(
        parser,
        "--write-stall-timeout",
        "WRITE_STALL_TIMEOUT",
        "seconds a client or the egress may accept no bytes before the tunnel ends",
        default=60.0,
        type=float,
    )


def config_from_args(args: argparse.Namespace, token: Secret) -> RelayConfig:
    if not args.egress_url:
        raise ConfigError("egress_url", "required (--egress-url or UPSTREAMPROXY_EGRESS_URL)")
    if not args.session_id:
        raise ConfigError("session_id", "required (--session-id or UPSTREAMPROXY_SESSION_ID)")
    return RelayConfig(
        egress_url=args.egress_url,
        session_id=args.session_id,
        token=token,
        listen_host=args.listen_host,
        listen_port=args.port,
        allow_non_loopback=args.allow_non_loopback,
        egress_ca_file=args.egress_ca_file,
        egress_proxy=args.egress_proxy,
        handshake_timeout=args.handshake_timeout,
        keepalive_interval=args.keepalive,
        pool_size=args.pool_size,
        reuse=not args.no_reuse,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        write_stall_timeout=args.write_stall_timeout,
    )


def _read_token(path: str | None) -> Secret:
    if not path:
        raise ConfigError("token_file", "required (--token-file or UPSTREAMPROXY_TOKEN_FILE)")
    result = read_token(path)  # ConfigError for anything malformed, symlinks included
    for warning in result.warnings:
        log.warning("%s", warning)
    if result.token is None:
        raise ConfigError("token_file", result.reason or "no token")
    return result.token


def _harden(fail_closed: bool) -> None:
    hardening = make_non_dumpable()
    if hardening.ok:
        log.info("process hardened: %s", hardening.describe())
    elif fail_closed:
        raise ConfigError("hardening", f"incomplete (--fail-closed): {hardening.describe()}")
    else:
        log.warning(
            "process hardening incomplete, continuing (--fail-closed would refuse): %s",
            hardening.describe(),
        )
    try:
        refuse_if_traced()
    except HardeningError as exc:
        raise ConfigError("token_file", str(exc)) from None


def _delete(path: str) -> None:
    try:
        if delete_token_file(path):
            log.info("token file %s deleted", path)
    except OSError as exc:
        log.warning(
            "could not delete the token file %s (%s); the token stays on disk",
            path,
            exc.strerror or exc,
        )


def run(args: argparse.Namespace) -> int:
    _harden(args.fail_closed)
    relay = Relay(config_from_args(args, _read_token(args.token_file)))  # checks the CA file
    if args.egress_ca_file and not args.egress_url.startswith("wss://"):
        log.warning(
            "--egress-ca-file %s is not used: the egress URL is ws://, without TLS",
            args.egress_ca_file,
        )
    raise_nofile_limit("relay")
    pipe.set_enabled(not args.no_splice)

    def ready() -> None:
        if not args.keep_token_file:
            _delete(args.token_file)
        print(f"relay listening on {relay.proxy_url}", flush=True)

    try:
        return asyncio.run(serve(relay.start, relay.stop, ready))
    except OSError as exc:
        print(f"upstreamproxy relay: cannot listen: {exc.strerror}", file=sys.stderr)
        return 1
