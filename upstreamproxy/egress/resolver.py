"""Name resolution for tunnels. Each tunnel resolves its host exactly once (rebinding safety)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Protocol

IPAddress = IPv4Address | IPv6Address


class ResolveError(Exception):
    """Resolution failed; ``reason`` is machine-readable (dns-failed, dns-timeout, dns-empty)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[IPAddress]: ...


def _unique(addresses: Sequence[IPAddress]) -> list[IPAddress]:
    return list(dict.fromkeys(addresses))


class SystemResolver:
    """The operating system's resolver (``getaddrinfo``), with a deadline."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                infos = await loop.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
                )
        except TimeoutError:
            raise ResolveError("dns-timeout") from None
        except (socket.gaierror, UnicodeError, OSError):
            raise ResolveError("dns-failed") from None
        # Scoped IPv6 results ("fe80::1%eth0") lose the scope: never dialled anyway.
        addresses = _unique([ip_address(str(info[4][0]).split("%")[0]) for info in infos])
        if not addresses:
            raise ResolveError("dns-empty")
        return addresses


class StaticResolver:
    """A fixed host -> addresses table, falling back to another resolver for other names.

    Operators use it (``--resolve HOST=IP``) to pin names; tests use it to control exactly
    what a name resolves to and to count lookups (``calls``).
    """

    def __init__(
        self, table: Mapping[str, Sequence[str]], fallback: Resolver | None = None
    ) -> None:
        self.table = {host.lower(): [ip_address(a) for a in addrs] for host, addrs in table.items()}
        self.fallback = fallback
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        self.calls.append(host)
        if host in self.table:
            if not self.table[host]:
                raise ResolveError("dns-empty")
            return list(self.table[host])
        if self.fallback is not None:
            return await self.fallback.resolve(host, port)
        raise ResolveError("dns-failed")
