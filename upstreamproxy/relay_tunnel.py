"""One client connection of the relay, run on callbacks: no stream pair, no task per tunnel.

The relay's listener accepts a connection straight into a :class:`ClientLink` (the tunnel's
local link, :mod:`.tunnel.links`) as the transport's protocol; its ``connection_made``
starts a :class:`RelayTunnel`, whose :class:`~.tunnel.driver.TunnelDriver` runs the core
until it ends, then reports (the per-tunnel log line) and releases the tunnel's slot. A task
exists only while a WebSocket is being taken or opened (the driver's), and for a plain-HTTP
request handed off to the forwarder, which gets a stream pair built at that moment over the
same transport.

:meth:`Relay.open_tunnel <upstreamproxy.relay.Relay.open_tunnel>` runs the same
:class:`RelayTunnel` over an in-memory stream pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Final

from .tunnel import Role, TunnelCore
from .tunnel.core import relay_answer
from .tunnel.driver import CLOSE_GRACE, TunnelDriver, close_stream, reset
from .tunnel.links import LocalLink

if TYPE_CHECKING:
    from .relay import Relay

log = logging.getLogger("upstreamproxy.relay")

#: The plain-HTTP forwarder's stream limit (its heads are bounded by itself).
STREAM_LIMIT: Final = 64 * 1024

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class RelayTunnel:
    """The core and driver of one client connection, and what the relay logs about it."""

    __slots__ = (
        "_done",
        "core",
        "driver",
        "link",
        "relay",
        "started",
        "started_driver",
        "stopped",
        "streams",
    )

    def __init__(
        self,
        relay: Relay,
        reader: asyncio.StreamReader | None = None,
        writer: asyncio.StreamWriter | None = None,
    ) -> None:
        self.relay = relay
        loop = asyncio.get_running_loop()
        self.started = time.monotonic()
        self.core = TunnelCore(Role.RELAY, relay._timeouts, loop.time(), plain_http=True)
        self.driver = TunnelDriver(
            self.core,
            relay._open_ws,
            reader=reader,
            writer=writer,
            connect_chunk=relay._connect_chunk,
            open_ready=relay._open_ready,
        )
        self.link: LocalLink | None = None
        #: The client as a stream pair: given (open_tunnel), or built at a plain-HTTP hand-off.
        self.streams: Streams | None = None
        if reader is not None and writer is not None:
            self.streams = (reader, writer)
        self.stopped = False
        self.started_driver = False
        #: Set when everything is over (open_tunnel's handler waits for it).
        self._done: asyncio.Future[None] | None = None
        relay._tunnels.add(self)

    def start(self, link: LocalLink | None = None) -> None:
        """Run it: ``link`` is the accepted client (None: the stream pair given)."""
        if self.stopped:  # the relay stopped before the connection was made
            if link is not None:
                link.abort()
            return
        self.link = link
        self.started_driver = True
        try:
            self.driver.start(self._driver_done, local=link)
        except Exception:  # a bug must not take the listener down; it closes this tunnel
            self.core.outcome = "internal-error"
            log.exception("tunnel %s failed unexpectedly", _target(self.core))
            self.driver.stop()

    def stop(self) -> None:
        """The relay is stopping: close the tunnel now."""
        if self.stopped:
            return
        self.stopped = True
        if not self.core.closed:
            self.core.outcome = "relay-stopping"
        if self.started_driver:
            self.driver.stop()  # -> _driver_done at once, unless it is already done
        else:
            self._end()  # accepted, not connected yet: start() aborts the socket

    def evict(self) -> None:
        """Make room for another client (see ``Relay._make_room``): reset this one now, its
        descriptor freed at once rather than after a lingering close."""
        self.core.outcome = "evicted (no head, out of descriptors)"
        if self.link is not None:
            self.link.abort()
        self.stop()

    def wait(self) -> asyncio.Future[None]:
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
            if self not in self.relay._tunnels:
                self._done.set_result(None)
        return self._done

    def _driver_done(self) -> None:
        core, relay = self.core, self.relay
        if self.driver.handed_off is not None and self.streams is not None:
            # Plain HTTP (absolute-form): see relay_forward.py.
            relay._plain.spawn(self._forward(self.streams, self.driver.handed_off), name="plain")
            return
        if core.error is not None:
            log.error("tunnel %s: protocol error: %s", _target(core), core.error)
        elif core.reason:
            log.warning("tunnel %s not established: %s", _target(core), core.reason)
        link = self.link
        transport = link.transport if link is not None else None
        if (
            link is not None
            and transport is not None
            and not transport.is_closing()
            and not link.lingering  # (closing itself, bounded)
        ):
            link.close_gracefully()  # the driver closes it; this is a backstop
        self._end()

    async def _forward(self, streams: Streams, initial: bytes) -> None:
        from .relay_forward import serve_plain_http

        reader, writer = streams
        try:
            forwarded = await serve_plain_http(self.relay, reader, writer, initial)
            self.core.outcome = f"plain-http: {forwarded.outcome}"
        except asyncio.CancelledError:
            self.core.outcome = "relay-stopping" if self.relay._stopping else "cancelled"
            if not self.relay._stopping:
                raise
            # Stopping: ending quietly keeps asyncio from logging a traceback per tunnel.
        except Exception:
            self.core.outcome = "internal-error"
            log.exception("tunnel %s failed unexpectedly", _target(self.core))
        finally:
            if not writer.transport.is_closing():
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.shield(close_stream(writer))
            self._end()

    def _end(self) -> None:
        relay, core = self.relay, self.core
        if self not in relay._tunnels:
            return
        relay._tunnels.discard(self)
        relay.trimmer.tunnel_ended()
        link = self.link
        if link is not None and link.transport is not None and not link.lost:
            # Still closing (lingering): its descriptor is in use until the socket is gone.
            relay._closing += 1
            link.when_lost(relay._closed_one)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "tunnel %s closed: %s, %d bytes up, %d bytes down, %.3fs",
                _target(core),
                core.outcome,
                core.counters.to_ws,
                core.counters.to_local,
                time.monotonic() - self.started,
            )
        if self._done is not None and not self._done.done():
            self._done.set_result(None)


class ClientLink(LocalLink):
    """A client connection accepted straight into the tunnel's local link."""

    def __init__(self, tunnel: RelayTunnel) -> None:
        super().__init__(tunnel.driver)
        self.tunnel = tunnel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.attach(transport)
        self.tunnel.start(self)

    def give_back(self) -> None:
        """Plain-HTTP hand-off: the transport goes to a stream pair built now (the forwarder
        starts from the bytes the core read, which it gets on its own)."""
        transport = self.transport
        self.transport = None
        if transport is None or self.lost:
            return
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        transport.set_write_buffer_limits()
        if self.eof:
            reader.feed_eof()
        self.tunnel.streams = (reader, asyncio.StreamWriter(transport, protocol, reader, loop))
        transport.resume_reading()


#: What a client gets when the relay has no descriptors left for its tunnel's WebSocket.
OVER_BUDGET: Final = relay_answer(503, "too-many-tunnels (file descriptor limit)")


class Refusal(asyncio.Protocol):
    """An accepted client the relay has no descriptors for: a 503 at once, then close."""

    def __init__(self) -> None:
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(OVER_BUDGET)
        transport.close()  # after the answer is flushed; reset if that takes too long
        self._timer = asyncio.get_running_loop().call_later(CLOSE_GRACE, reset, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _target(core: TunnelCore) -> str:
    return core.target.authority if core.target is not None else "-"
