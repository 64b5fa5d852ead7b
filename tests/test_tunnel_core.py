"""The tunnel protocol core without sockets: every state x every input, malformed input,
byte-at-a-time feeding, every deadline, flow control, and a hypothesis state machine."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from upstreamproxy.codec import KEEPALIVE, MAX_CHUNK_PAYLOAD, decode_chunk, encode_chunk
from upstreamproxy.connect_head import build_status_head, parse_status_head
from upstreamproxy.errors import ChunkError
from upstreamproxy.tunnel import (
    LOCAL,
    WS,
    Action,
    CheckPeers,
    CloseLocal,
    CloseWs,
    CoreMisuse,
    Finished,
    HandOff,
    Open,
    Role,
    SendChunk,
    SendConnect,
    SendData,
    SendPing,
    State,
    Timeouts,
    TunnelCore,
    WriteLocal,
)
from upstreamproxy.tunnel.core import EVENTS, HIGH_WATER, TRANSITIONS

VECTORS = json.loads(
    (Path(__file__).resolve().parent.parent / "protocol" / "vectors.json").read_text()
)
CONNECT = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
TUNNEL_CONNECT = (
    b"CONNECT example.com:443 HTTP/1.1\r\nProxy-Authorization: Basic c2Vzczp0b2s=\r\n\r\n"
)
OK_HEAD = build_status_head(200)
T = Timeouts(
    head=10,
    open=10,
    establish=30,
    idle=300,
    keepalive=30,
    ping_interval=20,
    ping_timeout=20,
    write_stall=60,
    pooled_wait=90,
    hangup_check=1,
)

#: The egress sends no keepalive chunks (the relay does).
TE = dataclasses.replace(T, keepalive=None)


def malformed_messages() -> list[bytes]:
    out = []
    for case in VECTORS["malformed"]:
        if "hex" in case:
            out.append(bytes.fromhex(case["hex"]))
        else:
            repeat = case["payload_repeat"]
            out.append(
                bytes.fromhex(case["head_hex"]) + bytes.fromhex(repeat["byte"]) * repeat["count"]
            )
    return out


def kinds(actions: list[Action]) -> list[type]:
    return [type(a) for a in actions]


def finished(actions: list[Action]) -> str:
    last = actions[-1]
    assert isinstance(last, Finished), actions
    return last.outcome


def complete_writes(core: TunnelCore, actions: list[Action], now: float) -> None:
    for action in actions:
        if isinstance(action, SendChunk):
            core.written(WS, len(action.message), now)
        elif isinstance(action, SendData):
            core.written(WS, len(action.payload), now)
        elif isinstance(action, WriteLocal):
            core.written(LOCAL, len(action.data), now)


# -- reaching each state --------------------------------------------------------------------


def relay_in(state: State, *, pooled: bool = False) -> TunnelCore:
    core = TunnelCore(Role.RELAY, T, 0.0)
    if state is State.HEAD:
        return core
    assert kinds(core.local_data(CONNECT, 0.0)) == [Open]
    if state is State.OPENING:
        return core
    assert kinds(core.ws_opened(0.0, pooled=pooled)) == [SendConnect]
    if state is State.ESTABLISHING:
        return core
    actions = core.ws_message(encode_chunk(OK_HEAD), 0.0)
    complete_writes(core, actions, 0.0)
    if state is State.ESTABLISHED:
        return core
    core.local_eof(0.0)
    assert core.state is State.CLOSED
    return core


def egress_in(state: State, *, preopened: bool = False) -> TunnelCore:
    core = TunnelCore(Role.EGRESS, TE, 0.0, preopened=preopened)
    if state is State.HEAD:
        return core
    assert kinds(core.ws_message(encode_chunk(TUNNEL_CONNECT), 0.0)) == [Open]
    if state is State.OPENING:
        return core
    actions = core.open_done(0.0)
    complete_writes(core, actions, 0.0)
    if state is State.ESTABLISHED:
        return core
    core.ws_closed(1000, 0.0)
    assert core.state is State.CLOSED
    return core


REACH: dict[Role, Callable[[State], TunnelCore]] = {Role.RELAY: relay_in, Role.EGRESS: egress_in}
EVENT_ARGS: dict[str, Callable[[TunnelCore], list[Action]]] = {
    "local_data": lambda c: c.local_data(b"data", 1.0),
    "local_eof": lambda c: c.local_eof(1.0),
    "ws_message": lambda c: c.ws_message(encode_chunk(b"data"), 1.0),
    "ws_closed": lambda c: c.ws_closed(1000, 1.0),
    "ws_opened": lambda c: c.ws_opened(1.0),
    "open_done": lambda c: c.open_done(1.0),
    "open_failed": lambda c: c.open_failed(403, "denied", 1.0, rule="r1"),
    "open_stale": lambda c: c.open_stale(1.0),
    "drain": lambda c: c.drain(5.0),
    "deadline": lambda c: c.tick(10_000.0),
}


# -- every state x every input ---------------------------------------------------------------


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("key", list(TRANSITIONS), ids=lambda k: f"{k[0].value}-{k[1].value}")
def test_every_state_and_input_has_a_defined_outcome(key: tuple[Role, State], event: str) -> None:
    role, state = key
    core = REACH[role](state)
    assert core.state is state
    # "deadline" is what tick() does when a state's own deadline passes; tick() itself is
    # always allowed (a state without a deadline just has other timers, or none).
    if event not in TRANSITIONS[key] and event != "deadline":
        with pytest.raises(CoreMisuse):
            EVENT_ARGS[event](core)
        return
    actions = EVENT_ARGS[event](core)
    assert all(isinstance(a, Action.__args__) for a in actions)  # type: ignore[attr-defined]
    if core.state is State.CLOSED and state is not State.CLOSED:
        assert finished(actions)
    if state is State.CLOSED:
        assert actions == []
    # After the end, nothing is ever asked again.
    if core.closed:
        assert core.next_deadline() is None
        assert core.tick(1e9) == []


def test_the_table_covers_every_role_and_state() -> None:
    for role in Role:
        for state in State:
            if role is Role.EGRESS and state is State.ESTABLISHING:
                continue  # the egress has no establishing state
            assert (role, state) in TRANSITIONS


# -- relay: the head ---------------------------------------------------------------------------


def test_relay_head_whole_and_byte_at_a_time_agree() -> None:
    whole = TunnelCore(Role.RELAY, T, 0.0)
    expected = whole.local_data(CONNECT + b"early", 0.0)
    single = TunnelCore(Role.RELAY, T, 0.0)
    got: list[Action] = []
    for byte in CONNECT + b"early":
        if single.state is State.HEAD:
            assert single.local_read_size >= 1
            got += single.local_data(bytes([byte]), 0.0)
    assert expected == got == [Open(whole.target)]  # type: ignore[arg-type]
    assert single.target == whole.target


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET http://x/ HTTP/1.1\r\n\r\n", 405),
        (b"CONNECT nohost HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT a:1 HTTP/2\r\n\r\n", 400),
        (b"CONNECT a\rb:1 HTTP/1.1\r\n\r\n", 400),
        (b"X" * 8192, 400),
    ],
)
def test_relay_answers_a_bad_head_itself(head: bytes, status: int) -> None:
    core = TunnelCore(Role.RELAY, T, 0.0)
    actions = core.local_data(head, 0.0)
    assert kinds(actions) == [WriteLocal, CloseLocal, Finished]
    assert isinstance(actions[0], WriteLocal)
    assert parse_status_head(actions[0].data.split(b"\r\n\r\n")[0] + b"\r\n\r\n").status == status
    assert core.status == status and core.outcome == f"refused-{status}"


def test_relay_never_reads_past_the_head_limit() -> None:
    core = TunnelCore(Role.RELAY, T, 0.0)
    core.local_data(b"CONNECT a:1 HTTP/1.1\r\n", 0.0)
    assert core.local_read_size == 8192 - len(b"CONNECT a:1 HTTP/1.1\r\n")


def test_relay_head_timeout_closes_quietly() -> None:
    core = TunnelCore(Role.RELAY, T, 0.0)
    assert core.next_deadline() == 10.0
    assert core.tick(9.9) == []
    actions = core.tick(10.0)
    assert kinds(actions) == [CloseLocal, Finished]
    assert finished(actions) == "client-gone-before-head"


# -- relay: opening and establishing -----------------------------------------------------------


def test_relay_open_failure_is_answered() -> None:
    core = relay_in(State.OPENING)
    actions = core.open_failed(429, "session-concurrency-limit", 1.0)
    assert kinds(actions) == [WriteLocal, CloseLocal, Finished]
    assert actions[0].data.startswith(b"HTTP/1.1 429")  # type: ignore[union-attr]
    assert b"X-Upstreamproxy-Reason: session-concurrency-limit" in actions[0].data  # type: ignore[union-attr]


def test_relay_open_timeout_is_504() -> None:
    core = relay_in(State.OPENING)
    actions = core.tick(10.0)
    assert actions[0].data.startswith(b"HTTP/1.1 504")  # type: ignore[union-attr]
    assert not any(isinstance(a, CloseWs) for a in actions)  # no WebSocket yet


def test_relay_status_head_byte_at_a_time_and_early_data() -> None:
    core = TunnelCore(Role.RELAY, T, 0.0)
    core.local_data(CONNECT + b"early", 0.0)
    core.ws_opened(0.0)
    stream = OK_HEAD + b"first"
    actions: list[Action] = []
    for byte in stream:
        actions += core.ws_message(encode_chunk(bytes([byte])), 0.0)
    assert core.state is State.ESTABLISHED
    # The head goes out whole; stream bytes follow as they come; early data goes up.
    writes = b"".join(a.data for a in actions if isinstance(a, WriteLocal))
    assert writes == stream
    sends = [bytes(a.payload) for a in actions if isinstance(a, SendData)]
    assert sends == [b"early"]


@pytest.mark.parametrize("message", malformed_messages())
def test_relay_malformed_chunk_before_establishment_is_502_and_1002(message: bytes) -> None:
    core = relay_in(State.ESTABLISHING)
    actions = core.ws_message(message, 1.0)
    assert actions[0].data.startswith(b"HTTP/1.1 502")  # type: ignore[union-attr]
    assert CloseWs(1002) in actions
    assert core.outcome == "protocol-error" and core.error is not None


@pytest.mark.parametrize(
    "message",
    [
        "text",
        encode_chunk(b"NOT-HTTP\r\n\r\n"),
        encode_chunk(b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n"),
        encode_chunk(b"x" * 9000),
    ],
)
def test_relay_bad_status_is_502(message: bytes | str) -> None:
    core = relay_in(State.ESTABLISHING)
    actions = core.ws_message(message, 1.0)
    assert actions[0].data.startswith(b"HTTP/1.1 502")  # type: ignore[union-attr]
    assert core.closed


def test_relay_forwards_a_refusal_and_closes() -> None:
    core = relay_in(State.ESTABLISHING)
    refusal = build_status_head(403, (("X-Upstreamproxy-Reason", "denied"),), b"no\n")
    actions = core.ws_message(encode_chunk(refusal), 1.0)
    assert actions[0] == WriteLocal(refusal)
    assert finished(actions) == "refused-by-egress"
    assert core.status == 403


def test_relay_establish_timeout_is_504() -> None:
    core = relay_in(State.ESTABLISHING)
    assert core.next_deadline() == 1.0  # the client is not read: hang-up checks
    assert SendPing() in core.tick(20.0)
    core.pong(20.5)
    actions = core.tick(30.0)
    assert actions[0].data.startswith(b"HTTP/1.1 504")  # type: ignore[union-attr]
    assert CloseWs(1000) in actions


def test_relay_closed_before_answer_is_502() -> None:
    core = relay_in(State.ESTABLISHING)
    actions = core.ws_closed(1011, 1.0)
    assert actions[0].data.startswith(b"HTTP/1.1 502")  # type: ignore[union-attr]


def test_relay_pooled_socket_dead_before_answer_is_replaced_once() -> None:
    core = relay_in(State.ESTABLISHING, pooled=True)
    actions = core.ws_closed(1001, 1.0)
    assert actions == [Open(core.target, fresh=True)]  # type: ignore[arg-type]
    assert core.state is State.OPENING
    assert kinds(core.ws_opened(1.1)) == [SendConnect]
    # The fresh one failing too is the client's 502.
    actions = core.ws_closed(1011, 1.2)
    assert actions[0].data.startswith(b"HTTP/1.1 502")  # type: ignore[union-attr]


def test_relay_pooled_socket_that_answered_is_not_retried() -> None:
    core = relay_in(State.ESTABLISHING, pooled=True)
    core.ws_message(encode_chunk(b"HTTP/1.1 200"), 1.0)  # part of a head arrived
    actions = core.ws_closed(1011, 1.1)
    assert actions[0].data.startswith(b"HTTP/1.1 502")  # type: ignore[union-attr]


def test_relay_client_leaving_while_waiting() -> None:
    core = relay_in(State.ESTABLISHING)
    assert core.next_deadline() == 1.0  # the local side is not read: check for a hang-up
    assert CheckPeers() in core.tick(1.0)
    actions = core.local_eof(1.5)
    assert actions == [
        CloseWs(1000, patient=True),  # (what it sent may still be on its way)
        CloseLocal(patient=True),
        Finished("client-closed"),
    ]


# -- established ------------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
def test_established_moves_bytes_and_counts_them(role: Role) -> None:
    core = REACH[role](State.ESTABLISHED)
    up = core.local_data(b"abc", 1.0)
    assert up == [SendData(b"abc")]
    down = core.ws_message(encode_chunk(b"xyz"), 1.0)
    assert down == [WriteLocal(b"xyz")]
    assert core.ws_message(KEEPALIVE, 1.0) == []
    assert core.ws_message(b"", 1.0) == []  # a zero-length message is an empty chunk
    assert core.counters.to_ws >= 3 and core.counters.to_local >= 3


@pytest.mark.parametrize("role", list(Role))
def test_decoded_payloads_stream_like_whole_messages(role: Role) -> None:
    """``ws_payload``: what the adapter's frame reader decoded - pieces of a chunk, views."""
    core = REACH[role](State.ESTABLISHED)
    buffer = bytearray(b"..piece..")
    piece = memoryview(buffer)[2:7]
    assert core.ws_payload(piece, 1.0) == [WriteLocal(piece)]  # passed on, not copied
    assert core.ws_payload(b"", 1.0) == []  # a keepalive
    before = core.counters.to_local
    assert core.ws_payload(b"more", 1.0) == [WriteLocal(b"more")]
    assert core.counters.to_local == before + 4


