"""Counters the interception engine bumps, behind a tiny interface.

:class:`InterceptMetrics` is a do-nothing base; the egress passes a
:class:`PrometheusInterceptMetrics` bound to its own registry. Labels are rule ids, header names
and fixed reason codes from the configuration and the code, never request data or secret values,
so cardinality stays bounded.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter

# Reasons passed to ``sni_refused``.
SNI_MISSING: Final = "sni-missing"
SNI_MISMATCH: Final = "sni-mismatch"


class InterceptMetrics:
    """No-op counters. Subclass and override what you export."""

    def leaf_issued(self) -> None:
        """A leaf certificate was issued from the egress CA."""

    def leaf_cache_hit(self) -> None:
        """A leaf certificate was served from the cache."""

    def sni_refused(self, reason: str) -> None:
        """A client's SNI was missing or did not match the CONNECT host (``reason``)."""

    def host_mismatch(self, rule_id: str) -> None:
        """A request's Host header did not match the SNI."""

    def alpn_refused(self) -> None:
        """A client offered ALPN protocols but not HTTP/1.1 (answered with an alert)."""

    def rewrite_applied(self, rule_id: str, header: str) -> None:
        """A header was rewritten on a request that was sent upstream."""

    def request_completed(self, rule_id: str, status: int) -> None:
        """A request finished with ``status`` (0 when it was aborted without a status)."""


NOOP_METRICS: Final = InterceptMetrics()


class PrometheusInterceptMetrics(InterceptMetrics):
    """Prometheus counters, registered in ``registry`` (a private registry when None)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, namespace: str = "upstreamproxy"
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        ns, sub, reg = namespace, "intercept", self.registry
        self.certs_issued = Counter(
            "certs_issued_total",
            "Leaf certificates issued from the egress CA",
            namespace=ns,
            subsystem=sub,
            registry=reg,
        )
        self.cert_cache_hits = Counter(
            "cert_cache_hits_total",
            "Leaf certificates served from the cache",
            namespace=ns,
            subsystem=sub,
            registry=reg,
        )
        self.sni_refusals = Counter(
            "sni_mismatches_total",
            "TLS handshakes whose SNI was missing or not the CONNECT host",
            ["reason"],
            namespace=ns,
            subsystem=sub,
            registry=reg,
        )
        self.alpn_refusals = Counter(
            "alpn_refusals_total",
            "TLS handshakes refused for offering ALPN without http/1.1",
            namespace=ns,
            subsystem=sub,
            registry=reg,
        )
        self.host_mismatches = Counter(
            "host_mismatches_total",
            "Requests whose Host header did not match the SNI",
            ["rule"],
            namespace=ns,
            subsystem=sub,
            registry=reg,
        )
        self.rewrites = Counter(
            "rewrites_total",
            "Header rewrites applied to requests sent upstream",
            ["rule", "header"],
            namespace=ns,
            subsystem=sub,
            registry=reg,
        )
        self.requests = Counter(
            "requests_total",
            "Intercepted requests by final status",
            ["rule", "code"],
            namespace=ns,
            subsystem=sub,
            registry=reg,
        )

    def leaf_issued(self) -> None:
        self.certs_issued.inc()

    def leaf_cache_hit(self) -> None:
        self.cert_cache_hits.inc()

    def sni_refused(self, reason: str) -> None:
        self.sni_refusals.labels(reason=reason).inc()

    def alpn_refused(self) -> None:
        self.alpn_refusals.inc()

    def host_mismatch(self, rule_id: str) -> None:
        self.host_mismatches.labels(rule=rule_id).inc()

    def rewrite_applied(self, rule_id: str, header: str) -> None:
        self.rewrites.labels(rule=rule_id, header=header.lower()).inc()

    def request_completed(self, rule_id: str, status: int) -> None:
        self.requests.labels(rule=rule_id, code=str(status)).inc()
