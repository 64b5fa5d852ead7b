"""Dialling an upstream: only addresses that passed the policy, never a host name.

Connections race RFC 8305 style ("happy eyeballs"): the checked addresses are interleaved by
family, a new attempt starts every ``stagger`` seconds or as soon as the previous one fails,
and the first to connect wins; the rest are cancelled and closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Final

IPAddress = IPv4Address | IPv6Address
log = logging.getLogger("upstreamproxy.egress.dialer")
DEFAULT_STAGGER: Final = 0.25
#: Stream buffer limit: above the tunnel's read size so reading never pauses the socket
#: mid-chunk (the default 64 KiB caused a pause/resume per chunk).
STREAM_LIMIT: Final = 256 * 1024


@dataclass(frozen=True)
class Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    address: str


class DialError(Exception):
    """The upstream could not be reached; ``status`` is 502 or 504."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def interleave(addresses: Sequence[IPAddress]) -> list[IPAddress]:
    """Alternate families, starting with the family of the first address (RFC 8305 §4)."""
    if not addresses:
        return []
    first = [a for a in addresses if a.version == addresses[0].version]
    other = [a for a in addresses if a.version != addresses[0].version]
    out: list[IPAddress] = []
    for index in range(max(len(first), len(other))):
        out.extend(group[index] for group in (first, other) if index < len(group))
    return out


def _format(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


async def _attempt(address: IPAddress, port: int) -> Upstream:
    reader, writer = await asyncio.open_connection(str(address), port, limit=STREAM_LIMIT)
    return Upstream(reader, writer, _format(address, port))


async def dial_addresses(
    addresses: Sequence[IPAddress], port: int, deadline: float, stagger: float = DEFAULT_STAGGER
) -> Upstream:
    """Connect to the first reachable address in ``addresses`` (already policy-checked),
    within ``deadline`` seconds for the whole race."""
    if not addresses:
        raise DialError(502, "dial-failed")
    queue = interleave(addresses)
    pending: set[asyncio.Task[Upstream]] = set()
    last_error = "no address"
    winner: Upstream | None = None
    try:
        async with asyncio.timeout(deadline):
            while winner is None and (queue or pending):
                if queue:
                    address = queue.pop(0)
                    pending.add(asyncio.ensure_future(_attempt(address, port)))
                done, pending = await asyncio.wait(
                    pending, timeout=stagger if queue else None, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    error = task.exception()
                    if error is not None:
                        last_error = getattr(error, "strerror", None) or type(error).__name__
                    elif winner is None:
                        winner = task.result()
                    else:
                        task.result().writer.close()
    except TimeoutError:
        raise DialError(504, "dial-timeout") from None
    finally:
        for task in pending:
            task.cancel()
        if pending:
            results = await asyncio.gather(*pending, return_exceptions=True)
            for result in results:
                if isinstance(result, Upstream):
                    result.writer.close()
    if winner is None:
        # The reason stays machine-readable; the socket error goes to the log only.
        log.info("dial to port %d failed on %d address(es): %s", port, len(addresses), last_error)
        raise DialError(502, "dial-failed")
    return winner
