"""Plain-HTTP forwarding plugged into the relay: ``open_tunnel`` on :meth:`.Relay.open_tunnel`.

:mod:`.http_forward` needs an ``open_tunnel(host, port)`` that gives a byte stream to the
target through the egress. :meth:`.relay.Relay.open_tunnel` runs the relay's own CONNECT path
(the tunnel core, the pre-opened WebSockets, every deadline) over an in-memory stream pair, so
a forwarded request is, on the wire, exactly a ``CONNECT host:port`` tunnel. This module only
adapts that stream pair and its refusals to the forwarder's interface.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .connect_head import REASON_HEADER, Target, header_values, parse_status_head, split_head
from .errors import HeadError
from .http_forward import ForwardStats, OpenTunnel, TunnelRefused, serve_forward
from .tunnel.driver import close_stream
from .tunnel.links import read_ahead

if TYPE_CHECKING:
    from .relay import Relay


class StreamTunnel:
    """An established tunnel's stream pair as the forwarder's ``TunnelStream``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def receive(self, max_bytes: int) -> bytes:
        return await self._reader.read(max_bytes)

    async def send(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise ConnectionError("tunnel closed")
        self._writer.write(data)
        await self._writer.drain()  # in-memory backpressure from the tunnel core

    async def aclose(self) -> None:
        await close_stream(self._writer)

    def buffered(self) -> int:
        return len(read_ahead(self._reader))


def refusal(status: int, answer: bytes) -> TunnelRefused:
    """The forwarder's refusal from the relay's (or egress's) whole answer."""
    try:
        parts = split_head(answer)
        head = parse_status_head(parts[0]) if parts is not None else None
    except HeadError:
        head = None
    if head is None:
        return TunnelRefused(status, "cannot reach the egress" if status == 502 else "refused")
    reason = next(iter(header_values(head.headers, REASON_HEADER)), head.reason)
    return TunnelRefused(status, reason, head.headers)


def relay_open_tunnel(relay: Relay) -> OpenTunnel:
    """``open_tunnel`` for :func:`.http_forward.serve_forward`, on ``relay``'s tunnels."""
    from .relay import TunnelRefused as RelayRefused

    async def open_tunnel(host: str, port: int) -> StreamTunnel:
        try:
            reader, writer = await relay.open_tunnel(Target(host, port))
        except RelayRefused as exc:
            raise refusal(exc.status, exc.answer) from None
        return StreamTunnel(reader, writer)

    return open_tunnel


async def serve_plain_http(
    relay: Relay, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, initial: bytes
) -> ForwardStats:
    """The relay's seam: serve a client whose first head is an absolute-form request."""
    return await serve_forward(reader, writer, initial, relay_open_tunnel(relay))
