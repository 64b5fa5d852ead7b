"""``upstreamproxy egress``: the egress server."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from ..egress.allowlist import AllowList
from ..egress.auth import StaticTokens
from ..egress.server import DEFAULT_WS_PATH, EgressConfig, EgressServer
from ..egress.tunnel import TunnelTimeouts
from ..errors import ConfigError
from ..options import add_option, env_default
from ._serving import serve

HELP = "run the egress server that terminates relay tunnels and dials upstreams"


def configure(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--host", "EGRESS_HOST", "address to listen on", default="127.0.0.1")
    add_option(parser, "--port", "EGRESS_PORT", "port to listen on (0: any free port)",
               default=8080, type=int)
    add_option(parser, "--ws-path", "WS_PATH", "tunnel WebSocket path", default=DEFAULT_WS_PATH)
    add_option(parser, "--ca-cert", "CA_CERT", "CA certificate PEM served at the ca-cert endpoint")
    add_option(parser, "--tls-cert", "TLS_CERT", "certificate chain for serving wss://")
    add_option(parser, "--tls-key", "TLS_KEY", "private key for serving wss://")
    add_option(parser, "--static-tokens", "STATIC_TOKENS",
               "file of 'SESSION_ID TOKEN [POLICY]' lines (development auth)")
    default_allow = env_default("ALLOW")
    parser.add_argument("--allow", action="append",
                        default=default_allow.split(",") if default_allow else None,
                        metavar="HOST:PORT",
                        help="allow a target (host exact or *.suffix; port or *); repeatable "
                             "(env UPSTREAMPROXY_ALLOW, comma-separated)")
    add_option(parser, "--head-timeout", "HEAD_TIMEOUT", "seconds to wait for the CONNECT head",
               default=10.0, type=float)
    add_option(parser, "--dial-timeout", "DIAL_TIMEOUT", "seconds allowed to dial an upstream",
               default=10.0, type=float)
    add_option(parser, "--idle-timeout", "IDLE_TIMEOUT",
               "seconds a tunnel may be idle before it is closed", default=300.0, type=float)


def build_server(args: argparse.Namespace) -> EgressServer:
    if not args.static_tokens:
        raise ConfigError("static_tokens", "required: a token file to authenticate sessions")
    ca_pem = None
    if args.ca_cert:
        try:
            ca_pem = Path(args.ca_cert).read_bytes()
        except OSError as exc:
            raise ConfigError("ca_cert", f"cannot read {args.ca_cert}: {exc.strerror}") from None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("tls_cert", "--tls-cert and --tls-key go together")
    config = EgressConfig(
        host=args.host, port=args.port, ws_path=args.ws_path, ca_cert_pem=ca_pem,
        tls_cert_file=args.tls_cert, tls_key_file=args.tls_key,
        timeouts=TunnelTimeouts(head=args.head_timeout, dial=args.dial_timeout,
                                idle=args.idle_timeout),
    )
    return EgressServer(config, StaticTokens.from_file(Path(args.static_tokens)),
                        AllowList(args.allow or []))


def run(args: argparse.Namespace) -> int:
    server = build_server(args)

    def ready() -> None:
        print(f"egress listening on {server.url}", flush=True)

    try:
        return asyncio.run(serve(server.start, server.stop, ready))
    except OSError as exc:
        print(f"upstreamproxy egress: cannot listen: {exc.strerror}", file=sys.stderr)
        return 1
