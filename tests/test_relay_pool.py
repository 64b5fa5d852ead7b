"""Pre-opened WebSockets: the relay's pool against the real egress and against stand-ins."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import WSMsgType, web
from conftest import SESSION, TOKEN, _serve, connect_via, loopback_policy

from upstreamproxy import relay_link
from upstreamproxy.codec import decode_chunk, encode_chunk
from upstreamproxy.connect_head import PREOPENED_HEADER, build_status_head
from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.limits import LimitConfig
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.relay import Relay, RelayConfig
from upstreamproxy.relay_link import LinkConfig, WsPool, open_ws
from upstreamproxy.secret import Secret
from upstreamproxy.tunnel.driver import OpenFailed
from upstreamproxy.tunnel.links import WsLink


def make_relay(url: str, **kwargs: object) -> Relay:
    return Relay(
        RelayConfig(egress_url=url, session_id=SESSION, token=Secret(TOKEN), **kwargs)  # type: ignore[arg-type]
    )


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def echo_roundtrip(relay: Relay, port: int) -> bytes:
    reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{port}")
    try:
        assert head.startswith(b"HTTP/1.1 200"), head
        writer.write(b"ping")
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(4), 10)
    finally:
        writer.close()


def egress_server(**config: object) -> EgressServer:
    return EgressServer(
        EgressConfig(**config),  # type: ignore[arg-type]
        StaticTokens({TOKEN: Session(SESSION)}),
        loopback_policy(),
    )


async def test_pool_fills_and_a_connect_takes_a_ready_socket(echo_port: int) -> None:
    async with egress_server() as egress, make_relay(egress.url, pool_size=2) as relay:
        await until(lambda: len(relay.pool) == 2)
        assert len(egress.active) == 2  # pre-opened sockets are tunnels to the egress
        assert await echo_roundtrip(relay, echo_port) == b"ping"
        assert relay.pool.stats["taken"] == 1 and relay.pool.stats["missed"] == 0
        await until(lambda: len(relay.pool) == 2)  # refilled in the background


async def test_pool_size_0_opens_one_socket_per_connect(echo_port: int) -> None:
    async with egress_server() as egress, make_relay(egress.url, pool_size=0) as relay:
        assert await echo_roundtrip(relay, echo_port) == b"ping"
        assert len(relay.pool) == 0 and relay.pool.stats["taken"] == 0


async def test_preopened_socket_outlives_the_head_timeout_while_kept_alive(
    echo_port: int,
) -> None:
    from upstreamproxy.egress.tunnel import TunnelTimeouts

    timeouts = TunnelTimeouts(head=0.3, pooled_wait=1.0)
    async with (
        egress_server(timeouts=timeouts) as egress,
        make_relay(egress.url, pool_size=1, keepalive_interval=0.3) as relay,
    ):
        await until(lambda: len(relay.pool) == 1)
        await asyncio.sleep(1.5)  # > head and > pooled_wait, but keepalives renew it
        assert len(relay.pool) == 1
        assert await echo_roundtrip(relay, echo_port) == b"ping"
        assert relay.pool.stats["replaced"] == 0


async def test_drain_retires_idle_preopened_sockets_and_relay_notices(echo_port: int) -> None:
    egress = egress_server()
    await egress.start()
    async with make_relay(egress.url, pool_size=2) as relay:
        await until(lambda: len(relay.pool) == 2)
        started = time.monotonic()
        stopping = asyncio.ensure_future(egress.stop(grace=30))
        # The idle pre-opened sockets close at once (1001), so the drain does not wait the
        # grace for them; the relay drops them without any client involved.
        await asyncio.wait_for(stopping, 10)
        assert time.monotonic() - started < 5
        await until(lambda: relay.pool.stats["replaced"] == 2)


async def test_dead_pooled_socket_is_replaced_without_the_client_noticing(
    echo_port: int,
) -> None:
    """A stand-in egress (named so) that drops every pre-opened socket when its CONNECT
    arrives - a CONNECT racing a retire - and serves fresh sockets normally."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        preopened = request.headers.get(PREOPENED_HEADER) == "1"
        message = await ws.receive()
        if message.type is not WSMsgType.BINARY:
            return ws
        seen.append("preopened" if preopened else "fresh")
        if preopened:
            await ws.close(code=1001)
            return ws
        await ws.send_bytes(encode_chunk(build_status_head(200)))
        async for message in ws:
            if message.type is WSMsgType.BINARY and decode_chunk(message.data):
                await ws.send_bytes(message.data)
        return ws

    await _with_stand_in(handler, _roundtrip_expect_ok(echo_port))
    assert seen == ["preopened", "fresh"]


