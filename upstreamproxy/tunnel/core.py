"""The tunnel protocol, written once for both ends, with no I/O (SPEC §4-§8).

A :class:`TunnelCore` is one tunnel seen from one end: the **relay** (its local stream is the
sandbox client) or the **egress** (its local stream is the upstream). It is driven like h11's
``Connection`` or websockets' ``Protocol``: the adapter feeds it what happened (bytes or EOF
from the local stream, a WebSocket message or close, the result of an opening step it was
asked to perform, a pong, the time) and executes the :mod:`actions <.actions>` it gets back,
in order. The core never blocks, sleeps, reads a clock or touches a socket, so every path of a
tunnel - including every timeout - is testable with plain method calls.

States (the same names at both ends)::

    relay:   HEAD --head ok--> OPENING --ws open--> ESTABLISHING --200--> ESTABLISHED --> CLOSED
    egress:  HEAD --CONNECT ok--> OPENING --dialled--> ESTABLISHED --> CLOSED

* ``HEAD``: the relay reads the client's CONNECT head; the egress reads the in-tunnel one.
* ``OPENING``: the adapter performs :class:`~.actions.Open` (relay: open a WebSocket or take a
  pre-opened one; egress: credentials, admission, dial) and reports back.
* ``ESTABLISHING`` (relay only): the CONNECT chunk is sent; the egress's status head is awaited.
* ``ESTABLISHED``: bytes both ways. ``CLOSED``: every further input is ignored.

What each state does with each input is the table :data:`TRANSITIONS` - one place, like
h11's. An input the adapter should never deliver in a state (a local read before the relay
has a head, say) raises :class:`CoreMisuse`; remote misbehaviour never raises - it is a
typed :class:`~upstreamproxy.errors.ProtocolError` turned into the answer or close code the
spec asks for, and reported in :class:`~.actions.Finished`.

Time is explicit: every deadline (head, open, establish, idle, write stall, keepalive, ping,
pong, hangup check) is computed from the ``now`` values fed in; :meth:`next_deadline` says
when the adapter must call :meth:`tick` at the latest.

Flow control is explicit: :attr:`may_read_local` and :attr:`may_read_ws` say whether the
adapter may read each side now. Every write the core asks for is outstanding until the
adapter reports it done with :meth:`written`; reading a side stops while the bytes it fed
toward the other side are over :data:`HIGH_WATER`, so a tunnel holds a bounded amount of
data however fast either sender is.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..codec import KEEPALIVE, MAX_CHUNK_PAYLOAD, decode_chunk, encode_chunk
from ..connect_head import (
    MAX_HEAD_BYTES,
    REASON_HEADER,
    RULE_HEADER,
    ConnectRequest,
    Target,
    build_status_head,
    parse_connect_head,
    parse_status_head,
    split_head,
)
from ..errors import ChunkError, HeadError, ProtocolError, UpstreamProxyError
from ..forward_request import MAX_REQUEST_HEAD, is_forward_request, may_be_forward_request
from .actions import (
    LOCAL,
    WS,
    Action,
    CheckPeers,
    CloseLocal,
    CloseWs,
    Finished,
    HandOff,
    Open,
    SendChunk,
    SendConnect,
    SendData,
    SendPing,
    Side,
    WriteLocal,
)
from .payload import Payload, Piped

#: Largest local read the core asks for once established (well under the 512 KiB payload cap).
#: 64 KiB halved a busy tunnel's worst-case memory but cost 40-70% more CPU per GiB over the
#: benchmark's veth path (benchmarks/README.md): 128 KiB it is.
READ_SIZE: Final = 128 * 1024
#: A side is not read while this many bytes fed from it still wait to be written to the other.
HIGH_WATER: Final = 64 * 1024
#: What a WebSocket read may add to a payload budget: a frame header and a chunk prefix.
WS_FRAMING: Final = 64

#: Egress draining: a socket that has sent nothing yet is closed once it is this old (its
#: CONNECT would have come by then unless it is a pre-opened one).
DRAIN_MIN_AGE: Final = 1.0

# WebSocket close codes used by the tunnel (RFC 6455 §7.4.1).
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_INTERNAL_ERROR: Final = 1011


class Role(enum.Enum):
    RELAY = "relay"
    EGRESS = "egress"

    __hash__ = object.__hash__  # identity hash in C: keys TRANSITIONS (see Side)


class State(enum.Enum):
    HEAD = "head"
    OPENING = "opening"
    ESTABLISHING = "establishing"
    ESTABLISHED = "established"
    CLOSED = "closed"

    __hash__ = object.__hash__


class CoreMisuse(UpstreamProxyError):
    """The adapter fed an input the current state never expects (a bug, not the peer's)."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Every bound the core enforces, in seconds; ``None`` turns a timer off."""

    #: Relay: the client's CONNECT head. Egress: the in-tunnel CONNECT after the upgrade.
    head: float = 10.0
    #: Relay: opening the WebSocket. Egress: credentials, admission and dial together.
    open: float = 30.0
    #: Relay: CONNECT chunk sent -> status head received.
    establish: float = 30.0
    #: No payload in either direction for this long ends an established tunnel.
    idle: float | None = None
    #: Relay: an empty chunk this often once the WebSocket is open (the CCR keepalive).
    keepalive: float | None = None
    #: A WebSocket ping after this long without hearing from the peer ...
    ping_interval: float | None = 20.0
    #: ... and the peer is dead when no pong (or any message) follows within this.
    ping_timeout: float = 20.0
    #: A write (to either side) outstanding this long without completing ends the tunnel.
    write_stall: float | None = 60.0
    #: Egress: a pre-opened WebSocket waits this long for its CONNECT (renewed by each
    #: keepalive) instead of ``head``.
    pooled_wait: float = 90.0
    #: While a side is not being read, check this often whether its peer hung up.
    hangup_check: float | None = 1.0


@dataclass(slots=True)
class Counters:
    """Payload bytes moved, from this end's point of view."""

    to_ws: int = 0
    to_local: int = 0


def _safe_reason(reason: str) -> str:
    return reason.encode("ascii", "replace").decode("ascii").replace("\r", " ").replace("\n", " ")


def relay_answer(status: int, reason: str) -> bytes:
    """The relay's own answer to its client (before establishment only), SPEC §7."""
    body = (reason + "\n").encode("utf-8", "replace")
    return build_status_head(status, ((REASON_HEADER, _safe_reason(reason)),), body)


def egress_answer(status: int, reason: str, rule: str = "-") -> bytes:
    """The egress's in-tunnel refusal, SPEC §5: reason and rule headers, a JSON body."""
    # The rule header is always there ("-": no rule matched) so a client can rely on it.
    headers = ((REASON_HEADER, reason), (RULE_HEADER, rule))
    body = json.dumps({"status": status, "reason": reason, "rule": rule}).encode() + b"\n"
    return build_status_head(status, headers, body)


_Handler = Callable[["TunnelCore", object, float], list[Action]]


class TunnelCore:
    """One tunnel at one end. See the module docstring for the model."""

    def __init__(
        self,
        role: Role,
        timeouts: Timeouts,
        now: float,
        *,
        preopened: bool = False,
        plain_http: bool = False,
    ) -> None:
        self.role = role
        #: Relay: a plain-HTTP request head is handed off (:class:`~.actions.HandOff`)
        #: instead of being refused as "not CONNECT".
        self.plain_http = plain_http
        #: Egress: the relay opened this socket ahead of any CONNECT (its upgrade said so);
        #: it waits ``pooled_wait`` (renewed by each keepalive) instead of ``head``.
        self.preopened = preopened
        self.timeouts = timeouts
        self.state = State.HEAD
        self.counters = Counters()
        #: Why the tunnel ended (set with :class:`~.actions.Finished`).
        self.outcome = "open"
        #: The close code the peer's WebSocket close frame carried (None: no close frame yet,
        #: or the connection was lost without one).
        self.ws_close_code: int | None = None
        self._local_reset = False  # the local stream ended with a reset (local_eof)
        self._local_ended = False  # the tunnel ended because the local stream did
        #: The final HTTP status: answered (relay) or sent in the tunnel (egress); 0 if none.
        self.status = 0
        self.target: Target | None = None
        self.request: ConnectRequest | None = None
        #: The WebSocket in use was pre-opened (relay): it may be replaced once if it fails.
        self.pooled = False
        self.error: ProtocolError | None = None
        self._buffer = bytearray()  # head bytes (HEAD) or status bytes (ESTABLISHING)
        self._early = b""  # bytes after a head, held until establishment
        self._seen_head_bytes = False
        self._keepalive_seen = False
        self._draining = False
        self._created = now
        self._ws_open = role is Role.EGRESS  # the egress core starts on an upgraded socket
        self._local_open = role is Role.RELAY  # the egress has an upstream once dialled
        self.refusal: tuple[str, str] | None = None  # egress: (reason, rule) it answered with
        #: Set when a deadline may have moved earlier; the adapter clears it once it has
        #: looked at :meth:`next_deadline` (later deadlines need no re-arming: an early
        #: timer just ticks and re-arms), so a busy tunnel does not recompute it per chunk.
        self.deadline_moved = True
        self.reason = ""  # relay: the reason it answered its client with
        wait = timeouts.pooled_wait if preopened else timeouts.head
        self._state_deadline: float | None = now + wait
        self._last_payload = now
        self._last_heard = now
        self._ping_sent: float | None = None
        self._next_keepalive: float | None = None
        self._pending = {LOCAL: 0, WS: 0}  # outstanding write actions per side
        self._pending_bytes = {LOCAL: 0, WS: 0}
        self._stall_since: dict[Side, float | None] = {LOCAL: None, WS: None}
        self._next_hangup_check: float | None = None
        if self._ws_open:
            self._start_ws_timers(now)
        self._update_hangup_check(now)

    # -- flow control ----------------------------------------------------------------------

    @property
    def may_read_local(self) -> bool:
        if self.state is State.ESTABLISHED:
            return self._pending_bytes[WS] < HIGH_WATER
        return self.state is State.HEAD and self.role is Role.RELAY

    @property
    def may_read_ws(self) -> bool:
        if self.state is State.ESTABLISHED:
            return self._pending_bytes[LOCAL] < HIGH_WATER
        if self.role is Role.RELAY:
            return self.state is State.ESTABLISHING
        return self.state is State.HEAD

    @property
    def local_read_size(self) -> int:
        """How much the adapter may read from the local side at once.

        Before the head is complete the relay never reads past the head limit, so the bytes
        a client pipelines after its CONNECT stay bounded by it. Once established a read is
        :data:`READ_SIZE`, or only what is left below :data:`HIGH_WATER` while earlier bytes
        still wait to be written: what a tunnel holds stays within ``READ_SIZE``.
        """
        if self.state is State.HEAD:
            return max(1, self._head_limit() - len(self._buffer))
        return _budget(self._pending_bytes[WS])

    @property
    def ws_read_size(self) -> int:
        """How much the adapter may read from the WebSocket at once (as ``local_read_size``,
        framing allowed for). The relay passes what it reads on without copying it, and a
        read of two chunks leaves in one ``writev``: it reads twice as much while nothing
        waits."""
        pending = self._pending_bytes[LOCAL]
        if pending <= 0 and self.role is Role.RELAY:
            return 2 * READ_SIZE + WS_FRAMING
        return _budget(pending) + WS_FRAMING

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def written(self, side: Side, size: int, now: float) -> None:
        """A write action on ``side`` (``size`` bytes) completed: the peer accepted it."""
        self._pending[side] -= 1
        self._pending_bytes[side] -= size
        self._stall_since[side] = now if self._pending[side] > 0 else None
        self._update_hangup_check(now)

    # -- inputs ----------------------------------------------------------------------------

    def local_data(self, data: Payload, now: float) -> list[Action]:
        """Bytes read from the local stream (client at the relay, upstream at the egress);
        :class:`~.wsframes.Piped` bytes only once established."""
        return self._dispatch("local_data", data, now)

    def local_eof(self, now: float, *, reset: bool = False) -> list[Action]:
        """The local stream ended (EOF, reset, or a hang-up seen while not reading);
        ``reset``: by a reset (passed on as one)."""
        self._local_reset = reset
        return self._dispatch("local_eof", None, now)

    def ws_message(self, message: bytes | str, now: float) -> list[Action]:
        """One WebSocket message (``str`` for a text message, a protocol error)."""
        self._last_heard = now
        self._ping_sent = None
        return self._dispatch("ws_message", message, now)

    def ws_payload(self, payload: Payload | ProtocolError, now: float) -> list[Action]:
        """One chunk's payload (or a piece of it, once established), already decoded by the
        adapter's frame reader - or the :class:`ProtocolError` it found instead. Same as
        :meth:`ws_message` otherwise; ``b""`` is a whole empty chunk (a keepalive)."""
        self._last_heard = now
        self._ping_sent = None
        return self._dispatch("ws_message", _Decoded(payload), now)

    def ws_closed(self, code: int | None, now: float) -> list[Action]:
        """The WebSocket closed (by the peer, an error, or a failed keepalive); ``code``: the
        peer's close code, None when it sent no close frame."""
        self._ws_open = False
        if self.ws_close_code is None:
            self.ws_close_code = code
        return self._dispatch("ws_closed", code, now)

    def ws_opened(self, now: float, *, pooled: bool = False) -> list[Action]:
        """Relay: the WebSocket asked for by :class:`~.actions.Open` is open."""
        self.pooled = pooled
        return self._dispatch("ws_opened", None, now)

    def open_done(self, now: float) -> list[Action]:
        """Egress: the upstream asked for by :class:`~.actions.Open` is connected."""
        return self._dispatch("open_done", None, now)

    def open_failed(self, status: int, reason: str, now: float, *, rule: str = "-") -> list[Action]:
        """The opening step failed; ``status``/``reason`` (and ``rule``) are what to answer."""
        return self._dispatch("open_failed", (status, reason, rule), now)

    def open_stale(self, now: float) -> list[Action]:
        """Egress: the socket itself is no longer good for a tunnel (a pre-opened socket
        whose token expired since its upgrade): close it without an answer (1008), so the
        relay opens a fresh one - whose upgrade gets the real answer."""
        return self._dispatch("open_stale", None, now)

    def pong(self, now: float) -> None:
        """A pong arrived: the peer is alive."""
        self._last_heard = now
        self._ping_sent = None

    def drain(self, now: float) -> list[Action]:
        """Egress shutting down: a socket that has not sent its CONNECT is closed with 1001
        (a pre-opened one - the relay replaces it without its client noticing)."""
        return self._dispatch("drain", None, now)

    def tick(self, now: float) -> list[Action]:
        """Time passed: act on every deadline that is due at ``now``."""
        if self.state is State.CLOSED:
            return []
        if self._state_deadline is not None and now >= self._state_deadline:
            return self._dispatch("deadline", None, now)
        for side in (WS, LOCAL):
            since = self._stall_since[side]
            stall = self.timeouts.write_stall
            if since is not None and stall is not None and now >= since + stall:
                return self._fail(
                    now, f"write-stall ({self._peer(side)} accepted no bytes)", abort=True
                )
        heartbeat = False
        if self._ws_open:
            if self._ping_sent is not None and now >= self._ping_sent + self.timeouts.ping_timeout:
                if self.may_read_ws:
                    return self._peer_dead(now)
                # Not reading the WebSocket (our other side is slow to take its bytes): the
                # answer may wait unread behind data, and the peer's own pings go unanswered
                # for the same reason. Ping again - to the peer, a ping is a sign of life - and
                # wait again; once reading resumes any byte read answers, and a peer that is
                # gone is noticed within the timeout (one that takes nothing: write-stall).
                self._ping_sent = now
                self.deadline_moved = True
                heartbeat = True
            idle = self.timeouts.idle
            if (
                idle is not None
                and self.state is State.ESTABLISHED
                and now >= self._last_payload + idle
            ):
                return self._finish(now, "idle-timeout", ws_code=CLOSE_NORMAL)
        actions: list[Action] = [SendPing()] if heartbeat else []
        if self._ws_open:
            interval = self.timeouts.ping_interval
            if (
                interval is not None
                and self._ping_sent is None
                and now >= self._last_heard + interval
            ):
                self._ping_sent = now
                actions.append(SendPing())
            if self._next_keepalive is not None and now >= self._next_keepalive:
                self._next_keepalive = now + self._keepalive_interval()
                actions.append(self._send(KEEPALIVE, 0, now))
        if self._next_hangup_check is not None and now >= self._next_hangup_check:
            if self._reading_both():
                self._next_hangup_check = None
            else:
                assert self.timeouts.hangup_check is not None
                self._next_hangup_check = now + self.timeouts.hangup_check
                actions.append(CheckPeers())
        return actions

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`tick` has something to do (None: nothing pending)."""
        # Called after nearly every input: plain comparisons, no list or generator.
        if self.state is State.CLOSED:
            return None
        best = self._state_deadline
        hangup = self._next_hangup_check
        if hangup is not None and (best is None or hangup < best):
            best = hangup
        stall = self.timeouts.write_stall
        if stall is not None:
            for since in self._stall_since.values():
                if since is not None and (best is None or since + stall < best):
                    best = since + stall
        if self._ws_open:
            timeouts = self.timeouts
            more = self._next_keepalive
            if more is not None and (best is None or more < best):
                best = more
            if self._ping_sent is not None:
                more = self._ping_sent + timeouts.ping_timeout
            elif timeouts.ping_interval is not None:
                more = self._last_heard + timeouts.ping_interval
            else:
                more = None
            if more is not None and (best is None or more < best):
                best = more
            if timeouts.idle is not None and self.state is State.ESTABLISHED:
                more = self._last_payload + timeouts.idle
                if best is None or more < best:
                    best = more
        return best

    # -- the table -------------------------------------------------------------------------

    def _dispatch(self, event: str, arg: object, now: float) -> list[Action]:
        handler = TRANSITIONS[self.role, self.state].get(event, _misuse)
        actions = handler(self, arg, now)
        self._update_hangup_check(now)
        return actions

    # relay ---------------------------------------------------------------------------------

    def _head_limit(self) -> int:
        """The relay's first head is a CONNECT's (:data:`MAX_HEAD_BYTES`) unless plain HTTP is
        on and its first bytes rule a CONNECT out: a forwarded request's head may be as large
        as the forwarder allows its later ones (cookies), and is answered 431 over it."""
        if self.plain_http and may_be_forward_request(bytes(self._buffer[:8])):
            return MAX_REQUEST_HEAD
        return MAX_HEAD_BYTES

    def _relay_head_data(self, data: object, now: float) -> list[Action]:
        assert isinstance(data, bytes | bytearray | memoryview)
        self._buffer += data
        try:
            limit = self._head_limit()
            parts = split_head(self._buffer, limit, 431 if limit == MAX_REQUEST_HEAD else 400)
            if parts is None:
                return []
            head, self._early = parts
            if self.plain_http and is_forward_request(head):
                return self._hand_off(head + self._early, now)
            request = parse_connect_head(head)
        except HeadError as exc:
            return self._answer_local(now, exc.status, exc.reason, outcome=f"refused-{exc.status}")
        self._buffer = bytearray()
        self.request, self.target = request, request.target
        self._enter(State.OPENING, now + self.timeouts.open)
        return [Open(request.target)]

    def _relay_opened(self, _: object, now: float) -> list[Action]:
        assert self.target is not None
        self._ws_open = True
        self._start_ws_timers(now)
        self._enter(State.ESTABLISHING, now + self.timeouts.establish)
        return [SendConnect(self.target)]

    def _relay_open_failed(self, arg: object, now: float) -> list[Action]:
        status, reason, _rule = _failure(arg)
        return self._answer_local(now, status, reason, outcome=f"failed-{status}")

    def _relay_status_message(self, message: object, now: float) -> list[Action]:
        try:
            payload = self._payload(message)
            if not payload:
                return []
            self._buffer += payload
            parts = split_head(self._buffer)
            if parts is None:
                return []
            head, rest = parts
            status = parse_status_head(head).status
        except ChunkError as exc:
            self.error = exc
            return self._answer_local(
                now,
                502,
                f"protocol error from egress: {exc}",
                "protocol-error",
                CLOSE_PROTOCOL_ERROR,
            )
        except HeadError as exc:
            self.error = exc
            # HeadError from split_head says 400 (the limit); from the egress it is a 502.
            return self._answer_local(now, 502, exc.reason, "protocol-error", CLOSE_PROTOCOL_ERROR)
        except ProtocolError as exc:
            self.error = exc
            return self._answer_local(now, 502, str(exc), "protocol-error", CLOSE_PROTOCOL_ERROR)
        self._buffer = bytearray()
        self.status = status
        actions: list[Action] = [self._write_local(head + rest, now)]
        if status != 200:
            return actions + self._finish(now, "refused-by-egress", ws_code=CLOSE_NORMAL)
        self._enter(State.ESTABLISHED, None)
        self.counters.to_local += len(rest)
        early, self._early = self._early, b""
        if early:
            actions += self._chunks(early, now)
        return actions

    def _relay_establishing_closed(self, _: object, now: float) -> list[Action]:
        if self.pooled and not self._buffer:
            # A pre-opened socket that died (or was retired by a draining egress) before any
            # answer: nothing reached the client, so open a fresh one instead.
            self.pooled = False
            self._stop_ws_timers()
            self._enter(State.OPENING, now + self.timeouts.open)
            assert self.target is not None
            return [Open(self.target, fresh=True)]
        return self._answer_local(now, 502, "egress closed the tunnel before establishing it")

    def _relay_deadline(self, _: object, now: float) -> list[Action]:
        if self.state is State.HEAD:
            return self._finish(now, "client-gone-before-head", ws_code=None)
        if self.state is State.OPENING:
            return self._answer_local(
                now, 504, "timed out opening the WebSocket to the egress", ws_code=None
            )
        return self._answer_local(now, 504, "egress did not answer the CONNECT in time")

    # egress ------------------------------------------------------------------------------

    def _egress_head_message(self, message: object, now: float) -> list[Action]:
        try:
            payload = self._payload(message)
            if not payload:
                if self.preopened and not self._seen_head_bytes:
                    # A pre-opened socket kept alive while it waits for its CONNECT.
                    self._keepalive_seen = True
                    self._state_deadline = now + self.timeouts.pooled_wait
                    if self._draining:
                        return self._egress_drain(None, now)
                return []
            self._seen_head_bytes = True
            self._buffer += payload
            parts = split_head(self._buffer, MAX_HEAD_BYTES)
            if parts is None:
                return []
            head, self._early = parts
            self._buffer = bytearray()
            request = parse_connect_head(head)
        except HeadError as exc:
            return self._refuse(now, exc.status, exc.reason)
        except ProtocolError as exc:
            return self._protocol_error(exc, now)
        self.request, self.target = request, request.target
        self._enter(State.OPENING, now + self.timeouts.open)
        return [Open(request.target, request=request)]

    def _egress_head_deadline(self, _: object, now: float) -> list[Action]:
        if self._draining and not self._seen_head_bytes:
            return self._finish(now, "drained-before-connect", ws_code=CLOSE_GOING_AWAY)
        if self.state is State.OPENING:
            return self._refuse(now, 504, "timed out admitting and dialling the target")
        return self._refuse(now, 400, "timed out waiting for the CONNECT head")

    def _egress_opened(self, _: object, now: float) -> list[Action]:
        self.status = 200
        self._local_open = True
        self._enter(State.ESTABLISHED, None)
        actions: list[Action] = [self._send(encode_chunk(build_status_head(200)), 0, now)]
        early, self._early = self._early, b""
        if early:
            actions.append(self._write_local(early, now))
            self.counters.to_local += len(early)
        return actions

    def _egress_open_failed(self, arg: object, now: float) -> list[Action]:
        status, reason, rule = _failure(arg)
        return self._refuse(now, status, reason, rule)

    def _egress_stale(self, _: object, now: float) -> list[Action]:
        return self._finish(now, "stale-preopened-socket", ws_code=CLOSE_POLICY_VIOLATION)

    def _egress_drain(self, _: object, now: float) -> list[Action]:
        if self._seen_head_bytes:
            return []
        self._draining = True
        if not (self.preopened or self._keepalive_seen) and now < self._created + DRAIN_MIN_AGE:
            # Upgraded just now: its CONNECT may be on the way. Give it a moment.
            self._state_deadline = min(self._state_deadline or now, self._created + DRAIN_MIN_AGE)
            self.deadline_moved = True
            return []
        return self._finish(now, "drained-before-connect", ws_code=CLOSE_GOING_AWAY)

    def _egress_head_closed(self, _: object, now: float) -> list[Action]:
        return self._finish(now, "closed-before-connect", ws_code=None)

    # both, established ---------------------------------------------------------------------

    def _established_local_data(self, data: object, now: float) -> list[Action]:
        assert isinstance(data, bytes | bytearray | memoryview | Piped)
        self._last_payload = now
        return self._chunks(data, now)

    def _established_ws_message(self, message: object, now: float) -> list[Action]:
        try:
            payload = self._any_payload(message)
        except ProtocolError as exc:
            return self._protocol_error(exc, now)
        if not payload:  # keepalives keep the WebSocket open, not an idle tunnel
            return []
        self._last_payload = now
        self.counters.to_local += len(payload)
        return [self._write_local(payload, now)]

    def _local_eof(self, _: object, now: float) -> list[Action]:
        if self.state is State.HEAD:
            return self._finish(now, "client-gone-before-head", ws_code=None)
        # SPEC §8: every chunk for bytes already read was sent (writes are in order).
        self._local_ended = True
        return self._finish(now, f"{self._peer(LOCAL)}-closed", ws_code=CLOSE_NORMAL)

    def _ws_closed_established(self, _: object, now: float) -> list[Action]:
        # SPEC §8: payloads already received were written (writes are in order); close.
        return self._finish(now, f"{self._peer(WS)}-closed", ws_code=None)

    def _ws_closed_opening(self, _: object, now: float) -> list[Action]:
        # Egress: the relay left while we admitted and dialled; the adapter drops the dial.
        return self._finish(now, "relay-closed-while-opening", ws_code=None)

    def _ignore(self, _: object, now: float) -> list[Action]:
        return []

    def _early_data(self, data: object, now: float) -> list[Action]:
        # Egress OPENING: a relay that pipelined data after its CONNECT; held until 200.
        try:
            payload = self._payload(data)
        except ProtocolError as exc:
            return self._protocol_error(exc, now)
        if len(self._early) + len(payload) > HIGH_WATER:
            return self._protocol_error(ProtocolError("too much data before the 200"), now)
        self._early += payload
        return []

    # -- helpers -----------------------------------------------------------------------------

    @classmethod
    def _payload(cls, message: object) -> bytes | bytearray | memoryview:
        payload = cls._any_payload(message)
        if isinstance(payload, Piped):
            raise CoreMisuse("piped payload before the tunnel is established")
        return payload

    @staticmethod
    def _any_payload(message: object) -> Payload:
        """The payload of a ``ws_message`` input (:class:`~.wsframes.Piped`, once
        established, is bytes the adapter moved without reading them)."""
        if isinstance(message, _Decoded):
            if isinstance(message.payload, ProtocolError):
                raise message.payload
            return message.payload
        if isinstance(message, str):
            raise ChunkError("text-frame", "text frames are not part of the protocol")
        assert isinstance(message, bytes | bytearray | memoryview)
        return decode_chunk(message)

    def _enter(self, state: State, deadline: float | None) -> None:
        self.state = state
        self._state_deadline = deadline
        self.deadline_moved = True

    def _start_ws_timers(self, now: float) -> None:
        self._last_heard = now
        self._ping_sent = None
        if self.timeouts.keepalive is not None:
            self._next_keepalive = now + self.timeouts.keepalive
        self.deadline_moved = True

    def _stop_ws_timers(self) -> None:
        self._ws_open = False
        self._ping_sent = None
        self._next_keepalive = None

    def _keepalive_interval(self) -> float:
        assert self.timeouts.keepalive is not None
        return self.timeouts.keepalive

    def _reading_both(self) -> bool:
        """Whether both sides are being read (a hang-up then shows as EOF by itself)."""
        local = not self._local_open or (self.may_read_local and self._pending[WS] == 0)
        ws = not self._ws_open or (self.may_read_ws and self._pending[LOCAL] == 0)
        return local and ws

    def _update_hangup_check(self, now: float) -> None:
        """Arm a hang-up check when a side is not being read.

        Armed, never disarmed here: :meth:`tick` disarms it if reading resumed, so a busy
        tunnel re-arms it at most once per interval instead of once per chunk.
        """
        if self.timeouts.hangup_check is None or self.state is State.CLOSED:
            self._next_hangup_check = None
        elif self._next_hangup_check is None and not self._reading_both():
            self._next_hangup_check = now + self.timeouts.hangup_check
            self.deadline_moved = True

    def _peer(self, side: Side) -> str:
        if side is LOCAL:
            return "client" if self.role is Role.RELAY else "upstream"
        return "egress" if self.role is Role.RELAY else "relay"

    def _outstanding(self, side: Side, size: int, now: float) -> None:
        """A write of ``size`` bytes on ``side`` is asked for: outstanding until ``written``."""
        if self._pending[side] == 0:
            self._stall_since[side] = now
            self.deadline_moved = True
        self._pending[side] += 1
        self._pending_bytes[side] += size

    def _send(self, message: bytes, payload_size: int, now: float) -> SendChunk:
        self._outstanding(WS, len(message), now)
        return SendChunk(message, payload_size)

    def _send_data(self, payload: Payload, now: float) -> SendData:
        self._outstanding(WS, len(payload), now)
        return SendData(payload)

    def _write_local(self, data: Payload, now: float) -> WriteLocal:
        self._outstanding(LOCAL, len(data), now)
        return WriteLocal(data)

    def _chunks(self, data: Payload, now: float) -> list[Action]:
        self.counters.to_ws += len(data)
        if len(data) <= MAX_CHUNK_PAYLOAD:  # the common case
            return [self._send_data(data, now)]
        if isinstance(data, Piped):
            raise CoreMisuse(f"piped payload over {MAX_CHUNK_PAYLOAD} bytes")
        view = memoryview(data)
        return [
            self._send_data(view[at : at + MAX_CHUNK_PAYLOAD], now)
            for at in range(0, len(view), MAX_CHUNK_PAYLOAD)
        ]

    def _finish(
        self,
        now: float,
        outcome: str,
        *,
        ws_code: int | None,
        abort: bool = False,
        answered: bool = False,
    ) -> list[Action]:
        """End the tunnel: close the WebSocket (if open) and the local stream (if any).

        How patient each close is (see :class:`~.actions.CloseWs`): the relay's client gets
        the tail of a download; the egress's WebSocket as long as its relay (as slow as that
        relay's client); the relay's WebSocket when its client finished and closed (the
        egress answers our close after the upload's tail reached its origin); the egress's
        upstream when the relay closed with 1000 (its client finished an upload). A relay
        that vanished, or is shutting down (1001), gets no patience: a deaf origin is let go
        promptly. A client's reset is passed on as one (no closing handshake). After a clean
        close from the other end the local stream lingers (:class:`~.actions.CloseLocal`),
        and after the relay ``answered`` its client itself: a client still sending (the rest
        of an oversized head, a body) would otherwise get a reset that can destroy the answer.
        """
        self.outcome = outcome
        self.state = State.CLOSED
        self._state_deadline = None
        self._next_hangup_check = None
        relay = self.role is Role.RELAY
        stall = self.timeouts.write_stall is not None
        clean_local_end = self._local_ended and not self._local_reset
        actions: list[Action] = []
        if self._ws_open:
            # No code: the peer is gone or misbehaved badly; skip the closing handshake.
            drop = ws_code is None or abort or (relay and self._local_reset)
            patient = not drop and stall and (not relay or clean_local_end)
            actions.append(CloseWs(ws_code or CLOSE_NORMAL, abort=drop, patient=patient))
        self._ws_open = False
        if self._local_open:
            patient = not abort and stall and (relay or self.ws_close_code == CLOSE_NORMAL)
            linger = not abort and (answered or self.ws_close_code is not None)
            actions.append(CloseLocal(abort=abort, patient=patient, linger=linger))
        actions.append(Finished(outcome))
        return actions

    def _hand_off(self, initial: bytes, now: float) -> list[Action]:
        """Relay: the client speaks plain HTTP; the tunnel ends, its local stream lives on."""
        self._local_open = False  # the forwarder owns it now
        self._buffer = bytearray()
        self._early = b""
        return [HandOff(initial), *self._finish(now, "plain-http", ws_code=None)]

    def _answer_local(
        self,
        now: float,
        status: int,
        reason: str,
        outcome: str | None = None,
        ws_code: int | None = CLOSE_NORMAL,
    ) -> list[Action]:
        """Relay: answer the client ourselves (before establishment only), then close."""
        self.status = status
        self.reason = reason
        write = self._write_local(relay_answer(status, reason), now)
        finish = self._finish(now, outcome or f"failed-{status}", ws_code=ws_code, answered=True)
        return [write, *finish]

    def _refuse(self, now: float, status: int, reason: str, rule: str = "-") -> list[Action]:
        """Egress: answer inside the tunnel with an error status, then close."""
        self.status = status
        self.refusal = (reason, rule)
        send = self._send(encode_chunk(egress_answer(status, reason, rule)), 0, now)
        return [send, *self._finish(now, f"refused-{status}", ws_code=CLOSE_NORMAL)]

    def _protocol_error(self, exc: ProtocolError, now: float) -> list[Action]:
        self.error = exc
        return self._finish(now, "protocol-error", ws_code=CLOSE_PROTOCOL_ERROR)

    def _fail(
        self, now: float, outcome: str, *, code: int = CLOSE_INTERNAL_ERROR, abort: bool
    ) -> list[Action]:
        """A deadline ended the tunnel: a 504 to a relay client still waiting, else a close."""
        if self.role is Role.RELAY and self.state in (State.OPENING, State.ESTABLISHING):
            return self._answer_local(now, 504, f"tunnel failed: {outcome}", outcome, code)
        return self._finish(now, outcome, ws_code=code, abort=abort)

    def _peer_dead(self, now: float) -> list[Action]:
        peer = "egress" if self.role is Role.RELAY else "relay"
        outcome = f"{peer}-unresponsive (no pong in {self.timeouts.ping_timeout:g}s)"
        return self._fail(now, outcome, abort=True)


@dataclass(frozen=True, slots=True)
class _Decoded:
    """A ``ws_message`` input that the adapter already decoded (see ``ws_payload``)."""

    payload: Payload | ProtocolError


def _budget(pending: int) -> int:
    return READ_SIZE if pending <= 0 else max(1, HIGH_WATER - pending)


def _failure(arg: object) -> tuple[int, str, str]:
    assert isinstance(arg, tuple) and len(arg) == 3
    status, reason, rule = arg
    assert isinstance(status, int) and isinstance(reason, str) and isinstance(rule, str)
    return status, reason, rule


def _misuse(core: TunnelCore, arg: object, now: float) -> list[Action]:
    raise CoreMisuse(f"{core.role.value} core: input not expected in state {core.state.value}")


_H = TunnelCore
_IGNORE = _H._ignore
_CLOSED_ROW: dict[str, _Handler] = {
    event: _IGNORE
    for event in (
        "local_data",
        "local_eof",
        "ws_message",
        "ws_closed",
        "ws_opened",
        "open_done",
        "open_failed",
        "open_stale",
        "drain",
        "deadline",
    )
}

#: (role, state) -> input -> handler. An input missing from a row is a :class:`CoreMisuse`.
TRANSITIONS: Final[dict[tuple[Role, State], dict[str, _Handler]]] = {
    (Role.RELAY, State.HEAD): {
        "local_data": _H._relay_head_data,
        "local_eof": _H._local_eof,
        "drain": _IGNORE,
        "deadline": _H._relay_deadline,
    },
    (Role.RELAY, State.OPENING): {
        "local_eof": _H._local_eof,
        # Only a socket being replaced can be reported closed here (its reader and a send
        # may both notice); the one on its way is not open yet.
        "ws_closed": _IGNORE,
        "ws_opened": _H._relay_opened,
        "open_failed": _H._relay_open_failed,
        "drain": _IGNORE,
        "deadline": _H._relay_deadline,
    },
    (Role.RELAY, State.ESTABLISHING): {
        "local_eof": _H._local_eof,
        "ws_message": _H._relay_status_message,
        "ws_closed": _H._relay_establishing_closed,
        "drain": _IGNORE,
        "deadline": _H._relay_deadline,
    },
    (Role.RELAY, State.ESTABLISHED): {
        "local_data": _H._established_local_data,
        "local_eof": _H._local_eof,
        "ws_message": _H._established_ws_message,
        "ws_closed": _H._ws_closed_established,
        "drain": _IGNORE,
    },
    (Role.RELAY, State.CLOSED): _CLOSED_ROW,
    (Role.EGRESS, State.HEAD): {
        "ws_message": _H._egress_head_message,
        "ws_closed": _H._egress_head_closed,
        "drain": _H._egress_drain,
        "deadline": _H._egress_head_deadline,
    },
    (Role.EGRESS, State.OPENING): {
        "ws_message": _H._early_data,
        "ws_closed": _H._ws_closed_opening,
        "open_done": _H._egress_opened,
        "open_failed": _H._egress_open_failed,
        "open_stale": _H._egress_stale,
        "drain": _IGNORE,
        "deadline": _H._egress_head_deadline,
    },
    (Role.EGRESS, State.ESTABLISHED): {
        "local_data": _H._established_local_data,
        "local_eof": _H._local_eof,
        "ws_message": _H._established_ws_message,
        "ws_closed": _H._ws_closed_established,
        "drain": _IGNORE,
    },
    (Role.EGRESS, State.CLOSED): _CLOSED_ROW,
}

#: Every input name, for tests that walk the whole table.
EVENTS: Final = tuple(_CLOSED_ROW)
