"""Dialling checked addresses with aiohappyeyeballs: winner, failures, no second lookup."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import ip_address

import pytest

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
