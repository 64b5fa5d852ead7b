"""The egress HTTP server (aiohttp): the tunnel WebSocket, the CA endpoint, health, metrics.

Listeners: the main one (tunnels, ``ca-cert``, ``/healthz``, ``/readyz``) and, when
configured, a separate metrics listener (``/metrics``, ``/readyz``) so scraping never shares a
port with sandboxes. Readiness answers on the main listener, which sandboxes and any peer reach
without a token, give each reason's category alone (``missing-secrets``); the metrics listener
(the operator's) gives the reasons in full (``missing-secrets:NAME,...``), and so does the log,
once each time the failing checks change.

``stop(grace, delay)`` drains: readiness turns 503 at once, new tunnels are still accepted for
``delay`` seconds (time for a load balancer's health checks to take the replica out, so nothing
routed to it in the meantime is refused), then refused with ``503 draining``; open tunnels get
``grace`` seconds to finish, then the rest are closed with the listeners.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..connect_head import REASON_HEADER
from ..errors import AuthError, ConfigError
from ..logredact import redacting_logger
from ..memtrim import Trimmer
from ..tunnel import pipe
from ..tunnel.core import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    CLOSE_PROTOCOL_ERROR,
)
from ..tunnel.links import WsLink
from . import audit
from .admission import Admission, AdmissionRecord, DialFn, Route
from .auth import Authenticator, Session, bearer_token
from .dialer import IPAddress, dial_addresses
from .intercept.engine import Downstream
from .intercept_wiring import Interception
from .limits import LimitConfig, Limiter
from .listener import GuardedSite
from .metrics import CONTENT_TYPE_LATEST, EgressMetrics
from .native_upgrade import NativeUpgrade, OnUpgraded
from .policy import PolicySet, PolicyStore
from .preauth import PreauthGuard, PreauthLimits
from .resolver import Resolver, SystemResolver
from .tunnel import InterceptFn, Tunnel, TunnelContext, TunnelTimeouts

log = logging.getLogger("upstreamproxy.egress")


class _MalformedRequestFilter(logging.Filter):
    """aiohttp logs each malformed request - any peer's, before authentication - at ERROR with
    a traceback whose message quotes the peer's bytes (a credential in a header or query the
    redaction does not know, say): one line instead, naming only the error's type."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            args = record.args if isinstance(record.args, tuple) else ()
            record.msg = "malformed request from %s: %s"
            record.args = (args[0] if args else "-", type(exc).__name__)
            record.exc_info, record.exc_text = None, None
            if record.levelno > logging.WARNING:  # (a non-HTTP first line stays DEBUG)
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


# aiohttp quotes offending header lines in its errors; they may hold a token.
for _name in ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.websocket"):
    redacting_logger(_name)
_server_log = logging.getLogger("aiohttp.server")
if not any(isinstance(f, _MalformedRequestFilter) for f in _server_log.filters):
    # First: the redacting filter turns the traceback into text this one no longer sees.
    _server_log.filters.insert(0, _MalformedRequestFilter())

DEFAULT_WS_PATH: Final = "/v1/code/upstreamproxy/ws"
CA_CERT_PATH: Final = "/v1/code/upstreamproxy/ca-cert"
#: Many relays connecting at once overflowed aiohttp's default backlog of 128.
LISTEN_BACKLOG: Final = 1024

#: Returns a reason when not ready: ``category`` or ``category:detail``. The detail (the names
#: of missing secrets, say) is for the operator alone: see :func:`reason_categories`.
ReadinessCheck = Callable[[], str | None]


def reason_categories(reasons: list[str]) -> list[str]:
    """What the main listener's ``/readyz`` may say: each reason without its detail, once."""
    return list(dict.fromkeys(reason.split(":", 1)[0] for reason in reasons))


@dataclass
class EgressConfig:
    host: str = "127.0.0.1"
    port: int = 0
    ws_path: str = DEFAULT_WS_PATH
    ca_cert_pem: bytes | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    drain_grace: float = 30.0
    #: Seconds after SIGTERM during which readiness is 503 but new tunnels are still accepted.
    drain_delay: float = 0.0
    #: Seconds between checks of the policy and key (or static token) files for changes
    #: (0: only on SIGHUP).
    reload_interval: float = 10.0
    timeouts: TunnelTimeouts = field(default_factory=TunnelTimeouts)
    limits: LimitConfig = field(default_factory=LimitConfig)
    preauth: PreauthLimits = field(default_factory=PreauthLimits)
    #: Accept tunnel reuse (SPEC §11) when a relay offers it: one WebSocket carries its
    #: session's tunnels one after another.
    reuse: bool = True


