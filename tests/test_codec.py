"""The chunk codec against the golden vectors, Google's protobuf runtime, and properties."""

from __future__ import annotations

import array
import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from upstreamproxy import codec
from upstreamproxy.codec import (
    ERROR_CODES,
    KEEPALIVE,
    MAX_CHUNK_PAYLOAD,
    MAX_MESSAGE_BYTES,
    decode_chunk,
    encode_chunk,
    encode_varint,
    split_payload,
)
from upstreamproxy.errors import ChunkError, ProtocolError

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "protocol"
VECTORS: dict[str, Any] = json.loads((PROTOCOL / "vectors.json").read_text())
FAST = settings(max_examples=200, deadline=None)


# --- golden vectors ------------------------------------------------------------------------


def _message(vector: dict[str, Any]) -> bytes:
    """The encoded message a vector describes (whole ``hex``, or ``head_hex`` + repeat)."""
    if "hex" in vector:
        return bytes.fromhex(vector["hex"])
    return bytes.fromhex(vector["head_hex"]) + _repeat(vector)


def _repeat(vector: dict[str, Any]) -> bytes:
    spec = vector["payload_repeat"]
    return bytes.fromhex(spec["byte"]) * int(spec["count"])


def _payload(vector: dict[str, Any]) -> bytes:
    if "payload_hex" in vector:
        return bytes.fromhex(vector["payload_hex"])
    return _repeat(vector)


VALID = VECTORS["valid"]
MALFORMED = VECTORS["malformed"]
CANONICAL = [v for v in VALID if v.get("canonical", True)]


def _ids(vectors: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vectors]


def test_vectors_file_is_well_formed() -> None:
    names = _ids(VALID) + _ids(MALFORMED)
    assert len(names) == len(set(names)), "vector names must be unique"
    assert VECTORS["max_payload"] == MAX_CHUNK_PAYLOAD
    for vector in VALID + MALFORMED:
        assert ("hex" in vector) != ("payload_repeat" in vector), vector["name"]
        assert ("payload_repeat" in vector) == ("head_hex" in vector), vector["name"]
    for vector in VALID:
        assert ("payload_hex" in vector) == ("hex" in vector), vector["name"]
    # Every error code is exercised, and no vector uses an undocumented one.
    assert {v["error"] for v in MALFORMED} == ERROR_CODES


def test_vectors_cover_the_required_cases() -> None:
    valid = {v["name"]: v for v in VALID}
    assert valid["keepalive-empty-chunk"]["hex"] == "0a00"
    assert valid["zero-length-message"]["hex"] == ""
    sizes = {len(_payload(v)) for v in VALID}
    assert {0, 1, 127, 128, 300, 16383, 16384, MAX_CHUNK_PAYLOAD} <= sizes
    assert any(not v.get("canonical", True) and _payload(v) for v in VALID)  # non-minimal varint
    malformed = {v["hex"] for v in MALFORMED if "hex" in v}
    assert {"1200", "0800", "0b00", "0a80", "0aff", "0a80808080808000"} <= malformed


@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_valid_vector_decodes(vector: dict[str, Any]) -> None:
    assert decode_chunk(_message(vector)) == _payload(vector)


@pytest.mark.parametrize("vector", CANONICAL, ids=_ids(CANONICAL))
def test_canonical_vector_encodes(vector: dict[str, Any]) -> None:
    assert encode_chunk(_payload(vector)) == _message(vector)


@pytest.mark.parametrize("vector", MALFORMED, ids=_ids(MALFORMED))
def test_malformed_vector_raises_its_code(vector: dict[str, Any]) -> None:
    with pytest.raises(ChunkError) as info:
        decode_chunk(_message(vector))
    assert info.value.code == vector["error"]
    assert isinstance(info.value, ProtocolError)
    assert info.value.detail and vector["error"] in str(info.value)


@pytest.mark.parametrize("vector", VALID + MALFORMED, ids=_ids(VALID + MALFORMED))
def test_vector_decodes_the_same_from_bytearray_and_memoryview(vector: dict[str, Any]) -> None:
    message = _message(vector)
    outcomes: list[bytes | str] = []
    for form in (message, bytearray(message), memoryview(message)):
        try:
            outcomes.append(decode_chunk(form))
        except ChunkError as exc:
            outcomes.append(exc.code)
    assert outcomes[0] == outcomes[1] == outcomes[2]


def test_keepalive_constant() -> None:
    assert KEEPALIVE == b"\x0a\x00" == encode_chunk(b"")
    assert decode_chunk(KEEPALIVE) == b""


