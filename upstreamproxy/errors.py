"""The exception tree of upstreamproxy.

UpstreamProxyError
├── ProtocolError              the peer broke the wire contract (remote misbehaviour)
│   ├── ChunkError             an UpstreamProxyChunk message could not be decoded
│   └── HeadError              a CONNECT head or in-tunnel status head is malformed;
│                              carries the HTTP status to answer with (400, 405, 431, ...)
├── ConfigError                invalid configuration; names the offending field
└── AuthError                  a token or credential was refused (never carries the secret)
"""

from __future__ import annotations


class UpstreamProxyError(Exception):
    """Base class of every error raised on purpose by upstreamproxy."""


class ProtocolError(UpstreamProxyError):
    """The remote side sent something the protocol does not allow."""


class ChunkError(ProtocolError):
    """A binary WebSocket message is not a well-formed UpstreamProxyChunk.

    ``code`` is a stable, machine-readable name (the ``error`` field of the golden
    vectors in ``protocol/vectors.json``).
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class HeadError(ProtocolError):
    """An HTTP head (CONNECT request or tunnel status) is malformed or refused.

    ``status`` is the HTTP status to answer with; ``reason`` a short, safe explanation
    (never echoes credentials).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


class ConfigError(UpstreamProxyError):
    """Configuration is invalid. ``field`` names the offending setting."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class AuthError(UpstreamProxyError):
    """A credential was refused. ``reason`` is machine-readable and never includes the secret."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
