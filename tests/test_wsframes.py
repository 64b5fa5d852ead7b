"""The tunnel's WebSocket frame reader and writers (upstreamproxy/tunnel/wsframes.py).

Frames under test are built by the ``websockets`` library's own serializer wherever it can
build them, so the reader is checked against an independent implementation of RFC 6455,
not against our writer only.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from upstreamproxy.codec import (
    MAX_CHUNK_PAYLOAD,
    TAG,
    decode_chunk,
    encode_chunk,
    encode_varint,
)
from upstreamproxy.errors import ChunkError
from upstreamproxy.tunnel import pipe, wsframes
from upstreamproxy.tunnel.payload import Piped
from upstreamproxy.tunnel.wsframes import (
    Close,
    End,
    FrameReader,
    Ping,
    Pong,
    Text,
    WsError,
    chunk_header,
    frame_header,
    masked_chunk_frame,
)

OP_BINARY, OP_CLOSE, OP_CONT = Opcode.BINARY, Opcode.CLOSE, Opcode.CONT
OP_PING, OP_PONG, OP_TEXT = Opcode.PING, Opcode.PONG, Opcode.TEXT


def ws_frame(opcode: Opcode, data: bytes, *, mask: bool, fin: bool = True) -> bytes:
    """One frame serialized by websockets (the reference encoder)."""
    return Frame(opcode, data, fin=fin).serialize(mask=mask)


def feed_all(reader: FrameReader, data: bytes, step: int | None = None) -> list[object]:
    """Feed ``data`` in pieces of ``step`` bytes; events with payload views turned to bytes."""
    events: list[object] = []
    step = step or len(data) or 1
    for at in range(0, len(data), step):
        for event in reader.feed(data[at : at + step]):
            events.append(bytes(event) if isinstance(event, memoryview) else event)
    return events


def payloads(events: list[object]) -> bytes:
    return b"".join(e for e in events if isinstance(e, bytes))


# -- what a tunnel sends ----------------------------------------------------------------------

chunk_payloads = st.lists(st.binary(max_size=3000), max_size=6)


@settings(max_examples=150, deadline=None)
@given(chunks=chunk_payloads, masked=st.booleans(), step=st.integers(1, 4000))
def test_chunks_from_the_reference_encoder_arrive_intact_however_split(
    chunks: list[bytes], masked: bool, step: int
) -> None:
    stream = b"".join(ws_frame(OP_BINARY, encode_chunk(c), mask=masked) for c in chunks)
    events = feed_all(FrameReader(masked=masked), stream, step)
    assert payloads(events) == b"".join(chunks)
    assert all(isinstance(e, bytes) for e in events)
    # Every empty chunk is reported (a keepalive), once; a non-empty one never as b"".
    assert events.count(b"") == sum(1 for c in chunks if not c)


@settings(max_examples=100, deadline=None)
@given(
    payload=st.binary(min_size=1, max_size=5000),
    cuts=st.lists(st.integers(0, 5010), max_size=4),
    masked=st.booleans(),
)
def test_a_fragmented_message_is_reassembled_as_a_stream(
    payload: bytes, cuts: list[int], masked: bool
) -> None:
    message = encode_chunk(payload)
    points = sorted({min(c, len(message)) for c in cuts} | {0, len(message)})
    pieces = [message[a:b] for a, b in itertools.pairwise(points)] or [b""]
    stream = b""
    for index, piece in enumerate(pieces):
        opcode = OP_BINARY if index == 0 else OP_CONT
        stream += ws_frame(opcode, piece, mask=masked, fin=index == len(pieces) - 1)
        if index == 0:  # a control frame may come between fragments
            stream += ws_frame(OP_PING, b"p", mask=masked)
    events = feed_all(FrameReader(masked=masked), stream, 7)
    assert payloads(events) == payload
    assert Ping(b"p") in events


@pytest.mark.parametrize("masked", [False, True])
def test_control_frames(masked: bool) -> None:
    stream = (
        ws_frame(OP_PING, b"hi", mask=masked)
        + ws_frame(OP_PONG, b"", mask=masked)
        + ws_frame(OP_CLOSE, (1001).to_bytes(2, "big") + "bye ☃".encode(), mask=masked)
        + ws_frame(OP_BINARY, encode_chunk(b"after"), mask=masked)
    )
    reader = FrameReader(masked=masked)
    assert feed_all(reader, stream, 3) == [Ping(b"hi"), Pong(b""), Close(1001, "bye ☃")]
    assert reader.done  # nothing is read after a close


def test_an_empty_close_and_an_empty_message() -> None:
    assert feed_all(FrameReader(masked=False), ws_frame(OP_BINARY, b"", mask=False)) == [b""]
    assert feed_all(FrameReader(masked=False), ws_frame(OP_CLOSE, b"", mask=False)) == [
        Close(None, "")
    ]


def test_unmasked_payloads_are_views_of_the_fed_buffer() -> None:
    data = bytearray(ws_frame(OP_BINARY, encode_chunk(b"x" * 1000), mask=False))
    events = FrameReader(masked=False).feed(memoryview(data))
    assert len(events) == 1 and isinstance(events[0], memoryview)
    assert events[0].obj is data  # no copy on the relay's download path
    assert bytes(events[0]) == b"x" * 1000


def test_a_large_chunk_is_reported_in_the_pieces_that_arrived() -> None:
    stream = ws_frame(OP_BINARY, encode_chunk(os.urandom(MAX_CHUNK_PAYLOAD)), mask=False)
    reader = FrameReader(masked=False)
    sizes = [
        len(e) for at in range(0, len(stream), 65536) for e in reader.feed(stream[at : at + 65536])
    ]  # type: ignore[arg-type]
    assert sum(sizes) == MAX_CHUNK_PAYLOAD and len(sizes) > 1


# -- what the peer must not send -----------------------------------------------------------


def _error(stream: bytes, *, masked: bool = False) -> object:
    reader = FrameReader(masked=masked)
    events = feed_all(reader, stream)
    assert reader.done
    assert not [e for e in events if isinstance(e, bytes) and e], "no payload before an error"
    return events[-1]


@pytest.mark.parametrize(
    ("stream", "code", "words"),
    [
        (bytes((0xC2, 3)) + encode_chunk(b"a"), 1002, "reserved"),
        (bytes((0x83, 0)), 1002, "opcode"),
        (bytes((0x8B, 0)), 1002, "opcode"),
        (ws_frame(OP_BINARY, encode_chunk(b"a"), mask=True), 1002, "unmasked"),
        (bytes((0x89, 126, 0, 126)) + b"x" * 126, 1002, "125"),
        (bytes((0x09, 1)) + b"x", 1002, "fragmented control"),
        (ws_frame(OP_CONT, b"x", mask=False), 1002, "continuation"),
        (
            ws_frame(OP_BINARY, b"\x0a", mask=False, fin=False)
            + ws_frame(OP_BINARY, b"", mask=False),
            1002,
            "inside",
        ),
        (bytes((0x82, 127)) + (1 << 63).to_bytes(8, "big"), 1002, "2**63"),
        (bytes((0x82, 127)) + (2 << 20).to_bytes(8, "big"), 1009, "over"),
        (ws_frame(OP_CLOSE, b"\x03", mask=False), 1002, "1-byte"),
        (ws_frame(OP_CLOSE, (1005).to_bytes(2, "big"), mask=False), 1002, "1005"),
        (ws_frame(OP_CLOSE, (2999).to_bytes(2, "big"), mask=False), 1002, "2999"),
        (ws_frame(OP_CLOSE, b"\x03\xe8\xff", mask=False), 1007, "UTF-8"),
    ],
)
def test_protocol_violations_are_errors_with_their_close_code(
    stream: bytes, code: int, words: str
) -> None:
    error = _error(stream)
    assert isinstance(error, WsError) and error.code == code and words in error.reason


def test_the_client_must_mask() -> None:
    error = _error(ws_frame(OP_BINARY, encode_chunk(b"a"), mask=False), masked=True)
    assert isinstance(error, WsError) and "masked" in error.reason


def test_a_text_message_is_reported_and_ends_reading() -> None:
    assert feed_all(FrameReader(masked=False), ws_frame(OP_TEXT, b"hi", mask=False)) == [Text()]


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"\x0b\x01a", "wrong-tag"),
        (b"\x0a\x05ab", "length-exceeds-buffer"),
        (b"\x0a\x01abc", "trailing-bytes"),
        (b"\x0a\x80", "truncated-varint"),
        (b"\x0a" + b"\xff" * 5 + b"\x01", "overlong-varint"),
        (b"\x0a" + encode_varint(MAX_CHUNK_PAYLOAD + 1), "payload-too-large"),
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_malformed_chunks_give_the_codecs_error_and_no_data(
    message: bytes, code: str, masked: bool
) -> None:
    with pytest.raises(ChunkError) as expected:
        decode_chunk(message)
    assert expected.value.code == code  # the same verdict as the whole-message codec
    error = _error(ws_frame(OP_BINARY, message, mask=masked), masked=masked)
    assert isinstance(error, ChunkError) and error.code == code


def test_a_fragmented_message_shorter_than_its_chunk_is_an_error_at_its_end() -> None:
    stream = ws_frame(OP_BINARY, b"\x0a\x05ab", mask=False, fin=False) + ws_frame(
        OP_CONT, b"c", mask=False
    )
    events = feed_all(FrameReader(masked=False), stream)
    assert isinstance(events[-1], ChunkError) and events[-1].code == "length-exceeds-buffer"


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), masked=st.booleans(), step=st.integers(1, 64))
def test_garbage_never_raises_and_nothing_follows_an_end(
    data: bytes, masked: bool, step: int
) -> None:
    reader = FrameReader(masked=masked)
    events = feed_all(reader, data, step)
    for index, event in enumerate(events):
        if isinstance(event, WsError | ChunkError | Close | Text):
            assert index == len(events) - 1
    # What the reader holds between feeds is bounded by a header, a control payload and a
    # chunk prefix - never by what the peer sends.
    assert len(reader._head) <= wsframes.MAX_HEADER
    assert len(reader._control) <= wsframes.MAX_CONTROL_PAYLOAD
    assert len(reader._prefix) <= wsframes.MAX_CHUNK_PREFIX


# -- writers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "header"),
    [(0, "8200"), (125, "827d"), (126, "827e007e"), (65536, "827f0000000000010000")],
)
def test_frame_header(size: int, header: str) -> None:
    assert frame_header(wsframes.OP_BINARY, size).hex() == header


@pytest.mark.parametrize("size", [0, 1, 120, 127, 128, 16384, 65536, MAX_CHUNK_PAYLOAD])
def test_chunk_header_then_payload_is_one_valid_message(size: int) -> None:
    payload = os.urandom(size)
    wire = chunk_header(size) + payload
    events = feed_all(FrameReader(masked=False), wire)
    assert payloads(events) == payload
    header_size = len(frame_header(wsframes.OP_BINARY, len(encode_chunk(payload))))
    assert decode_chunk(wire[header_size:]) == payload


@pytest.mark.parametrize("size", [0, 5, 200, 70000])
def test_masked_chunk_frames_are_masked_and_decode(size: int) -> None:
    payload = os.urandom(size)
    wire = masked_chunk_frame(payload)
    assert wire[1] & 0x80  # the mask bit
    assert payloads(feed_all(FrameReader(masked=True), wire, 1000)) == payload
    assert masked_chunk_frame(payload) != wire or size == 0  # a fresh key each time


def test_apply_mask_matches_the_pure_definition() -> None:
    data, mask = os.urandom(1001), os.urandom(4)
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert wsframes.apply_mask(data, mask) == expected


def test_masking_keys_are_fresh_across_pool_refills() -> None:
    from upstreamproxy.tunnel import wsframes

    keys = [wsframes.new_mask() for _ in range(2 * wsframes.MASK_POOL // 4 + 3)]
    assert all(len(key) == 4 for key in keys)
    # 4-byte keys from the OS: a repeat among a few thousand is vanishingly rare.
    assert len(set(keys)) > len(keys) - 3
    frame = wsframes.masked_chunk_frame(b"payload")
    assert frame[1] & 0x80  # the mask bit is set


# -- splicing: payload_left, skip, head_size ---------------------------------------------------
#
# The relay's splicing reader (links.WsLink._splice_ready) peeks at a frame boundary, feeds
# exactly ``head_size(peek)`` bytes, then moves ``payload_left()`` bytes past the reader with
# ``skip``; everything else is fed as usual. Whatever the mix, the reader must report what
# feeding the whole stream reports (with :class:`Piped` standing for the skipped bytes).

PEEK = pipe.PEEK


def padded_varint(value: int, width: int) -> bytes:
    """``value`` as a varint of exactly ``width`` bytes (continuation groups of 0 pad it - a
    legal, if wasteful, encoding)."""
    assert value >> (7 * width) == 0
    groups = [(value >> (7 * index)) & 0x7F for index in range(width)]
    return bytes(group | 0x80 for group in groups[:-1]) + bytes(groups[-1:])


def chunk_message(payload: bytes, width: int | None = None) -> bytes:
    """The chunk carrying ``payload``; its length varint padded to ``width`` bytes if given."""
    if width is None:
        return encode_chunk(payload)
    return bytes((TAG,)) + padded_varint(len(payload), width) + payload


def chunk_frame(payload: bytes, width: int | None = None) -> bytes:
    """One final unmasked binary frame carrying ``payload`` as a chunk (websockets frames it)."""
    return ws_frame(OP_BINARY, chunk_message(payload, width), mask=False)


def some_bytes(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that differ from one place (and seed) to the next."""
    start = seed % 251
    return (bytes(range(251)) * (size // 251 + 2))[start : start + size]


@pytest.mark.parametrize(
    ("size", "width", "header"),
    [
        (5, None, 2),  # 7-bit frame length, 1-byte varint
        (123, None, 2),  # the largest 7-bit frame: 125 bytes
        (124, None, 4),  # the smallest 16-bit frame: 126 bytes
        (200, None, 4),  # 2-byte varint
        (65531, None, 4),  # 3-byte varint, the largest 16-bit frame: 65535 bytes
        (65532, None, 10),  # 64-bit frame length
        (MAX_CHUNK_PAYLOAD, None, 10),
        (5, 1, 2),
        (5, 2, 2),
        (5, 3, 2),
        (5, 4, 2),
        (5, 5, 2),
        (300, 4, 4),
        (300, 5, 4),
        (70000, 5, 10),  # the largest head there is: 10 + 1 + 5 bytes
    ],
)
def test_head_size_is_the_frame_header_and_chunk_prefix(
    size: int, width: int | None, header: int
) -> None:
    payload = some_bytes(size, size)
    after = chunk_frame(b"next")
    stream = chunk_frame(payload, width) + after
    assert {2: range(126), 4: [126], 10: [127]}[header].count(stream[1])  # as the id says
    prefix = len(chunk_message(payload, width)) - size
    assert width is None or prefix == 1 + width
    head = header + prefix
    reader = FrameReader(masked=False)
    assert reader.payload_left() == 0
    assert reader.head_size(stream[:PEEK]) == head
    assert reader.head_size(stream[:head]) == head  # exactly the head is peek enough
    assert reader.feed(stream[:head]) == []  # checked, nothing reported yet
    assert reader.payload_left() == size
    assert reader.head_size(stream[head : head + PEEK]) == 0  # not at a boundary
    assert reader.skip(size) == [Piped(size)]
    # Back at a boundary: the next frame is read (or skipped) as usual.
    assert reader.payload_left() == 0
    rest = stream[head + size :]
    assert rest == after
    assert reader.head_size(rest) == 4
    assert feed_all(reader, rest) == [b"next"]
    # ... and the same stream fed whole says the same.
    assert payloads(feed_all(FrameReader(masked=False), stream)) == payload + b"next"


def test_a_head_needs_all_its_bytes_in_the_peek() -> None:
    stream = chunk_frame(some_bytes(70000), 5)
    reader = FrameReader(masked=False)
    head = reader.head_size(stream[:PEEK])
    assert head == 16
    for size in range(head):
        assert reader.head_size(stream[:size]) == 0, size
    assert reader.head_size(stream[:head]) == head


def _zero_mask_frame(opcode: int, payload: bytes) -> bytes:
    """A masked frame whose key is 0: its payload reads as plain (a tag where a tag would be)."""
    return frame_header(opcode, len(payload), b"\0\0\0\0") + payload


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(ws_frame(OP_PING, b"\x0a\x01x", mask=False), id="ping"),
        pytest.param(ws_frame(OP_PONG, b"\x0a\x01x", mask=False), id="pong"),
        pytest.param(ws_frame(OP_CLOSE, b"\x03\xe8", mask=False), id="close"),
        pytest.param(ws_frame(OP_TEXT, b"\x0a\x01x", mask=False), id="text"),
        pytest.param(ws_frame(OP_BINARY, b"\x0a\x01x", mask=False, fin=False), id="binary-not-fin"),
        pytest.param(ws_frame(OP_CONT, b"\x0a\x01x", mask=False), id="continuation"),
        pytest.param(ws_frame(OP_CONT, b"\x0a\x01x", mask=False, fin=False), id="cont-not-fin"),
        pytest.param(ws_frame(OP_BINARY, b"", mask=False), id="empty-message"),
        pytest.param(ws_frame(OP_BINARY, b"\x12\x01x", mask=False), id="wrong-tag"),
        pytest.param(ws_frame(OP_BINARY, b"\x0a" + b"\x80" * 5 + b"\x00", mask=False), id="varint"),
        pytest.param(bytes((0xC2, 3)) + b"\x0a\x01x", id="rsv1"),
        pytest.param(bytes((0x92, 3)) + b"\x0a\x01x", id="rsv3"),
        pytest.param(ws_frame(OP_BINARY, encode_chunk(b"x" * 50), mask=True), id="masked"),
        pytest.param(_zero_mask_frame(OP_BINARY, b"\x0a\x01x"), id="masked-zero-key"),
    ],
)
def test_head_size_is_0_for_anything_but_a_final_unmasked_chunk_frame(stream: bytes) -> None:
    reader = FrameReader(masked=False)
    assert reader.head_size(stream[:PEEK]) == 0
    assert reader.head_size(stream) == 0
    assert reader.payload_left() == 0


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(_zero_mask_frame(OP_BINARY, b"\x0a\x01x"), id="zero-key"),
        pytest.param(ws_frame(OP_BINARY, encode_chunk(b"x" * 50), mask=True), id="random-key"),
        pytest.param(chunk_frame(b"x" * 50), id="unmasked"),
    ],
)
def test_a_masked_reader_never_splices(stream: bytes) -> None:
    """The egress reads masked frames: their payload must be unmasked, in user space."""
    reader = FrameReader(masked=True)
    assert reader.head_size(stream[:PEEK]) == 0
    reader.feed(stream[:10])
    assert reader.payload_left() == 0
    assert reader.head_size(stream[10:]) == 0


