"""The relay refuses tunnels it has no descriptors for at once (503), not with a late 502."""

from __future__ import annotations

import asyncio
import resource

import pytest

from upstreamproxy import fdlimit
from upstreamproxy.relay import Relay


def test_budget_is_half_the_descriptors_after_the_reserve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 4096))
    assert fdlimit.tunnel_budget() == (1024 - fdlimit.FD_RESERVE) // 2
    monkeypatch.setattr(resource, "getrlimit", lambda _: (70, 4096))
    assert fdlimit.tunnel_budget() == 16  # never below a usable floor
    infinity = resource.RLIM_INFINITY
    monkeypatch.setattr(resource, "getrlimit", lambda _: (infinity, infinity))
    assert fdlimit.tunnel_budget() > 100_000


async def test_over_budget_clients_get_503_and_the_rest_still_work(relay: Relay) -> None:
    relay._budget = 3  # as if the soft limit left room for three tunnels
    held = []
    for _ in range(3):  # three clients that have not sent their head yet hold the budget
        held.append(await asyncio.open_connection("127.0.0.1", relay.port))
    await asyncio.sleep(0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b"too-many-tunnels (file descriptor limit)" in answer
    writer.close()
    for _, held_writer in held:
        held_writer.close()
    deadline = asyncio.get_running_loop().time() + 10
    while relay.active_tunnels and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert relay.active_tunnels == 0