# --- edges of the limits and the varint ----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, "00"),
        (1, "01"),
        (127, "7f"),
        (128, "8001"),
        (300, "ac02"),
        (16383, "ff7f"),
        (16384, "808001"),
        (MAX_CHUNK_PAYLOAD, "808020"),
        (2**28 - 1, "ffffff7f"),
        (2**28, "8080808001"),
        (2**35 - 1, "ffffffff7f"),
    ],
)
def test_encode_varint(value: int, encoded: str) -> None:
    assert encode_varint(value).hex() == encoded


@pytest.mark.parametrize("value", [-1, 2**35, 2**64])
def test_encode_varint_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        encode_varint(value)


def test_encode_refuses_payload_over_the_limit() -> None:
    encode_chunk(bytes(MAX_CHUNK_PAYLOAD))
    with pytest.raises(ValueError):
        encode_chunk(bytes(MAX_CHUNK_PAYLOAD + 1))


def test_largest_message_fits_max_message_bytes() -> None:
    assert len(encode_chunk(bytes(MAX_CHUNK_PAYLOAD))) <= MAX_MESSAGE_BYTES


def test_decode_honours_a_smaller_max_payload() -> None:
    message = encode_chunk(b"x" * 100)
    assert decode_chunk(message, max_payload=100) == b"x" * 100
    with pytest.raises(ChunkError) as info:
        decode_chunk(message, max_payload=99)
    assert info.value.code == codec.PAYLOAD_TOO_LARGE


def test_payload_too_large_is_reported_before_buffer_length() -> None:
    # A receiver must refuse an oversized declaration without caring how much followed.
    for extra in (b"", b"a", b"a" * 1000):
        with pytest.raises(ChunkError) as info:
            decode_chunk(b"\x0a" + encode_varint(MAX_CHUNK_PAYLOAD + 1) + extra)
        assert info.value.code == codec.PAYLOAD_TOO_LARGE


def test_every_prefix_of_a_message_is_refused() -> None:
    message = encode_chunk(bytes(range(200)))
    for cut in range(1, len(message)):
        with pytest.raises(ChunkError) as info:
            decode_chunk(message[:cut])
        assert info.value.code in {codec.TRUNCATED_VARINT, codec.LENGTH_EXCEEDS_BUFFER}


def test_error_leaves_a_bytearray_resizable() -> None:
    # Regression: the decoder's memoryview used to stay alive in the traceback and pin the buffer.
    buffer = bytearray(b"\x12\x00")
    try:
        decode_chunk(buffer)
    except ChunkError:
        buffer.clear()
    assert buffer == b""


def test_multibyte_memoryview_is_measured_in_bytes() -> None:
    # Regression: len() of a memoryview over 16-bit items counts items, not bytes.
    words = memoryview(array.array("H", [0x0102, 0x0304]))
    message = encode_chunk(words)
    assert message[:2] == b"\x0a\x04"
    assert decode_chunk(message) == words.tobytes()
    assert b"".join(decode_chunk(c) for c in split_payload(words, 3)) == words.tobytes()


# --- split_payload -------------------------------------------------------------------------


def test_split_payload_large_write() -> None:
    data = random.Random(7).randbytes(MAX_CHUNK_PAYLOAD * 2 + 5)
    chunks = list(split_payload(data))
    assert [len(decode_chunk(c)) for c in chunks] == [MAX_CHUNK_PAYLOAD, MAX_CHUNK_PAYLOAD, 5]
    assert b"".join(decode_chunk(c) for c in chunks) == data


def test_split_payload_of_nothing_sends_nothing() -> None:
    assert list(split_payload(b"")) == []


@pytest.mark.parametrize("limit", [0, -1, MAX_CHUNK_PAYLOAD + 1])
def test_split_payload_rejects_bad_limits(limit: int) -> None:
    with pytest.raises(ValueError):
        list(split_payload(b"abc", limit))


# --- interop with Google's protobuf runtime ------------------------------------------------


def _proto_declaration() -> tuple[str, str, str, int]:
    """(package, message, field, number) as declared in protocol/upstreamproxy.proto."""
    text = (PROTOCOL / "upstreamproxy.proto").read_text()
    assert re.search(r'^syntax\s*=\s*"proto3"\s*;', text, re.M)
    package = re.search(r"^package\s+([\w.]+)\s*;", text, re.M)
    message = re.search(r"message\s+(\w+)\s*\{\s*bytes\s+(\w+)\s*=\s*(\d+)\s*;\s*\}", text)
    assert package and message
    return package.group(1), message.group(1), message.group(2), int(message.group(3))


def _runtime_chunk_class() -> type[Message]:
    package, name, field, number = _proto_declaration()
    assert (name, field, number) == ("UpstreamProxyChunk", "data", 1)
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="upstreamproxy_interop_test.proto", package=package, syntax="proto3"
    )
    message = file_proto.message_type.add(name=name)
    message.field.add(
        name=field,
        number=number,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    cls: type[Message] = message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"{package}.{name}")
    )
    return cls


