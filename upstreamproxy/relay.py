"""The relay: a loopback HTTP CONNECT listener that carries each tunnel over a WebSocket.

Per client connection: read the CONNECT head (bounded, with a deadline), open one WebSocket
to the egress with the session's bearer token, send the first chunk (request line and
``Proxy-Authorization`` only), relay the egress's in-tunnel status head, then pump bytes both
ways. Backpressure comes from never reading a side faster than the other side drains:

* client -> egress: the next ``read()`` waits for ``ws.send()``, which waits for the socket's
  write buffer to drain below ``write_limit``;
* egress -> client: the next ``recv()`` waits for ``writer.drain()``; meanwhile websockets
  stops reading the socket once ``max_queue`` messages are buffered.

So a tunnel holds at most a few chunks in memory however fast either sender is.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Final

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from . import __version__
from .acceptor import StreamServer, refuse_http_503, start_server
from .codec import KEEPALIVE, MAX_MESSAGE_BYTES, decode_chunk, encode_chunk
from .connect_head import (
    MAX_HEAD_BYTES,
    Target,
    build_status_head,
    build_tunnel_request,
    parse_connect_head,
    parse_status_head,
    split_head,
)
from .errors import ConfigError, HeadError, ProtocolError
from .forward_request import is_forward_request
from .logredact import redacting_logger
from .secret import Secret

log = logging.getLogger("upstreamproxy.relay")
_ws_log = redacting_logger("upstreamproxy.relay.websocket")
# websockets logs every frame at DEBUG, abbreviated in the middle: the first chunk's
# credentials could show up cut where no redaction pattern matches. Frames are never logged.
_ws_log.setLevel(logging.INFO)

#: Bytes read from the client per chunk; well under the 512 KiB payload cap. Larger reads
#: mean fewer frames (and fewer syscalls and mask draws) per byte relayed.
READ_SIZE: Final = 128 * 1024
#: Pending connections the kernel queues for us; bursts of tools opening many tunnels at once
#: overflowed the default 100 and stalled clients for a 1 s SYN retry.
LISTEN_BACKLOG: Final = 1024
#: Messages websockets buffers before it stops reading the socket (backpressure).
WS_MAX_QUEUE: Final = 4
WS_WRITE_LIMIT: Final = 256 * 1024
#: How long a closing tunnel waits for the egress's close frame before aborting the socket.
#: The frame may sit behind data we no longer read, so waiting longer only holds resources.
WS_CLOSE_GRACE: Final = 1.0
REASON_HEADER: Final = "X-Upstreamproxy-Reason"


@dataclass(frozen=True)
class RelayConfig:
    egress_url: str
    session_id: str
    token: Secret = field(repr=False)
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    allow_non_loopback: bool = False
    #: CA file to verify a ``wss://`` egress (None: system trust store).
    egress_ca_file: str | None = None
    #: Outbound proxy the relay itself uses to reach the egress (``http://`` or ``socks5://``).
    egress_proxy: str | None = None
    head_timeout: float = 10.0
    handshake_timeout: float = 10.0
    establish_timeout: float = 30.0
    keepalive_interval: float = 30.0

    def validate(self) -> None:
        if not self.egress_url.startswith(("ws://", "wss://")):
            raise ConfigError("egress_url", "must start with ws:// or wss://")
        if not self.session_id:
            raise ConfigError("session_id", "must not be empty")
        if not self.token:
            raise ConfigError("token", "must not be empty")
        if not self.allow_non_loopback and not is_loopback_host(self.listen_host):
            raise ConfigError(
                "listen_host",
                f"{self.listen_host} is not a loopback address; pass --allow-non-loopback "
                "to expose the relay beyond this machine",
            )
        for name in (
            "head_timeout",
            "handshake_timeout",
            "establish_timeout",
            "keepalive_interval",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(name, "must be positive")


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _PumpFinished(Exception):
    """Raised by a pump that ended normally, to stop its sibling pumps."""


class _TunnelFailed(Exception):
    """The tunnel could not be established; ``status`` is what the client is told."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class TunnelStats:
    target: str = "-"
    sent: int = 0
    received: int = 0
    outcome: str = "open"


