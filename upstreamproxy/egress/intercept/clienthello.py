"""Reading the ALPN offer out of a TLS ClientHello, without I/O.

Python's :mod:`ssl` answers a client whose ALPN list shares nothing with ours by completing
the handshake without ALPN; RFC 7301 §3.2 requires the ``no_application_protocol`` alert
instead. The engine therefore peeks at the ClientHello before OpenSSL sees it and refuses
such a client itself. Only what is needed is parsed: record layer, handshake header, the
fixed ClientHello fields, and the extension list.
"""

from __future__ import annotations

from typing import Final

#: Bytes the engine will look at before giving up and letting OpenSSL decide.
MAX_CLIENT_HELLO: Final = 16 * 1024 + 5

#: A fatal ``no_application_protocol`` (120) alert record.
NO_APPLICATION_PROTOCOL_ALERT: Final = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 120])

_HANDSHAKE: Final = 0x16
_CLIENT_HELLO: Final = 0x01
_ALPN_EXTENSION: Final = 16


class NeedMore(Exception):
    """The ClientHello is not complete yet in the bytes given."""


class NotClientHello(Exception):
    """The bytes are not a ClientHello this parser understands (OpenSSL will judge)."""


def _handshake_bytes(data: bytes) -> bytes:
    """The handshake message bytes carried by the leading handshake records."""
    out = bytearray()
    offset = 0
    while True:
        if len(data) < offset + 5:
            raise NeedMore
        if data[offset] != _HANDSHAKE:
            raise NotClientHello("not a handshake record")
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        if len(data) < offset + 5 + length:
            raise NeedMore
        out += data[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if len(out) >= 4:
            if out[0] != _CLIENT_HELLO:
                raise NotClientHello("not a ClientHello")
            if len(out) >= 4 + int.from_bytes(out[1:4], "big"):
                return bytes(out[4 : 4 + int.from_bytes(out[1:4], "big")])


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise NotClientHello("truncated ClientHello")
        piece = self.data[self.offset : self.offset + size]
        self.offset += size
        return piece

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> bytes:
        return self.take(self.number(length_size))

    @property
    def done(self) -> bool:
        return self.offset >= len(self.data)


def offered_alpn(data: bytes) -> list[bytes] | None:
    """The ALPN protocol names the ClientHello at the start of ``data`` offers.

    None when it has no ALPN extension. Raises :class:`NeedMore` when ``data`` stops before
    the end of the ClientHello, :class:`NotClientHello` when it is something else.
    """
    body = _Reader(_handshake_bytes(data))
    body.take(2 + 32)  # legacy_version, random
    body.vector(1)  # legacy_session_id
    body.vector(2)  # cipher_suites
    body.vector(1)  # legacy_compression_methods
    if body.done:
        return None  # no extensions at all
    extensions = _Reader(body.vector(2))
    while not extensions.done:
        kind = extensions.number(2)
        payload = extensions.vector(2)
        if kind == _ALPN_EXTENSION:
            names = _Reader(_Reader(payload).vector(2))
            offered = []
            while not names.done:
                offered.append(names.vector(1))
            return offered
    return None
