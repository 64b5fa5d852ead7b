"""Plain-HTTP forwarding: absolute-form requests carried over the same tunnels as CONNECT.

A tool with ``HTTP_PROXY`` set sends ``GET http://host[:port]/path HTTP/1.1`` to the relay.
The wire protocol to the egress does not change: the forwarder opens a tunnel to
``host:port`` exactly as for ``CONNECT host:port`` (so the egress policy decides port 80 like
any other port), and speaks origin-form HTTP/1.1 to the origin inside it.

Public API::

    is_forward_request(head: bytes) -> bool          # route a client's first head here?
    parse_forward_target(target: bytes) -> ForwardTarget
    rewrite_request(request: h11.Request) -> tuple[ForwardTarget, h11.Request]
    rewrite_response(response: h11.Response | h11.InformationalResponse) -> same type
    class TunnelStream(Protocol)      # receive(max) -> bytes (b"" = EOF), send(data), aclose()
    OpenTunnel = Callable[[str, int], Awaitable[TunnelStream]]; raises TunnelRefused
    class ForwardLimits               # the timeouts
    async serve_forward(reader, writer, initial, open_tunnel, limits) -> ForwardStats

The first five are pure (no I/O); ``serve_forward`` is the thin asyncio layer. Both sides are
h11 connections, so framing (Content-Length, chunked, close-delimited, HEAD, 1xx) is h11's and
bodies stream event by event: a Data event is written (and drained) before the next read, so
a connection holds at most one read's worth of body however large the body is.

Rules (RFC 9110 §7.6, RFC 9112 §3.2.2):

* The client's absolute-form target becomes origin-form; ``Host`` is replaced by the target's
  authority (a proxy must ignore the client's Host for an absolute-form request).
* Hop-by-hop headers are dropped in both directions: the fixed list below plus every name the
  ``Connection`` header lists. ``Proxy-Authorization`` is in that list: a client's proxy
  credentials never reach an origin (nor the egress: the tunnel carries only the session's).
  ``Upgrade`` is dropped, so the origin never switches protocols on a forwarded connection.
* Framing headers are kept for h11 to frame with; with both ``Transfer-Encoding`` and
  ``Content-Length`` the latter is dropped (RFC 9112 §6.3: the former wins; forwarding both is
  how request smuggling starts).
* Keep-alive: the client connection stays open across requests while h11 says it may. The
  tunnel to the origin is reused while the next request goes to the same ``host:port`` and
  the origin kept its connection open; a request for another target closes it and opens a
  tunnel to the new one.
* Only ``http://`` is accepted in absolute form: an ``https://`` URL sent to a proxy in the
  clear would be sent by us in the clear too, so it is refused (400; use CONNECT).
* A refusal before the response started (the egress's 403/407/429/502/..., an unreachable
  or misbehaving origin, a malformed request) is answered with that status, the
  ``X-Upstreamproxy-Reason`` header and ``Connection: close``. Once the response has started,
  an error can only abort the client connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

import h11

from .connect_head import Target, build_status_head, parse_target
from .errors import HeadError
from .tasks import TaskSet

log = logging.getLogger("upstreamproxy.http_forward")

#: Largest request head accepted from the client (the relay's first head is capped lower).
MAX_REQUEST_HEAD: Final = 16 * 1024
#: Largest response head accepted from an origin (Set-Cookie-heavy answers are big).
MAX_RESPONSE_HEAD: Final = 64 * 1024
READ_SIZE: Final = 64 * 1024
DEFAULT_PORT: Final = 80
REASON_HEADER: Final = "X-Upstreamproxy-Reason"
#: Headers the egress puts on a refusal that the client is also shown.
PASSED_REFUSAL_HEADERS: Final = frozenset({"x-upstreamproxy-reason", "x-upstreamproxy-rule"})

# RFC 9110 §7.6.1 and the de-facto ones (Keep-Alive, Proxy-Connection).
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
    }
)
#: Hop-by-hop too, but h11 frames with them, so they are kept (and re-framed by h11).
FRAMING: Final = frozenset({"content-length", "transfer-encoding"})


class ForwardRefused(Exception):
    """A request the forwarder answers itself with ``status`` and ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class TunnelRefused(ForwardRefused):
    """``open_tunnel`` could not give a stream: the egress's (or relay's) status and reason.

    ``headers`` are the refusal's headers from the egress (X-Upstreamproxy-Reason/Rule).
    """

    def __init__(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(status, reason)
        self.headers = headers


class TunnelStream(Protocol):
    """An established tunnel's byte stream (what ``open_tunnel`` returns)."""

    async def receive(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes``; ``b""`` once the far end closed. Raises ConnectionError."""
        ...

    async def send(self, data: bytes) -> None:
        """Write ``data``, waiting while the tunnel's buffers are full."""
        ...

    async def aclose(self) -> None:
        """Close the tunnel; never raises, bounded in time."""
        ...


OpenTunnel = Callable[[str, int], Awaitable[TunnelStream]]


@dataclass(frozen=True)
class ForwardTarget:
    host: str
    port: int
    #: origin-form request target: path and query, ``/`` when the URL has no path.
    path: bytes

    @property
    def key(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def authority(self) -> str:
        return Target(self.host, self.port).authority

    @property
    def host_header(self) -> str:
        """``Host`` for the origin: the default port is left out, as clients do."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORT else f"{host}:{self.port}"


@dataclass(frozen=True)
class ForwardLimits:
    #: Waiting for the next request on an idle keep-alive client connection. Below the
    #: platform's 50 s idle timeout, as nothing flows on the tunnel meanwhile.
    keepalive_timeout: float = 30.0
    #: Opening the tunnel (WebSocket upgrade and the egress's answer).
    open_timeout: float = 40.0
    #: Any single read or write on either side once a request is in flight (a stalled
    #: origin, a client that stops sending its body or stops reading the response).
    idle_timeout: float = 120.0


@dataclass
class ForwardStats:
    requests: int = 0
    tunnels: int = 0
    sent: int = 0
    received: int = 0
    outcome: str = "open"


# -- pure part ------------------------------------------------------------------------------------


def is_forward_request(head: bytes) -> bool:
    """True for a head whose request line is ``<method other than CONNECT> http://...``."""
    line = head.split(b"\n", 1)[0]
    parts = line.split(b" ")
    return len(parts) == 3 and parts[0] != b"CONNECT" and parts[1][:7].lower() == b"http://"


def parse_forward_target(raw: bytes) -> ForwardTarget:
    """An absolute-form ``http://`` target; raises ForwardRefused(400) for anything else."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ForwardRefused(400, "non-ASCII request target") from None
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ForwardRefused(400, f"malformed request URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise ForwardRefused(400, "https:// URLs must be tunnelled with CONNECT")
    if scheme != "http":
        raise ForwardRefused(400, "only http:// URLs are forwarded; use CONNECT otherwise")
    if "@" in parts.netloc:
        raise ForwardRefused(400, "userinfo is not allowed in a proxied URL")
    host = parts.hostname
    if not host:
        raise ForwardRefused(400, "proxied URL has no host")
    port = DEFAULT_PORT if port is None else port
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        target = parse_target(authority)
    except HeadError as exc:
        raise ForwardRefused(400, exc.reason) from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if not path.startswith("/"):
        raise ForwardRefused(400, "malformed request URL path")
    return ForwardTarget(target.host, target.port, path.encode("ascii"))


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return tokens


def _filter_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers (fixed ones and those ``Connection`` names); keep framing."""
    listed = _connection_tokens(headers) - {name.encode() for name in FRAMING}
    drop = {name.encode() for name in HOP_BY_HOP} | listed
    kept = [(name, value) for name, value in headers if name not in drop]
    if any(name == b"transfer-encoding" for name, _ in kept):
        kept = [(name, value) for name, value in kept if name != b"content-length"]
    return kept


def rewrite_request(request: h11.Request) -> tuple[ForwardTarget, h11.Request]:
    """The request to send to the origin, and where to send it."""
    target = parse_forward_target(bytes(request.target))
    headers = [(name, value) for name, value in _filter_headers(list(request.headers))]
    forwarded = h11.Request(
        method=request.method,
        target=target.path,
        headers=[
            (b"host", target.host_header.encode("ascii")),
            *((name, value) for name, value in headers if name != b"host"),
        ],
        http_version="1.1",
    )
    return target, forwarded


def rewrite_response(
    response: h11.Response | h11.InformationalResponse,
) -> h11.Response | h11.InformationalResponse:
    """The origin's response head for the client: hop-by-hop headers dropped."""
    headers = _filter_headers(list(response.headers))
    cls = type(response)
    return cls(status_code=response.status_code, headers=headers, reason=response.reason)


def has_body(request: h11.Request) -> bool:
    """True when the request carries a body (chunked, or a non-zero Content-Length)."""
    for name, value in request.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def direct_route_hint(host: str) -> str:
    """A hint for a refused host that is likely next to the sandbox, else ``""``.

    Single-label names (compose services) and private or link-local addresses are usually
    reached directly; NO_PROXY decides that in the tool, before the relay sees anything.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        local = "." not in host.rstrip(".")
    else:
        local = address.is_private or address.is_link_local
    if not local:
        return ""
    return (
        f"{host} looks local to the sandbox: if it is reached directly (a service next to "
        f"this one), add it to NO_PROXY, e.g. `upstreamproxy start --no-proxy {host}`"
    )


def refusal_response(
    status: int, reason: str, extra: tuple[tuple[str, str], ...] = (), hint: str = ""
) -> bytes:
    """The whole response the forwarder answers a refused request with (connection closes).

    ``X-Upstreamproxy-Reason`` stays the machine-readable reason; ``hint`` goes in the body.
    """
    headers = [(REASON_HEADER, reason)]
    headers += [
        (name, value)
        for name, value in extra
        if name.lower() in PASSED_REFUSAL_HEADERS and name.lower() != REASON_HEADER.lower()
    ]
    headers.append(("Content-Type", "text/plain; charset=utf-8"))
    body = (reason + "\n" + (hint + "\n" if hint else "")).encode("utf-8", "replace")
    return build_status_head(status, tuple(headers), body)


# -- asyncio layer --------------------------------------------------------------------------------


class _ClientGone(Exception):
    """The client closed or broke its connection; nothing more can be sent to it."""


@dataclass
class _Upstream:
    target: ForwardTarget
    stream: TunnelStream
    conn: h11.Connection
    #: Bytes received in the current exchange (0: the origin said nothing at all).
    received: int = 0
    #: Exchanges started on this tunnel before the current one.
    exchanges: int = 0


class _Forwarder:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        open_tunnel: OpenTunnel,
        limits: ForwardLimits,
        stats: ForwardStats,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.open_tunnel = open_tunnel
        self.limits = limits
        self.stats = stats
        self.client = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self.upstream: _Upstream | None = None
        self.last_status = 0
        self._tasks = TaskSet()

    # client side

    async def _client_event(self, wait: float) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.client.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                async with asyncio.timeout(wait):
                    data = await self.reader.read(READ_SIZE)
            except (ConnectionError, OSError) as exc:
                raise _ClientGone(type(exc).__name__) from None
            self.client.receive_data(data)

    async def _to_client(self, event: h11.Event) -> None:
        data = self.client.send(event)
        if data:
            try:
                self.writer.write(data)
                async with asyncio.timeout(self.limits.idle_timeout):
                    await self.writer.drain()
            except (ConnectionError, OSError) as exc:
                raise _ClientGone(type(exc).__name__) from None
            self.stats.received += len(data)

    async def _refuse(
        self, status: int, reason: str, extra: tuple[tuple[str, str], ...] = (), hint: str = ""
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            self.writer.write(refusal_response(status, reason, extra, hint))
            async with asyncio.timeout(5):
                await self.writer.drain()

    # upstream side

    async def _upstream_event(self, upstream: _Upstream) -> h11.Event:
        while True:
            event = upstream.conn.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            async with asyncio.timeout(self.limits.idle_timeout):
                data = await upstream.stream.receive(READ_SIZE)
            upstream.received += len(data)
            upstream.conn.receive_data(data)

    async def _to_upstream(self, upstream: _Upstream, event: h11.Event) -> None:
        data = upstream.conn.send(event)
        if data:
            async with asyncio.timeout(self.limits.idle_timeout):
                await upstream.stream.send(data)
            self.stats.sent += len(data)

    async def _upstream_for(self, target: ForwardTarget) -> _Upstream:
        current = self.upstream
        if current is not None:
            reusable = (
                current.target.key == target.key
                and current.conn.our_state is h11.DONE
                and current.conn.their_state is h11.DONE
            )
            if reusable:
                current.conn.start_next_cycle()
                current.received = 0
                current.exchanges += 1
                return current
            self.upstream = None
            await current.stream.aclose()
        try:
            async with asyncio.timeout(self.limits.open_timeout):
                stream = await self.open_tunnel(target.host, target.port)
        except TimeoutError:
            raise TunnelRefused(504, "timed out opening the tunnel") from None
        except (ConnectionError, OSError) as exc:
            raise TunnelRefused(502, f"cannot open a tunnel: {type(exc).__name__}") from None
        self.stats.tunnels += 1
        self.upstream = _Upstream(
            target, stream, h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        )
        return self.upstream

    async def close_upstream(self) -> None:
        if self.upstream is not None:
            upstream, self.upstream = self.upstream, None
            await upstream.stream.aclose()

    # one exchange

    async def _request_body(self, upstream: _Upstream) -> None:
        while True:
            event = await self._client_event(self.limits.idle_timeout)
            if isinstance(event, h11.Data):
                await self._to_upstream(upstream, h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                await self._to_upstream(upstream, h11.EndOfMessage())
                return
            else:  # ConnectionClosed mid-body (h11 raises for other impossibilities)
                raise _ClientGone("client closed during the request body")

    async def _response(self, upstream: _Upstream) -> None:
        started = False
        try:
            while True:
                event = await self._upstream_event(upstream)
                if isinstance(event, h11.InformationalResponse):
                    await self._to_client(rewrite_response(event))
                elif isinstance(event, h11.Response):
                    started = True
                    self.last_status = event.status_code
                    await self._to_client(rewrite_response(event))
                elif isinstance(event, h11.Data):
                    await self._to_client(h11.Data(data=event.data))
                elif isinstance(event, h11.EndOfMessage):
                    await self._to_client(h11.EndOfMessage())
                    return
                else:
                    raise ConnectionError("origin closed the connection")
        except _ClientGone:
            raise
        except TimeoutError:
            if not started:
                raise ForwardRefused(504, "the origin did not answer in time") from None
            raise
        except h11.RemoteProtocolError as exc:
            if not started and not upstream.received:
                raise ForwardRefused(
                    502, "the origin closed the connection without answering"
                ) from None
            if not started:
                raise ForwardRefused(502, f"malformed response from the origin: {exc}") from None
            raise
        except (ConnectionError, OSError):
            if not started:
                raise ForwardRefused(
                    502, "the origin closed the connection without answering"
                ) from None
            raise

    async def exchange(self, request: h11.Request) -> bool:
        """Forward one request and its response; True if the client connection may go on."""
        target, forwarded = rewrite_request(request)
        started = time.monotonic()
        self.stats.requests += 1
        if has_body(request):
            upstream = await self._upstream_for(target)
            keep = await self._exchange_with_body(upstream, forwarded)
        else:
            end = await self._client_event(self.limits.idle_timeout)
            if not isinstance(end, h11.EndOfMessage):  # pragma: no cover - h11 guarantees it
                raise _ClientGone("no end of a bodiless request")
            keep = await self._exchange_bodiless(target, forwarded)
        log.info(
            "http %s %s -> %s, %.3fs",
            request.method.decode("ascii", "replace"),
            target.authority,
            self.last_status,
            time.monotonic() - started,
        )
        return keep and self.client.our_state is h11.DONE and self.client.their_state is h11.DONE

    async def _send_head(self, upstream: _Upstream, events: list[h11.Event]) -> None:
        try:
            for event in events:
                await self._to_upstream(upstream, event)
        except (ConnectionError, OSError, TimeoutError):
            await self.close_upstream()
            raise ForwardRefused(502, "the tunnel to the origin failed") from None

    async def _exchange_bodiless(self, target: ForwardTarget, forwarded: h11.Request) -> bool:
        # A reused tunnel may reach an origin that closed its idle connection meanwhile; a
        # request without a body is then sent again on a fresh tunnel (RFC 9110 §9.2.2
        # allows it for idempotent methods; a bodiless POST is retried only if the origin
        # said nothing at all, as a browser would).
        for attempt in range(2):
            upstream = await self._upstream_for(target)
            reused = upstream.exchanges > 0
            try:
                await self._send_head(upstream, [forwarded, h11.EndOfMessage()])
                await self._response(upstream)
                return True
            except ForwardRefused:
                if attempt == 0 and reused and upstream.received == 0:
                    await self.close_upstream()
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _exchange_with_body(self, upstream: _Upstream, forwarded: h11.Request) -> bool:
        await self._send_head(upstream, [forwarded])
        body = self._tasks.spawn(self._request_body(upstream))
        try:
            await self._response(upstream)
            if not body.done():
                # The origin answered before the request body ended (say, a 413). The rest of
                # the body cannot be forwarded usefully; the connection ends with the response.
                return False
            body.result()  # re-raise a body-side failure
            return True
        finally:
            if not body.done():
                body.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await body

    async def serve(self) -> None:
        while True:
            try:
                event = await self._client_event(self.limits.keepalive_timeout)
            except TimeoutError:
                self.stats.outcome = "idle"
                return
            except h11.RemoteProtocolError as exc:
                self.stats.outcome = f"refused-{exc.error_status_hint}"
                await self._refuse(exc.error_status_hint, f"malformed request: {exc}")
                return
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                self.stats.outcome = "client closed"
                return
            if not isinstance(event, h11.Request):  # pragma: no cover - h11 guarantees it
                self.stats.outcome = "protocol-error"
                return
            try:
                keep_going = await self.exchange(event)
            except TunnelRefused as exc:
                self.stats.outcome = f"refused-{exc.status}"
                log.warning(
                    "http %s not forwarded: %s %s", _authority(event), exc.status, exc.reason
                )
                host = _host(event)
                hint = direct_route_hint(host) if exc.status == 403 and host else ""
                await self._refuse(exc.status, exc.reason, exc.headers, hint)
                return
            except ForwardRefused as exc:
                self.stats.outcome = f"refused-{exc.status}"
                await self._refuse(exc.status, exc.reason)
                return
            except h11.RemoteProtocolError as exc:
                # From the client's body, or the origin's once the response started.
                self.stats.outcome = f"protocol-error ({exc})"
                return
            except (_ClientGone, ConnectionError, OSError, TimeoutError) as exc:
                self.stats.outcome = f"connection-lost ({type(exc).__name__})"
                return
            if not keep_going:
                self.stats.outcome = "closed after response"
                return
            self.client.start_next_cycle()


def _host(request: h11.Request) -> str:
    try:
        return parse_forward_target(bytes(request.target)).host
    except ForwardRefused:
        return ""


def _authority(request: h11.Request) -> str:
    try:
        return parse_forward_target(bytes(request.target)).authority
    except ForwardRefused:
        return "-"


async def serve_forward(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    initial: bytes,
    open_tunnel: OpenTunnel,
    limits: ForwardLimits | None = None,
) -> ForwardStats:
    """Serve one client connection whose first bytes (``initial``) are an absolute-form request.

    Returns when the client closes, a refusal was answered, a timeout expired or either side
    failed; the tunnel it holds is closed on every way out (cancellation included). The
    caller closes ``writer``.
    """
    stats = ForwardStats()
    forwarder = _Forwarder(reader, writer, open_tunnel, limits or ForwardLimits(), stats)
    forwarder.client.receive_data(initial)
    try:
        await forwarder.serve()
    finally:
        await asyncio.shield(forwarder.close_upstream())
    return stats
