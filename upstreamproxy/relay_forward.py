"""Plain-HTTP forwarding plugged into the relay: ``open_tunnel`` over the relay's WebSockets.

:mod:`.http_forward` needs an ``open_tunnel(host, port)`` that gives a byte stream to the
target through the egress. This module implements it on :class:`.relay.Relay`'s own tunnel
opening (``Relay._open_tunnel``: WebSocket upgrade, first chunk, the egress's status head),
so a forwarded request is, on the wire, exactly a ``CONNECT host:port`` tunnel.

It is the only place that knows both sides; when the relay moves onto another tunnel core,
only this adapter changes.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from .codec import KEEPALIVE, decode_chunk, encode_chunk
from .connect_head import Target, header_values, parse_status_head
from .errors import HeadError, ProtocolError
from .http_forward import REASON_HEADER, ForwardStats, OpenTunnel, TunnelRefused, serve_forward

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

    from .relay import Relay

#: Largest payload per chunk sent to the egress (well under the 512 KiB cap).
SEND_SIZE = 128 * 1024


class WsTunnelStream:
    """An established tunnel as a byte stream; sends the keepalive while it waits to read."""

    def __init__(self, ws: ClientConnection, early: bytes, keepalive_interval: float) -> None:
        self._ws = ws
        self._pending = bytearray(early)
        self._keepalive = keepalive_interval

    async def receive(self, max_bytes: int) -> bytes:
        while not self._pending:
            try:
                async with asyncio.timeout(self._keepalive):
                    message = await self._ws.recv()  # cancel-safe in websockets' asyncio API
            except TimeoutError:
                await self.send(b"")
                continue
            except ConnectionClosedOK:
                return b""
            except ConnectionClosed as exc:
                raise ConnectionError(f"egress WebSocket closed: {exc}") from None
            if isinstance(message, str):
                raise ConnectionError("egress sent a text frame")
            try:
                self._pending += decode_chunk(message)
            except ProtocolError as exc:
                raise ConnectionError(f"protocol error from egress: {exc}") from None
        data = bytes(self._pending[:max_bytes])
        del self._pending[:max_bytes]
        return data

    async def send(self, data: bytes) -> None:
        try:
            if not data:
                await self._ws.send(KEEPALIVE)
            for start in range(0, len(data), SEND_SIZE):
                await self._ws.send(encode_chunk(data[start : start + SEND_SIZE]))
        except ConnectionClosed as exc:
            raise ConnectionError(f"egress WebSocket closed: {exc}") from None

    async def aclose(self) -> None:
        from .relay import _close_ws

        await _close_ws(self._ws)


def relay_open_tunnel(relay: Relay) -> OpenTunnel:
    """``open_tunnel`` for :func:`.http_forward.serve_forward`, on ``relay``'s tunnels."""
    from .relay import _close_ws, _TunnelFailed

    async def open_tunnel(host: str, port: int) -> WsTunnelStream:
        try:
            ws, head, rest = await relay._open_tunnel(Target(host, port))
        except _TunnelFailed as exc:
            raise TunnelRefused(exc.status, exc.reason) from None
        try:
            status = parse_status_head(head)
        except HeadError as exc:
            await _close_ws(ws)
            raise TunnelRefused(502, exc.reason) from None
        if status.status != 200:
            await _close_ws(ws)
            reason = next(iter(header_values(status.headers, REASON_HEADER)), status.reason)
            raise TunnelRefused(status.status, reason, status.headers)
        return WsTunnelStream(ws, rest, relay.config.keepalive_interval)

    return open_tunnel


async def serve_plain_http(
    relay: Relay, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, initial: bytes
) -> ForwardStats:
    """The relay's seam: serve a client whose first head is an absolute-form request."""
    return await serve_forward(reader, writer, initial, relay_open_tunnel(relay))
