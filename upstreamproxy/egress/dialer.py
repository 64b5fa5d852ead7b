"""Dialling an upstream: only addresses that passed the policy, never a host name.

Connections race RFC 8305 style ("happy eyeballs") with :mod:`aiohappyeyeballs` (the
implementation aiohttp uses): the checked addresses are interleaved by family, a new attempt
starts every ``stagger`` seconds or as soon as the previous one fails, and the first to
connect wins; the rest are closed. It is fed socket addresses built from the checked IP
addresses, so nothing is resolved again. A single address has nothing to race: it is
connected directly (what aiohappyeyeballs does then too, less its layers of coroutines and
``sock_connect``'s second look at the address - a dial is a good part of a new tunnel's cost).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Final

import aiohappyeyeballs

IPAddress = IPv4Address | IPv6Address
log = logging.getLogger("upstreamproxy.egress.dialer")
DEFAULT_STAGGER: Final = 0.25
#: Stream buffer limit: above the tunnel's read size so reading never pauses the socket
#: mid-chunk (the default 64 KiB caused a pause/resume per chunk).
STREAM_LIMIT: Final = 256 * 1024


@dataclass(frozen=True)
class Upstream:
    """A connected, non-blocking socket to a checked address; whoever takes it closes it."""

    sock: socket.socket
    address: str

    async def streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The socket as an asyncio stream pair (closed if that fails)."""
        try:
            return await asyncio.open_connection(sock=self.sock, limit=STREAM_LIMIT)
        except BaseException:
            self.sock.close()
            raise


class DialError(Exception):
    """The upstream could not be reached; ``status`` is 502 or 504."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def address_infos(addresses: Sequence[IPAddress], port: int) -> list[aiohappyeyeballs.AddrInfoType]:
    """``getaddrinfo``-shaped entries for already-checked literal addresses (no lookup)."""
    infos: list[aiohappyeyeballs.AddrInfoType] = []
    for address in addresses:
        if address.version == 6:
            infos.append(
                (
                    socket.AF_INET6,
                    socket.SOCK_STREAM,
                    socket.IPPROTO_TCP,
                    "",
                    (str(address), port, 0, 0),
                )
            )
        else:
            infos.append(
                (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (str(address), port))
            )
    return infos


def _format(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


async def dial_addresses(
    addresses: Sequence[IPAddress], port: int, deadline: float, stagger: float = DEFAULT_STAGGER
) -> Upstream:
    """Connect to the first reachable address in ``addresses`` (already policy-checked),
    within ``deadline`` seconds for the whole race."""
    if not addresses:
        raise DialError(502, "dial-failed")
    infos = address_infos(addresses, port)
    try:
        async with asyncio.timeout(deadline):
            if len(infos) == 1:
                sock = await _connect(infos[0])
                return Upstream(sock, _format(str(addresses[0]), port))
            sock = await aiohappyeyeballs.start_connection(
                infos, happy_eyeballs_delay=stagger, interleave=1
            )
    except TimeoutError:
        raise DialError(504, "dial-timeout") from None
    except OSError as exc:
        # The reason stays machine-readable; the socket error goes to the log only.
        log.info(
            "dial to port %d failed on %d address(es): %s",
            port,
            len(addresses),
            exc.strerror or type(exc).__name__,
        )
        raise DialError(502, "dial-failed") from None
    try:
        address = _format(*sock.getpeername()[:2])
    except OSError:  # reset between connect and now
        sock.close()
        raise DialError(502, "dial-failed") from None
    return Upstream(sock, address)


async def _connect(info: aiohappyeyeballs.AddrInfoType) -> socket.socket:
    """One non-blocking connect to a literal socket address; the socket, or an OSError."""
    family, kind, proto, _, address = info
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        error = sock.connect_ex(address)
        if error in (errno.EINPROGRESS, errno.EINTR):  # (as sock_connect: under way)
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            fd = sock.fileno()
            loop.add_writer(fd, _writable, loop, fd, done)
            try:
                await done
            except BaseException:  # cancelled, or timed out
                loop.remove_writer(fd)
                raise
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
    except BaseException:
        sock.close()
        raise
    return sock


def _writable(loop: asyncio.AbstractEventLoop, fd: int, done: asyncio.Future[None]) -> None:
    loop.remove_writer(fd)  # (level-triggered: not again before the task resumes)
    if not done.done():
        done.set_result(None)
