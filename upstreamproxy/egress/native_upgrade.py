"""The tunnel endpoint's WebSocket upgrade, served without aiohttp.

``listener.py`` reads the first request head of each connection; when the request line is
``GET <ws path>`` it hands the connection here instead of to aiohttp. :class:`NativeUpgrade`
answers exactly what ``EgressServer._tunnel`` answers (statuses, JSON bodies,
``X-Upstreamproxy-Reason``), in the same order:

=====================================  ======  ===========================================
check                                  status  reason header
=====================================  ======  ===========================================
malformed / oversized head             400/    the parser's code (``head-too-large``, ...)
                                       431/505
draining                               503     ``draining``
``Authorization: Bearer`` refused      401     the authenticator's reason
not a WebSocket upgrade (HTTP/1.1,     400     ``websocket-upgrade-required``
Upgrade, Connection, 16-byte key, no
request body)
``Sec-WebSocket-Version`` not 13       426     ``unsupported-websocket-version`` (and
                                               ``Sec-WebSocket-Version: 13``)
session limits                         429/503 the limiter's reason
=====================================  ======  ===========================================

then ``101 Switching Protocols`` (no extension, no subprotocol; ``X-Upstreamproxy-Reuse: 1``
when the relay offered tunnel reuse and this egress allows it) in one write, the
connection leaves the pre-auth books, and ``on_upgraded(transport, leftover, session, token,
preopened, reuse)`` runs with reading paused: ``leftover`` holds any bytes that came after the
head (the first frames). The session's limiter slot is released when it returns or raises.
Refusals carry ``Connection: close``; the transport is closed, and aborted if it could not
flush within :data:`CLOSE_TIMEOUT`.

The pure parts (:func:`check_upgrade`, :func:`answer`, :func:`switching_protocols`) do no
I/O; :class:`NativeUpgrade` is the thin adapter.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from http import HTTPStatus
from typing import Any, Final

from ..connect_head import PREOPENED_HEADER, REASON_HEADER, REUSE_HEADER
from ..errors import AuthError
from ..tunnel.links import WsLink
from ..ws_handshake import VERSION, accept_key
from .auth import Session, bearer_token
from .limits import Limiter, LimitExceeded
from .metrics import EgressMetrics
from .preauth import PreauthGuard
from .upgrade_head import RequestHead, UpgradeHeadError, parse_request_head

log = logging.getLogger("upstreamproxy.egress")

#: Seconds a refused connection may take to flush its answer before it is aborted.
CLOSE_TIMEOUT: Final = 5.0

#: The tunnel runner: owns ``transport`` (reading paused) once called. ``leftover``: bytes
#: received after the upgrade head; ``token``: the verified bearer token (the in-tunnel
#: Proxy-Authorization must repeat it); ``preopened``: ``X-Upstreamproxy-Preopened: 1``;
#: ``reuse``: tunnel reuse was negotiated (SPEC §11).
OnUpgraded = Callable[[asyncio.Transport, bytes, Session, str, bool, bool], Awaitable[None]]

UPGRADE_REQUIRED: Final = {"error": "websocket upgrade required"}


class Refusal(Exception):
    """A non-101 answer: its status, JSON body and extra headers."""

    def __init__(
        self, status: int, body: dict[str, str], headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers


def check_upgrade(head: RequestHead) -> str:
    """The ``Sec-WebSocket-Key`` of a well-formed RFC 6455 §4.2.1 upgrade, or :class:`Refusal`
    (400; 426 for a version other than 13)."""
    required = Refusal(400, UPGRADE_REQUIRED, ((REASON_HEADER, "websocket-upgrade-required"),))
    if head.method != "GET" or head.version != (1, 1):
        raise required
    if not _has_token(head.header("upgrade"), "websocket"):
        raise required
    if not _has_token(head.header("connection"), "upgrade"):
        raise required
    # A body would be read as WebSocket frames.
    if head.header("transfer-encoding") is not None or head.header("content-length") not in (
        None,
        "0",
    ):
        raise required
    version = head.header("sec-websocket-version")
    if version is None:
        raise required
    if version.strip() != VERSION:
        raise Refusal(
            426,
            UPGRADE_REQUIRED,
            (
                (REASON_HEADER, "unsupported-websocket-version"),
                ("Sec-WebSocket-Version", VERSION),
            ),
        )
    key = head.header("sec-websocket-key")
    if key is None or not _valid_key(key.strip()):
        raise required
    return key.strip()


def _has_token(value: str | None, token: str) -> bool:
    if value is None:
        return False
    return any(part.strip().lower() == token for part in value.split(","))


def _valid_key(key: str) -> bool:
    if len(key) != 24:  # base64 of 16 bytes
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def answer(status: int, body: dict[str, str], headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete ``Connection: close`` response with a JSON body (as aiohttp's
    ``json_response`` would write it)."""
    payload = json.dumps(body).encode()
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(payload)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def switching_protocols(key: str, *, reuse: bool = False) -> bytes:
    extra = f"{REUSE_HEADER}: 1\r\n" if reuse else ""
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n{extra}\r\n"
    ).encode("ascii")


