"""Running a server in the foreground until SIGTERM/SIGINT, then stopping it in order."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable


async def wait_for_signal(on_reload: Callable[[], object] | None = None) -> int:
    """Block until SIGTERM or SIGINT; return the signal number. SIGHUP calls ``on_reload``."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def _stop(signum: int) -> None:
        if not stop.done():
            stop.set_result(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _stop, signum)
    if on_reload is not None:
        loop.add_signal_handler(signal.SIGHUP, on_reload)
    try:
        result: int = await stop
        return result
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)


async def serve(
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    ready: Callable[[], None] | None = None,
    on_reload: Callable[[], object] | None = None,
) -> int:
    await start()
    try:
        if ready is not None:
            ready()
        await wait_for_signal(on_reload)
    finally:
        await stop()
    return 0
