"""The tunnel's WebSocket byte stream, read and written without I/O (RFC 6455 §5, SPEC §3).

After the upgrade, each end of a tunnel WebSocket only ever carries binary messages that are
each one ``UpstreamProxyChunk`` (:mod:`upstreamproxy.codec`), plus control frames. This
module turns the raw byte stream into what the tunnel needs - chunk *payload* bytes, pings,
pongs, a close - and builds the frames to send. It is the zero-copy replacement for a
general WebSocket library on the data path:

* :class:`FrameReader` parses incrementally. For unmasked input (the relay reading the
  egress) the payload it reports is a ``memoryview`` slice of the fed buffer - no copy; the
  caller must use it before it feeds again. Masked input (the egress reading the relay) is
  unmasked into new bytes, as it must be.
* Payloads stream: a 512 KiB chunk is reported in the pieces that arrived, not reassembled.
  For an unfragmented message (the only kind the relay and CCR send) the chunk header is
  checked against the frame's length *before* any payload is reported, so a malformed chunk
  yields an error and no data. A fragmented message's length is known only at its end: its
  length mismatch is reported there (after the payload pieces before it - bytes from the
  authenticated peer, ending the tunnel all the same).
* Anything the tunnel protocol does not allow is a :class:`WsError` with the close code to
  send: RSV bits (no extension is negotiated), unknown opcodes, a wrong mask bit, oversized
  control frames or messages, a continuation out of place, an invalid close payload.
  Text messages are reported as :class:`Text` (the tunnel core refuses them).

Writing: :func:`chunk_header` frames a chunk payload (WebSocket header and the chunk's tag
and length) so a sender can put it in front of the payload it already has; :func:`frame`
builds whole control frames; masking for the client direction is done here too.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..codec import (
    END_TAG,
    LENGTH_EXCEEDS_BUFFER,
    MAX_CHUNK_PAYLOAD,
    MAX_MESSAGE_BYTES,
    MAX_VARINT_BYTES,
    OVERLONG_VARINT,
    PAYLOAD_TOO_LARGE,
    TAG,
    TRAILING_BYTES,
    WRONG_TAG,
    encode_varint,
)
from ..errors import ChunkError
from .payload import Piped

_c_apply_mask: Callable[[bytes | bytearray | memoryview, bytes], bytes] | None
try:  # websockets' C helper; a pure fallback keeps this module dependency-free
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover - websockets is installed with the package
    _c_apply_mask = None

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
_DATA_OPS: Final = frozenset({OP_CONT, OP_TEXT, OP_BINARY})
_CONTROL_OPS: Final = frozenset({OP_CLOSE, OP_PING, OP_PONG})

CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_INVALID_DATA: Final = 1007
CLOSE_TOO_BIG: Final = 1009
#: Close codes a peer may send (RFC 6455 §7.4.1, §7.4.2); 1005/1006/1015 never go on the wire.
_VALID_CODES: Final = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)
MAX_CONTROL_PAYLOAD: Final = 125
#: The largest WebSocket header: 2 bytes, a 64-bit length, a mask key.
MAX_HEADER: Final = 14
#: The largest chunk prefix: the tag and a 5-byte varint.
MAX_CHUNK_PREFIX: Final = 1 + MAX_VARINT_BYTES
#: Room a sender keeps in front of a payload for :func:`chunk_header`.
HEADROOM: Final = MAX_HEADER + MAX_CHUNK_PREFIX


# -- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The peer's close frame: ``code`` None when it sent none (1005)."""

    code: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class End:
    """The peer's end-of-tunnel message (tunnel reuse, SPEC §11): its side of the tunnel is
    done; the WebSocket stays open. Reported only by a reader made with ``reuse``."""


@dataclass(frozen=True, slots=True)
class Text:
    """A text message began: not part of the tunnel protocol (the core closes with 1002)."""


@dataclass(frozen=True, slots=True)
class WsError:
    """The peer broke RFC 6455 (or our limits): close with ``code``; nothing more is read."""

    code: int
    reason: str


