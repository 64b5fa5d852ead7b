"""Name resolution for tunnels. Each tunnel resolves its host exactly once (rebinding safety)."""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Final, Protocol, TypeVar

IPAddress = IPv4Address | IPv6Address
#: Names :class:`StaticResolver` remembers for inspection.
RECENT_CALLS: Final = 64
#: Lookups in flight at once (abandoned, still running ones included).
MAX_CONCURRENT_LOOKUPS: Final = 16
_T = TypeVar("_T")


class ResolveError(Exception):
    """Resolution failed; ``reason`` is machine-readable (dns-failed, dns-timeout, dns-empty)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[IPAddress]: ...


def _unique(addresses: Sequence[IPAddress]) -> list[IPAddress]:
    return list(dict.fromkeys(addresses))


class LookupThreads:
    """A small pool of daemon threads for blocking ``getaddrinfo`` calls, bounded in total.

    ``getaddrinfo`` cannot be cancelled: a lookup that times out keeps its thread until libc
    gives up. On asyncio's default executor such threads pile up beside everything else that
    uses it. Here at most ``size`` lookups run at once, *counting the abandoned ones*: a slot
    is freed when its thread really finishes, so a flood of hung lookups makes new lookups
    wait (and time out) instead of spawning threads. Daemon threads never hold up exit.
    """

    def __init__(self, size: int = MAX_CONCURRENT_LOOKUPS) -> None:
        self.size = size
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._slots: asyncio.Semaphore | None = None
        self.running = 0  # lookups holding a slot, abandoned ones included

    def _worker(self) -> None:
        while True:
            self._jobs.get()()

    async def run(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on a pool thread; cancelling the caller abandons (never kills) it."""
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        slots = self._slots
        await slots.acquire()
        self.running += 1
        future: asyncio.Future[_T] = loop.create_future()

        def release() -> None:
            self.running -= 1
            slots.release()

        def job() -> None:
            result: _T | None = None
            error: BaseException | None = None
            try:
                result = fn()
            except BaseException as exc:
                error = exc
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
                loop.call_soon_threadsafe(release)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more

        if len(self._threads) < self.size:
            thread = threading.Thread(target=self._worker, name="upstreamproxy-dns", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._jobs.put(job)
        return await future


def _settle(future: asyncio.Future[_T], result: _T | None, error: BaseException | None) -> None:
    if future.done():
        return  # the caller gave up
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


class SystemResolver:
    """The operating system's resolver (``getaddrinfo``), with a deadline, on its own threads."""

    def __init__(self, timeout: float = 5.0, threads: LookupThreads | None = None) -> None:
        self.timeout = timeout
        self.threads = threads or LookupThreads()

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        def lookup() -> list[Any]:
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)

        try:
            async with asyncio.timeout(self.timeout):
                infos = await self.threads.run(lookup)
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
    what a name resolves to and to see the lookups made: ``calls`` holds the most recent
    :data:`RECENT_CALLS` names (bounded: an egress runs for months), ``lookups`` counts all.
    """

    def __init__(
        self, table: Mapping[str, Sequence[str]], fallback: Resolver | None = None
    ) -> None:
        self.table = {host.lower(): [ip_address(a) for a in addrs] for host, addrs in table.items()}
        self.fallback = fallback
        self._recent: deque[str] = deque(maxlen=RECENT_CALLS)
        self.lookups = 0

    @property
    def calls(self) -> list[str]:
        return list(self._recent)

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        self._recent.append(host)
        self.lookups += 1
        if host in self.table:
            if not self.table[host]:
                raise ResolveError("dns-empty")
            return list(self.table[host])
        if self.fallback is not None:
            return await self.fallback.resolve(host, port)
        raise ResolveError("dns-failed")