async def test_pool_works_against_a_server_that_knows_nothing_of_pools(echo_port: int) -> None:
    """A CCR-style stand-in (named so): ignores the pre-open header and closes any socket
    that has not sent its CONNECT within 0.3 s. The relay's pool keeps losing sockets, and
    clients never notice."""

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        try:
            message = await ws.receive(timeout=0.3)
        except TimeoutError:
            await ws.close(code=1000)
            return ws
        while message.type is WSMsgType.BINARY and not decode_chunk(message.data):
            message = await ws.receive()  # keepalives
        if message.type is not WSMsgType.BINARY:
            return ws
        await ws.send_bytes(encode_chunk(build_status_head(200)))
        async for message in ws:
            if message.type is WSMsgType.BINARY and decode_chunk(message.data):
                await ws.send_bytes(message.data)
        return ws

    async def clients(relay: Relay) -> None:
        for _ in range(5):
            assert await echo_roundtrip(relay, echo_port) == b"ping"
            await asyncio.sleep(0.4)  # long enough for the pooled sockets to be closed

    await _with_stand_in(handler, clients)


def _roundtrip_expect_ok(port: int) -> Callable[[Relay], Awaitable[None]]:
    async def check(relay: Relay) -> None:
        await until(lambda: len(relay.pool) == 1)
        assert await echo_roundtrip(relay, port) == b"ping"

    return check


async def _with_stand_in(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    body: Callable[[Relay], Awaitable[None]],
) -> None:
    app = web.Application()
    app.router.add_get("/ws", handler)
    runner, port = await _serve(app, None)
    try:
        async with make_relay(f"ws://127.0.0.1:{port}/ws", pool_size=1) as relay:
            await body(relay)
    finally:
        await runner.cleanup()


async def test_pooled_sockets_never_cost_a_client_a_tunnel(echo_port: int) -> None:
    # Session limit 2, pool 2: the pool holds both slots, and still both CONNECTs get one.
    async with (
        egress_server(limits=LimitConfig(max_session_tunnels=2)) as egress,
        make_relay(egress.url, pool_size=2) as relay,
    ):
        held = [await connect_via(relay.port, f"127.0.0.1:{echo_port}") for _ in range(2)]
        assert all(head.startswith(b"HTTP/1.1 200") for _, _, head in held)
        _, writer, head = await connect_via(relay.port, f"127.0.0.1:{echo_port}")
        assert head.startswith(b"HTTP/1.1 429")  # the real limit, passed on
        writer.close()
        for _, w, _ in held:
            w.close()


