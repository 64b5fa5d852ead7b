"""Name resolution: bounded lookup threads, bounded lookup history."""

from __future__ import annotations

import argparse
import asyncio
import socket
import threading
from typing import Any

import pytest

from upstreamproxy.commands.egress import build_resolver
from upstreamproxy.egress import resolver as resolver_module
from upstreamproxy.egress.resolver import (
    RECENT_CALLS,
    LookupThreads,
    ResolveError,
    StaticResolver,
    SystemResolver,
)


async def test_static_resolver_history_is_bounded() -> None:
    # Regression: every lookup was recorded forever (an egress runs for months).
    resolver = StaticResolver({"a.test": ["127.0.0.1"]})
    for _ in range(RECENT_CALLS * 10):
        await resolver.resolve("a.test", 443)
    assert resolver.calls == ["a.test"] * RECENT_CALLS
    assert resolver.lookups == RECENT_CALLS * 10


async def test_system_resolver_resolves_on_its_own_threads() -> None:
    resolver = SystemResolver(5.0)
    addresses = await resolver.resolve("localhost", 443)
    assert {str(a) for a in addresses} & {"127.0.0.1", "::1"}
    with pytest.raises(ResolveError) as info:
        await resolver.resolve("name.invalid", 443)
    assert info.value.reason == "dns-failed"


async def test_hung_lookups_keep_their_slots_and_never_touch_the_default_executor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stand-in getaddrinfo that hangs like an unreachable DNS server (named: a mock; no
    # real resolver can be made to hang here without touching the host's resolv.conf).
    release = threading.Event()
    real = socket.getaddrinfo

    def hanging(host: str, *args: Any, **kwargs: Any) -> Any:
        if host.endswith(".hang.test"):
            release.wait(30)
        return real("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(resolver_module.socket, "getaddrinfo", hanging)
    threads = LookupThreads(size=2)
    resolver = SystemResolver(0.3, threads)
    for name in ("a", "b"):
        with pytest.raises(ResolveError) as info:
            await resolver.resolve(f"{name}.hang.test", 443)
        assert info.value.reason == "dns-timeout"
    # Both slots are held by abandoned lookups: the next one waits, and times out too,
    # without starting a third thread.
    assert threads.running == 2
    with pytest.raises(ResolveError):
        await resolver.resolve("fine.test", 443)
    assert threads.running == 2
    assert threading.active_count() < 50
    # asyncio's default executor is untouched and free.
    loop = asyncio.get_running_loop()
    assert await asyncio.wait_for(loop.run_in_executor(None, lambda: 42), 5) == 42
    release.set()
    for _ in range(100):
        if threads.running == 0:
            break
        await asyncio.sleep(0.05)
    assert threads.running == 0
    assert [str(a) for a in await resolver.resolve("fine.test", 443)] == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("pin", "name"),
    [
        ("Bücher.Example.=203.0.113.7", "xn--bcher-kva.example"),
        ("API.Example.COM.=203.0.113.7", "api.example.com"),
    ],
)
async def test_a_pinned_name_is_keyed_as_admission_looks_it_up(pin: str, name: str) -> None:
    # Regression: --resolve keys were only lower-cased and stripped of dots, while admission
    # looks up the normalised name (IDNA A-labels): the pin for bücher.example was never
    # found, and the name went to DNS instead.
    resolver = build_resolver(argparse.Namespace(dial_timeout=1.0, resolve=[pin]))
    assert isinstance(resolver, StaticResolver)
    assert list(resolver.table) == [name]
    assert [str(a) for a in await resolver.resolve(name, 443)] == ["203.0.113.7"]