def test_head_size_is_0_away_from_a_frame_boundary() -> None:
    frame_a, frame_b = chunk_frame(b"a" * 300), chunk_frame(b"b" * 300)
    reader = FrameReader(masked=False)
    reader.feed(frame_a[:1])  # a header split across reads
    assert reader.head_size(frame_a[1:PEEK]) == 0
    assert reader.head_size(frame_b[:PEEK]) == 0
    reader.feed(frame_a[1:10])  # inside the payload
    assert reader.head_size(frame_b[:PEEK]) == 0
    reader.feed(frame_a[10:])
    assert reader.head_size(frame_b[:PEEK]) == 7  # a boundary again

    # Inside a fragmented message: neither a new message nor its continuation.
    reader.feed(ws_frame(OP_BINARY, b"\x0a\x05ab", mask=False, fin=False))
    assert reader.head_size(frame_b[:PEEK]) == 0
    assert reader.head_size(ws_frame(OP_CONT, b"cde", mask=False)) == 0
    assert feed_all(reader, ws_frame(OP_CONT, b"cde", mask=False)) == [b"cde"]
    assert reader.head_size(frame_b[:PEEK]) == 7

    # Nothing after the end.
    reader.feed(ws_frame(OP_CLOSE, b"", mask=False))
    assert reader.done
    assert reader.head_size(frame_b[:PEEK]) == 0


