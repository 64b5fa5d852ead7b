"""The relay's WebSockets to the egress: opening one (natively) and the pre-opened pool.

Opening a tunnel costs a WebSocket upgrade (TCP, TLS, HTTP) before the CONNECT chunk can even
be sent. :class:`WsPool` keeps ``size`` upgraded, authenticated sockets ready, so a CONNECT
waits only for the CONNECT -> ``200`` round trip. An idle pooled socket is kept alive as an
open tunnel is: a keepalive chunk every ``keepalive`` seconds (the platform's idle timer) and
a ping when nothing was heard for ``ping_interval`` seconds, dropped when no pong follows
within ``ping_timeout``. A socket the egress closes while idle (a draining egress closes its
pre-opened sockets with 1001) is dropped and replaced in the background. The wire is
unchanged: to the egress a pooled socket is a tunnel whose CONNECT is late, so a CCR-style
server that knows nothing of pools serves it too (within its own head timeout; set
``pool_size`` 0 for a server that waits less than a keepalive interval).

With tunnel reuse (SPEC §11) negotiated, a socket whose tunnel ended with the end-of-tunnel
exchange comes back to the pool (:meth:`WsPool.give_back`) - while there is room - instead of
being closed, and a socket handed out within the last :data:`REUSE_HOLD` seconds counts as
coming back: short tunnels one after another then cost no new socket, and a long one is
replaced once it is past that. After a burst (a package manager's parallel downloads) the pool
keeps up to :data:`SURPLUS_MAX` sockets beyond ``size`` that came back, for
:data:`SURPLUS_IDLE` seconds: the next burst takes those instead of opening its own. Sockets
are taken newest first, so the surplus that is not needed is the oldest, and is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

from .codec import KEEPALIVE
from .relay_handshake import (
    DRAINING_RETRIES,
    DRAINING_RETRY_DELAY,
    LinkConfig,
    open_upgraded_retrying,
)
from .tasks import TaskSet
from .tunnel.driver import CLOSE_GRACE, OpenFailed
from .tunnel.links import WsLink
from .tunnel.wsframes import Close, Event, Ping, Pong

__all__ = [
    "DRAINING_RETRIES",
    "DRAINING_RETRY_DELAY",
    "LinkConfig",
    "WsPool",
    "open_ws",
]

log = logging.getLogger("upstreamproxy.relay")

#: Refill back-off after a failed pre-open (doubling up to the maximum).
POOL_BACKOFF: Final = 1.0
POOL_BACKOFF_MAX: Final = 30.0
#: A reusable socket handed out this recently counts toward the pool's size (it is likely
#: to come back); after that the pool opens a replacement.
REUSE_HOLD: Final = 1.0
#: Sockets back from tunnels kept beyond the pool's size (after a burst), and for how long.
SURPLUS_MAX: Final = 256
SURPLUS_IDLE: Final = 5.0


async def open_ws(cfg: LinkConfig, *, preopened: bool = False) -> WsLink:
    """Upgrade one WebSocket to the egress (natively: :mod:`.relay_handshake`, trying again
    when the egress that answered is draining) and hand its transport to a tunnel link."""
    # Taken over at once (no await in between): reading need not pause for the hand-over.
    upgraded = await open_upgraded_retrying(cfg, preopened=preopened, keep_reading=True)
    return WsLink.attach(
        upgraded.transport, upgraded.leftover, client=True, eof=upgraded.eof, reuse=upgraded.reuse
    )


class _Idle:
    """The owner of a pre-opened socket while it waits in the pool: keeps it alive (keepalive
    chunks, pings) and notices when it dies."""

    def __init__(self, pool: WsPool, link: WsLink) -> None:
        self.pool = pool
        self.link = link
        self._loop = asyncio.get_running_loop()
        self._ping_sent: float | None = None
        self._last_heard = self.since = self._loop.time()
        self._next_keepalive = self._last_heard + pool._keepalive
        self._timer: asyncio.TimerHandle | None = None
        link.set_owner(self)
        if self.link.usable:
            link.resume_reading()  # (a socket back from a tunnel comes paused)
            self._arm()

    def _arm(self) -> None:
        pool, now = self.pool, self._loop.time()
        times = [self._next_keepalive]
        if pool._ping_interval is not None:
            if self._ping_sent is not None:
                times.append(self._ping_sent + pool._ping_timeout)
            else:
                times.append(self._last_heard + pool._ping_interval)
        self._timer = self._loop.call_at(max(min(times), now), self._tick)

    def _tick(self) -> None:
        pool, now = self.pool, self._loop.time()
        if self._ping_sent is not None and now >= self._ping_sent + pool._ping_timeout:
            return self.drop()
        if now >= self._next_keepalive:
            self._next_keepalive = now + pool._keepalive
            self.link.send_message(KEEPALIVE)
        interval = pool._ping_interval
        if interval is not None and self._ping_sent is None and now >= self._last_heard + interval:
            self._ping_sent = now
            self.link.send_ping()
        self._arm()

    def release(self) -> WsLink:
        """Hand the socket out: this owner stops looking after it."""
        if self._timer is not None:
            self._timer.cancel()
        self.link.set_owner(None)
        return self.link

    def drop(self) -> None:
        self.release()
        self.link.abort()
        self.pool._dropped(self)

    # WsOwner

    def ws_events(self, link: WsLink, events: list[Event]) -> None:
        self._last_heard = self._loop.time()
        self._ping_sent = None
        for event in events:
            # The egress sends nothing unasked before a CONNECT: anything but a ping or a
            # pong (its close when draining, say) retires the socket.
            if not isinstance(event, Ping | Pong):
                if isinstance(event, Close) and not link.ended:  # answered; it closes itself
                    self.release()
                    self.pool._dropped(self)
                else:
                    self.drop()
                return

    def ws_writable(self, link: WsLink) -> None:
        pass

    def ws_lost(self, link: WsLink) -> None:
        self.drop()


class WsPool:
    """Up to ``size`` pre-opened WebSockets; :meth:`take` hands one out (or opens one)."""

    def __init__(
        self,
        size: int,
        opener: Callable[[], Awaitable[WsLink]],
        *,
        keepalive: float,
        ping_interval: float | None,
        ping_timeout: float,
    ) -> None:
        self.size = size
        self._open = opener
        self._keepalive = keepalive
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._idle: deque[_Idle] = deque()
        self._waiters: deque[asyncio.Future[WsLink | None]] = deque()
        self._opening = 0  # open attempts, including ones backing off
        self._connecting = 0  # open attempts actually under way
        self._tasks = TaskSet()
        self._backoff = 0.0
        #: Set when a pre-open works again: wakes those sleeping out the back-off.
        self._recovered: asyncio.Event | None = None
        self._started = False
        self._closed = False
        #: Reusable sockets handed out, and when: young ones count toward ``size``.
        self._out: dict[WsLink, float] = {}
        self._hold_timer: asyncio.TimerHandle | None = None
        self._surplus_timer: asyncio.TimerHandle | None = None
        #: Sockets handed out, replaced after dying before an answer, opened on demand, and
        #: back from a tunnel (reuse).
        self.stats = {"taken": 0, "replaced": 0, "missed": 0, "reused": 0}

    def __len__(self) -> int:
        return len(self._idle)

    def start(self) -> None:
        self._started = True
        self._refill()

    def take_ready(self) -> WsLink | None:
        """A ready socket at once, or None (:meth:`take` then waits for or opens one)."""
        while self._idle:
            # The newest, where sockets come back (reuse): what is not needed ages at the other
            # end. Without reuse the oldest, before a server's own wait for its CONNECT ends.
            idle = self._idle.pop() if self._idle[-1].link.reuse else self._idle.popleft()
            link = idle.release()
            if link.usable:
                self._handed_out(link)
                self._refill()
                return link
            link.abort()
            self._refill()
        return None

    def _handed_out(self, link: WsLink) -> None:
        self.stats["taken"] += 1
        self.adopt(link)
        if link.reuse:
            self._out[link] = asyncio.get_running_loop().time()

    def adopt(self, link: WsLink) -> None:
        """A socket opened for a tunnel comes back here when the tunnel ends (reuse)."""
        if link.reuse:
            link.on_reusable = self.give_back

    def give_back(self, link: WsLink) -> None:
        """A socket whose tunnel ended with the end-of-tunnel exchange: kept while there is
        room, closed otherwise."""
        self._out.pop(link, None)
        self._keep(link, reused=True)

    def _keep(self, link: WsLink, *, reused: bool) -> None:
        """A socket free for a CONNECT: to one waiting, else into the pool while there is room
        (beyond ``size`` for :data:`SURPLUS_IDLE`), else closed."""
        # A socket just opened goes to a waiting CONNECT even if it already died (a server
        # that closes right after the upgrade): that CONNECT then gets the real answer.
        while self._waiters and (link.usable or not reused) and not self._closed:
            waiter = self._waiters.popleft()  # a CONNECT waiting for a socket being opened
            if not waiter.done():
                waiter.set_result(link)
                return
        room = self.size + SURPLUS_MAX if self.size else 0
        if self._closed or len(self._idle) >= room or not link.usable:
            link.retire()
            return
        if reused:
            self.stats["reused"] += 1
        idle = _Idle(self, link)
        if not link.usable:
            idle.drop()
            return
        self._idle.append(idle)
        if len(self._idle) > self.size and self._surplus_timer is None:
            self._surplus_timer = asyncio.get_running_loop().call_at(
                self._idle[0].since + SURPLUS_IDLE, self._trim_surplus
            )

    def _trim_surplus(self) -> None:
        """Close the sockets beyond ``size`` that waited :data:`SURPLUS_IDLE` (oldest first)."""
        self._surplus_timer = None
        now = asyncio.get_running_loop().time()
        while len(self._idle) > self.size and self._idle[0].since + SURPLUS_IDLE <= now:
            self._idle.popleft().release().retire()
        if len(self._idle) > self.size:
            self._surplus_timer = asyncio.get_running_loop().call_at(
                self._idle[0].since + SURPLUS_IDLE, self._trim_surplus
            )

    async def take(self) -> tuple[WsLink, bool]:
        """A ready socket (``pooled`` True) or, if none is ready, a freshly opened one.

        With a pool, the socket this CONNECT waits for is opened by the pool: if its client
        leaves meanwhile, the socket (which carried nothing) is kept for the next CONNECT
        instead of being closed mid-upgrade."""
        ready = self.take_ready()
        if ready is not None:
            return ready, True
        pooled_open = self.size > 0 and not self._closed and not self._backoff
        if pooled_open and self._opening <= len(self._waiters):
            self.stats["missed"] += 1
            self._opening += 1
            self._tasks.spawn(self._open_one(), name="ws-pool-open")
        if self._connecting > len(self._waiters) or pooled_open:
            # One is on its way: it arrives sooner than a fresh one would, and does not
            # compete with it for the session's limit.
            waiter: asyncio.Future[WsLink | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                link_or_none = await waiter
            except asyncio.CancelledError:
                handed = waiter.result() if waiter.done() and not waiter.cancelled() else None
                if handed is not None:  # handed over just as this CONNECT gave up
                    self._keep(handed, reused=False)
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if link_or_none is not None:
                self._handed_out(link_or_none)
                return link_or_none, True
        elif self.size > 0:
            self.stats["missed"] += 1
        # No pool, or its open failed (the waiter got None): this CONNECT opens its own,
        # and gets the real answer if that fails too.
        link = await self._open()
        self.adopt(link)
        return link, False

    async def close(self) -> None:
        self._closed = True
        for timer in (self._hold_timer, self._surplus_timer):
            if timer is not None:
                timer.cancel()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        await self._tasks.cancel_all(grace=CLOSE_GRACE * 2)
        while self._idle:
            self._idle.popleft().release().abort()

    def _dropped(self, idle: _Idle) -> None:
        if idle in self._idle:
            self._idle.remove(idle)
            self.stats["replaced"] += 1
            self._refill()

    def _refill(self) -> None:
        """Start opening sockets until ready and opening ones make ``size`` (no task waits
        to do it: whatever takes, drops or finishes opening a socket calls this)."""
        if not self._started or self._closed:
            return
        young = 0
        if self._out:
            now = asyncio.get_running_loop().time()
            for link, at in list(self._out.items()):
                if link.lost or not link.reuse or now >= at + REUSE_HOLD:
                    del self._out[link]
                else:
                    young += 1
            if self._out and self._hold_timer is None:  # look again when the oldest is old
                oldest = min(self._out.values())
                self._hold_timer = asyncio.get_running_loop().call_at(
                    oldest + REUSE_HOLD, self._hold_over
                )
        while len(self._idle) + self._opening + young < self.size:
            self._opening += 1
            self._tasks.spawn(self._open_one(), name="ws-pool-open")

    async def _sleep_backoff(self) -> None:
        """Wait out the back-off, or until a pre-open works again (which ends it for all)."""
        if self._recovered is None:
            self._recovered = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._recovered.wait(), self._backoff)

    def _hold_over(self) -> None:
        self._hold_timer = None
        self._refill()

    async def _open_one(self) -> None:
        try:
            if self._backoff:
                await self._sleep_backoff()
                # Woken early (the egress is back): open only if still wanted - a burst of
                # CONNECTs may have left many here, more than the pool and its waiters need.
                if self._closed or len(self._idle) + self._connecting >= self.size + sum(
                    not waiter.done() for waiter in self._waiters
                ):
                    return
            self._connecting += 1
            try:
                link = await self._open()
            except OpenFailed as exc:
                if not self._backoff:  # one line per failure streak, not one per attempt
                    log.warning("pre-opening a WebSocket failed: %s", exc.reason)
                self._backoff = min(max(self._backoff * 2, POOL_BACKOFF), POOL_BACKOFF_MAX)
                # That CONNECT opens its own and gets the real answer; so does every one that
                # no open under way is left for (the pre-opens started for them sleep now).
                waiting = [waiter for waiter in self._waiters if not waiter.done()]
                under_way = self._connecting - 1  # (this one still counts until finally)
                for waiter in waiting[: max(1, len(waiting) - under_way)]:
                    self._waiters.remove(waiter)
                    waiter.set_result(None)
                return
            finally:
                self._connecting -= 1
            if self._backoff:
                log.info("pre-opening WebSockets works again")
                if self._recovered is not None:
                    self._recovered.set()
                    self._recovered = None
            self._backoff = 0.0
            if self._closed:
                link.abort()
                return
            self._keep(link, reused=False)
        finally:
            self._opening -= 1
            self._refill()