class Relay:
    """The CONNECT listener. ``start()`` binds, ``stop()`` closes the listener and every tunnel."""

    def __init__(self, config: RelayConfig) -> None:
        config.validate()
        self.config = config
        self._server: StreamServer | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._ssl: ssl.SSLContext | None = None
        if config.egress_url.startswith("wss://"):
            self._ssl = ssl.create_default_context(cafile=config.egress_ca_file)

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("relay is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def proxy_url(self) -> str:
        host = self.config.listen_host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    @property
    def active_tunnels(self) -> int:
        return len(self._handlers)

    async def start(self) -> None:
        # Our accept loop: fd exhaustion pauses accepts with one log line, not a flood.
        self._server = await start_server(
            self._handle,
            self.config.listen_host,
            self.config.listen_port,
            # The head is bounded by _read_head itself; a small stream limit would only make
            # the reader pause and resume the socket every few KiB of tunnel data.
            limit=2 * READ_SIZE,
            backlog=LISTEN_BACKLOG,
            on_shed=refuse_http_503,
        )
        log.info("relay listening on %s -> %s", self.proxy_url, self.config.egress_url)

    async def stop(self, grace: float = 5.0) -> None:
        if self._server is not None:
            self._server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=grace)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), grace)
            self._server = None
        log.info("relay stopped")

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- per connection -----------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        stats = TunnelStats()
        started = time.monotonic()
        try:
            await self._serve_client(reader, writer, stats)
        except asyncio.CancelledError:
            stats.outcome = "cancelled"
            raise
        except Exception:  # a bug must not take the listener down; it closes this tunnel
            stats.outcome = "internal-error"
            log.exception("tunnel %s failed unexpectedly", stats.target)
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(asyncio.wait_for(writer.wait_closed(), 1.0))
            log.info(
                "tunnel %s closed: %s, %d bytes up, %d bytes down, %.3fs",
                stats.target,
                stats.outcome,
                stats.sent,
                stats.received,
                time.monotonic() - started,
            )

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: TunnelStats
    ) -> None:
        try:
            head, early = await self._read_head(reader)
            if is_forward_request(head):  # plain HTTP (absolute-form): see relay_forward.py
                from .relay_forward import serve_plain_http

                stats.target = "plain-http"
                stats.outcome = (await serve_plain_http(self, reader, writer, head + early)).outcome
                return
            request = parse_connect_head(head)
        except HeadError as exc:
            stats.outcome = f"refused-{exc.status}"
            await _answer(writer, exc.status, exc.reason)
            return
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            stats.outcome = "client-gone-before-head"
            return
        stats.target = request.target.authority
        try:
            ws, status_head, rest = await self._open_tunnel(request.target)
        except _TunnelFailed as exc:
            stats.outcome = f"failed-{exc.status}"
            log.warning("tunnel %s not established: %s", stats.target, exc.reason)
            await _answer(writer, exc.status, exc.reason)
            return
        try:
            writer.write(status_head + rest)
            await writer.drain()
            if parse_status_head(status_head).status != 200:
                stats.outcome = "refused-by-egress"
                return
            stats.outcome = "established"
            stats.received += len(rest)
            for chunk_start in range(0, len(early), READ_SIZE):
                piece = early[chunk_start : chunk_start + READ_SIZE]
                await ws.send(encode_chunk(piece))
                stats.sent += len(piece)
            await self._pump(reader, writer, ws, stats)
        except (ConnectionError, ConnectionClosed) as exc:
            # Either side went away between the status head and the pumps: just close.
            stats.outcome = f"connection-lost ({type(exc).__name__})"
        finally:
            await _close_ws(ws)

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        buffer = bytearray()
        async with asyncio.timeout(self.config.head_timeout):
            while True:
                parts = split_head(buffer)
                if parts is not None:
                    return parts
                # Never read past the head limit: early tunnel bytes stay bounded by it.
                data = await reader.read(MAX_HEAD_BYTES - len(buffer))
                if not data:
                    raise asyncio.IncompleteReadError(bytes(buffer), None)
                buffer += data

    async def _open_tunnel(self, target: Target) -> tuple[ClientConnection, bytes, bytes]:
        cfg = self.config
        try:
            ws = await connect(
                cfg.egress_url,
                additional_headers={
                    "Authorization": f"Bearer {cfg.token.reveal()}",
                    "Content-Type": "application/proto",
                },
                user_agent_header=f"upstreamproxy-relay/{__version__}",
                open_timeout=cfg.handshake_timeout,
                proxy=cfg.egress_proxy,
                ssl=self._ssl,
                compression=None,
                ping_interval=None,
                close_timeout=WS_CLOSE_GRACE,
                logger=_ws_log,
                max_size=MAX_MESSAGE_BYTES,
                max_queue=WS_MAX_QUEUE,
                write_limit=WS_WRITE_LIMIT,
            )
        except TimeoutError:
            raise _TunnelFailed(504, "timed out opening the WebSocket to the egress") from None
        except InvalidStatus as exc:
            status = exc.response.status_code
            reason = exc.response.headers.get(REASON_HEADER, "")
            if status in (429, 503):  # a limit or a drain: the client may retry later
                raise _TunnelFailed(status, reason or f"egress answered HTTP {status}") from None
            detail = f"HTTP {status}: {reason}" if reason else f"HTTP {status}"
            raise _TunnelFailed(502, f"egress refused the WebSocket upgrade ({detail})") from None
        except (InvalidHandshake, InvalidURI, OSError) as exc:
            raise _TunnelFailed(502, f"cannot reach the egress: {type(exc).__name__}") from None
        try:
            await ws.send(
                encode_chunk(build_tunnel_request(target, cfg.session_id, cfg.token.reveal()))
            )
            head, rest = await self._read_status(ws)
            parse_status_head(head)
            return ws, head, rest
        except HeadError as exc:
            await _close_ws(ws)
            raise _TunnelFailed(502, exc.reason) from None
        except (ConnectionClosed, OSError):
            # The egress hung up right after the upgrade (e.g. draining): still a 502, never an
            # empty reply.
            await _close_ws(ws)
            raise _TunnelFailed(502, "egress closed the tunnel before establishing it") from None
        except BaseException:
            await _close_ws(ws)
            raise

    async def _read_status(self, ws: ClientConnection) -> tuple[bytes, bytes]:
        buffer = bytearray()
        try:
            async with asyncio.timeout(self.config.establish_timeout):
                while True:
                    message = await ws.recv()
                    if isinstance(message, str):
                        raise _TunnelFailed(502, "egress sent a text frame")
                    buffer += decode_chunk(message)
                    parts = split_head(buffer)
                    if parts is not None:
                        return parts
        except TimeoutError:
            raise _TunnelFailed(504, "egress did not answer the CONNECT in time") from None
        except ConnectionClosed:
            raise _TunnelFailed(502, "egress closed the tunnel before establishing it") from None
        except ProtocolError as exc:
            raise _TunnelFailed(502, f"protocol error from egress: {exc}") from None

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ws: ClientConnection,
        stats: TunnelStats,
    ) -> None:
        async def client_to_egress() -> None:
            while data := await reader.read(READ_SIZE):
                await ws.send(encode_chunk(data))
                stats.sent += len(data)
            raise _PumpFinished("client closed")

        async def egress_to_client() -> None:
            async for message in ws:
                if isinstance(message, str):
                    raise ProtocolError("egress sent a text frame")
                payload = decode_chunk(message)
                if payload:
                    writer.write(payload)
                    await writer.drain()
                    stats.received += len(payload)
            raise _PumpFinished("egress closed")

        async def keepalive() -> None:
            while True:
                await asyncio.sleep(self.config.keepalive_interval)
                await ws.send(KEEPALIVE)

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(client_to_egress())
                group.create_task(egress_to_client())
                group.create_task(keepalive())
        except* _PumpFinished as finished:
            stats.outcome = str(finished.exceptions[0])
        except* ProtocolError as errors:
            stats.outcome = "protocol-error"
            log.error("tunnel %s: protocol error: %s", stats.target, errors.exceptions[0])
            await _close_ws(ws, 1002)
        except* (ConnectionClosed, ConnectionError, OSError) as errors:
            stats.outcome = f"connection-lost ({type(errors.exceptions[0]).__name__})"


async def _close_ws(ws: ClientConnection, code: int = 1000) -> None:
    """Close the WebSocket, aborting the socket if the close handshake does not finish soon.

    Shielded so a cancelled tunnel (relay stopping) still releases its socket.
    """

    async def close() -> None:
        try:
            async with asyncio.timeout(WS_CLOSE_GRACE):
                await ws.close(code)
        except (TimeoutError, ConnectionClosed, OSError):
            pass
        finally:
            ws.transport.abort()

    await asyncio.shield(close())


async def _answer(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    """Answer the client ourselves (only before a tunnel is established)."""
    body = (reason + "\n").encode("utf-8", "replace")
    safe_reason = (
        reason.encode("ascii", "replace").decode("ascii").replace("\r", " ").replace("\n", " ")
    )
    with contextlib.suppress(ConnectionError):
        writer.write(build_status_head(status, ((REASON_HEADER, safe_reason),), body))
        await writer.drain()
