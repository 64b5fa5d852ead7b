"""The relay's WebSocket client handshake to the egress, native: one write, one read.

:func:`open_upgraded` connects (directly, or through ``--egress-proxy``), sends the upgrade
GET in one write, reads the ``101`` head and hands back the raw transport, reading paused,
with any bytes that followed the head. The tunnel's own protocol takes the transport over
from there (``transport.set_protocol(...)``, then ``resume_reading()``); nothing of
websockets' per-connection machinery is built for it.

Heads are built and checked by the pure :mod:`upstreamproxy.ws_handshake`; this module owns
sockets, TLS and the time bound only. Every failure is an
:class:`~upstreamproxy.tunnel.driver.OpenFailed` carrying what the relay answers its client
(the same statuses and texts as the websockets-based opener had), and closes the socket.
The token is written into the request head and nowhere else: no log line, no exception text.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Final

from . import __version__
from .acceptor import socket_transport
from .connect_head import PREOPENED_HEADER, REASON_HEADER, REUSE_HEADER
from .secret import Secret
from .tunnel.driver import OpenFailed
from .ws_handshake import (
    HandshakeError,
    MalformedResponse,
    ProxyTarget,
    Target,
    build_proxy_connect,
    build_upgrade_request,
    check_upgrade,
    find_head_end,
    new_key,
    parse_proxy_url,
    parse_response_head,
    parse_ws_url,
)


@dataclass(frozen=True)
class LinkConfig:
    egress_url: str
    token: Secret
    handshake_timeout: float
    egress_proxy: str | None
    ssl: ssl.SSLContext | None
    #: Offer tunnel reuse (SPEC §11) in every upgrade; the egress's 101 says if it agrees.
    reuse: bool = False


#: An upgrade refused because that egress is draining is tried again this many times (after
#: DRAINING_RETRY_DELAY, doubling): behind a load balancer the next try usually reaches a
#: replica that is not, and nothing of the client's was sent yet.
DRAINING_RETRIES: Final = 3
DRAINING_RETRY_DELAY: Final = 0.1


USER_AGENT: Final = f"upstreamproxy-relay/{__version__}"

_default_tls: ssl.SSLContext | None = None


class ClosedBeforeAnswer(HandshakeError):
    """The egress (or proxy) closed the connection before its answer was complete."""


class ProxyRefused(HandshakeError):
    """The ``--egress-proxy`` answered the CONNECT with a non-2xx status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the proxy answered HTTP {status}")
        self.status = status


class ProxyUnsupported(HandshakeError):
    """A ``socks*://`` proxy without python-socks installed."""


class SocksFailed(HandshakeError):
    """The SOCKS proxy did not open the tunnel (python-socks' error, not quoted)."""


