"""Tunnel reuse (SPEC §11): one WebSocket carries a session's tunnels one after another.

Against the real relay and egress in this process, and against the real egress driven by a
WebSocket client that plays the relay (the websockets library), including a hostile one.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import SESSION, TOKEN, connect_via, loopback_policy, tcp_origin
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from upstreamproxy import relay_link
from upstreamproxy.codec import END_OF_TUNNEL, decode_chunk, encode_chunk
from upstreamproxy.connect_head import PREOPENED_HEADER, REUSE_HEADER, basic_credentials
from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.limits import LimitConfig
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.relay import Relay, RelayConfig
from upstreamproxy.secret import Secret

AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/proto"}
REUSE = {**AUTH, REUSE_HEADER: "1"}


def make_egress(**config: object) -> EgressServer:
    return EgressServer(
        EgressConfig(**config),  # type: ignore[arg-type]
        StaticTokens({TOKEN: Session(SESSION)}),
        loopback_policy(),
    )


def make_relay(url: str, **config: object) -> Relay:
    return Relay(
        RelayConfig(egress_url=url, session_id=SESSION, token=Secret(TOKEN), **config)  # type: ignore[arg-type]
    )


def reused(egress: EgressServer) -> float:
    value = egress.metrics.registry.get_sample_value("upstreamproxy_websockets_reused_total")
    return value or 0.0


async def until(check: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.01)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
async def flood_port() -> AsyncIterator[int]:
    """An origin that sends b"A" until its client leaves (at most 256 MiB)."""

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        block = b"A" * 65536
        try:
            for _ in range(4096):
                writer.write(block)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async with tcp_origin(flood) as port:
        yield port


@pytest.fixture
async def bye_port() -> AsyncIterator[int]:
    """An origin that says b"bye" and closes: the egress ends those tunnels first."""

    async def bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    async with tcp_origin(bye) as port:
        yield port


async def echo_once(relay: Relay, port: int, data: bytes = b"ping") -> bytes:
    reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{port}")
    try:
        assert head.startswith(b"HTTP/1.1 200"), head
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(data)), 10)
    finally:
        writer.close()


# -- relay and egress together ---------------------------------------------------------------


async def test_tunnels_one_after_another_share_the_pooled_websockets(echo_port: int) -> None:
    async with make_egress() as egress, make_relay(egress.url, pool_size=2) as relay:
        await until(lambda: len(relay.pool) == 2)
        for n in range(20):
            assert await echo_once(relay, echo_port, b"ping %d" % n) == b"ping %d" % n
            await until(lambda: len(relay.pool) == 2)  # the socket is back, not replaced
        assert relay.pool.stats["reused"] == 20
        assert relay.pool.stats["missed"] == 0
        assert reused(egress) == 20


async def test_a_reused_websocket_takes_up_the_policy_its_token_has_now(
    echo_port: int, tmp_path: Path
) -> None:
    """The token is checked again at each CONNECT on a reused socket, and what it says now
    counts: a token file reload that moves it to another policy applied only to fresh
    upgrades, while the relay's reused sockets went on under the old one."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{SESSION} {TOKEN} default\n")
    authenticator = StaticTokens.from_file(tokens)
    egress = EgressServer(EgressConfig(reload_interval=0), authenticator, loopback_policy())
    async with egress, make_relay(egress.url, pool_size=1) as relay:
        assert await echo_once(relay, echo_port) == b"ping"
        await until(lambda: len(relay.pool) == 1)
        tokens.write_text(f"{SESSION} {TOKEN} restricted\n")
        assert egress.reload()
        _, writer, head = await connect_via(relay.port, f"127.0.0.1:{echo_port}")
        writer.close()
        assert head.startswith(b"HTTP/1.1 403"), head
        assert b"unknown-policy" in head
        assert relay.pool.stats["reused"] >= 1