def test_payload_left_is_0_until_the_chunk_prefix_is_checked() -> None:
    stream = chunk_frame(b"p" * 1000)  # 4-byte header, 3-byte prefix
    reader = FrameReader(masked=False)
    for at in range(7):
        assert reader.payload_left() == 0, at
        reader.feed(stream[at : at + 1])
    assert reader.payload_left() == 1000
    reader.feed(stream[7:107])
    assert reader.payload_left() == 900


def test_payload_left_is_0_inside_control_frames_and_masked_frames() -> None:
    reader = FrameReader(masked=False)
    reader.feed(ws_frame(OP_PING, b"\x0a\x05hello", mask=False)[:4])
    assert reader.payload_left() == 0
    masked = FrameReader(masked=True)
    masked.feed(ws_frame(OP_BINARY, encode_chunk(b"x" * 100), mask=True)[:12])
    assert masked.payload_left() == 0


def test_payload_left_stops_at_the_end_of_a_fragment() -> None:
    payload = some_bytes(1000)
    message = encode_chunk(payload)  # 3-byte prefix
    first = ws_frame(OP_BINARY, message[:403], mask=False, fin=False)
    ping = ws_frame(OP_PING, b"p", mask=False)
    last = ws_frame(OP_CONT, message[403:], mask=False)
    reader = FrameReader(masked=False)
    reader.feed(first[:7])  # the header and the chunk prefix
    assert reader.payload_left() == 400  # what is left of this frame, not of the chunk
    assert reader.skip(400) == [Piped(400)]  # not the message's end: nothing else
    assert reader.payload_left() == 0
    assert reader.head_size(ping) == 0
    assert reader.feed(ping) == [Ping(b"p")]
    assert reader.head_size(last) == 0  # a continuation is fed ...
    reader.feed(last[:4])
    assert reader.payload_left() == 600  # ... but its payload may be skipped
    assert reader.skip(600) == [Piped(600)]
    assert reader.payload_left() == 0
    assert reader.head_size(chunk_frame(b"z")) == 4  # the message ended