Chunk = _runtime_chunk_class()


def _pb_parse(message: bytes) -> bytes:
    chunk = Chunk()
    chunk.ParseFromString(message)
    return bytes(chunk.data)


def _pb_serialize(payload: bytes) -> bytes:
    serialized: bytes = Chunk(data=payload).SerializeToString()
    return serialized


INTEROP_SIZES = [0, 1, 2, 63, 126, 127, 128, 129, 255, 256, 300, 4095, 16383, 16384, 16385]
INTEROP_SIZES += [65535, 65536, 2**20 // 4, MAX_CHUNK_PAYLOAD - 1, MAX_CHUNK_PAYLOAD]


@pytest.mark.parametrize("size", INTEROP_SIZES)
def test_interop_with_protobuf_runtime(size: int) -> None:
    payload = random.Random(size).randbytes(size)
    ours = encode_chunk(payload)
    assert _pb_parse(ours) == payload
    theirs = _pb_serialize(payload)
    assert decode_chunk(theirs) == payload
    if size:  # proto3 serialises an empty chunk to no bytes; ours is the 0a00 keepalive
        assert theirs == ours


@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_valid_vector_parses_with_protobuf_runtime(vector: dict[str, Any]) -> None:
    # An independent decoder agrees with the golden vectors (they are not just our own output).
    assert _pb_parse(_message(vector)) == _payload(vector)


@FAST
@given(st.binary(max_size=4096))
def test_interop_property(payload: bytes) -> None:
    assert _pb_parse(encode_chunk(payload)) == payload
    assert decode_chunk(_pb_serialize(payload)) == payload


# --- properties ----------------------------------------------------------------------------


def _sized(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# Small payloads, plus payloads of any size up to the limit (random bytes of a drawn size,
# which is far faster than asking hypothesis for half a megabyte).
payloads = st.one_of(
    st.binary(max_size=1024),
    st.builds(_sized, st.integers(0, MAX_CHUNK_PAYLOAD), st.integers(0, 2**32)),
    st.builds(_sized, st.sampled_from([127, 128, 16383, 16384, MAX_CHUNK_PAYLOAD]), st.just(0)),
)


@FAST
@given(payloads)
def test_round_trip(payload: bytes) -> None:
    message = encode_chunk(payload)
    assert decode_chunk(message) == payload
    assert decode_chunk(bytearray(message)) == payload


@FAST
@given(st.binary(max_size=5000), st.integers(1, 600))
def test_split_payload_reassembles_within_limit(data: bytes, limit: int) -> None:
    chunks = list(split_payload(data, limit))
    payloads = [decode_chunk(c) for c in chunks]
    assert b"".join(payloads) == data
    assert all(0 < len(p) <= limit for p in payloads)
    assert len(chunks) == -(-len(data) // limit)


@FAST
@given(st.builds(_sized, st.integers(0, 3 * MAX_CHUNK_PAYLOAD), st.integers(0, 2**32)))
def test_split_payload_default_limit(data: bytes) -> None:
    payloads = [decode_chunk(c) for c in split_payload(data)]
    assert b"".join(payloads) == data
    assert all(len(p) <= MAX_CHUNK_PAYLOAD for p in payloads)


def _near_valid(payload: bytes, cut: int, extra: bytes) -> bytes:
    message = encode_chunk(payload) + extra
    return message[: cut % (len(message) + 1)]


arbitrary_messages = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=8).map(lambda b: b"\x0a" + b),
    st.builds(_near_valid, st.binary(max_size=300), st.integers(0, 400), st.binary(max_size=4)),
)


@FAST
@given(arbitrary_messages, st.integers(0, 300))
def test_decode_returns_bytes_or_raises_chunk_error(message: bytes, limit: int) -> None:
    for max_payload in (MAX_CHUNK_PAYLOAD, limit):
        try:
            payload = decode_chunk(message, max_payload=max_payload)
        except ChunkError as exc:
            assert exc.code in ERROR_CODES
        else:
            assert type(payload) is bytes
            assert len(payload) <= max_payload
            assert decode_chunk(encode_chunk(payload)) == payload


@FAST
@given(arbitrary_messages)
def test_decode_agrees_with_protobuf_whenever_we_accept(message: bytes) -> None:
    # We are stricter than protobuf (no unknown or repeated fields), never more lenient.
    try:
        payload = decode_chunk(message)
    except ChunkError:
        return
    assert _pb_parse(message) == payload


# --- the fuzz harness stays runnable -------------------------------------------------------


def test_fuzz_harness_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "fuzz_codec.py"), "--iterations", "3000"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "no findings" in result.stdout
