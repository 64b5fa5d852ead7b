"""Serving one intercepted tunnel: the sandbox's TLS ends here, HTTP/1.1 is relayed upstream.

The egress has authenticated the tunnel, parsed its CONNECT, applied policy and chosen
interception for the rule; it hands :func:`serve_intercepted` one end of an in-memory stream
pair (a transport; a connected socket works too) whose other end carries the tunnel's raw
bytes. From there:

1. TLS handshake as the server, with a leaf for the CONNECT host issued from the egress CA.
   The client must send SNI equal to the CONNECT host (an IP-literal host may omit it, since
   clients never send SNI for addresses). Otherwise the handshake is refused with an
   ``unrecognized_name`` alert; with ``refuse_unlisted_sni=False`` it completes instead and
   every request is answered ``421 Misdirected Request``.
2. A request loop with h11. Each request must be origin-form with a Host matching the SNI and
   unambiguous framing; CONNECT and Upgrade requests are answered 501 (this engine relays
   HTTP/1.1 messages only, not tunnels or WebSockets). Hop-by-hop headers are dropped, the rule's
   rewrites are applied (a missing secret is a 502 and nothing goes upstream), and the request is
   sent on one verified TLS connection to the upstream, reused while both sides keep it alive.
3. Bodies stream both ways chunk by chunk; each write waits for the reader (backpressure).
   Request trailers are dropped (they could re-add a header a rewrite removed).

Every answer the engine makes itself (4xx/5xx with an ``X-Upstreamproxy-Reason`` header) closes
the client connection, which never leaves a half-read body on it. Secret values exist only in
the upstream request head; nothing here logs or audits them, only their names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final

import h11

from ...connect_head import REASON_HEADER
from ...memstream import PeekableTransport
from .clienthello import (
    MAX_CLIENT_HELLO,
    NO_APPLICATION_PROTOCOL_ALERT,
    NeedMore,
    NotClientHello,
    offered_alpn,
)
from .headers import (
    PreparedRequest,
    Refusal,
    audit_path,
    check_request_head,
    header_values,
    prepare_request,
    prepare_response_headers,
)
from .leaves import ALPN_PROTOCOLS, LeafCache, is_ip_literal, normalize_name
from .metrics import NOOP_METRICS, SNI_MISMATCH, SNI_MISSING, InterceptMetrics
from .peer import CLIENT, READ_SIZE, UPSTREAM, Peer, PeerError
from .rules import InterceptRule
from .secretstore import SecretStore
from .upstream import UpstreamConnector, make_upstream_context, open_upstream

log = logging.getLogger("upstreamproxy.egress.intercept")
ALPN_BYTES: Final = frozenset(name.encode("ascii") for name in ALPN_PROTOCOLS)

#: RFC 9110 §9.2.2: only these may be sent again after a connection failed before an answer.
IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

AuditFn = Callable[[dict[str, object]], None]


def _no_audit(record: dict[str, object]) -> None:
    return None


@dataclass(frozen=True)
class InterceptTimeouts:
    handshake: float = 10.0  # the sandbox's TLS handshake
    connect: float = 10.0  # dialing the upstream, then its TLS handshake (each)
    idle: float = 120.0  # any single read or write making no progress during an exchange
    keepalive: float = 60.0  # waiting for the next request on an idle client connection
    #: From a request head's first byte to its end: a client trickling a head (a byte per
    #: read, each within ``idle``) would otherwise hold the tunnel for ever.
    head: float = 30.0


@dataclass
class InterceptEnv:
    """Everything the engine needs from the egress; built once, shared by every tunnel."""

    leaves: LeafCache
    secrets: SecretStore
    upstream_connector: UpstreamConnector
    upstream_ssl_context: ssl.SSLContext = field(default_factory=make_upstream_context)
    timeouts: InterceptTimeouts = field(default_factory=InterceptTimeouts)
    refuse_unlisted_sni: bool = True
    metrics: InterceptMetrics = NOOP_METRICS
    audit_request: AuditFn = _no_audit


@dataclass
class InterceptResult:
    """What happened on one intercepted tunnel (plaintext byte counts on the sandbox side)."""

    requests: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    upstream_connections: int = 0
    sni: str | None = None
    close_cause: str = "-"


class _SniGate:
    """The per-connection SNI check, run by OpenSSL during the ClientHello."""

    def __init__(
        self, expected: str, allow_missing: bool, leaf_context: ssl.SSLContext, refuse: bool
    ) -> None:
        self.expected = expected
        self.allow_missing = allow_missing
        self.leaf_context = leaf_context
        self.refuse = refuse
        self.server_name: str | None = None
        self.problem: str | None = None

    def context(self) -> ssl.SSLContext:
        # A fresh, certificate-less context per connection: the callback swaps in the cached
        # leaf context once the name checks out, so a refused handshake never sees a cert.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
        ctx.sni_callback = self._callback
        return ctx

    def _callback(
        self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _ctx: ssl.SSLContext
    ) -> int | None:
        self.server_name = server_name
        if server_name is None:
            if not self.allow_missing:
                self.problem = SNI_MISSING
        else:
            try:
                matches = normalize_name(server_name) == self.expected
            except ValueError:
                matches = False
            if not matches:
                self.problem = SNI_MISMATCH
        if self.problem is not None and self.refuse:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslobj.context = self.leaf_context
        return None


@dataclass
class _Exchange:
    """Progress of one request/response, for error handling and the audit line."""

    request: h11.Request
    started: float = field(default_factory=time.monotonic)
    status: int = 0
    response_started: bool = False
    early_response: bool = False
    upstream_tainted: bool = False
    bytes_up: int = 0
    bytes_down: int = 0
    injected: tuple[str, ...] = ()
    rewritten: tuple[str, ...] = ()
    error: str | None = None


#: What the engine serves on: a connected socket, or a transport (an in-memory one, say).
Downstream = socket.socket | asyncio.Transport


async def serve_intercepted(
    sock: Downstream,
    connect_host: str,
    connect_port: int,
    rule: InterceptRule,
    env: InterceptEnv,
) -> InterceptResult:
    """Terminate TLS on ``sock`` and relay HTTP/1.1 to ``connect_host:connect_port``.

    Owns ``sock``: it is closed when this returns (the egress sees EOF on the other end).
    Never raises for anything the client or upstream does; the outcome is in the result.
    """
    session = _Session(connect_host, connect_port, rule, env)
    try:
        await session.run(sock)
    finally:
        sock.close()
    return session.result


class _Session:
    def __init__(
        self, connect_host: str, connect_port: int, rule: InterceptRule, env: InterceptEnv
    ) -> None:
        self.connect_host = connect_host
        self.port = connect_port
        self.rule = rule
        self.env = env
        self.timeouts = env.timeouts
        self.result = InterceptResult()
        self.expected = ""
        self.misdirected: str | None = None
        self.upstream: Peer | None = None

    # -- connection ---------------------------------------------------------------------------

    async def run(self, sock: Downstream) -> None:
        try:
            self.expected = normalize_name(self.connect_host)
            leaf_context = self.env.leaves.get(self.expected)
        except ValueError:
            self.result.close_cause = "bad-connect-host"
            log.warning("intercept: CONNECT host %r cannot get a certificate", self.connect_host)
            return
        client = await self._handshake(sock, leaf_context)
        if client is None:
            return
        try:
            await self._serve(client)
        finally:
            self.result.bytes_up = client.bytes_in
            self.result.bytes_down = client.bytes_out
            await self._drop_upstream()
            await client.aclose()

    async def _handshake(self, sock: Downstream, leaf_context: ssl.SSLContext) -> Peer | None:
        gate = _SniGate(
            self.expected, is_ip_literal(self.expected), leaf_context, self.env.refuse_unlisted_sni
        )
        loop = asyncio.get_running_loop()
        if await _alpn_unacceptable(sock, self.timeouts.handshake):
            # RFC 7301 §3.2: no protocol in common is a fatal alert, not a handshake
            # without ALPN followed by HTTP/1.1 the client never offered.
            self.env.metrics.alpn_refused()
            self.result.close_cause = "handshake-refused (no-application-protocol)"
            log.info("intercept %s:%d: client offers no HTTP/1.1 in ALPN", self.expected, self.port)
            return None
        reader = asyncio.StreamReader(limit=READ_SIZE, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            async with asyncio.timeout(self.timeouts.handshake + 1):
                transport = await _accept_tls(
                    loop, sock, protocol, gate.context(), self.timeouts.handshake
                )
        except (OSError, TimeoutError) as exc:
            self.result.sni = gate.server_name
            if gate.problem is not None:
                self.env.metrics.sni_refused(gate.problem)
                self.result.close_cause = f"handshake-refused ({gate.problem})"
                log.info(
                    "intercept %s:%d: TLS handshake refused: %s (SNI %r)",
                    self.expected,
                    self.port,
                    gate.problem,
                    gate.server_name,
                )
            elif isinstance(exc, TimeoutError) or "taking longer" in str(exc):
                self.result.close_cause = "handshake-timeout"
            else:
                self.result.close_cause = "handshake-failed"
                log.info(
                    "intercept %s:%d: client TLS handshake failed (%s)",
                    self.expected,
                    self.port,
                    type(exc).__name__,
                )
            return None
        self.result.sni = gate.server_name
        if gate.problem is not None:
            self.env.metrics.sni_refused(gate.problem)
            self.misdirected = gate.problem
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return Peer(CLIENT, h11.SERVER, reader, writer, self.timeouts.idle)

    async def _serve(self, client: Peer) -> None:
        while True:
            request = await self._read_request(client)
            if request is None:
                return
            self.result.requests += 1
            if not await self._exchange(client, request):
                return
            client.start_next_cycle()

    async def _read_request(self, client: Peer) -> h11.Request | None:
        loop = asyncio.get_running_loop()
        head_deadline: float | None = None
        while True:
            try:
                event = client.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.result.close_cause = "client-protocol-error"
                status = exc.error_status_hint or 400
                await self._answer(client, Refusal(status, "malformed-request", str(exc)[:200]))
                self._audit(None, status, error="malformed-request")
                return None
            if event is h11.NEED_DATA:
                # Nothing buffered: we are between requests and the keep-alive clock runs.
                # Once a head has begun, the whole of it must arrive within the head timeout.
                between = not client.conn.trailing_data[0]
                if between:
                    wait = self.timeouts.keepalive
                else:
                    if head_deadline is None:
                        head_deadline = loop.time() + self.timeouts.head
                    wait = max(head_deadline - loop.time(), 0.0)
                try:
                    data = await client.read(wait)
                except PeerError as exc:
                    if not exc.reason.endswith("timeout"):
                        self.result.close_cause = exc.reason
                    elif between:
                        self.result.close_cause = "keepalive-timeout"
                    else:
                        self.result.close_cause = "client-head-timeout"
                        refusal = Refusal(408, "request-head-timeout", "request head incomplete")
                        await self._answer(client, refusal)
                        self._audit(None, 408, error="request-head-timeout")
                    return None
                client.conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                try:
                    client.check_head(event)
                except PeerError:
                    self.result.close_cause = "client-protocol-error"
                    refusal = Refusal(431, "malformed-request", "request head too large")
                    await self._answer(client, refusal)
                    self._audit(event, 431, error="malformed-request")
                    return None
                return event
            self.result.close_cause = "client-closed"
            return None

    # -- one request --------------------------------------------------------------------------

    async def _exchange(self, client: Peer, request: h11.Request) -> bool:
        """Handle one request; True if the client connection can carry another."""
        exchange = _Exchange(request)
        try:
            if self.misdirected is not None:
                raise Refusal(
                    421, self.misdirected, "the TLS server name does not match the CONNECT host"
                )
            try:
                check_request_head(request, self.expected, self.port)
            except Refusal as refusal:
                if refusal.reason == "host-mismatch":
                    self.env.metrics.host_mismatch(self.rule.rule_id)
                raise
            prepared = prepare_request(request, self.rule, self.env.secrets.get)
        except Refusal as refusal:
            await self._refuse(client, exchange, refusal)
            return False
        exchange.injected, exchange.rewritten = prepared.injected, prepared.rewritten
        keep = await self._forward(client, exchange, prepared)
        self._finish(exchange)
        return keep

    async def _refuse(self, client: Peer, exchange: _Exchange, refusal: Refusal) -> None:
        log.info(
            "intercept %s:%d rule %s: %s %s refused: %s %s",
            self.expected,
            self.port,
            self.rule.rule_id,
            exchange.request.method.decode("ascii", "replace"),
            audit_path(exchange.request.target),
            refusal.status,
            refusal.reason,
        )
        exchange.error = refusal.reason
        if await self._answer(client, refusal):
            exchange.status = refusal.status
        self.result.close_cause = f"refused-{refusal.status} ({refusal.reason})"
        self._finish(exchange)

    async def _answer(self, client: Peer, refusal: Refusal) -> bool:
        """Send the engine's own response (then the connection closes). False if impossible."""
        if client.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return False
        try:
            phrase = HTTPStatus(refusal.status).phrase
        except ValueError:
            phrase = ""
        body = f"{refusal.status} {refusal.reason}"
        body += f": {refusal.detail}\n" if refusal.detail else "\n"
        data = body.encode("utf-8", errors="replace")
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(data))),
            ("Connection", "close"),
            (REASON_HEADER, refusal.reason),
        ]
        try:
            await client.send(
                h11.Response(status_code=refusal.status, headers=headers, reason=phrase)
            )
            if _sending_body(client.conn):  # not after a HEAD request
                await client.send(h11.Data(data=data))
                await client.send(h11.EndOfMessage())
        except PeerError:
            return False
        return True

    async def _forward(self, client: Peer, exchange: _Exchange, prepared: PreparedRequest) -> bool:
        for attempt in (1, 2):
            try:
                upstream, reused = await self._upstream_peer()
            except Refusal as refusal:
                await self._refuse_forward(client, exchange, refusal)
                return False
            try:
                await self._relay(client, upstream, exchange, prepared)
            except PeerError as exc:
                await self._drop_upstream()
                stale = (
                    exc.side == UPSTREAM
                    and exc.closed
                    and reused
                    and upstream.cycle_bytes_in == 0
                    and not prepared.has_body
                    and not exchange.response_started
                    and prepared.method.upper() in IDEMPOTENT_METHODS
                )
                if stale and attempt == 1:
                    # A kept-alive upstream closed as we reused it; a bodiless idempotent
                    # request is safe to send again on a fresh connection. A POST is not: the
                    # upstream may have acted on it before closing (RFC 9110 §9.2.2).
                    log.debug("intercept %s: stale upstream connection, retrying", self.expected)
                    continue
                return await self._relay_failed(client, exchange, exc)
            break
        upstream_keep = (
            upstream.cycle_complete
            and not exchange.upstream_tainted
            and not upstream.eof
            # bytes after the response's end (e.g. a body sent for HEAD) would be read as
            # the next response: such a connection is never reused
            and not upstream.conn.trailing_data[0]
        )
        if upstream_keep:
            upstream.start_next_cycle()
        else:
            await self._drop_upstream()
        return client.cycle_complete and not exchange.early_response

    async def _refuse_forward(self, client: Peer, exchange: _Exchange, refusal: Refusal) -> None:
        log.warning(
            "intercept %s:%d rule %s: upstream unavailable: %s %s",
            self.expected,
            self.port,
            self.rule.rule_id,
            refusal.status,
            refusal.reason,
        )
        exchange.error = refusal.reason
        if await self._answer(client, refusal):
            exchange.status = refusal.status
        self.result.close_cause = f"refused-{refusal.status} ({refusal.reason})"

    async def _relay_failed(self, client: Peer, exchange: _Exchange, exc: PeerError) -> bool:
        exchange.error = exc.reason
        self.result.close_cause = exc.reason
        if exchange.response_started:
            # Mid-response: no status can be sent any more; closing tells the client the
            # body is incomplete (chunked without the last chunk, or short of Content-Length).
            log.info(
                "intercept %s:%d: exchange aborted mid-response: %s",
                self.expected,
                self.port,
                exc.reason,
            )
            return False
        if exc.side == UPSTREAM:
            status = 504 if exc.reason.endswith("timeout") else 502
            log.warning(
                "intercept %s:%d rule %s: upstream failed before responding: %s",
                self.expected,
                self.port,
                self.rule.rule_id,
                exc.reason,
            )
            refusal = Refusal(status, exc.reason, "the upstream failed before responding")
        elif exc.reason.endswith("protocol-error"):
            refusal = Refusal(
                exc.status_hint or 400, "malformed-request-body", "the request body is malformed"
            )
        else:
            return False  # the client went away or stalled: nobody to answer
        if await self._answer(client, refusal):
            exchange.status = refusal.status
        return False

    async def _relay(
        self, client: Peer, upstream: Peer, exchange: _Exchange, prepared: PreparedRequest
    ) -> None:
        await upstream.send(
            h11.Request(method=prepared.method, target=prepared.target, headers=prepared.headers)
        )
        for header in prepared.rewritten:
            self.env.metrics.rewrite_applied(self.rule.rule_id, header)
        try:
            async with asyncio.TaskGroup() as group:
                body = group.create_task(self._pump_request_body(client, upstream, exchange))
                group.create_task(self._pump_response(client, upstream, exchange, body))
        except ExceptionGroup as errors:
            # One side failing cancels the other; report the failure, not the cancellation.
            peer_errors, rest = errors.split(PeerError)
            if rest is not None or peer_errors is None:
                raise
            raise _first_peer_error(peer_errors) from None

    async def _pump_request_body(self, client: Peer, upstream: Peer, exchange: _Exchange) -> None:
        if client.conn.their_state is h11.DONE:  # bodiless, or a retry of one
            await upstream.send(h11.EndOfMessage())
            return
        while True:
            event = await client.next_event()
            if isinstance(event, h11.Data):
                await upstream.send(h11.Data(data=event.data))
                exchange.bytes_up += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                await upstream.send(h11.EndOfMessage())  # trailers dropped on purpose
                return
            else:
                raise PeerError(CLIENT, "client-closed", closed=True)

    async def _pump_response(
        self, client: Peer, upstream: Peer, exchange: _Exchange, body: asyncio.Task[None]
    ) -> None:
        while True:
            # An upstream is silent while it takes a request body in (most answer only once
            # all of it arrived): that is no stall while the body still moves, under its own
            # deadlines (client reads, upstream writes). Only after it can silence time out.
            event = await upstream.next_event(patient=lambda: not body.done())
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    raise PeerError(UPSTREAM, "upstream-unexpected-101")
                await client.send(
                    h11.InformationalResponse(
                        status_code=event.status_code,
                        reason=event.reason,
                        headers=prepare_response_headers(event.headers),
                    )
                )
            elif isinstance(event, h11.Response):
                if header_values(event.headers, b"transfer-encoding") and header_values(
                    event.headers, b"content-length"
                ):
                    exchange.upstream_tainted = True  # RFC 9112 6.3: close after such a message
                exchange.status = event.status_code
                exchange.response_started = True
                await client.send(
                    h11.Response(
                        status_code=event.status_code,
                        reason=event.reason,
                        headers=prepare_response_headers(event.headers),
                    )
                )
            elif isinstance(event, h11.Data):
                await client.send(h11.Data(data=event.data))
                exchange.bytes_down += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                await client.send(h11.EndOfMessage())
                if not body.done():
                    # The upstream answered before reading the whole request (e.g. 413):
                    # stop sending; neither connection can be reused.
                    exchange.early_response = True
                    body.cancel()
                return
            else:
                raise PeerError(UPSTREAM, "upstream-closed", closed=True)

    # -- upstream connection ------------------------------------------------------------------

    async def _upstream_peer(self) -> tuple[Peer, bool]:
        if self.upstream is not None:
            if self.upstream.idle_and_open:
                return self.upstream, True
            await self._drop_upstream()
        reader, writer = await open_upstream(
            self.env.upstream_connector,
            self.connect_host,
            self.expected,
            self.port,
            self.env.upstream_ssl_context,
            self.timeouts.connect,
        )
        self.upstream = Peer(UPSTREAM, h11.CLIENT, reader, writer, self.timeouts.idle)
        self.result.upstream_connections += 1
        return self.upstream, False

    async def _drop_upstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            await upstream.aclose()

    # -- audit --------------------------------------------------------------------------------

    def _finish(self, exchange: _Exchange) -> None:
        self._audit(exchange.request, exchange.status, error=exchange.error, exchange=exchange)

    def _audit(
        self,
        request: h11.Request | None,
        status: int,
        *,
        error: str | None = None,
        exchange: _Exchange | None = None,
    ) -> None:
        self.env.metrics.request_completed(self.rule.rule_id, status)
        record: dict[str, object] = {
            "event": "intercept-request",
            "rule": self.rule.rule_id,
            "connect": f"{self.expected}:{self.port}",
            "host": self.expected,
            "method": request.method.decode("ascii", "replace") if request else "-",
            "path": audit_path(request.target) if request else "-",
            "status": status,
            "injected": list(exchange.injected) if exchange else [],
            "rewritten": list(exchange.rewritten) if exchange else [],
            "bytes_up": exchange.bytes_up if exchange else 0,
            "bytes_down": exchange.bytes_down if exchange else 0,
            "duration_ms": round((time.monotonic() - exchange.started) * 1000, 1)
            if exchange
            else 0.0,
            "error": error,
        }
        try:
            self.env.audit_request(record)
        except Exception:
            log.exception("intercept: the audit callback failed")