@pytest.mark.parametrize("bad", [0, -1, 301])
def test_skip_refuses_what_is_not_payload(bad: int) -> None:
    reader = FrameReader(masked=False)
    with pytest.raises(ValueError):
        reader.skip(1)  # nothing may be skipped at a boundary
    stream = chunk_frame(b"s" * 300)
    reader.feed(stream[:7])
    with pytest.raises(ValueError):
        reader.skip(bad)
    assert reader.payload_left() == 300  # a refused skip changes nothing
    assert reader.skip(299) == [Piped(299)]
    with pytest.raises(ValueError):
        reader.skip(2)
    assert reader.skip(1) == [Piped(1)]
    with pytest.raises(ValueError):
        reader.skip(1)


def test_skip_to_the_end_of_a_frame_returns_to_the_header_phase() -> None:
    reader = FrameReader(masked=False)
    reader.feed(chunk_frame(b"s" * 300)[:7])
    assert reader.skip(100) == [Piped(100)]
    assert reader._phase == wsframes._PAYLOAD
    assert reader.skip(200) == [Piped(200)]
    assert reader._phase == wsframes._HEADER
    assert not reader._head
    assert reader.payload_left() == 0
    stream = ws_frame(OP_PING, b"hi", mask=False) + chunk_frame(b"after")
    events = feed_all(reader, stream, 3)
    assert events[0] == Ping(b"hi") and payloads(events) == b"after"


