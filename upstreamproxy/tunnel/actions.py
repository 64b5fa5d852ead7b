"""What the tunnel core asks its adapter to do (outputs of :mod:`.core`), in order.

Every action is a small frozen value; the adapter executes a returned list front to back.
Writes (:class:`SendChunk`, :class:`WriteLocal`) stay outstanding until the adapter reports
them done with ``TunnelCore.written``; that is how the core sees backpressure and stalls.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..connect_head import ConnectRequest, Target
from .payload import Payload


class Side(enum.Enum):
    LOCAL = "local"  # the client at the relay, the upstream at the egress
    WS = "ws"  # the WebSocket between relay and egress

    # Members are singletons compared by identity: the C identity hash does, and keys the
    # core's per-side dicts without a Python-level Enum.__hash__ call on every lookup.
    __hash__ = object.__hash__


LOCAL = Side.LOCAL
WS = Side.WS


@dataclass(frozen=True, slots=True)
class SendChunk:
    """Send one binary WebSocket message (already an encoded UpstreamProxyChunk)."""

    message: bytes
    payload_size: int


@dataclass(frozen=True, slots=True)
class SendData:
    """Send one chunk carrying ``payload`` (stream data): the adapter frames it, so the
    payload is never copied into an encoded message first."""

    payload: Payload


@dataclass(frozen=True, slots=True)
class WriteLocal:
    """Write bytes to the local stream (stream data, or the relay's answer head)."""

    data: Payload


@dataclass(frozen=True, slots=True)
class SendConnect:
    """Relay: send the first chunk for ``target`` (the adapter adds the credentials, so the
    core never holds the token)."""

    target: Target


@dataclass(frozen=True, slots=True)
class Open:
    """Perform the opening step, then report ``ws_opened``/``open_done`` or ``open_failed``.

    Relay: get a WebSocket to the egress - a pre-opened one unless ``fresh``. Egress: check
    the in-tunnel credentials of ``request``, admit its target and dial it.
    """

    target: Target
    request: ConnectRequest | None = None
    fresh: bool = False


@dataclass(frozen=True, slots=True)
class SendPing:
    """Send a WebSocket ping without waiting for it (report the pong with ``pong()``)."""


@dataclass(frozen=True, slots=True)
class CheckPeers:
    """Check, without reading, whether a peer hung up: the local one (report ``local_eof``)
    or the WebSocket's (report ``ws_closed``). Asked for while a side is not being read -
    paused by backpressure, or its reader stuck in a write - where a hang-up shows no other way."""


@dataclass(frozen=True, slots=True)
class CloseWs:
    """Close the WebSocket with ``code``; ``abort``: drop the socket without a handshake.
    ``patient``: what is still on its way gets as long as a write may stall (``write_stall``)
    while it keeps moving, rather than the adapter's short grace."""

    code: int
    abort: bool = False
    patient: bool = False


@dataclass(frozen=True, slots=True)
class CloseLocal:
    """Close the local stream; ``abort`` (unsendable data, or an error) resets it at once.
    ``patient``: as for :class:`CloseWs`. ``linger``: the other end finished cleanly - send
    our FIN and keep reading (dropping) until the peer is done too, so its unread tail is not
    reset away."""

    abort: bool = False
    patient: bool = False
    linger: bool = False


@dataclass(frozen=True, slots=True)
class HandOff:
    """Relay: the client's head is a plain-HTTP request (absolute-form ``http://``), not a
    CONNECT. The local stream is not closed: the adapter serves it with the plain-HTTP
    forwarder, which starts from ``initial`` (the head and any bytes after it)."""

    initial: bytes


@dataclass(frozen=True, slots=True)
class Finished:
    """The tunnel is over; ``outcome`` says why (for the log/audit line)."""

    outcome: str


Action = (
    SendChunk
    | SendData
    | WriteLocal
    | SendConnect
    | Open
    | SendPing
    | CheckPeers
    | CloseWs
    | CloseLocal
    | HandOff
    | Finished
)
