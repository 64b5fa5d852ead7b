"""The tunnel's WebSocket frame reader and writers (upstreamproxy/tunnel/wsframes.py).

Frames under test are built by the ``websockets`` library's own serializer wherever it can
build them, so the reader is checked against an independent implementation of RFC 6455,
not against our writer only.
"""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from upstreamproxy.codec import (
    MAX_CHUNK_PAYLOAD,
    decode_chunk,
    encode_chunk,
    encode_varint,
)
from upstreamproxy.errors import ChunkError
from upstreamproxy.tunnel import pipe, wsframes
from upstreamproxy.tunnel.wsframes import (
    Close,
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


# -- splicing: head_size never offers a masked frame ----------------------------------------

PEEK = pipe.PEEK


def chunk_frame(payload: bytes) -> bytes:
    return ws_frame(OP_BINARY, encode_chunk(payload), mask=False)


def _zero_mask_frame(opcode: int, payload: bytes) -> bytes:
    """A masked frame whose key is 0: its payload reads as plain (a tag where a tag would be)."""
    return frame_header(opcode, len(payload), b"\0\0\0\0") + payload


@pytest.mark.parametrize(
    "stream",
    [
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
