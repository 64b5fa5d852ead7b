"""Plain-HTTP forwarding: absolute-form requests carried over the same tunnels as CONNECT.

A tool with ``HTTP_PROXY`` set sends ``GET http://host[:port]/path HTTP/1.1`` to the relay.
The wire protocol to the egress does not change: the forwarder opens a tunnel to
``host:port`` exactly as for ``CONNECT host:port`` (so the egress policy decides port 80 like
any other port), and speaks origin-form HTTP/1.1 to the origin inside it.

Public API::

    class TunnelStream(Protocol)      # receive(max) -> bytes (b"" = EOF), send, aclose, buffered
    OpenTunnel = Callable[[str, int], Awaitable[TunnelStream]]; raises TunnelRefused
    class ForwardLimits               # the timeouts
    async serve_forward(reader, writer, initial, open_tunnel, limits) -> ForwardStats
    is_forward_request, ForwardRefused, TunnelRefused    # from .forward_request

What is forwarded and how requests and responses change is decided in the pure
:mod:`.forward_request`; this module is the thin asyncio layer. Both sides are h11
connections, so framing (Content-Length, chunked, close-delimited, HEAD, 1xx) is h11's and
bodies stream event by event: a Data event is written (and drained) before the next read, so
a connection holds at most one read's worth of body however large the body is.

* Keep-alive: the client connection stays open across requests while h11 says it may. The
  tunnel to the origin is reused while the next request goes to the same ``host:port`` and
  the origin kept its connection open; a request for another target closes it and opens a
  tunnel to the new one. A bodiless request whose reused tunnel turns out closed is sent
  again once on a fresh tunnel.
* A refusal before the response started (the egress's 403/407/429/502/..., an unreachable
  or misbehaving origin, a malformed request) is answered with that status, the
  ``X-Upstreamproxy-Reason`` header and ``Connection: close``. Once the response has started,
  an error can only abort the client connection.
* Every wait has a bound (:class:`ForwardLimits`); the tunnel is closed on every way out,
  cancellation included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

import h11

from .connect_head import REASON_HEADER
from .forward_request import (
    MAX_REQUEST_HEAD,
    ForwardRefused,
    ForwardTarget,
    TunnelRefused,
    direct_route_hint,
    has_body,
    is_forward_request,
    parse_forward_target,
    refusal_response,
    rewrite_request,
    rewrite_response,
)
from .tasks import TaskSet

__all__ = [
    "REASON_HEADER",
    "ForwardLimits",
    "ForwardRefused",
    "ForwardStats",
    "OpenTunnel",
    "TunnelRefused",
    "TunnelStream",
    "is_forward_request",
    "serve_forward",
]

log = logging.getLogger("upstreamproxy.http_forward")

#: Largest response head accepted from an origin (Set-Cookie-heavy answers are big).
MAX_RESPONSE_HEAD: Final = 64 * 1024
READ_SIZE: Final = 64 * 1024


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

    def buffered(self) -> int:
        """Bytes received and not yet taken by :meth:`receive`."""
        ...


OpenTunnel = Callable[[str, int], Awaitable[TunnelStream]]


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
        #: Bytes fed to ``client``, and how many of them it had parsed when the current head
        #: began: h11 bounds only an *incomplete* head, so a head that completed within one
        #: more read could pass at four times the limit; :meth:`_head_too_large` measures it.
        self._fed = 0
        self._head_start = 0
        self.upstream: _Upstream | None = None
        self.last_status = 0
        self._tasks = TaskSet()

    # client side

    def feed(self, data: bytes) -> None:
        self._fed += len(data)
        self.client.receive_data(data)

    def _parsed(self) -> int:
        return self._fed - len(self.client.trailing_data[0])

    def _head_too_large(self) -> bool:
        """Just after a request head: was it over :data:`MAX_REQUEST_HEAD`?"""
        return self._parsed() - self._head_start > MAX_REQUEST_HEAD

    def _next_cycle(self) -> None:
        self.client.start_next_cycle()
        self._head_start = self._parsed()

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
            self.feed(data)

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
                # Bytes past the end of the last response (a body on a 204 or a HEAD answer),
                # with it or since, would be read as the next response: such a connection is
                # not reused.
                and not current.conn.trailing_data[0]
                and not current.stream.buffered()
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
        except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
            # Local: the origin's answer cannot be re-sent to the client as it is (say, a 101
            # nobody asked for); either way the origin is at fault.
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
            except ForwardRefused as exc:
                # Not after a timeout: the origin may be busy with the request, and a second
                # wait as long would only double the client's.
                if attempt == 0 and reused and upstream.received == 0 and exc.status != 504:
                    await self.close_upstream()
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _exchange_with_body(self, upstream: _Upstream, forwarded: h11.Request) -> bool:
        await self._send_head(upstream, [forwarded])
        body = self._tasks.spawn(self._request_body(upstream))
        response = self._tasks.spawn(self._response(upstream))
        try:
            # Until the response ends, or the request body fails: a client that left or sent
            # a malformed body mid-upload is not left waiting for an origin that still waits
            # for the rest of that body (it would hold the tunnel until the idle timeout).
            pending: set[asyncio.Task[None]] = {body, response}
            while not response.done():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if body in done and body.exception() is not None:
                    break
            if not response.done():
                exc = body.exception()
                if isinstance(exc, h11.RemoteProtocolError) and (
                    self.client.our_state is h11.SEND_RESPONSE
                ):
                    raise ForwardRefused(400, f"malformed request body: {exc}")
                body.result()  # re-raise the body-side failure
            response.result()  # re-raise a response-side failure
            if not body.done():
                # The origin answered before the request body ended (say, a 413). The rest of
                # the body cannot be forwarded usefully; the connection ends with the response.
                return False
            body.result()  # re-raise a body-side failure
            return True
        finally:
            for task in (body, response):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    async def serve(self) -> None:
        while True:
            try:
                event = await self._client_event(self.limits.keepalive_timeout)
            except TimeoutError:
                self.stats.outcome = "idle"
                return
            except _ClientGone as exc:  # (a reset between requests, say)
                self.stats.outcome = f"connection-lost ({exc})"
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
            if self._head_too_large():
                self.stats.outcome = "refused-431"
                await self._refuse(431, f"request head exceeds {MAX_REQUEST_HEAD} bytes")
                return
            if event.method == b"CONNECT":
                # The relay tunnels a CONNECT only as a connection's first request (the tunnel
                # then owns the connection); after plain-HTTP requests it is refused clearly.
                self.stats.outcome = "refused-400"
                await self._refuse(400, "CONNECT must be the first request on a connection")
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
            except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
                # From the client's body, or the origin's once the response started.
                self.stats.outcome = f"protocol-error ({exc})"
                return
            except (_ClientGone, ConnectionError, OSError, TimeoutError) as exc:
                self.stats.outcome = f"connection-lost ({type(exc).__name__})"
                return
            if not keep_going:
                self.stats.outcome = "closed after response"
                return
            self._next_cycle()


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
    forwarder.feed(initial)
    try:
        await forwarder.serve()
    finally:
        await asyncio.shield(forwarder.close_upstream())
    return stats
