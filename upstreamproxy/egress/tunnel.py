"""One tunnel on the egress side: in-tunnel CONNECT, limits, admission, then bytes both ways.

The WebSocket has been upgraded and the bearer token verified before this runs. Answers go
*inside* the tunnel as an HTTP/1.1 status head; after ``200`` the chunks are the raw stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

from ..codec import MAX_CHUNK_PAYLOAD, decode_chunk, encode_chunk
from ..connect_head import (
    MAX_HEAD_BYTES,
    ConnectRequest,
    build_status_head,
    parse_connect_head,
    split_head,
)
from ..errors import ChunkError, HeadError, ProtocolError
from .admission import Admission, AdmissionRecord, Refusal, Route
from .auth import Session, check_tunnel_credentials
from .dialer import Upstream
from .limits import Limiter
from .metrics import EgressMetrics

log = logging.getLogger("upstreamproxy.egress.tunnel")

UPSTREAM_READ_SIZE = 128 * 1024
REASON_HEADER = "X-Upstreamproxy-Reason"
RULE_HEADER = "X-Upstreamproxy-Rule"

#: Serves an intercepted tunnel on the inner end of a socketpair (see egress/interception).
InterceptFn = Callable[[socket.socket, Route, AdmissionRecord, Session], Awaitable[object]]


@dataclass
class TunnelTimeouts:
    head: float = 10.0
    dial: float = 10.0
    idle: float = 300.0


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


class _ClosedByPeer(Exception):
    pass


class _Idle(Exception):
    pass


@dataclass
class TunnelContext:
    """Everything a tunnel needs from its server."""

    admission: Admission
    limiter: Limiter
    metrics: EgressMetrics
    timeouts: TunnelTimeouts
    intercept: InterceptFn | None = None


class Tunnel:
    def __init__(
        self, ws: web.WebSocketResponse, session: Session, token: str, context: TunnelContext
    ) -> None:
        self.ws = ws
        self.session = session
        self._token = token
        self.ctx = context
        self.record = TunnelRecord(session=session.session_id)
        self.admitted = AdmissionRecord()
        self._last_activity = time.monotonic()

    async def run(self) -> None:
        try:
            await self._run()
        except ProtocolError as exc:
            self.record.close_cause = "protocol-error"
            if self.admitted.decision == "-":
                self.admitted.decision = "error"  # counted, not left without a decision
            self.ctx.metrics.protocol_errors.inc()
            log.error(
                "session %s tunnel %s: protocol error: %s",
                self.session.session_id,
                self.record.target,
                exc,
            )
            await self.ws.close(code=1002, message=b"protocol error")

    async def _run(self) -> None:
        try:
            request, early = await self._read_connect()
        except HeadError as exc:
            await self._refuse(exc.status, exc.reason)
            return
        except _ClosedByPeer:
            self.record.close_cause = "closed-before-connect"
            return
        except TimeoutError:
            await self._refuse(400, "timed out waiting for the CONNECT head")
            return
        self.record.target = request.target.authority
        try:
            check_tunnel_credentials(
                request.header("Proxy-Authorization"), self.session, self._token
            )
        except HeadError as exc:
            self.ctx.metrics.auth_failures.labels("tunnel-credentials").inc()
            await self._refuse(exc.status, exc.reason)
            return
        await self._admitted(request, early)

    async def _admitted(self, request: ConnectRequest, early: bytes) -> None:
        try:
            route = await self.ctx.admission.admit(self.session, request.target, self.admitted)
        except Refusal as exc:
            if exc.status == 403:
                self.ctx.metrics.denies.labels(exc.reason, exc.rule).inc()
            await self._refuse(exc.status, exc.reason, exc.rule)
            return
        if route.intercept is not None:
            await self._serve_intercepted(route, early)
            return
        assert route.upstream is not None
        await self._serve_opaque(route.upstream, early)

    async def _serve_opaque(self, upstream: Upstream, early: bytes) -> None:
        try:
            await self._establish()
            if early:
                upstream.writer.write(early)
                self._count_up(len(early))
            await self._pump(upstream)
        finally:
            upstream.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.wait_for(upstream.writer.wait_closed(), 1.0))

    async def _serve_intercepted(self, route: Route, early: bytes) -> None:
        if self.ctx.intercept is None:
            await self._refuse(502, "interception-not-configured", self.admitted.rule)
            return
        outer, inner = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=outer)
        engine = asyncio.ensure_future(
            self.ctx.intercept(inner, route, self.admitted, self.session)
        )
        try:
            await self._serve_opaque(Upstream(reader, writer, "intercept"), early)
            if not engine.done():  # let the engine finish the response it is writing
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(engine), 2.0)
        finally:
            # Runs on cancellation too: the engine (and its upstream TLS) never outlives us.
            engine.cancel()
            await asyncio.wait([engine])
            if not engine.cancelled() and engine.exception() is not None:
                log.error("interception engine failed: %r", engine.exception())
            inner.close()

    async def _establish(self) -> None:
        self.record.status = 200
        await self.ws.send_bytes(encode_chunk(build_status_head(200)))

    async def _refuse(self, status: int, reason: str, rule: str = "-") -> None:
        self.record.status = status
        if self.admitted.decision == "-":
            self.admitted.decision = "error"
        self.admitted.reason = reason
        self.admitted.rule = rule if rule != "-" else self.admitted.rule
        self.record.close_cause = f"refused-{status}"
        # The rule header is always there ("-": no rule matched) so a client can rely on it.
        headers = [(REASON_HEADER, reason), (RULE_HEADER, rule)]
        body = json.dumps({"status": status, "reason": reason, "rule": rule}).encode() + b"\n"
        with contextlib.suppress(ConnectionError):
            await self.ws.send_bytes(encode_chunk(build_status_head(status, tuple(headers), body)))
        await self.ws.close()

    async def _receive_payload(self) -> bytes:
        """The next chunk's payload (possibly empty: a keepalive)."""
        message = await self.ws.receive()
        if message.type == WSMsgType.BINARY:
            payload = decode_chunk(message.data)
            if payload:  # keepalives keep the WebSocket open, not an idle tunnel
                self._last_activity = time.monotonic()
            return payload
        if message.type == WSMsgType.TEXT:
            raise ChunkError("text-frame", "text frames are not part of the protocol")
        raise _ClosedByPeer()

    async def _read_connect(self) -> tuple[ConnectRequest, bytes]:
        buffer = bytearray()
        async with asyncio.timeout(self.ctx.timeouts.head):
            while True:
                buffer += await self._receive_payload()
                parts = split_head(buffer, MAX_HEAD_BYTES)
                if parts is not None:
                    head, early = parts
                    return parse_connect_head(head), early

    def _count_up(self, size: int) -> None:
        self.record.bytes_up += size
        self.ctx.metrics.bytes_up.inc(size)

    async def _pump(self, upstream: Upstream) -> None:
        async def relay_to_upstream() -> None:
            while True:
                payload = await self._receive_payload()
                if payload:
                    upstream.writer.write(payload)
                    await upstream.writer.drain()
                    self._count_up(len(payload))

        async def upstream_to_relay() -> None:
            down = self.ctx.metrics.bytes_down
            while data := await upstream.reader.read(UPSTREAM_READ_SIZE):
                # send_bytes waits while the socket's write buffer is over its limit.
                for start in range(0, len(data), MAX_CHUNK_PAYLOAD):
                    await self.ws.send_bytes(encode_chunk(data[start : start + MAX_CHUNK_PAYLOAD]))
                self.record.bytes_down += len(data)
                down.inc(len(data))
                self._last_activity = time.monotonic()
            raise _ClosedByPeer("upstream")

        async def idle_watch() -> None:
            while True:
                remaining = self._last_activity + self.ctx.timeouts.idle - time.monotonic()
                if remaining <= 0:
                    raise _Idle()
                await asyncio.sleep(remaining)

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(relay_to_upstream())
                group.create_task(upstream_to_relay())
                group.create_task(idle_watch())
        except* _ClosedByPeer as closed:
            side = str(closed.exceptions[0]) or "relay"
            self.record.close_cause = f"{side}-closed"
        except* _Idle:
            self.record.close_cause = "idle-timeout"
        except* (ConnectionError, OSError) as errors:
            self.record.close_cause = f"connection-lost ({type(errors.exceptions[0]).__name__})"
        except* ProtocolError as errors:
            raise errors.exceptions[0] from None  # run() closes with 1002
        if not self.ws.closed:
            await self.ws.close()
