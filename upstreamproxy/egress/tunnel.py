"""One tunnel on the egress side: in-tunnel CONNECT, policy, dial, then bytes both ways.

The WebSocket has been upgraded and the bearer token verified before this runs. Answers go
*inside* the tunnel as an HTTP/1.1 status head; after ``200`` the chunks are the raw stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

from ..codec import MAX_CHUNK_PAYLOAD, decode_chunk, encode_chunk
from ..connect_head import (
    MAX_HEAD_BYTES,
    ConnectRequest,
    Target,
    build_status_head,
    parse_connect_head,
    split_head,
)
from ..errors import ChunkError, HeadError, ProtocolError
from .allowlist import Decision
from .auth import Session, check_tunnel_credentials
from .dialer import DialError, Upstream

log = logging.getLogger("upstreamproxy.egress.tunnel")

UPSTREAM_READ_SIZE = 64 * 1024
REASON_HEADER = "X-Upstreamproxy-Reason"
RULE_HEADER = "X-Upstreamproxy-Rule"

DecideFn = Callable[[Session, Target], Decision]
DialFn = Callable[[Target, float], Awaitable[Upstream]]


@dataclass
class TunnelTimeouts:
    head: float = 10.0
    dial: float = 10.0
    idle: float = 300.0


@dataclass
class TunnelRecord:
    """What happened to one tunnel: the audit record's raw material."""

    session: str
    target: str = "-"
    address: str = "-"
    decision: str = "-"
    reason: str = "-"
    rule: str = "-"
    status: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    close_cause: str = "-"
    started: float = field(default_factory=time.monotonic)


class _ClosedByPeer(Exception):
    pass


class _Idle(Exception):
    pass


class Tunnel:
    def __init__(self, ws: web.WebSocketResponse, session: Session, token: str,
                 decide: DecideFn, dial: DialFn, timeouts: TunnelTimeouts) -> None:
        self.ws = ws
        self.session = session
        self._token = token
        self._decide = decide
        self._dial = dial
        self.timeouts = timeouts
        self.record = TunnelRecord(session=session.session_id)
        self._last_activity = time.monotonic()

    async def run(self) -> TunnelRecord:
        try:
            await self._run()
        except ProtocolError as exc:
            self.record.close_cause = "protocol-error"
            log.error("session %s tunnel %s: protocol error: %s", self.session.session_id,
                      self.record.target, exc)
            await self.ws.close(code=1002, message=b"protocol error")
        return self.record

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
        target = request.target
        self.record.target = target.authority
        try:
            check_tunnel_credentials(request.header("Proxy-Authorization"), self.session,
                                     self._token)
        except HeadError as exc:
            await self._refuse(exc.status, exc.reason)
            return
        decision = self._decide(self.session, target)
        self.record.decision = "allow" if decision.allowed else "deny"
        self.record.reason, self.record.rule = decision.reason, decision.rule
        if not decision.allowed:
            await self._refuse(403, decision.reason, decision.rule)
            return
        try:
            upstream = await self._dial(target, self.timeouts.dial)
        except DialError as exc:
            self.record.reason = exc.reason
            await self._refuse(exc.status, exc.reason)
            return
        self.record.address = upstream.address
        try:
            self.record.status = 200
            await self.ws.send_bytes(encode_chunk(build_status_head(200)))
            if early:
                upstream.writer.write(early)
                self.record.bytes_up += len(early)
            await self._pump(upstream)
        finally:
            upstream.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.wait_for(upstream.writer.wait_closed(), 1.0))

    async def _refuse(self, status: int, reason: str, rule: str = "-") -> None:
        self.record.status = status
        if self.record.decision == "-":
            self.record.decision = "error"
        self.record.reason = reason
        self.record.close_cause = f"refused-{status}"
        headers = [(REASON_HEADER, reason)]
        if rule != "-":
            headers.append((RULE_HEADER, rule))
        body = f"{status} {reason}\n".encode()
        with contextlib.suppress(ConnectionError):
            await self.ws.send_bytes(encode_chunk(build_status_head(status, tuple(headers),
                                                                    body)))
        await self.ws.close()

    async def _receive_payload(self) -> bytes:
        """The next chunk's payload (possibly empty: a keepalive)."""
        message = await self.ws.receive()
        if message.type == WSMsgType.BINARY:
            payload = decode_chunk(message.data)
            self._last_activity = time.monotonic()
            return payload
        if message.type == WSMsgType.TEXT:
            raise ChunkError("text-frame", "text frames are not part of the protocol")
        raise _ClosedByPeer()

    async def _read_connect(self) -> tuple[ConnectRequest, bytes]:
        buffer = bytearray()
        async with asyncio.timeout(self.timeouts.head):
            while True:
                buffer += await self._receive_payload()
                parts = split_head(buffer, MAX_HEAD_BYTES)
                if parts is not None:
                    head, early = parts
                    return parse_connect_head(head), early

    async def _pump(self, upstream: Upstream) -> None:
        async def relay_to_upstream() -> None:
            while True:
                payload = await self._receive_payload()
                if payload:
                    upstream.writer.write(payload)
                    await upstream.writer.drain()
                    self.record.bytes_up += len(payload)

        async def upstream_to_relay() -> None:
            while data := await upstream.reader.read(UPSTREAM_READ_SIZE):
                # send_bytes waits while the socket's write buffer is over its limit.
                for start in range(0, len(data), MAX_CHUNK_PAYLOAD):
                    await self.ws.send_bytes(encode_chunk(data[start:start + MAX_CHUNK_PAYLOAD]))
                self.record.bytes_down += len(data)
                self._last_activity = time.monotonic()
            raise _ClosedByPeer("upstream")

        async def idle_watch() -> None:
            while True:
                remaining = self._last_activity + self.timeouts.idle - time.monotonic()
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
