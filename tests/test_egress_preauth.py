"""The egress before authentication: upgrade deadline, pre-auth caps, fd limit at start.

In-process egress on port 0 with small limits; attackers are raw sockets, some bound to
other loopback addresses (127.0.0.2, ...) so "per peer" can be told apart from the relays.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest
from conftest import SESSION, TOKEN, TLSFiles, curl_via, loopback_policy
from hypothesis import given, settings
from hypothesis import strategies as st

from upstreamproxy.acceptor import RateLimitedLog
from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.preauth import PreauthGuard, PreauthLimits
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.errors import ConfigError
from upstreamproxy.relay import Relay, RelayConfig
from upstreamproxy.secret import Secret

UPGRADE_HEAD = (
    "GET /v1/code/upstreamproxy/ws HTTP/1.1\r\nHost: egress\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    f"Authorization: Bearer {TOKEN}\r\n\r\n"
)


def make_egress(limits: PreauthLimits, tls: TLSFiles | None = None) -> EgressServer:
    config = EgressConfig(preauth=limits)
    if tls is not None:
        config.tls_cert_file, config.tls_key_file = str(tls.cert_file), str(tls.key_file)
    return EgressServer(config, StaticTokens({TOKEN: Session(SESSION)}), loopback_policy())


@pytest.fixture
async def slow_egress() -> AsyncIterator[EgressServer]:
    server = make_egress(PreauthLimits(upgrade_timeout=1.0, max_pending=40, max_pending_per_peer=8))
    await server.start()
    yield server
    await server.stop()


async def raw_conn(
    port: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the egress closes the connection (EOF or reset) within ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def refusals(server: EgressServer, reason: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "upstreamproxy_preauth_refusals_total", {"reason": reason}
    )
    return value or 0.0


async def relay_works(server: EgressServer, origin_url: str, tls: TLSFiles) -> None:
    async with Relay(
        RelayConfig(egress_url=server.url, session_id=SESSION, token=Secret(TOKEN))
    ) as relay:
        done = await curl_via(relay.proxy_url, origin_url + "/", tls.ca_file, "-m", "20")
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"hello from origin\n"


async def test_half_sent_upgrade_is_closed_at_the_deadline(slow_egress: EgressServer) -> None:
    reader, writer = await raw_conn(slow_egress.port)
    writer.write(UPGRADE_HEAD[:60].encode())  # the head never completes
    started = time.monotonic()
    assert await closed_within(reader, 10)
    assert 0.8 < time.monotonic() - started < 8
    assert refusals(slow_egress, "upgrade-timeout") == 1
    writer.close()


async def test_silent_connection_is_closed_at_the_deadline(slow_egress: EgressServer) -> None:
    reader, writer = await raw_conn(slow_egress.port)
    assert await closed_within(reader, 10)
    writer.close()


async def test_upgraded_tunnel_outlives_the_deadline(
    slow_egress: EgressServer, https_origin: object, tls: TLSFiles
) -> None:
    async with Relay(
        RelayConfig(egress_url=slow_egress.url, session_id=SESSION, token=Secret(TOKEN))
    ) as relay:
        port = https_origin.port  # type: ignore[attr-defined]
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(2.0)  # twice the pre-auth deadline
        assert not await closed_within(reader, 0.2)
        writer.close()
    assert refusals(slow_egress, "upgrade-timeout") == 0


async def test_kept_alive_plain_requests_get_a_fresh_deadline_each(
    slow_egress: EgressServer,
) -> None:
    reader, writer = await raw_conn(slow_egress.port)
    for _ in range(3):
        await asyncio.sleep(0.6)  # each gap is under the deadline, the total is not
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: e\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    assert await closed_within(reader, 10)  # then idle: closed
    writer.close()


async def test_per_peer_cap_refuses_only_that_peer(
    slow_egress: EgressServer, https_origin: object, tls: TLSFiles
) -> None:
    held = [await raw_conn(slow_egress.port, "127.0.0.2") for _ in range(8)]
    await asyncio.sleep(0.1)
    extra_reader, extra_writer = await raw_conn(slow_egress.port, "127.0.0.2")
    assert await closed_within(extra_reader, 0.5)  # closed at once, not at the deadline
    assert refusals(slow_egress, "preauth-per-peer") >= 1
    # Another peer is not affected.
    await relay_works(slow_egress, https_origin.url, tls)  # type: ignore[attr-defined]
    for _, writer in held:
        writer.close()
    extra_writer.close()


async def test_total_cap_evicts_the_oldest(slow_egress: EgressServer) -> None:
    # 5 peers x 8 fills the total cap of 40; one more evicts the oldest connection.
    held = []
    for peer in range(5):
        for _ in range(8):
            held.append(await raw_conn(slow_egress.port, f"127.0.1.{peer + 1}"))
    await asyncio.sleep(0.1)
    assert len(slow_egress.preauth) == 40
    newest = await raw_conn(slow_egress.port, "127.0.2.1")
    assert await closed_within(held[0][0], 0.5)
    assert not await closed_within(newest[0], 0.2)
    assert refusals(slow_egress, "preauth-total") == 1
    for _, writer in [*held, newest]:
        writer.close()


async def test_bookkeeping_returns_to_zero(slow_egress: EgressServer) -> None:
    conns = [await raw_conn(slow_egress.port, "127.0.0.3") for _ in range(6)]
    for _, writer in conns:
        writer.close()
    await asyncio.sleep(1.5)  # past the deadline: every entry is gone
    assert len(slow_egress.preauth) == 0
    assert slow_egress.preauth.per_peer("127.0.0.3") == 0


async def test_tls_client_that_never_says_hello_is_closed(tls: TLSFiles) -> None:
    server = make_egress(PreauthLimits(upgrade_timeout=1.0), tls)
    async with server:
        assert server.url.startswith("wss://")
        reader, writer = await raw_conn(server.port)
        started = time.monotonic()
        assert await closed_within(reader, 10)
        assert time.monotonic() - started < 8
        writer.close()
        await asyncio.sleep(0.2)
        assert len(server.preauth) == 0


def test_limits_are_validated() -> None:
    for bad in (
        PreauthLimits(upgrade_timeout=0),
        PreauthLimits(max_pending=0),
        PreauthLimits(max_pending_per_peer=0),
    ):
        with pytest.raises(ConfigError):
            bad.validate()


def test_rate_limited_log_says_one_line_then_a_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limited = RateLimitedLog(logging.getLogger("t.ratelimit"), interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t.ratelimit"):
        assert limited.warning("out of fds")
        for _ in range(1000):
            now[0] += 0.001
            assert not limited.warning("out of fds")
        now[0] += 10
        assert limited.warning("out of fds")
    assert [r.getMessage() for r in caplog.records] == [
        "out of fds",
        "out of fds (1000 similar events since the last report)",
    ]


def test_fd_soft_limit_is_raised_to_the_hard_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, 4096)

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, target))

    code = (
        "import logging, resource, sys;"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s');"
        "from upstreamproxy.fdlimit import raise_nofile_limit;"
        "raise_nofile_limit('egress');"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], preexec_fn=lower, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert f"egress: file descriptor limit raised from 256 to {target}" in out.stdout
    assert f"({target}, {target})" in out.stdout


def test_listener_binds_every_address_of_a_name() -> None:
    from upstreamproxy.acceptor import bind_sockets

    sockets = bind_sockets("localhost", 0, 8)
    try:
        ports = {s.getsockname()[1] for s in sockets}
        assert len(ports) == 1
        assert {s.family for s in sockets} <= {socket.AF_INET, socket.AF_INET6}
    finally:
        for s in sockets:
            s.close()


async def test_wss_tunnel_leaves_the_preauth_state(tls: TLSFiles, https_origin: object) -> None:
    server = make_egress(PreauthLimits(upgrade_timeout=1.0), tls)
    async with server:
        relay = Relay(
            RelayConfig(
                egress_url=server.url,
                session_id=SESSION,
                token=Secret(TOKEN),
                egress_ca_file=str(tls.ca_file),
            )
        )
        async with relay:
            port = https_origin.port  # type: ignore[attr-defined]
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            assert len(server.preauth) == 0  # the 101 took it out of the pre-auth books
            await asyncio.sleep(1.5)  # past the deadline: still open
            assert not await closed_within(reader, 0.2)
            writer.close()
        assert refusals(server, "upgrade-timeout") == 0


# -- the guard's book-keeping, by property ---------------------------------------------------


class FakeSock:
    """Stands in for an accepted socket (only ``close`` is used)."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeTransport:
    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.aborted = False

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str) -> object:
        return self.key if name == "peername" else None