# -- a splicing consumer says what feeding says ---------------------------------------------


def plain(event: object) -> object:
    """An event kept past its feed (views turned to bytes, errors comparable)."""
    if isinstance(event, memoryview):
        return bytes(event)
    if isinstance(event, ChunkError):
        return ("ChunkError", event.code, event.detail)
    return event


def normalized(events: list[object]) -> list[object]:
    """Events with adjacent payload pieces joined (the pieces depend on the reads)."""
    out: list[object] = []
    for event in map(plain, events):
        if isinstance(event, bytes) and event:
            if out and isinstance(out[-1], bytearray):
                out[-1] += event
            else:
                out.append(bytearray(event))
        else:
            out.append(event)  # b"" (a keepalive), a control or terminal event
    return out


def read_whole(stream: bytes) -> list[object]:
    return normalized(list(FrameReader(masked=False).feed(stream)))


def read_splicing(
    stream: bytes, rng: random.Random, full_peeks: bool = False
) -> tuple[list[object], int]:
    """Read ``stream`` as the relay's splicing reader does: at a frame boundary peek, feed
    exactly the head when there is one, then skip the payload in random steps (the
    skipped bytes stand for :class:`Piped`); otherwise feed a random-size piece."""
    reader = FrameReader(masked=False)
    events: list[object] = []
    pos = skipped = 0
    while pos < len(stream) and not reader.done:
        left = reader.payload_left()
        if left:
            step = min(left, rng.choice([1, 2, 7, 100, 4096, 65536, left, left]))
            for event in reader.skip(step):
                if isinstance(event, Piped):
                    assert event.size == step
                    event = stream[pos : pos + step]
                events.append(plain(event))
            pos += step
            skipped += step
            continue
        peek_size = PEEK if full_peeks else rng.choice([PEEK, PEEK, PEEK, rng.randint(0, PEEK)])
        peek = stream[pos : pos + peek_size]
        need = reader.head_size(peek)
        assert need <= len(peek)
        size = need or (1 if full_peeks else rng.choice([1, 2, 3, 19, 100, 5000, 70000]))
        events += map(plain, reader.feed(stream[pos : pos + size]))
        pos += size
    return normalized(events), skipped


