"""Pure pieces of the WebSocket opening handshake (RFC 6455 §4), shared by relay and egress.

No I/O: the relay's client handshake and the egress's upgrade build and check heads with
these. Everything after the handshake (frames) lives in :mod:`upstreamproxy.tunnel.wsframes`.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Final

#: RFC 6455 §1.3: appended to the client's key before hashing.
GUID: Final = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
VERSION: Final = "13"


def new_key() -> str:
    """A fresh ``Sec-WebSocket-Key``: 16 random bytes, base64."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value the server answers ``key`` with."""
    digest = hashlib.sha1((key + GUID).encode("ascii"), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode("ascii")