@pytest.mark.parametrize("role", list(Role))
def test_a_decoding_error_from_the_adapter_closes_1002(role: Role) -> None:
    core = REACH[role](State.ESTABLISHED)
    actions = core.ws_payload(ChunkError("wrong-tag", "expected tag 0x0a"), 1.0)
    assert (
        CloseWs(1002, patient=role is Role.EGRESS) in actions
        and finished(actions) == "protocol-error"
    )
    assert isinstance(core.error, ChunkError)


def test_local_data_goes_out_as_the_same_view() -> None:
    core = relay_in(State.ESTABLISHED)
    view = memoryview(bytearray(b"zero-copy"))
    actions = core.local_data(view, 1.0)
    assert len(actions) == 1 and isinstance(actions[0], SendData)
    assert actions[0].payload is view  # the adapter frames it where it lies


def test_large_local_data_is_split_at_the_payload_cap() -> None:
    core = relay_in(State.ESTABLISHED)
    data = bytes(range(256)) * (MAX_CHUNK_PAYLOAD // 256 * 2 + 1)
    actions = core.local_data(data, 1.0)
    payloads = [bytes(a.payload) for a in actions if isinstance(a, SendData)]
    assert len(payloads) == 3 and all(len(p) <= MAX_CHUNK_PAYLOAD for p in payloads)
    assert b"".join(payloads) == data


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("message", [*malformed_messages(), "text"])
def test_malformed_message_when_established_closes_1002(role: Role, message: bytes | str) -> None:
    core = REACH[role](State.ESTABLISHED)
    actions = core.ws_message(message, 1.0)
    assert actions[0] == CloseWs(1002, patient=role is Role.EGRESS)
    assert finished(actions) == "protocol-error"
    assert not any(isinstance(a, WriteLocal) for a in actions)  # never an in-band status


@pytest.mark.parametrize("role", list(Role))
def test_flow_control_stops_reading_over_the_high_water_mark(role: Role) -> None:
    core = REACH[role](State.ESTABLISHED)
    sent = core.local_data(b"x" * HIGH_WATER, 1.0)
    assert not core.may_read_local
    complete_writes(core, sent, 1.1)
    assert core.may_read_local
    wrote = core.ws_message(encode_chunk(b"y" * (HIGH_WATER // 2)), 1.2)
    wrote += core.ws_message(encode_chunk(b"y" * (HIGH_WATER // 2)), 1.2)
    assert not core.may_read_ws
    complete_writes(core, wrote, 1.3)
    assert core.may_read_ws


@pytest.mark.parametrize(("role", "side"), [(r, s) for r in Role for s in (LOCAL, WS)])
def test_write_stall_ends_the_tunnel(role: Role, side: object) -> None:
    core = REACH[role](State.ESTABLISHED)
    if side is WS:
        core.local_data(b"x", 100.0)
    else:
        core.ws_message(encode_chunk(b"x"), 100.0)
    core.pong(150.0)  # the peer is alive; it just does not accept bytes
    core.ws_message(KEEPALIVE, 155.0) if side is LOCAL else None
    actions = core.tick(160.0)
    assert "write-stall" in finished(actions)
    assert CloseLocal(abort=True) in actions


def test_ping_then_dead_peer_closes_established() -> None:
    core = relay_in(State.ESTABLISHED)
    assert SendPing() in core.tick(20.0)
    assert not any(isinstance(a, Finished) for a in core.tick(39.9))
    actions = core.tick(40.0)
    assert "egress-unresponsive" in finished(actions)
    assert CloseWs(1011, abort=True) in actions


def test_unanswered_ping_is_no_dead_peer_while_ws_reads_are_paused() -> None:
    """A slow client pauses the relay's WebSocket reads: the egress's pong then waits unread
    behind its data, and a ping gone unanswered says nothing. Once reading resumes, any
    byte read answers it, and a peer that is really gone is noticed within the timeout."""
    core = relay_in(State.ESTABLISHED)
    core.ws_message(encode_chunk(b"y" * HIGH_WATER), 1.0)  # the client does not take it
    assert not core.may_read_ws
    assert SendPing() in core.tick(21.0)
    # Was "egress-unresponsive". Now: ping again (the egress takes it as a sign of life).
    assert core.tick(41.0)[0] == SendPing()  # (then the keepalive chunk and a hang-up check)
    assert not any(isinstance(a, Finished) for a in core.tick(55.0))
    core.written(LOCAL, HIGH_WATER, 56.0)  # the client took it: reads resume
    assert core.may_read_ws
    deadline = core.next_deadline()
    assert deadline is not None and deadline <= 56.0 + T.ping_timeout
    assert "egress-unresponsive" in finished(core.tick(56.0 + T.ping_timeout))


def test_paused_ws_reads_then_data_counts_as_the_answer() -> None:
    core = egress_in(State.ESTABLISHED)
    core.ws_message(encode_chunk(b"u" * HIGH_WATER), 1.0)  # an upload the origin does not take
    assert not core.may_read_ws
    assert SendPing() in core.tick(21.0)
    assert not any(isinstance(a, Finished) for a in core.tick(41.0))
    core.written(LOCAL, HIGH_WATER, 45.0)
    core.ws_message(encode_chunk(b"u"), 45.5)  # read again: the relay is there
    assert not any(isinstance(a, Finished) for a in core.tick(61.0))


def test_any_message_counts_as_a_pong() -> None:
    core = egress_in(State.ESTABLISHED)
    assert core.tick(20.0) == [SendPing()]
    core.ws_message(KEEPALIVE, 30.0)
    assert core.tick(40.0) == []  # heard at 30: the next ping is due at 50
    assert core.tick(50.0) == [SendPing()]


def test_relay_keepalive_every_interval() -> None:
    core = relay_in(State.ESTABLISHED)
    core.pong(29.0)
    actions = core.tick(30.0)
    assert SendChunk(KEEPALIVE, 0) in actions


def test_egress_idle_timeout_ignores_keepalives() -> None:
    core = egress_in(State.ESTABLISHED)
    for t in range(30, 300, 30):
        core.ws_message(KEEPALIVE, float(t))
    actions = core.tick(300.0)
    assert finished(actions) == "idle-timeout"
    assert CloseWs(1000, patient=True) in actions


def test_client_hangup_noticed_while_writes_are_stuck() -> None:
    core = relay_in(State.ESTABLISHED)
    core.local_data(b"x" * HIGH_WATER, 5.0)  # the egress does not take it
    assert not core.may_read_local
    deadline = core.next_deadline()
    assert deadline is not None and deadline <= 6.0
    assert CheckPeers() in core.tick(deadline)
    actions = core.local_eof(deadline)
    assert finished(actions) == "client-closed"


# -- egress: head, opening, drain ----------------------------------------------------------------


def test_egress_connect_byte_at_a_time_with_keepalives_between() -> None:
    core = TunnelCore(Role.EGRESS, TE, 0.0)
    actions: list[Action] = []
    for byte in TUNNEL_CONNECT + b"early":
        if core.state is State.HEAD:
            actions += core.ws_message(KEEPALIVE, 0.0)
            actions += core.ws_message(encode_chunk(bytes([byte])), 0.0)
        else:
            actions += core.ws_message(encode_chunk(bytes([byte])), 0.0)
    assert len(actions) == 1 and isinstance(actions[0], Open)
    assert actions[0].request is not None
    assert actions[0].request.header("Proxy-Authorization") == "Basic c2Vzczp0b2s="
    opened = core.open_done(1.0)
    assert opened[0] == SendChunk(encode_chunk(OK_HEAD), 0)
    assert opened[1] == WriteLocal(b"early")


@pytest.mark.parametrize("message", malformed_messages())
def test_egress_malformed_chunk_in_head_closes_1002(message: bytes) -> None:
    core = TunnelCore(Role.EGRESS, TE, 0.0)
    actions = core.ws_message(message, 0.0)
    assert actions == [CloseWs(1002, patient=True), Finished("protocol-error")]


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 405),
        (b"CONNECT x HTTP/1.1\r\n\r\n", 400),
        (b"A" * 8193, 400),
    ],
)
def test_egress_refuses_a_bad_head_in_the_tunnel(head: bytes, status: int) -> None:
    core = TunnelCore(Role.EGRESS, TE, 0.0)
    actions = core.ws_message(encode_chunk(head), 0.0)
    assert isinstance(actions[0], SendChunk)
    answer = decode_chunk(actions[0].message)
    assert answer.startswith(f"HTTP/1.1 {status}".encode())
    assert b"X-Upstreamproxy-Rule: -" in answer
    assert actions[1:] == [CloseWs(1000, patient=True), Finished(f"refused-{status}")]


@pytest.mark.parametrize("message", [*malformed_messages(), "text"])
def test_egress_malformed_chunk_while_dialling_closes_1002(message: bytes | str) -> None:
    core = egress_in(State.OPENING)
    actions = core.ws_message(message, 1.0)
    assert actions == [CloseWs(1002, patient=True), Finished("protocol-error")]
    assert core.open_done(2.0) == []  # a dial finishing afterwards changes nothing


def test_egress_holds_pipelined_data_until_200_and_bounds_it() -> None:
    core = egress_in(State.OPENING)
    assert core.ws_message(encode_chunk(b"early"), 1.0) == []
    actions = core.ws_message(encode_chunk(b"x" * HIGH_WATER), 1.0)
    assert finished(actions) == "protocol-error"  # more than a head's worth before the 200


def test_egress_head_timeout_is_400() -> None:
    core = TunnelCore(Role.EGRESS, TE, 0.0)
    core.ws_message(KEEPALIVE, 5.0)  # a keepalive does not extend an ordinary socket
    actions = core.tick(10.0)
    assert decode_chunk(actions[0].message).startswith(b"HTTP/1.1 400")  # type: ignore[union-attr]


def test_egress_preopened_socket_waits_longer_while_kept_alive() -> None:
    core = TunnelCore(Role.EGRESS, TE, 0.0, preopened=True)
    assert core.tick(10.0) == [] or core.state is State.HEAD
    for t in (30.0, 60.0, 90.0, 120.0):
        core.ws_message(KEEPALIVE, t)
        assert core.state is State.HEAD
    assert core.tick(200.0) == [] or core.state is State.HEAD
    actions = core.tick(210.0)
    assert core.closed and "400" in finished(actions)


def test_egress_open_refusal_carries_the_rule() -> None:
    core = egress_in(State.OPENING)
    actions = core.open_failed(403, "host-not-allowed", 1.0, rule="r7")
    answer = decode_chunk(actions[0].message)  # type: ignore[union-attr]
    assert b"X-Upstreamproxy-Rule: r7" in answer and b'"rule": "r7"' in answer
    assert core.refusal == ("host-not-allowed", "r7")
    assert not any(isinstance(a, CloseLocal) for a in actions)  # nothing was dialled


def test_egress_drain_closes_idle_preopened_sockets_only() -> None:
    idle = TunnelCore(Role.EGRESS, TE, 0.0, preopened=True)
    assert idle.drain(0.5) == [CloseWs(1001, patient=True), Finished("drained-before-connect")]
    fresh = TunnelCore(Role.EGRESS, TE, 0.0)
    assert fresh.drain(0.1) == []  # its CONNECT may be in flight
    assert fresh.next_deadline() == 1.0
    assert fresh.tick(1.0) == [CloseWs(1001, patient=True), Finished("drained-before-connect")]
    busy = egress_in(State.ESTABLISHED)
    assert busy.drain(0.1) == []


def test_egress_stale_preopened_socket_closes_without_an_answer() -> None:
    core = egress_in(State.OPENING, preopened=True)
    assert core.open_stale(1.0) == [CloseWs(1008, patient=True), Finished("stale-preopened-socket")]


def test_egress_relay_leaving_while_dialling() -> None:
    core = egress_in(State.OPENING)
    actions = core.ws_closed(1000, 1.0)
    assert actions == [Finished("relay-closed-while-opening")]


# -- hypothesis: random input sequences ---------------------------------------------------------

payloads = st.binary(max_size=64)


class TunnelMachine(RuleBasedStateMachine):
    """Feed any allowed input in any order; the core must stay consistent and never raise."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.core: TunnelCore | None = None
        self.finished = 0
        self.to_ws: list[bytes] = []
        self.fed_local = b""
        self.wrote_local = b""
        self.fed_ws = b""

    @precondition(lambda self: self.core is None)
    @rule(role=st.sampled_from(list(Role)), preopened=st.booleans())
    def start(self, role: Role, preopened: bool) -> None:
        self.core = TunnelCore(role, T if role is Role.RELAY else TE, self.now, preopened=preopened)

    def _allowed(self, event: str) -> bool:
        core = self.core
        return core is not None and event in TRANSITIONS[core.role, core.state]

    def _apply(self, actions: list[Action]) -> None:
        assert self.core is not None
        for action in actions:
            if isinstance(action, Finished):
                self.finished += 1
            if isinstance(action, SendChunk):
                self.core.written(WS, len(action.message), self.now)
                if self.core.state is State.ESTABLISHED or self.core.closed:
                    self.to_ws.append(decode_chunk(action.message))
            if isinstance(action, SendData):
                self.core.written(WS, len(action.payload), self.now)
                self.to_ws.append(bytes(action.payload))
            if isinstance(action, WriteLocal):
                self.core.written(LOCAL, len(action.data), self.now)
                self.wrote_local += action.data

    @precondition(lambda self: self._allowed("local_data"))
    @rule(data=payloads)
    def local_data(self, data: bytes) -> None:
        assert self.core is not None
        if self.core.state is State.ESTABLISHED and data:
            self.fed_local += data
        self._apply(self.core.local_data(data, self.now))

    @precondition(lambda self: self._allowed("local_data") and self.core.state is State.HEAD)  # type: ignore[union-attr]
    @rule()
    def relay_head(self) -> None:
        assert self.core is not None
        self._apply(self.core.local_data(CONNECT, self.now))

    @precondition(lambda self: self._allowed("ws_message"))
    @rule(
        message=st.one_of(
            payloads.map(encode_chunk),
            st.just(KEEPALIVE),
            st.just(encode_chunk(TUNNEL_CONNECT)),
            st.just(encode_chunk(OK_HEAD)),
            st.sampled_from(malformed_messages()),
            st.text(max_size=4),
            st.binary(max_size=8),
        )
    )
    def ws_message(self, message: bytes | str) -> None:
        assert self.core is not None
        self._apply(self.core.ws_message(message, self.now))

    @precondition(lambda self: self.core is not None)
    @rule(
        event=st.sampled_from(
            ["local_eof", "ws_closed", "ws_opened", "open_done", "open_stale", "drain"]
        )
    )
    def other(self, event: str) -> None:
        assert self.core is not None
        if not self._allowed(event):
            with pytest.raises(CoreMisuse):
                EVENT_ARGS[event](self.core)
            return
        calls: dict[str, Callable[[TunnelCore], list[Action]]] = {
            "local_eof": lambda c: c.local_eof(self.now),
            "ws_closed": lambda c: c.ws_closed(1000, self.now),
            "ws_opened": lambda c: c.ws_opened(self.now, pooled=True),
            "open_done": lambda c: c.open_done(self.now),
            "drain": lambda c: c.drain(self.now),
            "open_stale": lambda c: c.open_stale(self.now),
        }
        self._apply(calls[event](self.core))

    @precondition(lambda self: self._allowed("open_failed"))
    @rule(status=st.sampled_from([403, 429, 502, 504]))
    def open_failed(self, status: int) -> None:
        assert self.core is not None
        was_open = not self.core.closed
        self._apply(self.core.open_failed(status, "why", self.now))
        assert self.core.closed
        assert self.core.status == status or not was_open

    @precondition(lambda self: self.core is not None)
    @rule(step=st.floats(min_value=0, max_value=120))
    def time_passes(self, step: float) -> None:
        assert self.core is not None
        self.now += step
        deadline = self.core.next_deadline()
        if deadline is not None:
            assert deadline >= 0
        self._apply(self.core.tick(self.now))

    @precondition(lambda self: self.core is not None)
    @rule()
    def pong(self) -> None:
        assert self.core is not None
        self.core.pong(self.now)

    @invariant()
    def consistent(self) -> None:
        core = self.core
        if core is None:
            return
        assert self.finished == (1 if core.closed else 0)
        if core.closed:
            assert core.next_deadline() is None
            assert not core.may_read_local
        # Nothing read from the local side once established is lost or reordered.
        if self.fed_local:
            assert b"".join(self.to_ws).endswith(self.fed_local) or core.closed


TunnelMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_tunnel_state_machine = TunnelMachine.TestCase


# -- plain HTTP at the relay -------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
def test_relay_hands_a_plain_http_request_off_with_every_byte(split: bool) -> None:
    """With plain_http the relay's core ends on an absolute-form head without answering or
    closing the client: the adapter's forwarder gets the head and what followed it."""
    core = TunnelCore(Role.RELAY, T, 0.0, plain_http=True)
    data = b"POST http://api:8080/x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
    actions: list[Action] = []
    for piece in [data[:10], data[10:]] if split else [data]:
        actions = core.local_data(piece, 0.0)
    assert kinds(actions) == [HandOff, Finished]
    handoff = actions[0]
    assert isinstance(handoff, HandOff) and handoff.initial == data
    assert core.state is State.CLOSED and core.outcome == "plain-http"
    assert core.next_deadline() is None


def test_relay_without_plain_http_refuses_absolute_form_405() -> None:
    core = TunnelCore(Role.RELAY, T, 0.0)
    actions = core.local_data(b"GET http://x/ HTTP/1.1\r\n\r\n", 0.0)
    assert HandOff not in kinds(actions)
    assert core.status == 405


def test_relay_plain_http_still_tunnels_connect() -> None:
    core = TunnelCore(Role.RELAY, T, 0.0, plain_http=True)
    assert kinds(core.local_data(CONNECT, 0.0)) == [Open]


# -- how a tunnel that ended closes its two sides ------------------------------------------------


def test_relay_passes_a_clients_reset_on_as_a_reset() -> None:
    core = relay_in(State.ESTABLISHED)
    actions = core.local_eof(1.0, reset=True)
    assert actions == [
        CloseWs(1000, abort=True),
        CloseLocal(patient=True),
        Finished("client-closed"),
    ]


def test_relay_waits_for_the_egress_after_its_client_finished() -> None:
    core = relay_in(State.ESTABLISHED)
    actions = core.local_eof(1.0)
    assert actions[0] == CloseWs(1000, patient=True)  # the upload's tail is on its way


@pytest.mark.parametrize(
    ("code", "local"),
    [
        (1000, CloseLocal(patient=True, linger=True)),  # the relay's client finished
        (1001, CloseLocal(linger=True)),  # a relay shutting down: no patience
        (None, CloseLocal()),  # the relay vanished: let the origin go promptly
    ],
)
def test_egress_closes_its_upstream_as_the_relay_closed(
    code: int | None, local: CloseLocal
) -> None:
    core = egress_in(State.ESTABLISHED)
    actions = core.ws_closed(code, 1.0)
    assert actions == [local, Finished("relay-closed")]


def test_no_write_stall_means_no_patience() -> None:
    core = TunnelCore(Role.RELAY, dataclasses.replace(T, write_stall=None), 0.0)
    assert kinds(core.local_data(CONNECT, 0.0)) == [Open]
    core.ws_opened(0.0)
    core.ws_message(encode_chunk(b"HTTP/1.1 200 OK\r\n\r\n"), 0.0)
    assert core.state is State.ESTABLISHED
    assert core.local_eof(1.0)[:2] == [CloseWs(1000), CloseLocal()]
