"""Dialling checked addresses with aiohappyeyeballs (one address: directly): winner,
failures, timeouts and cancellation without a leaked socket, no second lookup."""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import socket
import time
from collections.abc import Iterator
from ipaddress import ip_address

import pytest

from upstreamproxy.egress import dialer
from upstreamproxy.egress.dialer import DialError, address_infos, dial_addresses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_address_infos_are_literal_and_need_no_lookup() -> None:
    infos = address_infos([ip_address("::1"), ip_address("127.0.0.1")], 443)
    assert [info[4] for info in infos] == [("::1", 443, 0, 0), ("127.0.0.1", 443)]
    assert [info[0] for info in infos] == [socket.AF_INET6, socket.AF_INET]


async def test_the_live_address_wins_across_families(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_lookup(*args: object, **kwargs: object) -> None:
        raise AssertionError("the dialer must not resolve anything")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # ::1 refuses (nothing listens there on that port): the IPv4 attempt must still win.
    upstream = await dial_addresses([ip_address("::1"), ip_address("127.0.0.1")], port, 10)
    assert upstream.address == f"127.0.0.1:{port}"
    upstream.sock.close()
    server.close()


async def test_every_address_refusing_is_502() -> None:
    port = free_port()
    with pytest.raises(DialError) as info:
        await dial_addresses([ip_address("127.0.0.1"), ip_address("127.0.0.2")], port, 10)
    assert (info.value.status, info.value.reason) == (502, "dial-failed")
    with pytest.raises(DialError):
        await dial_addresses([], port, 10)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_single_address_is_connected_directly_and_named_without_a_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_race(*args: object, **kwargs: object) -> None:
        raise AssertionError("one address has nothing to race")

    monkeypatch.setattr(dialer.aiohappyeyeballs, "start_connection", no_race)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = await dial_addresses([ip_address("127.0.0.1")], port, 10)
    try:
        assert upstream.address == f"127.0.0.1:{port}"
        assert not upstream.sock.getblocking()
        assert upstream.sock.getpeername()[:2] == ("127.0.0.1", port)
    finally:
        upstream.sock.close()
        server.close()


async def test_a_single_address_refusing_is_502_and_keeps_no_socket() -> None:
    port = free_port()
    before = open_fds()
    for _ in range(20):
        with pytest.raises(DialError) as info:
            await dial_addresses([ip_address("127.0.0.1")], port, 10)
        assert (info.value.status, info.value.reason) == (502, "dial-failed")
    assert open_fds() == before


@contextlib.contextmanager
def full_backlog() -> Iterator[int]:
    """A loopback listener whose accept queue is full: further SYNs are dropped, so a connect
    to it neither succeeds nor fails for a while (Linux, ``tcp_abort_on_overflow`` off)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_a_single_address_that_never_answers_is_504_and_keeps_no_socket() -> None:
    with full_backlog() as port:
        await asyncio.sleep(0.05)  # the fillers' handshakes fill the queue
        before = open_fds()
        started = time.monotonic()
        with pytest.raises(DialError) as info:
            await dial_addresses([ip_address("127.0.0.1")], port, 0.3)
        assert (info.value.status, info.value.reason) == (504, "dial-timeout")
        assert time.monotonic() - started < 2
        assert open_fds() == before


async def test_a_cancelled_single_dial_keeps_no_socket_and_no_watch() -> None:
    with full_backlog() as port:
        await asyncio.sleep(0.05)
        before = open_fds()
        task = asyncio.ensure_future(dial_addresses([ip_address("127.0.0.1")], port, 10))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert open_fds() == before
        loop = asyncio.get_running_loop()
        selector = loop._selector  # type: ignore[attr-defined]
        assert all(key.events & selectors.EVENT_WRITE == 0 for key in selector.get_map().values())
