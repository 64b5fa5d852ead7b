"""Running a server in the foreground until SIGTERM/SIGINT, then stopping it in order."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def handling_signals(
    stopped: asyncio.Future[int], on_reload: Callable[[], object] | None = None
) -> Iterator[None]:
    """SIGTERM/SIGINT resolve ``stopped`` (later ones are ignored: the stop is under way and
    bounded); SIGHUP calls ``on_reload``. Installed for the whole block, so a signal that
    arrives during start-up or during the drain never falls back to the default action."""
    loop = asyncio.get_running_loop()

    def _stop(signum: int) -> None:
        if not stopped.done():
            stopped.set_result(signum)

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, _stop, signum)
    if on_reload is not None:
        loop.add_signal_handler(signal.SIGHUP, on_reload)
    try:
        yield
    finally:
        for signum in (*STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(signum)


async def wait_for_signal(on_reload: Callable[[], object] | None = None) -> int:
    """Block until SIGTERM or SIGINT; return the signal number. SIGHUP calls ``on_reload``."""
    stopped: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    with handling_signals(stopped, on_reload):
        return await stopped


async def serve(
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    ready: Callable[[], None] | None = None,
    on_reload: Callable[[], object] | None = None,
) -> int:
    """Start, announce readiness, wait for SIGTERM/SIGINT, stop.

    The handlers are in place before ``start`` and until ``stop`` has finished: a supervisor
    that signals as soon as it reads the readiness line, or signals again (or sends SIGHUP)
    while the server drains, does not kill it mid-way.
    """
    stopped: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    with handling_signals(stopped, on_reload):
        await start()
        try:
            if ready is not None:
                ready()
            await stopped
        finally:
            await stop()
    return 0
