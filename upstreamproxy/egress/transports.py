"""A dialled upstream socket as a bare transport the tunnel's link takes over (no streams).

Made at once where the loop allows (:func:`~upstreamproxy.acceptor.socket_transport`), through
``loop.create_connection(sock=...)`` elsewhere.
"""

from __future__ import annotations

import asyncio
import socket

from ..acceptor import socket_transport
from ..tunnel.links import Parked

__all__ = ["parked_transport", "socket_transport"]


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
