"""Fuzz the HTTP head parsers: each returns a result or raises HeadError, nothing else.

python fuzz/fuzz_connect_head.py --iterations 100000     # built-in random loop
python fuzz/fuzz_connect_head.py -runs=1000000 corpus/   # libFuzzer via atheris, when installed
"""

from __future__ import annotations

import contextlib

from _runner import atheris, main

with atheris.instrument_imports() if atheris is not None else contextlib.nullcontext():
    from upstreamproxy.connect_head import (
        MAX_HEAD_BYTES,
        build_status_head,
        build_tunnel_request,
        parse_basic_credentials,
        parse_connect_head,
        parse_status_head,
        parse_target,
        split_head,
    )
    from upstreamproxy.errors import HeadError


def _check_connect(head: bytes) -> None:
    try:
        request = parse_connect_head(head)
    except HeadError as exc:
        assert exc.status in (400, 405), exc.status
        return
    assert request.method == "CONNECT"
    assert 1 <= request.target.port <= 65535
    # The relay re-builds the head it forwards; the egress must parse it to the same target.
    forwarded = parse_connect_head(build_tunnel_request(request.target, "session", "token"))
    assert forwarded.target == request.target
    assert [name for name, _ in forwarded.headers] == ["Proxy-Authorization"]


def test_one_input(data: bytes) -> None:
    try:
        parts = split_head(data)
    except HeadError as exc:
        assert exc.status == 400 and len(data) >= MAX_HEAD_BYTES
        parts = None
    if parts is not None:
        head, rest = parts
        assert len(head) <= MAX_HEAD_BYTES and head + rest == data
    _check_connect(parts[0] if parts else data)

    try:
        status = parse_status_head(data)
    except HeadError as exc:
        assert exc.status == 502, exc.status
    else:
        assert 100 <= status.status <= 599
        rebuilt = build_status_head(status.status, status.headers)
        assert parse_status_head(rebuilt).status == status.status

    text = data.decode("latin-1")  # how header values reach the parsers
    try:
        parse_basic_credentials(text)
    except HeadError as exc:
        assert exc.status == 407, exc.status
    try:
        target = parse_target(data.decode("utf-8", "replace"))
    except HeadError as exc:
        assert exc.status == 400, exc.status
    else:
        assert parse_target(target.authority) == target


SEEDS = [
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    b"CONNECT [2001:db8::1]:8443 HTTP/1.0\r\n\r\n",
    b"CONNECT 192.0.2.1:443 HTTP/1.1\nProxy-Authorization: Basic c2Vzczp0b2s=\n\n",
    "CONNECT bücher.example:443 HTTP/1.1\r\nUser-Agent: curl/8\r\n\r\n".encode(),
    b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"HTTP/1.1 200 Connection established\r\n\r\n",
    b"HTTP/1.1 403 Forbidden\r\nX-Upstreamproxy-Reason: host-not-allowed\r\n"
    b"X-Upstreamproxy-Rule: r1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno",
    b"Basic c2Vzc2lvbjp0b2tlbg==",
]
TOKENS = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b":",
    b"[",
    b"]",
    b"%",
    b"%25",
    b"@",
    b" ",
    b"\t",
    b"\x00",
    b"\x7f",
    b"\xc2\xa0",
    b"\xc2\x85",
    b"\xe2\x80\x8b",
    b"\xff",
    b"65535",
    b"65536",
    b"0",
    b"+",
    b"0x1bb",
    b"::",
    b"::ffff:127.0.0.1",
    b"HTTP/1.1",
    b"CONNECT ",
    b"xn--",
    b"Basic ",
    b"=",
    b"X" * 300,
]

if __name__ == "__main__":
    raise SystemExit(main(test_one_input, SEEDS, TOKENS, max_len=MAX_HEAD_BYTES + 64))