def _alpn_verdict(data: bytes) -> bool | None:
    """True: the ClientHello offers ALPN without HTTP/1.1 (refuse); False: leave it to
    OpenSSL (no ALPN, not TLS, oversized); None: the hello is not complete yet."""
    try:
        offered = offered_alpn(data)
    except NeedMore:
        return False if len(data) >= MAX_CLIENT_HELLO else None
    except NotClientHello:
        return False
    return offered is not None and not any(name in ALPN_BYTES for name in offered)


async def _alpn_unacceptable(downstream: Downstream, within: float) -> bool:
    """Peek at the ClientHello; if it offers ALPN without HTTP/1.1, consume it and answer
    the alert (True). Anything unusual (no ALPN, not TLS, too slow) is left to OpenSSL."""
    if isinstance(downstream, socket.socket):
        return await _alpn_unacceptable_socket(downstream, within)
    if not isinstance(downstream, PeekableTransport):
        return False
    # Reading stays paused: the hello waits in the transport until start_tls() resumes it.
    downstream.pause_reading()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        data, ended = downstream.peek_incoming()
        verdict = _alpn_verdict(data)
        if verdict is None and not ended:
            await asyncio.sleep(0.01)
            continue
        if verdict:
            downstream.discard_incoming(len(data))
            downstream.write(NO_APPLICATION_PROTOCOL_ALERT)
        return bool(verdict)
    return False