class _Refused(Exception):
    """The egress answered the upgrade with a status other than 101."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status)
        self.status = status
        self.reason = reason


@dataclass
class Upgraded:
    """An upgraded WebSocket to the egress, not yet owned by any tunnel protocol.

    ``transport``: reading paused; its protocol is a placeholder that would buffer (nothing
    arrives while reading is paused). With ``keep_reading`` (the relay's own links) reading
    is not paused: what arrives until the take-over is in ``leftover``, so take it over
    before the next ``await`` - that saves a pause and a resume (two ``epoll_ctl``) per
    socket. Take it over with ``set_protocol()`` then
    ``resume_reading()``, feeding ``leftover`` first; do the ``set_protocol()`` before the
    next ``await``, so a connection loss (say, a write failing) cannot reach the placeholder.
    ``leftover``: bytes the egress sent after the ``101`` head (usually empty; they are the
    first WebSocket frames).
    ``eof``: the egress's end of stream arrived together with the head (a TLS close_notify
    in the same read), or the transport is already closing: the new protocol should treat
    the stream as ended after ``leftover`` (it may get no ``connection_lost`` of its own).
    ``reuse``: the egress accepted tunnel reuse (SPEC §11).
    """

    transport: asyncio.Transport
    leftover: bytes
    eof: bool = False
    reuse: bool = False


#: What one read of a handshake answer takes at most (heads are a few hundred bytes).
HEAD_READ: Final = 16 * 1024


class _HeadReader(asyncio.Protocol):
    """Buffers bytes until a complete response head; pauses reading as soon as it has one.

    Stays the transport's protocol after the handshake, as the placeholder: with reading
    paused nothing reaches it, and anything that did would be kept in ``buffer``.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self._searched = 0
        self._waiter: asyncio.Future[int] | None = None
        self.eof = False
        #: Pause reading once a head is complete (off: bytes after it stay in ``buffer``).
        self.pause_after_head = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # A socket transport recv()s 256 KiB at a time for a plain protocol: a fresh block
        # that big is an mmap, mremap and munmap per handshake for a head of a few hundred
        # bytes. (The tunnel link that takes over reads into its own buffer.)
        if getattr(transport, "max_size", 0) > HEAD_READ:
            transport.max_size = HEAD_READ  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._check()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._fail(ClosedBeforeAnswer("end of stream before a complete response head"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        # A refused or reset connect (see _connect_plain) is reported as what it was.
        lost = exc if isinstance(exc, OSError) else None
        self._fail(lost or ClosedBeforeAnswer("connection lost before a complete response head"))

    async def next_head(self) -> bytes:
        """The next complete head (taken off the buffer); reading resumed until it is in."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._check()
        if not waiter.done():
            if self.eof:
                self._fail(ClosedBeforeAnswer("end of stream before a complete response head"))
            else:
                assert self.transport is not None
                self.transport.resume_reading()
        try:
            end = await waiter
        finally:
            self._waiter = None
        head = bytes(self.buffer[:end])
        del self.buffer[:end]
        self._searched = 0
        return head

    def _check(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        try:
            end = find_head_end(self.buffer, self._searched)
        except HandshakeError as exc:
            self._pause()
            waiter.set_exception(exc)
            return
        if end is None:
            self._searched = len(self.buffer)
            return
        # Paused before anyone else runs: no byte after the head reaches this placeholder
        # once the head is handed over (unless the caller takes the buffer along).
        if self.pause_after_head:
            self._pause()
        waiter.set_result(end)

    def _fail(self, exc: Exception) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()


async def open_upgraded(
    cfg: LinkConfig, *, preopened: bool = False, keep_reading: bool = False
) -> Upgraded:
    """Open and upgrade one WebSocket to the egress, or raise :class:`OpenFailed`.

    The whole handshake (TCP, proxy CONNECT, TLS, upgrade) is bounded by
    ``cfg.handshake_timeout``. ``preopened``: for the pool; the upgrade says so
    (``X-Upstreamproxy-Preopened: 1``) so the egress waits longer for its CONNECT.
    ``keep_reading``: see :class:`Upgraded`.
    """
    reader = _HeadReader()
    transports: list[asyncio.Transport] = []
    try:
        async with asyncio.timeout(cfg.handshake_timeout):
            target = parse_ws_url(cfg.egress_url)
            key = new_key()
            extra = [
                ("Authorization", f"Bearer {cfg.token.reveal()}"),
                ("Content-Type", "application/proto"),
                ("User-Agent", USER_AGENT),
            ]
            if preopened:
                extra.append((PREOPENED_HEADER, "1"))
            if cfg.reuse:
                extra.append((REUSE_HEADER, "1"))
            request = build_upgrade_request(target, key, extra)
            transport = await _connect(cfg, target, reader, transports)
            reader.pause_after_head = not keep_reading
            transport.write(request)
            response = parse_response_head(await reader.next_head())
            if response.status != 101:
                raise _Refused(response.status, response.get(REASON_HEADER))
            check_upgrade(response, key)
        upgraded = Upgraded(
            transport,
            bytes(reader.buffer),
            reader.eof or transport.is_closing(),
            cfg.reuse and response.get(REUSE_HEADER) == "1",
        )
        reader.buffer.clear()
        return upgraded
    except BaseException as exc:
        for transport in transports:
            transport.abort()
        if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
            raise OpenFailed(504, "timed out opening the WebSocket to the egress") from None
        if isinstance(exc, _Refused):
            if exc.status in (429, 503):  # a limit or a drain: the client may retry later
                raise OpenFailed(
                    exc.status, exc.reason or f"egress answered HTTP {exc.status}"
                ) from None
            detail = f"HTTP {exc.status}: {exc.reason}" if exc.reason else f"HTTP {exc.status}"
            raise OpenFailed(502, f"egress refused the WebSocket upgrade ({detail})") from None
        if isinstance(exc, ProxyRefused):
            raise OpenFailed(
                502, f"cannot reach the egress: the proxy answered HTTP {exc.status}"
            ) from None
        if isinstance(exc, (HandshakeError, OSError, ValueError)):
            # A malformed --egress-proxy lands here too: the client gets a 502 naming the
            # problem (InvalidProxy), never an empty reply.
            raise OpenFailed(502, f"cannot reach the egress: {type(exc).__name__}") from None
        raise


async def open_upgraded_retrying(
    cfg: LinkConfig, *, preopened: bool = False, keep_reading: bool = False
) -> Upgraded:
    """:func:`open_upgraded`, tried again (DRAINING_RETRIES times, after DRAINING_RETRY_DELAY,
    doubling) while the egress that answered is draining (``503 draining``)."""
    delay = DRAINING_RETRY_DELAY
    for attempt in range(DRAINING_RETRIES + 1):
        try:
            return await open_upgraded(cfg, preopened=preopened, keep_reading=keep_reading)
        except OpenFailed as exc:
            if exc.status != 503 or exc.reason != "draining" or attempt == DRAINING_RETRIES:
                raise
        await asyncio.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


async def _connect(
    cfg: LinkConfig,
    target: Target,
    reader: _HeadReader,
    transports: list[asyncio.Transport],
) -> asyncio.Transport:
    """A transport to the egress whose protocol is ``reader`` (TLS done for ``wss://``).

    Every transport made is appended to ``transports`` at once, so the caller can abort them
    all whatever fails (or is cancelled) later.
    (asyncio sets ``TCP_NODELAY`` on every TCP transport it makes, ``sock=`` ones too.)
    """
    loop = asyncio.get_running_loop()
    tls = _tls_context(cfg) if target.secure else None
    hostname = target.host if target.secure else None
    if cfg.egress_proxy is None:
        plain = _connect_plain(target, reader) if tls is None else None
        if plain is not None:
            transports.append(plain)
            return plain
        transport, _ = await loop.create_connection(
            lambda: reader, target.host, target.port, ssl=tls, server_hostname=hostname
        )
        transports.append(transport)
        return transport
    proxy = parse_proxy_url(cfg.egress_proxy)
    if not proxy.is_http:
        sock = await _socks_connect(proxy, target)
        try:
            transport, _ = await loop.create_connection(
                lambda: reader, sock=sock, ssl=tls, server_hostname=hostname
            )
        except BaseException:
            sock.close()
            raise
        transports.append(transport)
        return transport
    proxy_tls = ssl.create_default_context() if proxy.scheme == "https" else None
    raw, _ = await loop.create_connection(
        lambda: reader,
        proxy.host,
        proxy.port,
        ssl=proxy_tls,
        server_hostname=proxy.host if proxy_tls else None,
    )
    transports.append(raw)
    raw.write(build_proxy_connect(target, proxy, USER_AGENT))
    answer = parse_response_head(await reader.next_head())
    if not 200 <= answer.status < 300:
        raise ProxyRefused(answer.status)
    if reader.buffer:  # nothing was asked of the egress yet: these bytes are the proxy's
        raise MalformedResponse("the proxy sent bytes after its answer")
    if tls is None:
        return raw
    wrapped = await loop.start_tls(raw, reader, tls, server_hostname=hostname)
    assert wrapped is not None
    transports.append(wrapped)
    reader.transport = wrapped  # start_tls does not call connection_made
    return wrapped


def _connect_plain(target: Target, reader: _HeadReader) -> asyncio.Transport | None:
    """Plain TCP to an IP literal, made at once: a non-blocking ``connect()`` and the
    transport over it (None where that cannot be done: a host name, a loop that cannot make
    transports). ``create_connection`` spends a task-side future, a writer callback and a
    ``connection_made`` waiter on it - a quarter of what the pool's refill of a socket
    costs. Whatever is written before the connection is up waits in the transport's buffer
    (``send`` says EAGAIN until then); a refused connection reaches ``reader`` as
    ``connection_lost(ConnectionRefusedError)``."""
    try:
        address = ipaddress.ip_address(target.host)
    except ValueError:
        return None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setblocking(False)
        code = sock.connect_ex((target.host, target.port))
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, os.strerror(code))
        transport = socket_transport(sock, reader)
    except BaseException:
        sock.close()
        raise
    if transport is None:
        sock.close()
        return None
    reader.transport = transport
    return transport


def _tls_context(cfg: LinkConfig) -> ssl.SSLContext:
    global _default_tls
    if cfg.ssl is not None:
        return cfg.ssl
    if _default_tls is None:
        _default_tls = ssl.create_default_context()
    return _default_tls


_SOCKS_TYPES: Final = {
    "socks5h": ("SOCKS5", True),
    "socks5": ("SOCKS5", False),
    "socks4a": ("SOCKS4", True),
    "socks4": ("SOCKS4", False),
}


async def _socks_connect(proxy: ProxyTarget, target: Target) -> socket.socket:
    """A socket tunnelled to ``target`` through a SOCKS proxy (python-socks, optional)."""
    try:
        python_socks: Any = importlib.import_module("python_socks")
        socks_asyncio: Any = importlib.import_module("python_socks.async_.asyncio")
    except ImportError:
        raise ProxyUnsupported("a socks proxy needs python-socks") from None
    kind, rdns = _SOCKS_TYPES[proxy.scheme]
    client = socks_asyncio.Proxy(
        getattr(python_socks.ProxyType, kind),
        proxy.host,
        proxy.port,
        proxy.username,
        proxy.password,
        rdns,
    )
    try:
        sock: socket.socket = await client.connect(target.host, target.port)
    except OSError:
        raise
    except Exception:
        raise SocksFailed("the SOCKS proxy did not open the tunnel") from None
    return sock