class FakeExchange:
    def __init__(self, transport: FakeTransport, status: int) -> None:
        self.transport = transport
        self.status = status


operations = st.lists(
    st.tuples(
        st.sampled_from(["admit", "connect", "answer-101", "answer-200", "forget", "drop"]),
        st.integers(0, 3),  # peer
        st.integers(0, 5),  # port
    ),
    max_size=60,
)


@given(operations)
@settings(max_examples=150, deadline=None)
def test_guard_books_always_balance(ops: list[tuple[str, int, int]]) -> None:
    async def scenario() -> None:
        guard = PreauthGuard(PreauthLimits(60.0, max_pending=6, max_pending_per_peer=3))
        socks: dict[tuple[str, int], FakeSock] = {}
        transports: dict[tuple[str, int], FakeTransport] = {}
        for op, peer, port in ops:
            key = (f"127.0.9.{peer}", 40000 + port)
            if op == "admit":
                socks[key] = FakeSock()
                admitted = guard.admit(key, socks[key])  # type: ignore[arg-type]
                assert admitted != socks[key].closed
            elif op == "connect":
                transports[key] = FakeTransport(key)
                guard.connected(key, transports[key])  # type: ignore[arg-type]
            elif op.startswith("answer"):
                exchange = FakeExchange(transports.get(key) or FakeTransport(key), int(op[-3:]))
                await guard.on_response_prepare(exchange, exchange)  # type: ignore[arg-type]
            elif op == "forget":
                guard.forget(key)
            elif key in transports:
                transports[key].abort()
            pending = guard._pending
            assert len(pending) <= 6
            for p in range(4):
                mine = [k for k in pending if k[0] == f"127.0.9.{p}"]
                assert guard.per_peer(f"127.0.9.{p}") == len(mine) <= 3
        guard.close_all()
        assert len(guard) == 0 and all(guard.per_peer(f"127.0.9.{p}") == 0 for p in range(4))

    asyncio.run(scenario())


