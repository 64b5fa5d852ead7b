"""The relay: a loopback HTTP CONNECT listener that carries each tunnel over a WebSocket.

Per client connection the tunnel protocol core (:mod:`upstreamproxy.tunnel.core`, relay role)
decides everything - the CONNECT head, the first chunk, the egress's status head, keepalives,
pings, deadlines, close codes - and :class:`~upstreamproxy.tunnel.driver.TunnelDriver` runs it
over the client's socket and a WebSocket to the egress, taken from a small pool of
pre-opened ones (:mod:`upstreamproxy.relay_link`) so a CONNECT waits only for its answer.

Backpressure: a side is read only while less than 64 KiB read from it wait to be written to
the other (:mod:`upstreamproxy.tunnel.links`), so a tunnel holds at most a read's worth of data
however fast either sender is.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .acceptor import (
    Listener,
    RateLimitedLog,
    bind_sockets,
    refuse_http_503,
    socket_transport,
    supports_make_transport,
)
from .capped_file import CappedFileError, read_capped
from .codec import encode_chunk
from .connect_head import Target, build_tunnel_request, parse_status_head
from .errors import ConfigError
from .fdlimit import tunnel_budget
from .memstream import stream_pair
from .memtrim import Trimmer
from .options import env_flag
from .relay_link import LinkConfig, WsPool, open_ws
from .relay_tunnel import OVER_BUDGET, ClientLink, Refusal, RelayTunnel
from .secret import Secret
from .tasks import TaskSet
from .tunnel import Open, SendConnect, Timeouts, pipe
from .tunnel.core import READ_SIZE, State
from .tunnel.driver import Opened, close_stream

log = logging.getLogger("upstreamproxy.relay")

#: Pending connections the kernel queues for us; bursts of tools opening many tunnels at once
#: overflowed the default 100 and stalled clients for a 1 s SYN retry.
LISTEN_BACKLOG: Final = 1024
#: Over the descriptor budget, a client that sent no complete head for this long is dropped
#: to make room (younger ones may be a burst whose heads are on their way: those get 503).
EVICT_AFTER: Final = 2.0
#: Pre-opened WebSockets at most (--pool-size): each counts against the session's tunnel limit
#: at the egress (512 by default), and more than this would only hold it idle.
MAX_POOL_SIZE: Final = 64
#: The largest --egress-ca-file read (a whole system bundle is about 200 KiB).
MAX_CA_FILE_SIZE: Final = 16 * 1024 * 1024


@dataclass(frozen=True)
class RelayConfig:
    egress_url: str
    session_id: str
    token: Secret = field(repr=False)
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    allow_non_loopback: bool = False
    #: CA file to verify a ``wss://`` egress (None: system trust store); it must load even
    #: with ``ws://``, where it is unused (see :func:`egress_tls_context`).
    egress_ca_file: str | None = None
    #: Outbound proxy the relay itself uses to reach the egress (``http://`` or ``socks5://``).
    egress_proxy: str | None = None
    head_timeout: float = 10.0
    handshake_timeout: float = 10.0
    establish_timeout: float = 30.0
    keepalive_interval: float = 30.0
    #: A WebSocket ping after this long without hearing from the egress; the egress is dead
    #: (tunnel closed, or 504 before establishment) when no pong follows within ping_timeout.
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    #: A client or egress that accepts no bytes for this long ends the tunnel.
    write_stall_timeout: float = 60.0
    #: Pre-opened WebSockets kept ready (0: open one per CONNECT).
    pool_size: int = 2
    #: Offer tunnel reuse (SPEC §11): a WebSocket whose tunnel ended cleanly goes back to
    #: the pool instead of being closed, where the egress agrees.
    reuse: bool = True

    def validate(self) -> ssl.SSLContext | None:
        """ConfigError for the first unusable setting; else the TLS context loaded from
        ``egress_ca_file`` while checking it (None without one), for the caller to use."""
        if not self.egress_url.startswith(("ws://", "wss://")):
            raise ConfigError("egress_url", "must start with ws:// or wss://")
        if not self.session_id:
            raise ConfigError("session_id", "must not be empty")
        if not self.token:
            raise ConfigError("token", "must not be empty")
        # With ws:// too: a typo must not pass unnoticed until the URL becomes wss://.
        context = egress_tls_context(self.egress_ca_file) if self.egress_ca_file else None
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
            "ping_interval",
            "ping_timeout",
            "write_stall_timeout",
        ):
            # "nan" (from the environment, say) passes a `<= 0` check and breaks deadlines.
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(name, "must be a positive number of seconds")
        if not 0 <= self.pool_size <= MAX_POOL_SIZE:
            # Each is a live WebSocket the egress counts against the session's tunnels.
            raise ConfigError("pool_size", f"must be 0..{MAX_POOL_SIZE}")
        if self.egress_proxy is not None and not self.egress_proxy.startswith(
            ("http://", "https://", "socks5://", "socks5h://", "socks4://", "socks4a://")
        ):
            raise ConfigError("egress_proxy", "must be an http://, https:// or socks5:// URL")
        return context

    def timeouts(self) -> Timeouts:
        return Timeouts(
            head=self.head_timeout,
            open=self.handshake_timeout,
            establish=self.establish_timeout,
            keepalive=self.keepalive_interval,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            write_stall=self.write_stall_timeout,
        )


#: ``UPSTREAMPROXY_*`` variables that tune a relay started by ``start`` (the ``relay``
#: command has the same as flags), and the RelayConfig field each sets.
TUNING_ENV: Final = {
    "HANDSHAKE_TIMEOUT": ("handshake_timeout", float),
    "KEEPALIVE": ("keepalive_interval", float),
    "POOL_SIZE": ("pool_size", int),
    "PING_INTERVAL": ("ping_interval", float),
    "PING_TIMEOUT": ("ping_timeout", float),
    "WRITE_STALL_TIMEOUT": ("write_stall_timeout", float),
}


def tuning_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """RelayConfig fields from ``UPSTREAMPROXY_*`` tuning variables (ConfigError if bad)."""
    fields: dict[str, Any] = {}
    for name, (field_name, convert) in TUNING_ENV.items():
        raw = environ.get(f"UPSTREAMPROXY_{name}")
        if raw is None or raw == "":
            continue
        try:
            fields[field_name] = convert(raw)
        except ValueError:
            # (``start`` names the variable: see cli.as_flag)
            raise ConfigError(field_name, f"{raw!r} is not a number") from None
    if env_flag("NO_REUSE", environ):
        fields["reuse"] = False
    return fields


def egress_tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The TLS context that verifies the egress: ``ca_file`` alone when given (PEM), else the
    system trust store.

    A CA file that cannot be used (missing, not a regular file, unreadable, no PEM certificate
    in it) is a ConfigError naming ``egress_ca_file``: at start-up, before anything listens,
    rather than on every CONNECT.
    """
    if not ca_file:
        return ssl.create_default_context()
    try:
        # One capped read of a regular file (a FIFO or a device swapped in cannot block it or
        # stream for ever), then the certificates from memory: nothing opens the path again.
        pem = read_capped(ca_file, MAX_CA_FILE_SIZE).data
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            raise ConfigError("egress_ca_file", f"{ca_file}: no PEM certificate in it")
        # Only ASCII is PEM; other bytes can only be in comments between the blocks.
        return ssl.create_default_context(cadata=pem.decode("ascii", "ignore"))
    except ssl.SSLError:  # (an OSError too: first)
        raise ConfigError("egress_ca_file", f"{ca_file}: no PEM certificate in it") from None
    except CappedFileError as exc:
        raise ConfigError("egress_ca_file", f"{ca_file}: {exc}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError("egress_ca_file", f"{ca_file}: {reason}") from None


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TunnelRefused(Exception):
    """:meth:`Relay.open_tunnel` did not get a ``200``: ``status`` and the whole ``answer``."""

    def __init__(self, status: int, answer: bytes) -> None:
        super().__init__(f"tunnel not established: HTTP {status}")
        self.status = status
        self.answer = answer


class Relay:
    """The CONNECT listener. ``start()`` binds, ``stop()`` closes the listener and every tunnel."""

    def __init__(self, config: RelayConfig) -> None:
        loaded = config.validate()  # (--egress-ca-file read here, once)
        self.config = config
        self._server: Listener | None = None
        #: Every client connection from accept (or open_tunnel) to its log line.
        self._tunnels: set[RelayTunnel] = set()
        self._plain = TaskSet()  # plain-HTTP requests handed off to the forwarder
        self._ssl: ssl.SSLContext | None = None
        if config.egress_url.startswith("wss://"):
            self._ssl = loaded or ssl.create_default_context()
        self._timeouts = config.timeouts()
        self._link = LinkConfig(
            config.egress_url,
            config.token,
            config.handshake_timeout,
            config.egress_proxy,
            self._ssl,
            config.reuse,
        )
        self.pool = WsPool(
            config.pool_size,
            lambda: open_ws(self._link, preopened=True),
            keepalive=config.keepalive_interval,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
        )
        self._stopping = False
        self._inner = TaskSet()  # tunnels opened by open_tunnel()
        #: Tunnels this process has descriptors for (client socket + WebSocket each); set
        #: at start(), after the command raised the soft limit.
        self._budget = 0
        #: Client sockets of ended tunnels still closing (the tail of a download on its way
        #: to a slow reader): their descriptors count against the budget until closed.
        self._closing = 0
        self._fast_accept = True
        self._over_budget_log = RateLimitedLog(log)
        self.trimmer = Trimmer()  # freed chunk buffers back to the kernel after a burst

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
        return len(self._tunnels)

    async def start(self) -> None:
        pipe.prepare()
        self._budget = tunnel_budget()
        self._fast_accept = supports_make_transport(asyncio.get_running_loop())
        # Our accept loop: fd exhaustion pauses accepts with one log line, not a flood.
        sockets = bind_sockets(self.config.listen_host, self.config.listen_port, LISTEN_BACKLOG)
        self._server = Listener(sockets, self._accepted, on_shed=refuse_http_503)
        self.pool.start()
        log.info(
            "relay listening on %s -> %s (%d pre-opened WebSockets)",
            self.proxy_url,
            self.config.egress_url,
            self.config.pool_size,
        )

    async def stop(self, grace: float = 5.0) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for tunnel in list(self._tunnels):
            tunnel.stop()  # closes it at once (bounded closes), and logs its line
        await self._plain.cancel_all(grace)
        await self._inner.cancel_all(grace)
        await self.pool.close()
        self.trimmer.close()
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

    # -- in-process tunnels ---------------------------------------------------------------

    async def open_tunnel(
        self, target: Target
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a tunnel to ``target`` for code in this process (e.g. plain-HTTP forwarding).

        It runs the very same path as a client's CONNECT - the tunnel core, the pool, every
        deadline, the log line - over an in-memory stream pair instead of a socket: this
        writes ``CONNECT target`` into one end, :meth:`_handle` serves the other, and once
        the egress answered ``200`` the returned ``(reader, writer)`` carry the raw tunnel
        bytes. Closing the writer (or EOF) ends the tunnel as a client's FIN would.

        Raises :class:`TunnelRefused` with the status and the whole answer (the egress's
        refusal, or the relay's own ``502``/``504``) when the tunnel is not established.
        """
        if self._server is None:
            raise RuntimeError("relay is not started")
        (reader, writer), (inner_reader, inner_writer) = stream_pair(2 * READ_SIZE)
        self._inner.spawn(self._handle(inner_reader, inner_writer), name="open-tunnel")
        writer.write(f"CONNECT {target.authority} HTTP/1.1\r\n\r\n".encode())
        try:
            # Bounded by the tunnel's own deadlines: the handler always answers or closes.
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            raise TunnelRefused(502, b"") from None
        except BaseException:
            writer.close()
            raise
        status = parse_status_head(head).status
        if status != 200:
            body = await reader.read()
            writer.close()
            raise TunnelRefused(status, head + body)
        return reader, writer

    # -- per connection -----------------------------------------------------------------

    def _accepted(self, conn: socket.socket, address: Any) -> None:
        """A client connected: straight into its tunnel's link, no stream pair, no task."""
        if self._stopping:
            conn.close()
            return
        if not self._fast_accept:  # not a selector event loop: asyncio's way
            self._inner.spawn(self._connect_accepted(conn), name="accept")
            return
        if self._over_budget() and not self._make_room():
            self._log_over_budget()
            protocol: asyncio.BaseProtocol = Refusal()
        else:
            protocol = ClientLink(RelayTunnel(self))
        try:
            socket_transport(conn, protocol, address)  # not None: _fast_accept said so
        except OSError:  # the socket died at once
            conn.close()
            if isinstance(protocol, ClientLink):
                protocol.tunnel.core.outcome = "accept-failed"
                protocol.tunnel.stop()

    async def _connect_accepted(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=READ_SIZE // 2)
        except OSError:
            conn.close()
            return
        await self._handle(reader, writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A client as a stream pair (open_tunnel's in-memory one): the same tunnel."""
        if self._over_budget() and not self._make_room():
            await self._refuse_over_budget(writer)
            return
        tunnel = RelayTunnel(self, reader, writer)
        tunnel.start()
        try:
            await asyncio.shield(tunnel.wait())
        except asyncio.CancelledError:
            tunnel.stop()
            if not self._stopping:
                raise

    def _over_budget(self) -> bool:
        return len(self._tunnels) + self._closing >= self._budget

    def _make_room(self) -> bool:
        """Over budget: drop the client that has waited longest - and :data:`EVICT_AFTER` at
        least - without sending a complete head (idle or trickling: it loses only its place),
        as the egress evicts the oldest unauthenticated connection, so a process holding
        connections open cannot lock every other tool out for the head timeout. False if
        there is none."""
        since = time.monotonic() - EVICT_AFTER
        waiting = [
            t
            for t in self._tunnels
            if t.core.state is State.HEAD and not t.stopped and t.started <= since
        ]
        if not waiting:
            return False
        self._over_budget_log.warning(
            "out of file descriptors for tunnels: dropped the client that waited longest "
            "without sending its head (%d waiting)",
            len(waiting),
        )
        min(waiting, key=lambda tunnel: tunnel.started).evict()
        return True

    def _closed_one(self) -> None:
        self._closing -= 1

    def _log_over_budget(self) -> None:
        self._over_budget_log.warning(
            "refusing tunnels: %d open (%d closing), the file descriptor limit allows %d",
            len(self._tunnels) + self._closing,
            self._closing,
            self._budget,
        )

    async def _refuse_over_budget(self, writer: asyncio.StreamWriter) -> None:
        """No descriptors left for this tunnel's WebSocket: say so at once (503)."""
        self._log_over_budget()
        with contextlib.suppress(ConnectionError):
            writer.write(OVER_BUDGET)
        await close_stream(writer)

    async def _open_ws(self, action: Open) -> Opened:
        """The driver's opener: a pre-opened WebSocket, or a fresh one when asked."""
        if action.fresh:
            link = await open_ws(self._link)
            self.pool.adopt(link)
            return Opened(ws=link)
        port, pooled = await self.pool.take()
        return Opened(ws=port, pooled=pooled)

    def _open_ready(self, action: Open) -> Opened | None:
        """A ready pooled WebSocket, taken without a task (None: :meth:`_open_ws` runs)."""
        if action.fresh:
            return None
        link = self.pool.take_ready()
        return Opened(ws=link, pooled=True) if link is not None else None

    def _connect_chunk(self, action: SendConnect) -> bytes:
        return encode_chunk(
            build_tunnel_request(action.target, self.config.session_id, self.config.token.reveal())
        )
