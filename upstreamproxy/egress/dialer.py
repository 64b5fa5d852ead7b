"""Opening the upstream TCP connection for a tunnel."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..connect_head import Target


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


async def dial(target: Target, timeout: float) -> Upstream:
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(target.host, target.port)
    except TimeoutError:
        raise DialError(504, "dial-timeout") from None
    except OSError as exc:
        raise DialError(502, f"dial-failed: {exc.strerror or type(exc).__name__}") from None
    peer = writer.get_extra_info("peername")
    address = f"{peer[0]}:{peer[1]}" if peer else target.authority
    return Upstream(reader, writer, address)