def claims(buffer: bytes | bytearray, prefix: bytes) -> bool | None:
    """Whether a connection whose first bytes are ``buffer`` is an upgrade of the ws path
    (``prefix`` = ``b"GET " + path``): True, False, or None while it cannot tell yet."""
    n = len(prefix)
    if len(buffer) <= n:
        return None if prefix.startswith(bytes(buffer)) else False
    return buffer.startswith(prefix) and buffer[n : n + 1] in (b" ", b"?")


class NativeUpgrade:
    """Serves the upgrade of one ws path for one listener (single event loop)."""

    def __init__(
        self,
        path: str,
        *,
        authenticate: Callable[[str], Session],
        limiter: Limiter,
        metrics: EgressMetrics,
        guard: PreauthGuard,
        on_upgraded: OnUpgraded,
        refusing: Callable[[], bool],
        spawn: Callable[[Coroutine[Any, Any, None]], object],
        reuse: bool = False,
    ) -> None:
        self.prefix = b"GET " + path.encode("ascii")
        self._authenticate = authenticate
        self._limiter = limiter
        self._metrics = metrics
        self._guard = guard
        self._on_upgraded = on_upgraded
        self._refusing = refusing
        self._spawn = spawn
        self._reuse = reuse

    def claims(self, buffer: bytes | bytearray) -> bool | None:
        return claims(buffer, self.prefix)

    def handle(self, transport: asyncio.Transport, key: Any, head: bytes, leftover: bytes) -> None:
        """Answer the upgrade whose complete (or oversized, or truncated) head is ``head``."""
        transport.pause_reading()
        try:
            parsed = parse_request_head(head)
            session, token, ws_key = self._admit(parsed, transport)
        except UpgradeHeadError as exc:
            self._refuse(transport, Refusal(exc.status, {"error": exc.reason}, _reason(exc.code)))
            return
        except Refusal as refusal:
            self._refuse(transport, refusal)
            return
        reuse = self._reuse and parsed.header(REUSE_HEADER) == "1"
        transport.write(switching_protocols(ws_key, reuse=reuse))
        self._guard.left_preauth(key)
        preopened = parsed.header(PREOPENED_HEADER) == "1"
        self._spawn(self._run(transport, leftover, session, token, preopened, reuse))

    def _admit(self, head: RequestHead, transport: asyncio.Transport) -> tuple[Session, str, str]:
        if self._refusing():
            raise Refusal(503, {"error": "draining"}, _reason("draining"))
        try:
            token = bearer_token(head.header("authorization"))
            session = self._authenticate(token)
        except AuthError as exc:
            self._metrics.auth_failures.labels(exc.reason).inc()
            peer = transport.get_extra_info("peername")
            remote = peer[0] if isinstance(peer, tuple) else peer
            log.warning("upgrade refused from %s: %s", remote, exc.reason)
            raise Refusal(
                401, {"error": "unauthorized", "reason": exc.reason}, _reason(exc.reason)
            ) from None
        ws_key = check_upgrade(head)
        # Limits count WebSockets, not CONNECT heads (as in EgressServer._tunnel).
        try:
            self._limiter.acquire(session.session_id)
        except LimitExceeded as exc:
            self._metrics.limit_rejections.labels(exc.reason).inc()
            log.warning("upgrade refused for session %s: %s", session.session_id, exc.reason)
            raise Refusal(
                exc.status, {"error": "limited", "reason": exc.reason}, _reason(exc.reason)
            ) from None
        return session, token, ws_key

    def _refuse(self, transport: asyncio.Transport, refusal: Refusal) -> None:
        transport.write(answer(refusal.status, refusal.body, refusal.headers))
        close_bounded(transport)

    async def _run(
        self,
        transport: asyncio.Transport,
        leftover: bytes,
        session: Session,
        token: str,
        preopened: bool,
        reuse: bool,
    ) -> None:
        try:
            await self._on_upgraded(transport, leftover, session, token, preopened, reuse)
        finally:
            release = functools.partial(self._limiter.release, session.session_id)
            link = transport.get_protocol()
            if (
                isinstance(link, WsLink)
                and not link.lost
                and (link.lingering or transport.is_closing())
            ):
                # Still delivering its tail (it closes itself, bounded): the socket keeps its
                # session's slot until it is gone, or a session could hold any number.
                link.when_lost(release)
            else:
                release()
                if not transport.is_closing():
                    close_bounded(transport)


def close_bounded(transport: asyncio.Transport) -> None:
    """Close after flushing, but abort if the peer does not take the bytes in time."""
    pending = transport.get_write_buffer_size() > 0
    tls = transport.get_extra_info("sslcontext") is not None  # close_notify may be pending too
    transport.close()
    if pending or tls:
        asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)


def _reason(reason: str) -> tuple[tuple[str, str], ...]:
    return ((REASON_HEADER, reason),)
