"""Wiring TLS interception into the egress: CA, leaf cache, secrets, metrics, audit.

The engine itself lives in the package :mod:`upstreamproxy.egress.intercept` (what happens to
an intercepted connection); this module (how the egress sets it up) builds it from
the server's settings and adapts it to one tunnel: the upstream connector dials only the
addresses admission already checked (no second resolution), and every per-request audit line
carries the tunnel's session and policy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from ..certs import CertificateAuthority, load_ca
from ..errors import ConfigError
from . import audit
from .admission import Admission, AdmissionRecord, Refusal, Route
from .auth import Session
from .dialer import DialError
from .intercept import (
    InterceptEnv,
    InterceptResult,
    LeafCache,
    PrometheusInterceptMetrics,
    SecretStore,
    make_upstream_context,
    serve_intercepted,
)
from .intercept.engine import Downstream
from .policy import PolicySet

log = logging.getLogger("upstreamproxy.egress.intercept_wiring")


@dataclass(frozen=True)
class InterceptionConfig:
    ca_cert: Path
    ca_key: Path
    secrets_dir: Path | None = None
    leaf_ttl: dt.timedelta = dt.timedelta(hours=24)
    #: CA file to verify upstreams with instead of the system roots (private upstreams, tests).
    upstream_ca: Path | None = None
    #: Refuse the TLS handshake for an SNI that is not the CONNECT host (else answer 421).
    refuse_unlisted_sni: bool = True
    secrets_reload_interval: float = 30.0


class Interception:
    def __init__(self, config: InterceptionConfig, registry: CollectorRegistry) -> None:
        self.config = config
        self.ca: CertificateAuthority = load_ca(config.ca_cert, config.ca_key)
        self.metrics = PrometheusInterceptMetrics(registry)
        self.leaves = LeafCache(self.ca, config.leaf_ttl, metrics=self.metrics)
        self.secrets: SecretStore | None = None
        if config.secrets_dir is not None:
            if not config.secrets_dir.is_dir():
                raise ConfigError("secrets_dir", f"{config.secrets_dir} is not a directory")
            self.secrets = SecretStore(config.secrets_dir)
        upstream_ca = str(config.upstream_ca) if config.upstream_ca else None
        self._env = InterceptEnv(
            leaves=self.leaves,
            secrets=self.secrets or SecretStore(Path("/nonexistent"), load=False),
            upstream_connector=_no_connector,
            upstream_ssl_context=make_upstream_context(upstream_ca),
            refuse_unlisted_sni=config.refuse_unlisted_sni,
            metrics=self.metrics,
        )
        self._watcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.secrets is not None and self.config.secrets_reload_interval > 0:
            self._watcher = asyncio.get_running_loop().create_task(
                self.secrets.watch(self.config.secrets_reload_interval)
            )

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    def reload_secrets(self) -> None:
        if self.secrets is not None:
            report = self.secrets.reload()
            if not report.ok:
                log.error("secrets reload failed, keeping the last good values: %s", report.error)

    def missing_secrets(self, policies: PolicySet) -> set[str]:
        wanted: set[str] = set()
        for rule in policies.intercept_rules():
            wanted |= set(rule.secret_names())
        if self.secrets is None:
            return wanted
        return self.secrets.missing(wanted)

    async def serve(
        self,
        inner: Downstream,
        route: Route,
        admitted: AdmissionRecord,
        session: Session,
        admission: Admission,
    ) -> InterceptResult:
        assert route.intercept is not None

        async def connect(
            host: str, port: int
        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            # Only the addresses admission checked for this tunnel; never a new lookup.
            try:
                upstream = await admission.dial(route.addresses, route.port, admitted)
            except Refusal as exc:
                raise DialError(exc.status, exc.reason) from None
            return await upstream.streams()

        def audit_request(fields: dict[str, object]) -> None:
            audit.emit(
                {
                    **fields,
                    "event": "request",
                    "session": session.session_id,
                    "policy": session.policy,
                }
            )

        env = dataclasses.replace(
            self._env, upstream_connector=connect, audit_request=audit_request
        )
        return await serve_intercepted(inner, route.host, route.port, route.intercept, env)


async def _no_connector(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    raise DialError(502, "no-upstream-connector")