async def test_upgrade_refused_while_draining_is_tried_again(echo_port: int) -> None:
    """A stand-in (named so) answering the first two upgrades 503 draining, as a replica
    behind a load balancer does while it drains; the next try reaches a live one."""
    refused: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        if len(refused) < 2:
            refused.append(1)
            return web.json_response(
                {"error": "draining"}, status=503, headers={"X-Upstreamproxy-Reason": "draining"}
            )
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        await ws.send_bytes(encode_chunk(build_status_head(200)))
        async for message in ws:
            if message.type is WSMsgType.BINARY and decode_chunk(message.data):
                await ws.send_bytes(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner, port = await _serve(app, None)
    try:
        async with make_relay(f"ws://127.0.0.1:{port}/ws", pool_size=0) as relay:
            assert await echo_roundtrip(relay, echo_port) == b"ping"
    finally:
        await runner.cleanup()
    assert len(refused) == 2


async def test_a_failed_pre_open_skips_a_connect_that_gave_up_waiting_for_it() -> None:
    """A CONNECT waiting for a socket being pre-opened gives up (its client left) in the very
    loop iteration where that pre-open fails: its cancelled waiter is still listed. The failed
    pre-open passes it over instead of failing on it (InvalidStateError, a task exception
    nobody retrieves)."""
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def opener() -> WsLink:
        await gate
        raise OpenFailed(502, "refused")

    pool = WsPool(1, opener, keepalive=30.0, ping_interval=None, ping_timeout=20.0)
    pool.start()
    await until(lambda: pool._connecting == 1, timeout=5)
    opening = list(pool._tasks._tasks)
    take = asyncio.ensure_future(pool.take())
    await until(lambda: len(pool._waiters) == 1, timeout=5)
    gate.set_result(None)  # the pre-open fails (its task runs first) ...
    take.cancel()  # ... as the CONNECT waiting for it gives up
    with pytest.raises(asyncio.CancelledError):
        await take
    try:
        async with asyncio.timeout(5):
            await asyncio.wait(opening)
        assert [t.exception() for t in opening if not t.cancelled()] == [None]
    finally:
        await pool.close()


async def test_a_socket_opened_for_a_connect_whose_client_left_is_kept(echo_port: int) -> None:
    """The pool is empty (its socket carries a tunnel) and the way to the egress is slow: two
    CONNECTs wait, one for the pool's refill, one for a socket opened for it; both clients
    leave. Neither socket carried anything: both are kept in the pool (the second was closed
    mid-upgrade), and the next CONNECT takes one without opening another."""
    gate = asyncio.Event()
    connections = 0

    async with egress_server() as egress:
        egress_port = int(egress.url.rsplit(":", 1)[1].split("/")[0])

        async def slow_path(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            await gate.wait()
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", egress_port)

            async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(ConnectionError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                dst.close()

            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

        path = await asyncio.start_server(slow_path, "127.0.0.1", 0)
        path_port = path.sockets[0].getsockname()[1]
        url = egress.url.replace(f":{egress_port}/", f":{path_port}/")
        gate.set()
        async with make_relay(url, pool_size=1) as relay:
            await until(lambda: len(relay.pool) == 1)
            _, held_writer, head = await connect_via(relay.port, f"127.0.0.1:{echo_port}")
            assert head.startswith(b"HTTP/1.1 200")  # the pooled socket is now this tunnel's
            gate.clear()  # from here new connections to the egress wait
            await until(lambda: connections == 2)  # the pool's refill, held at the gate
            waiting = []
            for _ in range(2):
                _, writer = await asyncio.open_connection("127.0.0.1", relay.port)
                writer.write(f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\n\r\n".encode())
                await writer.drain()
                waiting.append(writer)
            await until(lambda: connections == 3)  # the second is opened for its CONNECT
            for writer in waiting:
                writer.transport.abort()  # the clients leave while they wait
            await until(lambda: relay.active_tunnels == 1)  # noticed (the hang-up check)
            gate.set()
            await until(lambda: len(relay.pool) == 2)  # the refill and the one nobody took
            taken = relay.pool.stats["taken"]
            assert await echo_roundtrip(relay, echo_port) == b"ping"
            assert relay.pool.stats["taken"] == taken + 1 and connections == 3
            held_writer.close()
        path.close()


async def test_a_token_that_expired_while_its_socket_waited_gets_no_tunnel(
    echo_port: int,
) -> None:
    # The pre-opened socket passed its upgrade with a valid token; by its CONNECT the token
    # has expired. The egress verifies it again there and closes the socket; the relay's
    # fresh upgrade then meets the real 401, so the client gets 502, never a tunnel.
    from upstreamproxy.egress.auth import SignedTokens
    from upstreamproxy.tokens import TokenVerifier, generate_key, issue_token

    key = generate_key()
    now = [time.time()]
    verifier = TokenVerifier({"k": key.public_key()}, "upstreamproxy")
    egress = EgressServer(
        EgressConfig(), SignedTokens(verifier, clock=lambda: now[0]), loopback_policy()
    )
    token = issue_token(key, "k", SESSION, "default", "upstreamproxy", 60, now[0])
    async with egress:
        relay = Relay(
            RelayConfig(egress_url=egress.url, session_id=SESSION, token=Secret(token), pool_size=1)
        )
        async with relay:
            assert await echo_roundtrip(relay, echo_port) == b"ping"
            await until(lambda: len(relay.pool) == 1)
            now[0] += 60 + 31  # past expiry and the leeway
            _, writer, head = await connect_via(relay.port, f"127.0.0.1:{echo_port}")
            writer.close()
    assert head.startswith(b"HTTP/1.1 502"), head
    assert b"401" in head
    assert egress.metrics.registry.get_sample_value(
        "upstreamproxy_auth_failures_total", {"reason": "expired"}
    )


async def test_connects_never_wait_for_pre_opens_sleeping_out_a_back_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three CONNECTs wait for pre-opens; the third started one that has not run yet when
    the first pre-open fails, so it sleeps out the back-off (at its maximum after a burst of
    failures). Then the second pre-open works: the egress is back. Neither the third CONNECT
    nor a later one waits for the sleeping pre-open: they used to, until their deadline (504).
    """
    monkeypatch.setattr(relay_link, "POOL_BACKOFF", 30.0)
    loop = asyncio.get_running_loop()
    gates = [loop.create_future(), loop.create_future()]
    calls = 0
    links: list[WsLink] = []
    async with egress_server() as egress:
        config = LinkConfig(egress.url, Secret(TOKEN), 10.0, None, None, reuse=True)

        async def opener() -> WsLink:
            nonlocal calls
            calls += 1
            if calls <= len(gates):  # the first two wait for the test; the others open
                await gates[calls - 1]
            link = await open_ws(config, preopened=True)
            links.append(link)
            return link

        pool = WsPool(1, opener, keepalive=30.0, ping_interval=None, ping_timeout=20.0)
        pool.start()
        try:
            takes = [asyncio.ensure_future(pool.take())]  # waits for the pool's pre-open
            await until(lambda: len(pool._waiters) == 1)
            takes.append(asyncio.ensure_future(pool.take()))  # opens one for itself
            await until(lambda: pool._connecting == 2)
            takes.append(asyncio.ensure_future(pool.take()))  # runs next: starts a third...
            gates[0].set_exception(OpenFailed(502, "refused"))  # ... which the failure beats
            await until(lambda: pool._backoff == 30.0 and pool._opening == 2)
            gates[1].set_result(None)
            async with asyncio.timeout(5):
                taken = [link for link, _ in await asyncio.gather(*takes)]
                taken.append((await pool.take())[0])
            assert len(set(taken)) == 4
        finally:
            await pool.close()
            for link in links:
                link.abort()