def bad_frame(kind: str) -> bytes:
    if kind == "rsv":
        return bytes((0xC2, 3)) + b"\x0a\x01x"
    if kind == "masked":
        return _zero_mask_frame(OP_BINARY, b"\x0a\x01x")
    if kind == "longer":  # the chunk says more than the frame holds
        return frame_header(OP_BINARY, 12) + b"\x0a\x14" + b"x" * 10
    if kind == "shorter":  # the frame holds more than the chunk says
        return frame_header(OP_BINARY, 12) + b"\x0a\x05" + b"x" * 10
    if kind == "fragment-shorter":  # known only at the message's end
        return ws_frame(OP_BINARY, b"\x0a\x10abc", mask=False, fin=False) + ws_frame(
            OP_CONT, b"def", mask=False
        )
    assert kind == "close"
    return ws_frame(OP_CLOSE, b"\x03\xe8bye", mask=False)


@st.composite
def tunnel_streams(draw: st.DrawFn) -> bytes:
    """What an egress may send a relay: chunk frames of every header size, pings, pongs,
    keepalives, fragmented chunk messages (a ping between fragments) - and maybe a frame
    that ends reading."""
    stream = bytearray()
    sizes = st.one_of(st.integers(1, 300), st.integers(16300, 16500), st.integers(65500, 65560))
    kinds = ["chunk", "chunk", "keepalive", "ping", "pong", "fragmented"]
    for index, kind in enumerate(draw(st.lists(st.sampled_from(kinds), max_size=7))):
        if kind == "chunk":
            size = draw(sizes)
            least = len(encode_varint(size))
            width = draw(st.one_of(st.none(), st.integers(least, 5)))
            stream += chunk_frame(some_bytes(size, index), width)
        elif kind == "keepalive":
            stream += ws_frame(OP_BINARY, draw(st.sampled_from([b"", b"\x0a\x00"])), mask=False)
        elif kind in ("ping", "pong"):
            opcode = OP_PING if kind == "ping" else OP_PONG
            stream += ws_frame(opcode, draw(st.binary(max_size=125)), mask=False)
        else:
            message = encode_chunk(some_bytes(draw(st.integers(0, 3000)), index))
            cuts = draw(st.lists(st.integers(0, len(message)), max_size=3))
            points = sorted({*cuts, 0, len(message)})
            pieces = [message[a:b] for a, b in itertools.pairwise(points)]
            for at, piece in enumerate(pieces):
                opcode = OP_BINARY if at == 0 else OP_CONT
                stream += ws_frame(opcode, piece, mask=False, fin=at == len(pieces) - 1)
                if at < len(pieces) - 1 and draw(st.booleans()):
                    stream += ws_frame(OP_PING, b"between", mask=False)
    end = draw(st.sampled_from([None, None, "rsv", "masked", "longer", "shorter", "close"]))
    if end is not None:
        stream += bad_frame(end) + chunk_frame(b"never read")
    return bytes(stream)