async def test_the_tail_of_an_abandoned_download_never_reaches_the_next_tunnel(
    flood_port: int, echo_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client ends a download mid-stream (a FIN: a reset is passed on as one, which
    closes the WebSocket); the egress still has megabytes on their way. The same WebSocket
    then carries the next tunnel: it sees only its own bytes."""
    # However long the drop takes on a loaded machine, the pool waits for the socket to
    # come back rather than opening another: the next tunnel runs on the same socket.
    monkeypatch.setattr(relay_link, "REUSE_HOLD", 60.0)
    async with make_egress() as egress, make_relay(egress.url, pool_size=1) as relay:
        await until(lambda: len(relay.pool) == 1)
        for _ in range(3):
            reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{flood_port}")
            assert head.startswith(b"HTTP/1.1 200")
            got = 0
            while got < 1024 * 1024:
                got += len(await asyncio.wait_for(reader.read(65536), 10))
            before = relay.pool.stats["reused"]
            writer.write_eof()
            while await asyncio.wait_for(reader.read(1 << 20), 10):
                pass  # what was under way, then the relay's close
            writer.close()
            await until(lambda: relay.pool.stats["reused"] == before + 1)  # noqa: B023
            assert len(relay.pool) == 1
            reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{echo_port}")
            assert head == b"HTTP/1.1 200 Connection established\r\n\r\n", head
            writer.write(b"mine")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(4), 10) == b"mine"
            with pytest.raises(TimeoutError):  # and nothing after it
                await asyncio.wait_for(reader.read(1), 0.2)
            writer.close()
        assert reused(egress) >= 3


async def test_a_tunnel_the_egress_ends_first_hands_its_websocket_back(
    bye_port: int, echo_port: int
) -> None:
    async with make_egress() as egress, make_relay(egress.url, pool_size=1) as relay:
        await until(lambda: len(relay.pool) == 1)
        for n in range(5):
            reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{bye_port}")
            assert head.startswith(b"HTTP/1.1 200")
            assert await asyncio.wait_for(reader.read(), 10) == b"bye"  # then EOF
            writer.close()
            await until(lambda: relay.pool.stats["reused"] == n + 1)  # noqa: B023
        assert await echo_once(relay, echo_port) == b"ping"
        await until(lambda: reused(egress) == 6)


@pytest.mark.parametrize("side", ["relay", "egress"])
async def test_either_end_can_turn_reuse_off(side: str, echo_port: int) -> None:
    relay_config = {"reuse": False} if side == "relay" else {}
    egress_config = {"reuse": False} if side == "egress" else {}
    async with (
        make_egress(**egress_config) as egress,
        make_relay(egress.url, pool_size=1, **relay_config) as relay,
    ):
        for _ in range(3):
            assert await echo_once(relay, echo_port) == b"ping"
        assert relay.pool.stats["reused"] == 0
        assert reused(egress) == 0


async def test_the_rate_limit_still_counts_tunnels_on_a_reused_websocket(echo_port: int) -> None:
    limits = LimitConfig(session_rate=0.001, session_burst=3)
    async with make_egress(limits=limits) as egress, make_relay(egress.url, pool_size=1) as relay:
        await until(lambda: len(relay.pool) == 1)  # one token: the upgrade
        assert await echo_once(relay, echo_port) == b"ping"  # on that upgrade
        await until(lambda: len(relay.pool) == 1)
        assert await echo_once(relay, echo_port) == b"ping"  # reused: the second token
        await until(lambda: len(relay.pool) == 1)
        assert await echo_once(relay, echo_port) == b"ping"  # the third
        await until(lambda: len(relay.pool) == 1)
        _, writer, head = await connect_via(relay.port, f"127.0.0.1:{echo_port}")
        writer.close()
        assert head.startswith(b"HTTP/1.1 429"), head
        assert b"session-rate-limit" in head


# -- the egress, driven by a WebSocket client playing the relay ---------------------------------


def connect_chunk(port: int) -> bytes:
    target = f"127.0.0.1:{port}"
    return encode_chunk(
        f"CONNECT {target} HTTP/1.1\r\nProxy-Authorization: "
        f"{basic_credentials(SESSION, TOKEN)}\r\n\r\n".encode()
    )


async def recv_chunk(ws: ClientConnection) -> bytes:
    message = await asyncio.wait_for(ws.recv(), 5)
    assert isinstance(message, bytes)
    return message


async def echo_tunnel(ws: ClientConnection, port: int, data: bytes) -> None:
    await ws.send(connect_chunk(port))
    assert decode_chunk(await recv_chunk(ws)).startswith(b"HTTP/1.1 200")
    await ws.send(encode_chunk(data))
    got = b""
    while len(got) < len(data):
        got += decode_chunk(await recv_chunk(ws))
    assert got == data


@pytest.fixture
async def egress_audit(caplog: pytest.LogCaptureFixture) -> AsyncIterator[EgressServer]:
    caplog.set_level(logging.INFO, logger="upstreamproxy.audit")
    async with make_egress() as egress:
        yield egress


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "upstreamproxy.audit"]


async def test_reuse_is_answered_only_when_offered(egress_audit: EgressServer) -> None:
    async with connect(egress_audit.url, additional_headers=AUTH, proxy=None) as ws:
        assert ws.response is not None and REUSE_HEADER not in ws.response.headers
    async with connect(egress_audit.url, additional_headers=REUSE, proxy=None) as ws:
        assert ws.response is not None and ws.response.headers.get(REUSE_HEADER) == "1"


async def test_end_of_tunnel_exchange_then_the_next_connect(
    egress_audit: EgressServer, echo_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    async with connect(egress_audit.url, additional_headers=REUSE, proxy=None) as ws:
        for n in range(3):
            await echo_tunnel(ws, echo_port, b"round %d" % n)
            await ws.send(END_OF_TUNNEL)
            assert await recv_chunk(ws) == END_OF_TUNNEL  # the answer; the socket stays open
    await until(lambda: len(audit_lines(caplog)) == 3)
    assert all('"status":200' in line for line in audit_lines(caplog))
    assert reused(egress_audit) == 3


async def test_the_egress_ends_first_and_waits_for_the_answer(
    egress_audit: EgressServer, bye_port: int, echo_port: int
) -> None:
    async with connect(egress_audit.url, additional_headers=REUSE, proxy=None) as ws:
        await ws.send(connect_chunk(bye_port))
        assert decode_chunk(await recv_chunk(ws)).startswith(b"HTTP/1.1 200")
        assert decode_chunk(await recv_chunk(ws)) == b"bye"
        assert await recv_chunk(ws) == END_OF_TUNNEL
        # Bytes of the old tunnel still on their way are dropped, not taken for a CONNECT.
        await ws.send(encode_chunk(b"late upload"))
        await ws.send(END_OF_TUNNEL)
        await echo_tunnel(ws, echo_port, b"next")


async def test_end_of_tunnel_without_reuse_is_a_protocol_error(
    egress_audit: EgressServer, echo_port: int
) -> None:
    async with connect(egress_audit.url, additional_headers=AUTH, proxy=None) as ws:
        await echo_tunnel(ws, echo_port, b"data")
        await ws.send(END_OF_TUNNEL)
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1002


@pytest.mark.parametrize("message", [b"\x10\x02", b"\x10\x01\x00", b"\x10\x00"])
async def test_a_malformed_end_of_tunnel_is_a_protocol_error(
    egress_audit: EgressServer, echo_port: int, message: bytes
) -> None:
    async with connect(egress_audit.url, additional_headers=REUSE, proxy=None) as ws:
        await echo_tunnel(ws, echo_port, b"data")
        await ws.send(message)
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1002


async def test_an_end_without_a_tunnel_is_a_protocol_error(
    egress_audit: EgressServer, caplog: pytest.LogCaptureFixture
) -> None:
    """No relay ends a tunnel that carried nothing: a hostile one would make empty rounds
    cheap (each answered, each a new tunnel object). The first such end closes (1002)."""
    baseline = open_fds()
    async with connect(egress_audit.url, additional_headers=REUSE, proxy=None) as ws:
        for _ in range(200):
            await ws.send(END_OF_TUNNEL)
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1002
    await until(lambda: open_fds() <= baseline)
    assert "protocol error" in caplog.text


@pytest.mark.parametrize(
    ("message", "code"),
    [(b"C", 1002), (b"NOT A CONNECT\r\n\r\n", 1000)],
    ids=["partial-head", "refused-head"],
)
async def test_a_tunnel_ended_before_its_connect_does_not_free_the_socket(
    egress_audit: EgressServer, echo_port: int, message: bytes, code: int
) -> None:
    """A byte of a head (or a head refused before admission) and then an end, again and
    again: each round would be a new tunnel the rate limit never sees (its token is taken at
    a CONNECT's admission). The socket is not reused after such a round."""
    baseline = open_fds()
    async with connect(egress_audit.url, additional_headers=REUSE, proxy=None) as ws:
        await echo_tunnel(ws, echo_port, b"a real tunnel first")
        await ws.send(END_OF_TUNNEL)
        assert await recv_chunk(ws) == END_OF_TUNNEL
        for _ in range(50):
            await ws.send(encode_chunk(message))
            await ws.send(END_OF_TUNNEL)
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5):
                ends = 0
                while True:
                    if await ws.recv() == END_OF_TUNNEL:
                        ends += 1
    # (the round's own end is answered - and, once, one already read with it)
    assert ends <= 2 and ws.close_code == code
    await until(lambda: open_fds() <= baseline)


async def test_a_connect_pipelined_between_two_ends_is_not_lost(
    egress_audit: EgressServer, bye_port: int, echo_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The egress ended a tunnel; in one write the relay answers, sends its next CONNECT and
    ends that tunnel at once (its client left): the CONNECT is served (and audited), and
    the socket goes on."""
    async with connect(egress_audit.url, additional_headers=REUSE, proxy=None) as ws:
        await ws.send(connect_chunk(bye_port))
        assert decode_chunk(await recv_chunk(ws)).startswith(b"HTTP/1.1 200")
        assert decode_chunk(await recv_chunk(ws)) == b"bye"
        assert await recv_chunk(ws) == END_OF_TUNNEL
        frames = (END_OF_TUNNEL, connect_chunk(echo_port), END_OF_TUNNEL)
        ws.transport.write(  # three messages in one write: one read at the egress
            b"".join(Frame(Opcode.BINARY, m).serialize(mask=True, extensions=[]) for m in frames)
        )
        assert await recv_chunk(ws) == END_OF_TUNNEL
        await echo_tunnel(ws, echo_port, b"next")
    await until(lambda: len(audit_lines(caplog)) == 3)
    assert f'"target":"127.0.0.1:{echo_port}"' in audit_lines(caplog)[1]


async def test_over_the_rate_a_reused_socket_is_closed(echo_port: int) -> None:
    """A CONNECT over the session's rate on a reused socket gets its 429, then the socket is
    closed (1008): further tries cost an upgrade, refused before any tunnel."""
    limits = LimitConfig(session_rate=0.001, session_burst=2)
    async with make_egress(limits=limits) as egress:
        async with connect(egress.url, additional_headers=REUSE, proxy=None) as ws:
            await echo_tunnel(ws, echo_port, b"one")  # the upgrade's token
            await ws.send(END_OF_TUNNEL)
            assert await recv_chunk(ws) == END_OF_TUNNEL
            await echo_tunnel(ws, echo_port, b"two")  # the second token
            await ws.send(END_OF_TUNNEL)
            assert await recv_chunk(ws) == END_OF_TUNNEL
            await ws.send(connect_chunk(echo_port))
            status = decode_chunk(await recv_chunk(ws))
            assert status.startswith(b"HTTP/1.1 429") and b"session-rate-limit" in status
            assert await recv_chunk(ws) == END_OF_TUNNEL
            await ws.send(END_OF_TUNNEL)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1008
        await until(lambda: egress.limiter.total == 0)


async def test_a_relay_that_never_answers_the_end_is_let_go(
    egress_audit: EgressServer, bye_port: int
) -> None:
    """The egress ended the tunnel; the relay never answers (and sends nothing): the socket is
    closed within the close grace, and its session slot comes back."""
    async with connect(egress_audit.url, additional_headers=REUSE, proxy=None) as ws:
        await ws.send(connect_chunk(bye_port))
        assert decode_chunk(await recv_chunk(ws)).startswith(b"HTTP/1.1 200")
        assert decode_chunk(await recv_chunk(ws)) == b"bye"
        assert await recv_chunk(ws) == END_OF_TUNNEL
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    await until(lambda: egress_audit.limiter.total == 0)


async def test_after_a_burst_the_pool_keeps_what_came_back_for_a_while(
    echo_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty tunnels at once (a package manager's parallel downloads): their sockets come
    back and the next burst takes them instead of opening its own; the surplus is closed
    after SURPLUS_IDLE."""
    monkeypatch.setattr(relay_link, "SURPLUS_IDLE", 1.0)
    async with make_egress() as egress, make_relay(egress.url, pool_size=2) as relay:
        await until(lambda: len(relay.pool) == 2)

        async def burst() -> None:
            results = await asyncio.gather(*(echo_once(relay, echo_port) for _ in range(20)))
            assert results == [b"ping"] * 20

        await burst()
        await until(lambda: len(relay.pool) == 20)
        missed = relay.pool.stats["missed"]
        assert missed >= 18
        await burst()
        assert relay.pool.stats["missed"] == missed  # all twenty from the pool
        await until(lambda: len(relay.pool) == 20)
        await until(lambda: len(relay.pool) == 2, timeout=5)  # the surplus closed
        await until(lambda: egress.limiter.total == 2)  # closed at the egress too
        assert await echo_once(relay, echo_port) == b"ping"


async def test_a_websocket_closed_before_any_connect_is_no_tunnel_in_the_audit(
    egress_audit: EgressServer, echo_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A pre-opened socket retired unused (the relay stopped, the pool shrank) or any socket
    that closes before its CONNECT carried no tunnel: no audit line, no ``decision="-"``."""
    for headers in (AUTH, {**REUSE, PREOPENED_HEADER: "1"}):
        async with connect(egress_audit.url, additional_headers=headers, proxy=None):
            pass
    async with connect(egress_audit.url, additional_headers=REUSE, proxy=None) as ws:
        await echo_tunnel(ws, echo_port, b"one real tunnel")
    await until(lambda: len(audit_lines(caplog)) == 1)
    await asyncio.sleep(0.2)
    assert len(audit_lines(caplog)) == 1 and '"status":200' in audit_lines(caplog)[0]
    assert egress_audit.metrics.registry.get_sample_value(
        "upstreamproxy_tunnels_total", {"decision": "-"}
    ) in (None, 0.0)