async def _alpn_unacceptable_socket(sock: socket.socket, within: float) -> bool:
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        try:
            data = sock.recv(MAX_CLIENT_HELLO, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            data = b""
        except OSError:
            return False
        else:
            if not data:
                return False  # EOF: OpenSSL reports the failed handshake
        verdict = _alpn_verdict(data)
        if verdict is None:
            # Level-triggered readiness would fire at once for bytes already peeked:
            # wait for more with a short sleep (a ClientHello is nearly always one segment).
            await _readable(sock, 0.01 if data else deadline - loop.time())
            continue
        if verdict:
            with contextlib.suppress(OSError):
                sock.recv(len(data))  # consume the hello so closing does not reset the alert
                sock.send(NO_APPLICATION_PROTOCOL_ALERT)
        return verdict
    return False


async def _readable(sock: socket.socket, wait: float) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        async with asyncio.timeout(max(wait, 0.0)):
            await ready
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(fd)


def _sending_body(conn: h11.Connection) -> bool:
    return conn.our_state is h11.SEND_BODY


def _first_peer_error(errors: BaseExceptionGroup[BaseException]) -> PeerError:
    for error in errors.exceptions:
        if isinstance(error, PeerError):
            return error
        if isinstance(error, BaseExceptionGroup):
            return _first_peer_error(error)
    raise AssertionError("no PeerError in the group")


async def _accept_tls(
    loop: asyncio.AbstractEventLoop,
    downstream: Downstream,
    protocol: asyncio.StreamReaderProtocol,
    context: ssl.SSLContext,
    handshake_timeout: float,
) -> asyncio.Transport:
    """The server side of the client's TLS handshake, over a socket or a transport."""
    if isinstance(downstream, socket.socket):
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, downstream, ssl=context, ssl_handshake_timeout=handshake_timeout
        )
        return transport
    tls = await loop.start_tls(
        downstream, protocol, context, server_side=True, ssl_handshake_timeout=handshake_timeout
    )
    if tls is None:  # the transport closed during the handshake
        raise ConnectionResetError("closed during the TLS handshake")
    protocol.connection_made(tls)
    return tls


__all__ = [
    "InterceptEnv",
    "InterceptResult",
    "InterceptTimeouts",
    "serve_intercepted",
]
