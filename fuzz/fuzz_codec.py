"""Fuzz the chunk codec: ``decode_chunk`` returns bytes or raises ChunkError, nothing else.

python fuzz/fuzz_codec.py --iterations 100000     # built-in random loop
python fuzz/fuzz_codec.py -runs=1000000 corpus/   # libFuzzer via atheris, when installed
"""

from __future__ import annotations

import contextlib
import json

from _runner import REPO_ROOT, atheris, main

with atheris.instrument_imports() if atheris is not None else contextlib.nullcontext():
    from upstreamproxy.codec import (
        ERROR_CODES,
        MAX_CHUNK_PAYLOAD,
        decode_chunk,
        encode_chunk,
        split_payload,
    )
    from upstreamproxy.errors import ChunkError

# Small limit too, so the payload-too-large path is reachable with short inputs.
SMALL_LIMIT = 16


def test_one_input(data: bytes) -> None:
    for limit in (MAX_CHUNK_PAYLOAD, SMALL_LIMIT):
        try:
            payload = decode_chunk(data, max_payload=limit)
        except ChunkError as exc:  # the documented failure: a known, stable code
            assert exc.code in ERROR_CODES, exc.code
            continue
        assert type(payload) is bytes
        assert len(payload) <= limit
        assert len(payload) < len(data) or payload == data == b""
        assert data.endswith(payload)
        # Whatever decodes re-encodes canonically to something that decodes the same.
        canonical = encode_chunk(payload)
        assert decode_chunk(canonical, max_payload=limit) == payload
        assert len(canonical) <= len(data) or data == b""
    # The payload splitter always reassembles the input.
    limit = 1 + len(data) % 7
    assert b"".join(decode_chunk(c) for c in split_payload(data, limit)) == data


def _seeds() -> list[bytes]:
    vectors = json.loads((REPO_ROOT / "protocol" / "vectors.json").read_text())
    seeds = [bytes.fromhex(v["hex"]) for v in vectors["valid"] + vectors["malformed"] if "hex" in v]
    seeds += [bytes.fromhex(v["head_hex"]) + b"x" * 20 for v in vectors["valid"] if "head_hex" in v]
    return seeds


TOKENS = [
    b"\x0a",
    b"\x0a\x00",
    b"\x80",
    b"\xff",
    b"\x80\x80\x80\x80",
    b"\xff\xff\xff\xff\x0f",
    b"\x12",
]

if __name__ == "__main__":
    raise SystemExit(main(test_one_input, _seeds(), TOKENS))