#: What :meth:`FrameReader.feed` reports, in order: chunk payload bytes (a ``memoryview``
#: valid until the next ``feed``, or ``bytes``; ``b""`` is a whole empty chunk - a
#: keepalive; :class:`Piped` from :meth:`FrameReader.skip`), a
#: :class:`~upstreamproxy.errors.ChunkError` (a malformed chunk; nothing more is read), or a
#: control/terminal event.
Event = memoryview | bytes | Piped | ChunkError | Ping | Pong | Close | End | Text | WsError


# -- reading ---------------------------------------------------------------------------------

# Reader phases.
_HEADER = 0
_PAYLOAD = 1
_DONE = 2


class FrameReader:
    """Incremental parser of one side's incoming frames; see the module docstring."""

    __slots__ = (
        "_chunk_left",
        "_control",
        "_ending",
        "_fin",
        "_head",
        "_in_message",
        "_left",
        "_mask",
        "_mask_pos",
        "_masked",
        "_max_message",
        "_message_size",
        "_opcode",
        "_pending_total",
        "_phase",
        "_prefix",
        "reuse",
    )

    def __init__(
        self, *, masked: bool, max_message: int = MAX_MESSAGE_BYTES, reuse: bool = False
    ) -> None:
        #: Whether frames must be masked (the server reading a client) or must not be.
        self._masked = masked
        self._max_message = max_message
        self._phase = _HEADER
        self._head = bytearray()  # a frame header split across feeds
        self._opcode = 0
        self._fin = True
        self._left = 0  # payload bytes of the current frame still to come
        self._mask = b""
        self._mask_pos = 0
        self._control = bytearray()  # a control frame's payload, assembled
        self._in_message = False  # a binary message is in progress (fragments may follow)
        self._message_size = 0
        self._prefix = bytearray()  # the chunk's tag and varint, until complete
        self._chunk_left = -1  # chunk payload bytes still expected; -1: prefix not parsed
        #: The whole message's size when it is one frame (checked against the chunk's
        #: length before any payload is reported); -1 for a fragmented message.
        self._pending_total = -1
        #: Tunnel reuse was negotiated: an end-of-tunnel message is an :class:`End`, not a
        #: wrong tag.
        self.reuse = reuse
        self._ending = False  # the message being read is an end-of-tunnel message

    @property
    def done(self) -> bool:
        """A close, an error or a text message was reported: nothing more will be."""
        return self._phase == _DONE

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse ``data``; the events it completes, in order."""
        events: list[Event] = []
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        pos, end = 0, len(view)
        while pos < end and self._phase != _DONE:
            if self._phase == _HEADER:
                pos = self._read_header(view, pos, end, events)
            else:
                take = min(self._left, end - pos)
                piece = view[pos : pos + take]
                pos += take
                self._left -= take
                if self._mask:
                    piece = memoryview(self._unmask(piece))
                self._payload(piece, events)
                if self._left == 0 and self._phase != _DONE:
                    self._frame_done(events)
        return events

    # -- payloads that bypass the reader (splice) -------------------------------------------

    def payload_left(self) -> int:
        """How many bytes coming next are chunk payload of an unmasked data frame whose
        header and chunk prefix were already read and checked: the adapter may move them
        without feeding them (:meth:`skip`). 0 when the next byte must be fed."""
        if (
            self._phase != _PAYLOAD
            or self._mask
            or self._opcode in _CONTROL_OPS
            or self._chunk_left <= 0
        ):
            return 0
        return min(self._left, self._chunk_left)

    def skip(self, size: int) -> list[Event]:
        """``size`` bytes (at most :meth:`payload_left`) went past without being fed: they
        are reported as :class:`Piped`, with what ending the frame reports."""
        if not 0 < size <= self.payload_left():
            raise ValueError(f"cannot skip {size} bytes here ({self.payload_left()} may be)")
        self._left -= size
        self._chunk_left -= size
        events: list[Event] = [Piped(size)]
        if self._left == 0:
            self._frame_done(events)
        return events

    def head_size(self, peek: bytes | bytearray | memoryview) -> int:
        """At a frame boundary, given the bytes that come next (``MSG_PEEK``): how many of
        them make up the header and chunk prefix of a final binary frame - to be fed, after
        which its payload may be skipped - or 0 when that cannot be told from ``peek`` or the
        frame is of another kind (the adapter then reads as usual)."""
        if self._masked or self._phase != _HEADER or self._head or len(peek) < 2:
            return 0  # (a masked payload is never skipped: it must be unmasked)
        if peek[0] != 0x80 | OP_BINARY or peek[1] & 0x80 or self._in_message:
            return 0
        end = self._header_size(peek)
        if len(peek) <= end or peek[end] != TAG:
            return 0
        for at in range(end + 1, min(len(peek), end + MAX_CHUNK_PREFIX)):
            if not peek[at] & 0x80:
                return at + 1
        return 0

    # -- frame headers -----------------------------------------------------------------------

    def _read_header(self, view: memoryview, pos: int, end: int, events: list[Event]) -> int:
        head = self._head
        if head:  # continue a header split across feeds
            need = self._header_size(head)
            while len(head) < need and pos < end:
                head.append(view[pos])
                pos += 1
                need = self._header_size(head)
            if len(head) < need:
                return pos
            self._start_frame(bytes(head), events)
            head.clear()
            return pos
        need = self._header_size(view[pos : pos + 2])
        if end - pos >= need:
            self._start_frame(view[pos : pos + need], events)
            return pos + need
        head += view[pos:end]
        return end

    @staticmethod
    def _header_size(head: bytes | bytearray | memoryview) -> int:
        if len(head) < 2:
            return 2
        second = head[1]
        size = 2 + (4 if second & 0x80 else 0)
        length = second & 0x7F
        if length == 126:
            size += 2
        elif length == 127:
            size += 8
        return size

    def _start_frame(self, head: bytes | memoryview, events: list[Event]) -> None:
        first, second = head[0], head[1]
        fin = bool(first & 0x80)
        opcode = first & 0x0F
        if first & 0x70:
            self._fail(events, CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension)")
            return
        if bool(second & 0x80) is not self._masked:
            wanted = "masked" if self._masked else "unmasked"
            self._fail(events, CLOSE_PROTOCOL_ERROR, f"frame must be {wanted}")
            return
        length = second & 0x7F
        at = 2
        if length == 126:
            length = struct.unpack_from("!H", head, 2)[0]
            at = 4
        elif length == 127:
            length = struct.unpack_from("!Q", head, 2)[0]
            at = 10
            if length >> 63:
                self._fail(events, CLOSE_PROTOCOL_ERROR, "frame length over 2**63")
                return
        self._mask = bytes(head[at : at + 4]) if self._masked else b""
        self._mask_pos = 0
        if opcode in _CONTROL_OPS:
            if not fin:
                self._fail(events, CLOSE_PROTOCOL_ERROR, "fragmented control frame")
                return
            if length > MAX_CONTROL_PAYLOAD:
                self._fail(events, CLOSE_PROTOCOL_ERROR, "control frame over 125 bytes")
                return
            self._control.clear()
        elif opcode in _DATA_OPS:
            if opcode == OP_CONT and not self._in_message:
                self._fail(events, CLOSE_PROTOCOL_ERROR, "continuation without a message")
                return
            if opcode != OP_CONT and self._in_message:
                self._fail(events, CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
                return
            if opcode == OP_TEXT:
                events.append(Text())
                self._phase = _DONE
                return None
            if opcode == OP_BINARY:
                self._in_message = True
                self._message_size = 0
                self._prefix.clear()
                self._chunk_left = -1
                self._pending_total = length if fin else -1
            self._message_size += length
            if self._message_size > self._max_message:
                self._fail(events, CLOSE_TOO_BIG, f"message over {self._max_message} bytes")
                return
        else:
            self._fail(events, CLOSE_PROTOCOL_ERROR, f"unknown opcode 0x{opcode:x}")
            return
        self._opcode, self._fin, self._left = opcode, fin, length
        self._phase = _PAYLOAD
        if length == 0:
            self._frame_done(events)
        return None

    # -- payloads ----------------------------------------------------------------------------

    def _payload(self, piece: memoryview, events: list[Event]) -> None:
        if self._opcode in _CONTROL_OPS:
            self._control += piece
            return
        if self._chunk_left < 0:  # the chunk's tag and length first
            piece = self._read_prefix(piece, events)
            if self._chunk_left < 0 or self._phase == _DONE:
                return
        if not piece:
            return
        if len(piece) > self._chunk_left:
            self._chunk_error(events, TRAILING_BYTES, "bytes after the chunk payload")
            return
        self._chunk_left -= len(piece)
        events.append(piece)

    def _read_prefix(self, piece: memoryview, events: list[Event]) -> memoryview:
        prefix = self._prefix
        used = 0
        for byte in piece[: MAX_CHUNK_PREFIX - len(prefix)]:
            prefix.append(byte)
            used += 1
            if len(prefix) == 1:
                if byte == END_TAG and self.reuse and self._pending_total == 2:
                    self._ending = True
                elif byte != TAG:
                    self._chunk_error(events, WRONG_TAG, f"expected tag 0x0a, got 0x{byte:02x}")
                    return piece[:0]
            elif not byte & 0x80:
                break
        else:
            if len(prefix) >= MAX_CHUNK_PREFIX:
                self._chunk_error(
                    events, OVERLONG_VARINT, f"length varint longer than {MAX_VARINT_BYTES} bytes"
                )
            return piece[:0]
        if self._ending:  # the whole message is END_OF_TUNNEL, or it is malformed
            if prefix[1] != 1:
                self._chunk_error(events, WRONG_TAG, "malformed end-of-tunnel message")
                return piece[:0]
            self._chunk_left = 0
            return piece[used:]
        length = 0
        for shift, byte in enumerate(prefix[1:]):
            length |= (byte & 0x7F) << (7 * shift)
        if length > MAX_CHUNK_PAYLOAD:
            self._chunk_error(
                events, PAYLOAD_TOO_LARGE, f"payload of {length} bytes exceeds {MAX_CHUNK_PAYLOAD}"
            )
            return piece[:0]
        total = self._pending_total
        if total >= 0 and len(prefix) + length != total:  # one frame: check it all up front
            if len(prefix) + length > total:
                self._chunk_error(
                    events,
                    LENGTH_EXCEEDS_BUFFER,
                    f"length {length} but only {total - len(prefix)} bytes follow",
                )
            else:
                self._chunk_error(
                    events,
                    TRAILING_BYTES,
                    f"{total - len(prefix) - length} bytes after the payload",
                )
            return piece[:0]
        self._chunk_left = length
        if length == 0 and total >= 0:
            events.append(b"")  # an empty chunk: a keepalive
        return piece[used:]

    def _frame_done(self, events: list[Event]) -> None:
        self._phase = _HEADER
        opcode = self._opcode
        if opcode in _CONTROL_OPS:
            payload = bytes(self._control)
            if opcode == OP_PING:
                events.append(Ping(payload))
            elif opcode == OP_PONG:
                events.append(Pong(payload))
            else:
                self._close(payload, events)
            return
        if not self._fin:
            return
        # The end of a binary message.
        self._in_message = False
        if self._ending:
            self._ending = False
            if self._chunk_left != 0:  # the value's varint never ended
                self._chunk_error(events, WRONG_TAG, "malformed end-of-tunnel message")
                return
            events.append(End())
        elif self._message_size == 0:
            events.append(b"")  # a zero-length message is an empty chunk (proto3)
        elif self._chunk_left < 0:
            self._chunk_error(events, "truncated-varint", "message ends inside the length varint")
        elif self._chunk_left > 0:
            self._chunk_error(
                events,
                LENGTH_EXCEEDS_BUFFER,
                f"message ends {self._chunk_left} bytes before its chunk payload",
            )
        elif self._pending_total < 0 and self._message_size == len(self._prefix):
            events.append(b"")  # a fragmented empty chunk
        self._chunk_left = -1

    def _close(self, payload: bytes, events: list[Event]) -> None:
        self._phase = _DONE
        if not payload:
            events.append(Close(None, ""))
            return
        if len(payload) == 1:
            events.append(WsError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload"))
            return
        code = int.from_bytes(payload[:2], "big")
        if code not in _VALID_CODES and not 3000 <= code <= 4999:
            events.append(WsError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}"))
            return
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            events.append(WsError(CLOSE_INVALID_DATA, "close reason is not UTF-8"))
            return
        events.append(Close(code, reason))

    def _unmask(self, piece: memoryview) -> bytes:
        at = self._mask_pos
        mask = self._mask[at:] + self._mask[:at] if at else self._mask
        self._mask_pos = (at + len(piece)) % 4
        return apply_mask(piece, mask)

    def _fail(self, events: list[Event], code: int, reason: str) -> None:
        self._phase = _DONE
        events.append(WsError(code, reason))

    def _chunk_error(self, events: list[Event], code: str, reason: str) -> None:
        self._phase = _DONE
        events.append(ChunkError(code, reason))


# -- writing ---------------------------------------------------------------------------------


def apply_mask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """``data`` XOR the 4-byte ``mask`` repeated (RFC 6455 §5.3)."""
    if _c_apply_mask is not None:
        return bytes(_c_apply_mask(data, mask))
    size = len(data)  # pragma: no cover - the C helper is always there
    key = int.from_bytes((mask * (size // 4 + 1))[:size], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(size, "big")


def frame_header(opcode: int, length: int, mask: bytes | None = None) -> bytes:
    """A final frame's header (with ``mask`` appended when given)."""
    first = 0x80 | opcode
    bit = 0x80 if mask is not None else 0
    if length < 126:
        head = bytes((first, bit | length))
    elif length < 1 << 16:
        head = struct.pack("!BBH", first, bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, bit | 127, length)
    return head + mask if mask is not None else head