@settings(max_examples=200, deadline=None)
@given(stream=tunnel_streams(), seed=st.integers(0, 2**32))
def test_a_splicing_reader_reports_what_feeding_reports(stream: bytes, seed: int) -> None:
    expected = read_whole(stream)
    got, _ = read_splicing(stream, random.Random(seed))
    assert got == expected


def test_with_whole_peeks_every_chunk_frames_payload_is_skipped() -> None:
    sizes = [1, 125, 126, 65531, 65532, 300_000, MAX_CHUNK_PAYLOAD]
    stream = b"".join(
        chunk_frame(some_bytes(size, size)) + ws_frame(OP_PING, b"\x82\x02\x0a\x00", mask=False)
        for size in sizes
    )
    got, skipped = read_splicing(stream, random.Random(1), full_peeks=True)
    assert skipped == sum(sizes)  # no payload byte of a chunk frame was fed
    assert got == read_whole(stream)


@pytest.mark.parametrize("kind", ["rsv", "masked", "longer", "shorter", "fragment-shorter"])
@pytest.mark.parametrize("seed", range(5))
def test_a_splicing_reader_meets_a_bad_frame_as_feeding_does(kind: str, seed: int) -> None:
    stream = chunk_frame(some_bytes(70000)) + bad_frame(kind) + chunk_frame(b"never read")
    expected = read_whole(stream)
    assert isinstance(expected[-1], WsError | tuple)  # the reader's error ...
    assert bytes(expected[0]).startswith(some_bytes(70000))  # ... after the good payload
    got, skipped = read_splicing(stream, random.Random(seed), full_peeks=seed == 0)
    assert got == expected
    if seed == 0:
        assert skipped >= 70000  # the good frame's payload was skipped


