"""``Relay.open_tunnel``: an in-process tunnel over the same CONNECT path (for issue 10)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from conftest import SESSION, TOKEN, loopback_policy

from upstreamproxy.connect_head import Target
from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.relay import Relay, RelayConfig, TunnelRefused
from upstreamproxy.secret import Secret


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    egress = EgressServer(
        EgressConfig(), StaticTokens({TOKEN: Session(SESSION)}), loopback_policy()
    )
    async with egress:
        config = RelayConfig(egress_url=egress.url, session_id=SESSION, token=Secret(TOKEN))
        async with Relay(config) as relay:
            yield relay


async def test_open_tunnel_carries_bytes(relay: Relay) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    origin = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = origin.sockets[0].getsockname()[1]
    reader, writer = await relay.open_tunnel(Target("127.0.0.1", port))
    payload = bytes(range(256)) * 4096  # 1 MiB: backpressure through the memory pair too
    writer.write(payload)
    received = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
    assert received == payload
    writer.close()
    async with asyncio.timeout(10):
        while relay.active_tunnels:
            await asyncio.sleep(0.02)
    origin.close()


async def test_open_tunnel_refused_raises_with_the_answer(relay: Relay) -> None:
    with pytest.raises(TunnelRefused) as info:
        await relay.open_tunnel(Target("10.255.255.1", 443))  # not allowed by the policy
    assert info.value.status == 403
    assert b"X-Upstreamproxy-Reason" in info.value.answer