def chunk_prefix(size: int) -> bytes:
    """The chunk's tag and length varint for a payload of ``size`` bytes."""
    if size < 0x80:
        return bytes((TAG, size))
    return bytes((TAG,)) + encode_varint(size)


def chunk_header(size: int) -> bytes:
    """Unmasked frame header and chunk prefix for a payload of ``size`` bytes (the server's
    direction): these bytes followed by the payload are one whole message."""
    prefix = chunk_prefix(size)
    return frame_header(OP_BINARY, len(prefix) + size) + prefix


#: Masking keys drawn from the OS at once (one ``getrandom`` per 1024 frames, not per frame).
MASK_POOL: Final = 4096
_masks = b""
_mask_at = 0


def new_mask() -> bytes:
    """A fresh, unpredictable 4-byte masking key (RFC 6455 §5.3), from a pooled draw."""
    global _masks, _mask_at
    at = _mask_at
    if at >= len(_masks):
        _masks, at = os.urandom(MASK_POOL), 0
    _mask_at = at + 4
    return _masks[at : at + 4]


def _forget_masks() -> None:  # a forked child must not reuse its parent's keys
    global _masks, _mask_at
    _masks, _mask_at = b"", 0


os.register_at_fork(after_in_child=_forget_masks)


def masked_chunk_frame(payload: bytes | bytearray | memoryview) -> bytes:
    """A whole masked frame carrying one chunk (the client's direction)."""
    prefix = chunk_prefix(len(payload))
    mask = new_mask()
    return frame_header(OP_BINARY, len(prefix) + len(payload), mask) + apply_mask(
        prefix + payload, mask
    )


def frame(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    """A whole final frame (control frames, an encoded message)."""
    if masked:
        mask = new_mask()
        return frame_header(opcode, len(payload), mask) + apply_mask(payload, mask)
    return frame_header(opcode, len(payload)) + payload


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode("utf-8")[: MAX_CONTROL_PAYLOAD - 2]