async def test_metrics_listener_has_the_same_deadline_and_caps() -> None:
    # The metrics port (0.0.0.0 in the Kubernetes manifests) is unauthenticated too: a
    # half-sent or silent connection there once stayed open for good, so a peer could hold
    # any number of the egress's descriptors.
    limits = PreauthLimits(upgrade_timeout=1.0, max_pending=40, max_pending_per_peer=4)
    config = EgressConfig(preauth=limits, metrics_port=0)
    server = EgressServer(config, StaticTokens({TOKEN: Session(SESSION)}), loopback_policy())
    async with server:
        reader, writer = await raw_conn(server.metrics_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: e\r\n")  # never finished
        started = time.monotonic()
        assert await closed_within(reader, 10)
        assert 0.8 < time.monotonic() - started < 8
        writer.close()
        held = [await raw_conn(server.metrics_port, "127.0.0.4") for _ in range(4)]
        await asyncio.sleep(0.1)
        extra_reader, extra_writer = await raw_conn(server.metrics_port, "127.0.0.4")
        assert await closed_within(extra_reader, 0.5)  # over the per-peer cap: at once
        # A scrape still works, and the pre-auth refusals stay the tunnel listener's.
        reader, writer = await raw_conn(server.metrics_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: e\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
        for _, held_writer in [*held, (None, extra_writer)]:
            held_writer.close()
        assert refusals(server, "upgrade-timeout") == refusals(server, "preauth-per-peer") == 0
