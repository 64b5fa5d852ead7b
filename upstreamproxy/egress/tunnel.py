"""One tunnel on the egress side: the tunnel core (egress role) over an aiohttp WebSocket.

The WebSocket has been upgraded and the bearer token verified before this runs. The core
(:mod:`upstreamproxy.tunnel.core`) reads the in-tunnel CONNECT, answers inside the tunnel and
keeps every deadline; this module supplies what only the egress knows: the opening step
(in-tunnel credentials, admission, dial or interception) and the audit record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, cast

from ..connect_head import REASON_HEADER, RULE_HEADER
from ..errors import AuthError, ConfigError, HeadError
from ..memstream import stream_pair
from ..tunnel import Open, Role, Timeouts, TunnelCore
from ..tunnel.driver import Opened, OpenFailed, OpenStale, TunnelDriver
from ..tunnel.links import WsLink
from .admission import Admission, AdmissionRecord, Refusal, Route
from .auth import Session, check_tunnel_credentials
from .intercept.engine import Downstream
from .limits import Limiter, LimitExceeded
from .metrics import EgressMetrics
from .transports import parked_transport

log = logging.getLogger("upstreamproxy.egress.tunnel")

__all__ = ["REASON_HEADER", "RULE_HEADER", "InterceptFn", "Tunnel", "TunnelTimeouts"]


#: Serves an intercepted tunnel on the inner end of an in-memory stream pair (see
#: egress/intercept_wiring).
InterceptFn = Callable[[Downstream, Route, AdmissionRecord, Session], Awaitable[object]]


@dataclass
class TunnelTimeouts:
    head: float = 10.0
    dial: float = 10.0
    idle: float = 300.0
    #: Ping the relay after this long without hearing from it; it is dead when no pong
    #: follows within ping_timeout.
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    #: A relay or upstream that accepts no bytes for this long ends the tunnel.
    write_stall: float = 60.0
    #: A WebSocket that sent only keepalives so far (a relay's pre-opened one) waits this
    #: long after each keepalive for its CONNECT, instead of ``head``.
    pooled_wait: float = 90.0

    def validate(self) -> None:
        names = {
            "head": "head_timeout",
            "dial": "dial_timeout",
            "idle": "idle_timeout",
            "ping_interval": "ping_interval",
            "ping_timeout": "ping_timeout",
            "write_stall": "write_stall_timeout",
            "pooled_wait": "preopened_wait",
        }
        for name, option in names.items():
            if getattr(self, name) <= 0:
                raise ConfigError(option, "must be positive")

    def core(self) -> Timeouts:
        return Timeouts(
            head=self.head,
            # Admission bounds resolution and dialling itself; this is a backstop.
            open=3 * self.dial + 5.0,
            idle=self.idle,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            write_stall=self.write_stall,
            pooled_wait=self.pooled_wait,
        )


@dataclass
class TunnelRecord:
    """What happened to one tunnel beyond admission: the rest of the audit line."""

    session: str
    target: str = "-"
    status: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    close_cause: str = "-"
    started: float = field(default_factory=time.monotonic)


@dataclass
class TunnelContext:
    """Everything a tunnel needs from its server."""

    admission: Admission
    limiter: Limiter
    metrics: EgressMetrics
    timeouts: TunnelTimeouts
    intercept: InterceptFn | None = None
    #: Re-checks a pre-opened socket's token at its CONNECT (it may have expired since).
    authenticate: Callable[[str], Session] | None = None
    _core_timeouts: Timeouts | None = None

    @property
    def core_timeouts(self) -> Timeouts:
        if self._core_timeouts is None:
            self._core_timeouts = self.timeouts.core()
        return self._core_timeouts


#: What the outer end of an intercepted tunnel's in-memory stream pair may buffer before it
#: stops reading is twice this: more would only hold memory while the relay is slow.
UPSTREAM_BUFFER_LIMIT: Final = 64 * 1024


class Tunnel:
    def __init__(
        self,
        link: WsLink,
        session: Session,
        token: str,
        context: TunnelContext,
        *,
        preopened: bool = False,
        reused: bool = False,
    ) -> None:
        self.link = link
        #: The WebSocket carried an earlier tunnel (reuse): its upgrade's slot is kept, but
        #: each new tunnel still takes one of the session's new-tunnels-per-second tokens.
        self.reused = reused
        self.session = session
        self._token = token
        self.ctx = context
        self.record = TunnelRecord(session=session.session_id)
        self.admitted = AdmissionRecord()
        self.core = TunnelCore(
            Role.EGRESS,
            context.core_timeouts,
            asyncio.get_running_loop().time(),
            preopened=preopened,
        )
        self._engine: asyncio.Future[object] | None = None
        self._driver: TunnelDriver | None = None
        self._inner: asyncio.StreamWriter | None = None

    def drain(self) -> None:
        """The egress is shutting down: a socket still waiting for its CONNECT closes (1001)."""
        actions = self.core.drain(asyncio.get_running_loop().time())
        if actions and self._driver is not None:
            self._driver.execute_soon(actions)

    async def run(self) -> None:
        self._driver = TunnelDriver(self.core, self._open, ws=self.link)
        try:
            await self._driver.run()
        finally:
            await self._stop_engine()
            self._finish_record()

    def _finish_record(self) -> None:
        core, record, metrics = self.core, self.record, self.ctx.metrics
        if core.target is not None:
            record.target = core.target.authority
        record.status = core.status
        record.bytes_up = core.counters.to_local
        record.bytes_down = core.counters.to_ws
        if record.bytes_up:
            metrics.bytes_up.inc(record.bytes_up)
        if record.bytes_down:
            metrics.bytes_down.inc(record.bytes_down)
        if record.close_cause == "-":
            record.close_cause = core.outcome
        if core.refusal is not None:
            reason, rule = core.refusal
            if self.admitted.decision == "-":
                self.admitted.decision = "error"
            self.admitted.reason = reason
            if rule != "-":
                self.admitted.rule = rule
        if core.error is not None:
            if self.admitted.decision == "-":
                self.admitted.decision = "error"  # counted, not left without a decision
            metrics.protocol_errors.inc()
            log.error(
                "session %s tunnel %s: protocol error: %s",
                self.session.session_id,
                record.target,
                core.error,
            )

    async def _open(self, action: Open) -> Opened:
        """In-tunnel credentials, admission, then the upstream (or the interception engine)."""
        request = action.request
        assert request is not None
        # First: every CONNECT on a reused socket takes a token, refused or not.
        if self.reused:
            try:
                self.ctx.limiter.renew(self.session.session_id)
            except LimitExceeded as exc:
                self.ctx.metrics.limit_rejections.labels(exc.reason).inc()
                raise OpenFailed(exc.status, exc.reason) from None
        try:
            check_tunnel_credentials(
                request.header("Proxy-Authorization"), self.session, self._token
            )
        except HeadError as exc:
            self.ctx.metrics.auth_failures.labels("tunnel-credentials").inc()
            raise OpenFailed(exc.status, exc.reason) from None
        if self.core.preopened and self.ctx.authenticate is not None:
            # Authenticated at its upgrade, maybe long ago: the token must still be good,
            # and what it says now counts (a reload may have given it another policy).
            try:
                current = self.ctx.authenticate(self._token)
            except AuthError as exc:
                self.ctx.metrics.auth_failures.labels(exc.reason).inc()
                raise OpenStale() from None
            if current.session_id != self.session.session_id:
                raise OpenStale()  # the token is another session's now: a fresh upgrade
            self.session = current
        try:
            route = await self.ctx.admission.admit(self.session, request.target, self.admitted)
        except Refusal as exc:
            if exc.status == 403:
                self.ctx.metrics.denies.labels(exc.reason, exc.rule).inc()
            raise OpenFailed(exc.status, exc.reason, exc.rule) from None
        if route.intercept is None:
            assert route.upstream is not None
            # The socket becomes a transport the tunnel's link takes over: no stream layer.
            return Opened(transport=await parked_transport(route.upstream.sock))
        if self.ctx.intercept is None:
            raise OpenFailed(502, "interception-not-configured", self.admitted.rule)
        # A memory-level hand-off: the engine terminates TLS on the inner end of an
        # in-memory stream pair; the tunnel drives the outer end like any upstream.
        (reader, writer), (_, inner) = stream_pair(UPSTREAM_BUFFER_LIMIT)
        # Held in the transport until the engine's start_tls() resumes reading: bytes that
        # came with the CONNECT (a pipelined ClientHello) must reach TLS, not the unused reader.
        transport = cast(asyncio.Transport, inner.transport)  # a memstream transport
        transport.pause_reading()
        self._inner = inner
        self._engine = asyncio.ensure_future(
            self.ctx.intercept(transport, route, self.admitted, self.session)
        )
        return Opened(reader=reader, writer=writer)

    async def _stop_engine(self) -> None:
        engine = self._engine
        if engine is None:
            return
        try:
            if not engine.done():  # let the engine finish the response it is writing
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(engine), 2.0)
        finally:
            # Runs on cancellation too: the engine (and its upstream TLS) never outlives us.
            engine.cancel()
            await asyncio.wait([engine])
            if not engine.cancelled() and engine.exception() is not None:
                log.error("interception engine failed: %r", engine.exception())
            if self._inner is not None:
                self._inner.transport.abort()
