"""Prometheus metrics of one egress server (its own registry, served on a separate port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "EgressMetrics"]


class EgressMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tunnels = Counter(
            "upstreamproxy_tunnels_total",
            "Tunnels by final decision (allow, deny, monitor-allow, error)",
            ["decision"],
            registry=r,
        )
        self.active = Gauge(
            "upstreamproxy_active_tunnels",
            "Tunnel WebSockets open now (pre-opened and idle reused ones included)",
            registry=r,
        )
        self.bytes = Counter(
            "upstreamproxy_bytes_total",
            "Bytes relayed; direction is up (to upstream) or down",
            ["direction"],
            registry=r,
        )
        # Resolved once: the per-chunk path only increments.
        self.bytes_up = self.bytes.labels("up")
        self.bytes_down = self.bytes.labels("down")
        self.dial_seconds = Histogram(
            "upstreamproxy_dial_seconds",
            "Time to connect to an upstream",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.auth_failures = Counter(
            "upstreamproxy_auth_failures_total",
            "Refused credentials by reason",
            ["reason"],
            registry=r,
        )
        self.protocol_errors = Counter(
            "upstreamproxy_protocol_errors_total",
            "Tunnels closed for a protocol violation",
            registry=r,
        )
        self.limit_rejections = Counter(
            "upstreamproxy_limit_rejections_total",
            "Tunnels refused by a limit",
            ["limit"],
            registry=r,
        )
        self.denies = Counter(
            "upstreamproxy_denies_total",
            "Denied tunnels by reason and rule",
            ["reason", "rule"],
            registry=r,
        )
        self.preauth_refusals = Counter(
            "upstreamproxy_preauth_refusals_total",
            "Connections closed before authentication: upgrade-timeout, preauth-per-peer, "
            "preauth-total",
            ["reason"],
            registry=r,
        )
        self.reused = Counter(
            "upstreamproxy_websockets_reused_total",
            "WebSockets kept open after a tunnel for the session's next one (tunnel reuse)",
            registry=r,
        )
        self.policy_reloads = Counter(
            "upstreamproxy_policy_reloads_total", "Policy reloads by result", ["result"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
