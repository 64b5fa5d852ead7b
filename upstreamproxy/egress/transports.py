"""A connected socket made a transport at once, with the protocol that will use it.

``loop.connect_accepted_socket`` and ``loop.create_connection(sock=...)`` are coroutines: each
new connection paid for a task (the listener's), a waiter future and a wake-up before its
protocol saw a byte - a good part of the egress's CPU per tunnel. On asyncio's selector event
loops (the only ones the egress runs on: no uvloop) the transport can be made synchronously,
as both coroutines do internally; on any other loop :func:`socket_transport` says so
(``None``) and the caller awaits the public coroutine instead.

Plain TCP only: a TLS listener keeps ``connect_accepted_socket`` (its handshake is awaited
with a deadline).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import cast

from ..tunnel.links import Parked


def socket_transport(
    sock: socket.socket, protocol: asyncio.BaseProtocol
) -> asyncio.Transport | None:
    """A transport over the connected ``sock`` with ``protocol`` (its ``connection_made``
    runs soon, as asyncio's own path does), or None when the loop cannot make one directly."""
    loop = asyncio.get_running_loop()
    make: Callable[..., object] | None = getattr(loop, "_make_socket_transport", None)
    if make is None or not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        return None
    sock.setblocking(False)
    return cast(asyncio.Transport, make(sock, protocol))


async def parked_transport(sock: socket.socket) -> asyncio.Transport:
    """The dialled ``sock`` as a transport whose protocol is a :class:`Parked` (for
    :meth:`~upstreamproxy.tunnel.links.LocalLink.take_transport`). Closes ``sock`` on failure."""
    try:
        transport = socket_transport(sock, Parked())
        if transport is None:
            transport, _ = await asyncio.get_running_loop().create_connection(Parked, sock=sock)
    except BaseException:
        sock.close()
        raise
    return transport