class EgressServer:
    def __init__(
        self,
        config: EgressConfig,
        authenticator: Authenticator,
        policies: PolicyStore,
        resolver: Resolver | None = None,
        dial: DialFn = dial_addresses,
        interception: Callable[[EgressMetrics], Interception] | None = None,
        on_upgraded: OnUpgraded | None = None,
    ) -> None:
        """The tunnel endpoint's WebSocket upgrade is served natively (``native_upgrade.py``,
        not aiohttp) and each upgraded connection runs a :class:`Tunnel`; ``on_upgraded``
        replaces that runner (tests use a stand-in)."""
        config.timeouts.validate()
        self.config = config
        self.authenticator = authenticator
        self.policies = policies
        self.metrics = EgressMetrics()
        self.limiter = Limiter(config.limits)
        self.preauth = PreauthGuard(config.preauth, self._preauth_refused)
        # The metrics port is unauthenticated as well (0.0.0.0 behind Kubernetes): the same
        # deadline and caps, else an idle or half-sent request holds a descriptor for good.
        # Its refusals are not counted: that metric is about the tunnel listener.
        self.metrics_preauth = PreauthGuard(config.preauth)
        self.readiness_checks: list[ReadinessCheck] = []
        self._failing_checks: list[str] = []  # as last logged
        self.admission = Admission(
            lambda: self.policies.current,
            resolver or SystemResolver(config.timeouts.dial),
            config.timeouts.dial,
            dial,
            self._own_ports,
            _listen_addresses(config.host),
            listens_everywhere=config.host in ("", "0.0.0.0", "::"),
            on_dial=self.metrics.dial_seconds.observe,
        )
        self.interception = interception(self.metrics) if interception else None
        intercept: InterceptFn | None = None
        if self.interception is not None:
            engine = self.interception

            async def intercept(
                sock: Downstream, route: Route, admitted: AdmissionRecord, session: Session
            ) -> object:
                return await engine.serve(sock, route, admitted, session, self.admission)

            self.readiness_checks.append(self._secrets_ready)
        self._check_policies(self.policies.current)
        self.context = TunnelContext(
            self.admission,
            self.limiter,
            self.metrics,
            config.timeouts,
            intercept,
            authenticate=lambda token: self.authenticator.authenticate(token),
        )
        self.active: set[asyncio.Task[None]] = set()
        self._tunnels: dict[asyncio.Task[None], Tunnel] = {}
        self._runner: web.AppRunner | None = None
        self._site: GuardedSite | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._metrics_site: GuardedSite | None = None
        # Remembered at start: a stopped (draining) site no longer reports its socket.
        self._port: int | None = None
        self._metrics_bound_port: int | None = None
        self._started = False
        self._draining = False  # readiness 503
        self._refusing = False  # new tunnels refused (503 draining)
        self._watcher: asyncio.Task[None] | None = None
        self.trimmer = Trimmer()  # freed chunk buffers back to the kernel after a burst
        self.native = NativeUpgrade(
            config.ws_path,
            authenticate=lambda token: self.authenticator.authenticate(token),
            limiter=self.limiter,
            metrics=self.metrics,
            guard=self.preauth,
            on_upgraded=on_upgraded or self._run_tunnel,
            refusing=lambda: self._refusing,
            spawn=self._spawn_native,
            reuse=config.reuse,
        )
        self.app = self._build_app()

    def _build_app(self) -> web.Application:
        app = web.Application()
        # Natively upgraded requests never reach aiohttp; what does (an absolute-form target,
        # say) is not a WebSocket upgrade it should serve.
        app.router.add_get(self.config.ws_path, self._upgrade_required)
        app.router.add_get(CA_CERT_PATH, self._ca_cert)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        # Pre-auth ends with the first answer on a connection (see preauth.py).
        app.on_response_prepare.append(self.preauth.on_response_prepare)
        return app

    def _preauth_refused(self, reason: str) -> None:
        self.metrics.preauth_refusals.labels(reason).inc()

    @property
    def port(self) -> int:
        assert self._port is not None, "the server has not been started"
        return self._port

    @property
    def metrics_port(self) -> int:
        assert self._metrics_bound_port is not None, "no metrics listener has been started"
        return self._metrics_bound_port

    def _own_ports(self) -> set[int]:
        return {p for p in (self._port, self._metrics_bound_port) if p is not None}

    @property
    def url(self) -> str:
        scheme = "wss" if self.config.tls_cert_file else "ws"
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{scheme}://{host}:{self.port}{self.config.ws_path}"

    async def start(self) -> None:
        pipe.prepare()
        ssl_context = None
        if self.config.tls_cert_file:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(self.config.tls_cert_file, self.config.tls_key_file)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = GuardedSite(
            self._runner,
            self.config.host,
            self.config.port,
            ssl_context=ssl_context,
            backlog=LISTEN_BACKLOG,
            guard=self.preauth,
            upgrade=self.native,
        )
        await self._site.start()
        self._port = self._site.port
        if self.config.metrics_port is not None:
            metrics_app = web.Application()
            metrics_app.router.add_get("/metrics", self._metrics)
            metrics_app.router.add_get("/readyz", self._readyz_in_full)
            metrics_app.on_response_prepare.append(self.metrics_preauth.on_response_prepare)
            self._metrics_runner = web.AppRunner(metrics_app, access_log=None, handle_signals=False)
            await self._metrics_runner.setup()
            self._metrics_site = GuardedSite(
                self._metrics_runner,
                self.config.metrics_host,
                self.config.metrics_port,
                guard=self.metrics_preauth,
            )
            await self._metrics_site.start()
            self._metrics_bound_port = self._metrics_site.port
            host = self.config.metrics_host
            host = f"[{host}]" if ":" in host else host
            log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)
        self._started = True
        self.not_ready_reasons()  # logs a failing check now, not at the first probe
        if self.interception is not None:
            self.interception.start()
        if self.config.reload_interval > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_files())
        log.info("egress listening on %s", self.url)

    async def _watch_files(self) -> None:
        """Reload when the policy file or a key file changes (a ConfigMap or Secret update swaps
        them underneath us), as SIGHUP would; reopen an audit file a rotation moved."""
        while True:
            await asyncio.sleep(self.config.reload_interval)
            policy, keys = self.policies.changed(), self.authenticator.changed()
            if policy or keys:
                # Only what changed: a still-broken file would log its error (and count a
                # failed reload) again each time the other one changes.
                self.reload(policy=policy, keys=keys)  # (reopens a moved audit file too)
            else:
                audit.reopen_if_moved()
                # The secrets reload on a watch of their own: their change is logged from here
                # if no probe asks first.
                self.not_ready_reasons()

    async def stop(self, grace: float = 0.0, delay: float = 0.0) -> None:
        """Drain: readiness turns 503; for ``delay`` seconds new tunnels are still accepted
        (a load balancer is taking the replica out), then refused (503) while the listener, and
        so liveness, stays up; open tunnels get ``grace`` seconds to finish; then the rest are
        closed with the listeners."""
        if self._runner is None:
            return  # never started, or already stopped
        self._draining = True
        if delay > 0:
            log.info("draining: readiness 503, still accepting tunnels for %.1fs", delay)
            await asyncio.sleep(delay)
        self._refusing = True
        if self._watcher is not None:
            self._watcher.cancel()
        if self.interception is not None:
            self.interception.stop()
        # Pre-opened sockets that have not sent a CONNECT close now (1001): the relay
        # replaces them elsewhere, no client involved. Tunnels in use get the grace.
        for tunnel in list(self._tunnels.values()):
            tunnel.drain()
        if grace > 0 and self.active:
            log.info("draining %d tunnels for up to %.0fs", len(self.active), grace)
            await asyncio.wait(list(self.active), timeout=grace)
        for task in list(self.active):
            task.cancel()
        if self.active:
            await asyncio.wait(list(self.active), timeout=5)
        for runner in (self._runner, self._metrics_runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._metrics_runner = None
        self.trimmer.close()
        self._started = False

    def reload(self, *, policy: bool = True, keys: bool = True) -> bool:
        """Reload the policy file and the token keys (SIGHUP: both). A bad file keeps the last
        good. A rotated audit file (``--audit-log``) is reopened."""
        ok = True
        audit.reopen_if_moved()
        error = self.policies.reload(self._check_policies) if policy else None
        if error is not None:
            ok = False
            self.metrics.policy_reloads.labels("failed").inc()
            log.error("policy reload failed, keeping the last good policy: %s", error)
        elif policy and self.policies.path is not None:
            self.metrics.policy_reloads.labels("ok").inc()
            log.info("policy reloaded from %s", self.policies.path)
        if self.interception is not None:
            self.interception.reload_secrets()
        key_error = self.authenticator.reload() if keys else None
        if key_error is not None:
            ok = False
            log.error("key reload failed, keeping the previous keys: %s", key_error)
        elif keys and (source := self.authenticator.source()) is not None:
            log.info("reloaded %s", source)
        self.not_ready_reasons()  # a new policy or secrets may have changed readiness: log it
        return ok

    def _check_policies(self, policies: PolicySet) -> None:
        """What the server needs of a policy beyond its file's rules (at start and reload)."""
        if self.interception is None and policies.intercept_rules():
            raise ConfigError("ca_key", "the policy intercepts hosts but no CA key is configured")

    async def __aenter__(self) -> EgressServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- handlers ------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "active_tunnels": len(self.active)})

    def not_ready_reasons(self) -> list[str]:
        """Every reason in full (for the operator), and a log line when the failing checks'
        reasons differ from the last ones logged: once per change, however often probes ask.
        (``starting`` and ``draining`` are the server's own states, logged as they happen.)"""
        reasons = []
        if not self._started:
            reasons.append("starting")
        if self._draining:
            reasons.append("draining")
        failing = [r for r in (check() for check in self.readiness_checks) if r]
        if failing != self._failing_checks:
            self._failing_checks = failing
            if failing:
                log.warning("not ready: %s", "; ".join(failing))
            else:
                log.info("ready: every readiness check passes")
        return reasons + failing

    def _secrets_ready(self) -> str | None:
        assert self.interception is not None
        missing = self.interception.missing_secrets(self.policies.current)
        return f"missing-secrets:{','.join(sorted(missing))}" if missing else None

    async def _readyz(self, request: web.Request) -> web.Response:
        """The main listener's: any peer asks it without a token, so categories only."""
        return _readiness_answer(reason_categories(self.not_ready_reasons()))

    async def _readyz_in_full(self, request: web.Request) -> web.Response:
        """The metrics listener's (the operator's): the reasons in full."""
        return _readiness_answer(self.not_ready_reasons())

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _ca_cert(self, request: web.Request) -> web.Response:
        if self.config.ca_cert_pem is None:
            return web.Response(status=404, text="no CA certificate configured\n")
        return web.Response(body=self.config.ca_cert_pem, content_type="application/x-pem-file")

    async def _upgrade_required(self, request: web.Request) -> web.Response:
        """The tunnel path reached aiohttp: not a connection's first request (the native
        upgrade takes only those), or not a WebSocket upgrade. Answered as the native path
        would refuse it - draining, then the token - but never upgraded here."""
        if self._refusing:
            return web.json_response(
                {"error": "draining"}, status=503, headers={REASON_HEADER: "draining"}
            )
        try:
            self.authenticator.authenticate(bearer_token(request.headers.get("Authorization")))
        except AuthError as exc:
            self.metrics.auth_failures.labels(exc.reason).inc()
            log.warning("upgrade refused from %s: %s", request.remote, exc.reason)
            return web.json_response(
                {"error": "unauthorized", "reason": exc.reason},
                status=401,
                headers={REASON_HEADER: exc.reason},
            )
        return web.json_response({"error": "websocket upgrade required"}, status=400)

    def _spawn_native(self, run: Coroutine[Any, Any, None]) -> None:
        """Run a natively upgraded connection's ``on_upgraded`` as one of the active tunnels
        (drained, then cancelled, by :meth:`stop`)."""
        task = asyncio.get_running_loop().create_task(run)
        self.active.add(task)
        self.metrics.active.inc()
        task.add_done_callback(self._native_done)

    def _native_done(self, task: asyncio.Task[None]) -> None:
        self.active.discard(task)
        self.metrics.active.dec()
        self.trimmer.tunnel_ended()
        if not task.cancelled() and (exc := task.exception()) is not None:
            # One line, no traceback (nor message: it might quote the peer's bytes).
            log.error("tunnel runner failed: %s", type(exc).__name__)

    async def _run_tunnel(
        self,
        transport: asyncio.Transport,
        leftover: bytes,
        session: Session,
        token: str,
        preopened: bool,
        reuse: bool = False,
    ) -> None:
        """Serve one natively upgraded, authenticated WebSocket as a tunnel, to its end (run
        by :meth:`_spawn_native`, which keeps the active count and the limiter). With
        ``reuse`` negotiated, a tunnel that ended with the end-of-tunnel exchange leaves the
        WebSocket open: it then waits for its next CONNECT as a pre-opened socket does."""
        task = asyncio.current_task()
        assert task is not None
        link = WsLink.attach(transport, leftover, client=False, reuse=reuse)
        loop = asyncio.get_running_loop()
        freed: asyncio.Future[bool] = loop.create_future()

        def on_free(_: WsLink) -> None:
            if not freed.done():
                freed.set_result(True)

        def on_lost() -> None:
            if not freed.done():
                freed.set_result(False)

        if reuse:
            link.when_lost(on_lost)
        reused = False
        while True:
            link.on_reusable = on_free if reuse else None
            tunnel = Tunnel(link, session, token, self.context, preopened=preopened, reused=reused)
            self._tunnels[task] = tunnel
            try:
                await tunnel.run()
            except asyncio.CancelledError:
                tunnel.record.close_cause = "server-shutdown"
                raise
            finally:
                self._tunnels.pop(task, None)
                core = tunnel.core
                if core.request is not None or core.status or core.error:
                    self._audit(tunnel)  # (a socket closed before any CONNECT: no tunnel)
            # The link is freed by the end-of-tunnel exchange, or closes (bounded either way).
            if not reuse or not await freed:
                return
            if self._refusing:  # draining: the relay opens its next socket elsewhere
                link.close(CLOSE_GOING_AWAY)
                return
            if tunnel.core.request is None:
                # The relay ended a tunnel that never got as far as a CONNECT (a partial or
                # refused head): no relay of ours does that, and such rounds would cost the
                # egress a tunnel each without a rate-limit token. Not reused.
                partial = not tunnel.core.status
                if partial:
                    self.metrics.protocol_errors.inc()
                    log.warning(
                        "session %s: tunnel ended before its CONNECT head was complete",
                        session.session_id,
                    )
                link.close(CLOSE_PROTOCOL_ERROR if partial else CLOSE_NORMAL)
                return
            if tunnel.core.status == 429:
                # Over a limit: no cheap retries on this socket - the next try is an upgrade,
                # refused (429) before any tunnel or audit line.
                link.close(CLOSE_POLICY_VIOLATION)
                return
            self.metrics.reused.inc()
            if link.lost:
                # Gone as the tunnel ended (its end-of-tunnel message and the close in one
                # read): on_lost has run already, so nothing would ever settle a new future.
                return
            freed = loop.create_future()
            preopened = reused = True

    def _audit(self, tunnel: Tunnel) -> None:
        record, admitted = tunnel.record, tunnel.admitted
        decision = admitted.decision
        self.metrics.tunnels.labels(decision).inc()
        audit.emit(
            {
                "event": "tunnel",
                "session": record.session,
                "policy": admitted.policy,
                "host": admitted.host,
                "port": admitted.port,
                "target": record.target,
                "resolved": admitted.resolved,
                "dialled": admitted.dialled,
                "decision": decision,
                "reason": admitted.reason,
                "rule": admitted.rule,
                "status": record.status,
                "bytes_up": record.bytes_up,
                "bytes_down": record.bytes_down,
                "duration_ms": round((time.monotonic() - record.started) * 1000, 1),
                "close_cause": record.close_cause,
            }
        )


def _readiness_answer(reasons: list[str]) -> web.Response:
    if reasons:
        return web.json_response({"status": "not-ready", "reasons": reasons}, status=503)
    return web.json_response({"status": "ready"})


def _listen_addresses(host: str) -> list[IPAddress]:
    """The address the main listener binds, when it is a specific one (a pod IP, say)."""
    try:
        address = ip_address(host.strip("[]"))
    except ValueError:
        return []
    return [] if address.is_unspecified else [address]