# -- tunnel reuse: the end-of-tunnel message (SPEC §11) ---------------------------------------

END_MESSAGE = ws_frame(OP_BINARY, b"\x10\x01", mask=False)


@settings(max_examples=150, deadline=None)
@given(
    tunnels=st.lists(chunk_payloads, min_size=1, max_size=4),
    masked=st.booleans(),
    step=st.integers(1, 200),
)
def test_end_of_tunnel_messages_split_a_reused_stream_into_its_tunnels(
    tunnels: list[list[bytes]], masked: bool, step: int
) -> None:
    """Each tunnel's chunks, then an End: reported in order however the stream is cut, and
    reading goes on after each End (the WebSocket stays open)."""
    end = ws_frame(OP_BINARY, b"\x10\x01", mask=masked)
    stream = b"".join(
        b"".join(ws_frame(OP_BINARY, encode_chunk(c), mask=masked) for c in chunks) + end
        for chunks in tunnels
    )
    events = feed_all(FrameReader(masked=masked, reuse=True), stream, step)
    assert events.count(End()) == len(tunnels)
    seen: list[bytes] = []
    current = b""
    for event in events:
        if isinstance(event, End):
            seen.append(current)
            current = b""
        else:
            assert isinstance(event, bytes), event
            current += event
    assert seen == [b"".join(chunks) for chunks in tunnels]


def test_without_reuse_an_end_of_tunnel_message_is_a_wrong_tag() -> None:
    events = feed_all(FrameReader(masked=False), END_MESSAGE)
    assert len(events) == 1 and isinstance(events[0], ChunkError)
    assert events[0].code == "wrong-tag"


@pytest.mark.parametrize(
    "stream",
    [
        ws_frame(OP_BINARY, b"\x10\x02", mask=False),  # end = 2
        ws_frame(OP_BINARY, b"\x10\x00", mask=False),  # end = false
        ws_frame(OP_BINARY, b"\x10\x01\x00", mask=False),  # a trailing byte
        ws_frame(OP_BINARY, b"\x10", mask=False),  # truncated
        ws_frame(OP_BINARY, b"\x10\x81\x00", mask=False),  # an overlong varint
        ws_frame(OP_BINARY, b"\x10\x81", mask=False),  # a varint that never ends
        ws_frame(OP_BINARY, b"\x10\x80", mask=False),
        # fragmented: an end-of-tunnel message is always one frame
        ws_frame(OP_BINARY, b"\x10", mask=False, fin=False)
        + ws_frame(OP_CONT, b"\x01", mask=False),
    ],
    ids=["two", "false", "trailing", "truncated", "overlong", "unended", "unended0", "fragmented"],
)
def test_a_malformed_end_of_tunnel_message_is_an_error_and_ends_reading(stream: bytes) -> None:
    reader = FrameReader(masked=False, reuse=True)
    events = feed_all(reader, stream + ws_frame(OP_BINARY, encode_chunk(b"after"), mask=False))
    assert [type(e) for e in events] == [ChunkError], events
    assert reader.done
