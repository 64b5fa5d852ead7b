"""Pure codec for the tunnel's wire message (no I/O, no clocks, no environment).

Every binary WebSocket message carries exactly one protobuf message::

    message UpstreamProxyChunk { bytes data = 1; }

encoded as the tag byte ``0x0a`` (field 1, wire type 2), the payload length as a base-128
varint (least-significant group first, at most 5 bytes) and the payload. The contract, with
golden vectors, lives in ``protocol/``; this module is its Python implementation.

Decoding is strict: anything but exactly one field-1 record raises :class:`ChunkError` with a
stable ``code``. Two liberties match the protobuf runtime, so a peer using a generated
encoder interoperates: a zero-length message is an empty chunk (proto3 omits an empty
``bytes`` field), and non-minimal varints are accepted (within the 5-byte limit).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from .errors import ChunkError

TAG: Final = 0x0A
MAX_VARINT_BYTES: Final = 5
#: Largest payload the relay puts in one outbound chunk (a fronting proxy's buffer cap).
MAX_CHUNK_PAYLOAD: Final = 512 * 1024
#: Largest encoded message: tag + 5-byte varint + payload.
MAX_MESSAGE_BYTES: Final = 1 + MAX_VARINT_BYTES + MAX_CHUNK_PAYLOAD
#: The empty chunk sent as a keepalive.
KEEPALIVE: Final = b"\x0a\x00"
#: The tunnel-reuse extension's end-of-tunnel message (SPEC §11): field 2 (``bool end``) set.
#: Sent and understood only on a WebSocket whose upgrade negotiated reuse; a CCR peer never
#: sees it (to a plain decoder it is a wrong tag).
END_TAG: Final = 0x10
END_OF_TUNNEL: Final = b"\x10\x01"

# Stable error codes (mirrored in protocol/vectors.json).
WRONG_TAG: Final = "wrong-tag"
TRUNCATED_VARINT: Final = "truncated-varint"
OVERLONG_VARINT: Final = "overlong-varint"
LENGTH_EXCEEDS_BUFFER: Final = "length-exceeds-buffer"
TRAILING_BYTES: Final = "trailing-bytes"
PAYLOAD_TOO_LARGE: Final = "payload-too-large"
ERROR_CODES: Final = frozenset(
    {
        WRONG_TAG,
        TRUNCATED_VARINT,
        OVERLONG_VARINT,
        LENGTH_EXCEEDS_BUFFER,
        TRAILING_BYTES,
        PAYLOAD_TOO_LARGE,
    }
)


def encode_varint(value: int) -> bytes:
    """Encode a non-negative integer below 2**35 as a base-128 varint."""
    if value < 0 or value >= 1 << (7 * MAX_VARINT_BYTES):
        raise ValueError(f"varint out of range: {value}")
    out = bytearray()
    while True:
        group = value & 0x7F
        value >>= 7
        if value:
            out.append(group | 0x80)
        else:
            out.append(group)
            return bytes(out)


def encode_chunk(data: bytes | bytearray | memoryview) -> bytes:
    """Encode one chunk. Payloads over :data:`MAX_CHUNK_PAYLOAD` are refused: split first."""
    # nbytes, not len(): a memoryview over a multi-byte format counts items, not bytes.
    with memoryview(data) as view:
        size = view.nbytes
    if size > MAX_CHUNK_PAYLOAD:
        raise ValueError(f"chunk payload of {size} bytes exceeds {MAX_CHUNK_PAYLOAD}")
    return bytes((TAG,)) + encode_varint(size) + bytes(data)


def decode_chunk(
    message: bytes | bytearray | memoryview, *, max_payload: int = MAX_CHUNK_PAYLOAD
) -> bytes:
    """Decode one message into its payload, or raise :class:`ChunkError`."""
    # Released on every exit: a view still alive in a ChunkError's traceback would pin a
    # caller's bytearray ("BufferError: Existing exports") while it handles the error.
    with memoryview(message) as raw, raw.cast("B") as view:
        return _decode(view, max_payload)


def _decode(view: memoryview, max_payload: int) -> bytes:
    total = len(view)
    if total == 0:
        return b""
    if view[0] != TAG:
        raise ChunkError(WRONG_TAG, f"expected tag 0x0a, got 0x{view[0]:02x}")
    length = 0
    pos = 1
    for shift in range(0, 7 * MAX_VARINT_BYTES, 7):
        if pos >= total:
            raise ChunkError(TRUNCATED_VARINT, "message ends inside the length varint")
        byte = view[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise ChunkError(OVERLONG_VARINT, f"length varint longer than {MAX_VARINT_BYTES} bytes")
    if length > max_payload:
        raise ChunkError(PAYLOAD_TOO_LARGE, f"payload of {length} bytes exceeds {max_payload}")
    end = pos + length
    if end > total:
        raise ChunkError(
            LENGTH_EXCEEDS_BUFFER, f"length {length} but only {total - pos} bytes follow"
        )
    if end < total:
        raise ChunkError(TRAILING_BYTES, f"{total - end} bytes after the payload")
    return bytes(view[pos:end])


def split_payload(
    data: bytes | bytearray | memoryview, limit: int = MAX_CHUNK_PAYLOAD
) -> Iterator[bytes]:
    """Yield encoded chunks carrying ``data`` in order, each payload at most ``limit`` bytes."""
    if limit <= 0 or limit > MAX_CHUNK_PAYLOAD:
        raise ValueError(f"limit must be in 1..{MAX_CHUNK_PAYLOAD}")
    with memoryview(data) as raw, raw.cast("B") as view:
        for start in range(0, len(view), limit):
            yield encode_chunk(view[start : start + limit])
