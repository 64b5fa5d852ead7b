"""``upstreamproxy egress``: the egress server."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from ..certs import parse_ca_certificate
from ..egress import audit
from ..egress.auth import Authenticator, SignedTokens, StaticTokens
from ..egress.hostnames import normalise_host
from ..egress.intercept_wiring import Interception, InterceptionConfig
from ..egress.limits import LimitConfig
from ..egress.metrics import EgressMetrics
from ..egress.policy import PolicyStore, policy_from_allow_list
from ..egress.preauth import PreauthLimits
from ..egress.resolver import Resolver, StaticResolver, SystemResolver
from ..egress.server import DEFAULT_WS_PATH, EgressConfig, EgressServer
from ..egress.tunnel import TunnelTimeouts
from ..errors import ConfigError
from ..fdlimit import raise_nofile_limit
from ..options import add_list_option, add_option, add_reuse_option, add_splice_option, port
from ..tokens import TokenVerifier, load_public_keys, private_key_files
from ..tunnel import pipe
from ._serving import serve

HELP = "run the egress server that terminates relay tunnels and dials upstreams"


def configure(parser: argparse.ArgumentParser) -> None:
    add_splice_option(parser)
    add_reuse_option(parser)
    net = parser.add_argument_group("listening")
    add_option(net, "--host", "EGRESS_HOST", "address to listen on", default="127.0.0.1")
    add_option(
        net,
        "--port",
        "EGRESS_PORT",
        "port to listen on (0: any free port)",
        default=8080,
        type=port,
    )
    add_option(net, "--ws-path", "WS_PATH", "tunnel WebSocket path", default=DEFAULT_WS_PATH)
    add_option(net, "--tls-cert", "TLS_CERT", "certificate chain for serving wss://")
    add_option(net, "--tls-key", "TLS_KEY", "private key for serving wss://")
    add_option(
        net,
        "--metrics-host",
        "METRICS_HOST",
        "address of the metrics listener",
        default="127.0.0.1",
    )
    add_option(
        net,
        "--metrics-port",
        "METRICS_PORT",
        "port of the Prometheus /metrics listener (omit to disable)",
        type=port,
    )
    auth = parser.add_argument_group("authentication")
    add_list_option(
        auth,
        "--public-keys",
        "PUBLIC_KEYS",
        "Ed25519 public key file or directory for verifying session tokens",
        "PATH",
    )
    add_option(
        auth,
        "--audience",
        "AUDIENCE",
        "audience session tokens must carry",
        default="upstreamproxy",
    )
    add_option(
        auth,
        "--static-tokens",
        "STATIC_TOKENS",
        "file of 'SESSION_ID TOKEN [POLICY]' lines (development only)",
    )
    pol = parser.add_argument_group("policy")
    add_option(pol, "--policy", "POLICY", "policy file (YAML); reloaded on SIGHUP")
    add_list_option(
        pol,
        "--allow",
        "ALLOW",
        "shorthand policy without a file: allow HOST:PORT (PORT may be *)",
        "HOST:PORT",
    )
    add_list_option(
        pol,
        "--allow-cidr",
        "ALLOW_CIDR",
        "with --allow: special-purpose range to allow (e.g. 127.0.0.0/8)",
        "CIDR",
    )
    add_list_option(
        pol,
        "--resolve",
        "RESOLVE",
        "pin a name to addresses instead of DNS: HOST=IP[+IP...]",
        "HOST=IP",
    )
    add_option(pol, "--ca-cert", "CA_CERT", "CA certificate PEM served at the ca-cert endpoint")
    add_option(
        pol,
        "--audit-log",
        "AUDIT_LOG",
        "write audit JSON lines to this file (default: the log on stderr)",
    )
    tls = parser.add_argument_group("TLS interception (credential injection)")
    add_option(
        tls,
        "--ca-key",
        "CA_KEY",
        "private key of --ca-cert; enables interception for rules that ask for it",
    )
    add_option(
        tls,
        "--secrets-dir",
        "SECRETS_DIR",
        "directory of secrets for header injection (Kubernetes Secret volume layout)",
    )
    add_option(
        tls,
        "--leaf-ttl",
        "LEAF_TTL",
        "validity of issued leaf certificates, seconds",
        default=86400.0,
        type=float,
    )
    add_option(
        tls,
        "--upstream-ca",
        "UPSTREAM_CA",
        "CA file to verify intercepted upstreams (default: system trust store)",
    )
    add_option(
        tls,
        "--sni-mismatch",
        "SNI_MISMATCH",
        "on an SNI that is not the CONNECT host: refuse the handshake, or answer 421",
        default="refuse-handshake",
        choices=("refuse-handshake", "http-421"),
    )
    lim = parser.add_argument_group("limits and timeouts")
    defaults = LimitConfig()
    add_option(
        lim,
        "--max-tunnels",
        "MAX_TUNNELS",
        "concurrent tunnels in total",
        default=defaults.max_tunnels,
        type=int,
    )
    add_option(
        lim,
        "--max-session-tunnels",
        "MAX_SESSION_TUNNELS",
        "concurrent tunnels per session",
        default=defaults.max_session_tunnels,
        type=int,
    )
    add_option(
        lim,
        "--session-rate",
        "SESSION_RATE",
        "new tunnels per second per session",
        default=defaults.session_rate,
        type=float,
    )
    add_option(
        lim,
        "--session-burst",
        "SESSION_BURST",
        "burst of new tunnels per session",
        default=defaults.session_burst,
        type=int,
    )
    add_option(
        lim,
        "--head-timeout",
        "HEAD_TIMEOUT",
        "seconds to wait for the CONNECT head",
        default=10.0,
        type=float,
    )
    add_option(
        lim,
        "--dial-timeout",
        "DIAL_TIMEOUT",
        "seconds allowed for the DNS lookup, and again for the connect",
        default=10.0,
        type=float,
    )
    add_option(
        lim,
        "--idle-timeout",
        "IDLE_TIMEOUT",
        "seconds a tunnel may be idle before it is closed",
        default=300.0,
        type=float,
    )
    add_option(
        lim,
        "--ping-interval",
        "PING_INTERVAL",
        "seconds without hearing from a relay before a WebSocket ping",
        default=20.0,
        type=float,
    )
    add_option(
        lim,
        "--ping-timeout",
        "PING_TIMEOUT",
        "seconds to wait for the pong before the relay counts as dead",
        default=20.0,
        type=float,
    )
    add_option(
        lim,
        "--write-stall-timeout",
        "WRITE_STALL_TIMEOUT",
        "seconds a relay or upstream may accept no bytes before the tunnel ends",
        default=60.0,
        type=float,
    )
    add_option(
        lim,
        "--preopened-wait",
        "PREOPENED_WAIT",
        "seconds a pre-opened WebSocket waits for its CONNECT, renewed by each keepalive",
        default=90.0,
        type=float,
    )
    add_option(
        pol,
        "--reload-interval",
        "RELOAD_INTERVAL",
        "seconds between checks of the policy and key files for changes and of the audit file "
        "for rotation (0: SIGHUP only)",
        default=10.0,
        type=float,
    )
    preauth = PreauthLimits()
    add_option(
        lim,
        "--upgrade-timeout",
        "UPGRADE_TIMEOUT",
        "seconds a new connection gets to complete TLS and its upgrade request",
        default=preauth.upgrade_timeout,
        type=float,
    )
    add_option(
        lim,
        "--max-preauth",
        "MAX_PREAUTH",
        "connections not yet authenticated, in total (over it, the oldest is closed)",
        default=preauth.max_pending,
        type=int,
    )
    add_option(
        lim,
        "--max-preauth-per-peer",
        "MAX_PREAUTH_PER_PEER",
        "connections not yet authenticated per peer IP address",
        default=preauth.max_pending_per_peer,
        type=int,
    )
    add_option(
        lim,
        "--drain-grace",
        "DRAIN_GRACE",
        "seconds open tunnels get to finish after SIGTERM",
        default=30.0,
        type=float,
    )
    add_option(
        lim,
        "--drain-delay",
        "DRAIN_DELAY",
        "seconds after SIGTERM during which /readyz is 503 but new tunnels are still accepted,"
        " so a load balancer takes the replica out before it refuses anything",
        default=0.0,
        type=float,
    )


def build_authenticator(args: argparse.Namespace) -> Authenticator:
    if args.public_keys:
        sources, audience = list(args.public_keys), args.audience
        for path in private_key_files(sources):
            logging.getLogger("upstreamproxy.egress").warning(
                "%s is a private signing key: skipped, but whoever can read it can issue "
                "tokens for every egress - keep only *.public.pem in --public-keys",
                path,
            )
        return SignedTokens(
            lambda: TokenVerifier(load_public_keys(sources), audience), sources=sources
        )
    if args.static_tokens:
        return StaticTokens.from_file(Path(args.static_tokens))
    raise ConfigError("public_keys", "required: --public-keys (or --static-tokens for development)")


def build_policies(args: argparse.Namespace) -> PolicyStore:
    if args.policy and args.allow:
        raise ConfigError("policy", "use --policy or --allow, not both")
    if args.policy:
        return PolicyStore.from_file(Path(args.policy))
    if args.allow:
        return PolicyStore(policy_from_allow_list(args.allow, args.allow_cidr or []))
    raise ConfigError("policy", "required: --policy FILE (or --allow HOST:PORT for development)")


def build_resolver(args: argparse.Namespace) -> Resolver:
    system = SystemResolver(args.dial_timeout)
    if not args.resolve:
        return system
    table: dict[str, list[str]] = {}
    for entry in args.resolve:
        host, sep, addresses = entry.partition("=")
        if not sep or not host or not addresses:
            raise ConfigError("resolve", f"{entry!r}: expected HOST=IP[+IP...]")
        # Keyed as admission looks names up (IDNA A-labels and all), else a pin such as
        # bücher.example was silently passed over for DNS.
        try:
            table[normalise_host(host)] = addresses.split("+")
        except ValueError as exc:
            raise ConfigError("resolve", f"{entry!r}: {exc}") from None
    try:
        return StaticResolver(table, system)
    except ValueError as exc:
        raise ConfigError("resolve", str(exc)) from None


def build_server(args: argparse.Namespace) -> EgressServer:
    ca_pem = None
    if args.ca_cert:
        try:
            raw = Path(args.ca_cert).read_bytes()
        except OSError as exc:
            raise ConfigError("ca_cert", f"cannot read {args.ca_cert}: {exc.strerror}") from None
        # Serve only the re-encoded certificate: a key pasted into the file never leaves.
        ca_pem = parse_ca_certificate(raw, "ca_cert").public_bytes(serialization.Encoding.PEM)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("tls_cert", "--tls-cert and --tls-key go together")
    config = EgressConfig(
        host=args.host,
        port=args.port,
        ws_path=args.ws_path,
        ca_cert_pem=ca_pem,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        drain_grace=args.drain_grace,
        drain_delay=args.drain_delay,
        reload_interval=args.reload_interval,
        timeouts=TunnelTimeouts(
            head=args.head_timeout,
            dial=args.dial_timeout,
            idle=args.idle_timeout,
            ping_interval=args.ping_interval,
            ping_timeout=args.ping_timeout,
            write_stall=args.write_stall_timeout,
            pooled_wait=args.preopened_wait,
        ),
        limits=LimitConfig(
            args.max_tunnels, args.max_session_tunnels, args.session_rate, args.session_burst
        ),
        preauth=PreauthLimits(args.upgrade_timeout, args.max_preauth, args.max_preauth_per_peer),
        reuse=not args.no_reuse,
    )
    config.limits.validate()
    config.preauth.validate()
    for name in ("drain_grace", "drain_delay"):
        if getattr(args, name) < 0:
            raise ConfigError(name, "must not be negative")
    return EgressServer(
        config,
        build_authenticator(args),
        build_policies(args),
        resolver=build_resolver(args),
        interception=build_interception(args),
    )


def build_interception(args: argparse.Namespace) -> Callable[[EgressMetrics], Interception] | None:
    if not args.ca_key:
        return None
    if not args.ca_cert:
        raise ConfigError("ca_cert", "--ca-key needs --ca-cert (the CA's certificate)")
    if args.leaf_ttl < 60:
        raise ConfigError("leaf_ttl", "must be at least 60 seconds")
    config = InterceptionConfig(
        ca_cert=Path(args.ca_cert),
        ca_key=Path(args.ca_key),
        secrets_dir=Path(args.secrets_dir) if args.secrets_dir else None,
        leaf_ttl=dt.timedelta(seconds=args.leaf_ttl),
        upstream_ca=Path(args.upstream_ca) if args.upstream_ca else None,
        refuse_unlisted_sni=args.sni_mismatch == "refuse-handshake",
    )
    return lambda metrics: Interception(config, metrics.registry)


def run(args: argparse.Namespace) -> int:
    server = build_server(args)
    raise_nofile_limit("egress")
    pipe.set_enabled(not args.no_splice)
    if args.audit_log:
        audit.log_to_file(Path(args.audit_log))

    def ready() -> None:
        print(f"egress listening on {server.url}", flush=True)

    async def stop() -> None:
        await server.stop(grace=server.config.drain_grace, delay=server.config.drain_delay)

    try:
        return asyncio.run(serve(server.start, stop, ready, on_reload=server.reload))
    except OSError as exc:
        print(f"upstreamproxy egress: cannot listen: {exc.strerror}", file=sys.stderr)
        return 1
