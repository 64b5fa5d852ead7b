"""Fuzz the WebSocket handshake's response-head parsing and upgrade check (the relay's side):
each returns a result or raises HandshakeError, nothing else.

python fuzz/fuzz_ws_handshake.py --iterations 100000     # built-in random loop
python fuzz/fuzz_ws_handshake.py -runs=1000000 corpus/   # libFuzzer via atheris, when installed
"""

from __future__ import annotations

import contextlib

from _runner import atheris, main

with atheris.instrument_imports() if atheris is not None else contextlib.nullcontext():
    from upstreamproxy.ws_handshake import (
        MAX_RESPONSE_HEAD,
        HandshakeError,
        accept_key,
        check_upgrade,
        find_head_end,
        parse_proxy_url,
        parse_response_head,
        parse_ws_url,
    )

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = accept_key(KEY).encode()


def test_one_input(data: bytes) -> None:
    try:
        end = find_head_end(data)
    except HandshakeError:
        assert len(data) >= MAX_RESPONSE_HEAD
        end = None
    if end is not None:
        assert end <= MAX_RESPONSE_HEAD and data[:end].endswith(b"\r\n\r\n")
        try:
            response = parse_response_head(data[:end])
        except HandshakeError:
            pass
        else:
            assert 100 <= response.status <= 999
            try:
                check_upgrade(response, KEY)
            except HandshakeError:
                pass
            else:  # a pass needs our accept key, verbatim, in the head
                assert response.status == 101 and ACCEPT in data[:end]
    text = data.decode("utf-8", "replace")
    for parse in (parse_ws_url, parse_proxy_url):
        with contextlib.suppress(HandshakeError):
            parse(text)


SEEDS = [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n\r\n\x82\x02\x0a\x00",
    b"HTTP/1.1 401 Unauthorized\r\nX-Upstreamproxy-Reason: unknown-token\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    b"HTTP/1.0 200 Connection established\r\n\r\n",
    b"ws://[::1]:8080/v1/code/upstreamproxy/ws?x=1",
    b"http://user:p%40ss@proxy:3128",
]
TOKENS = [
    b"\r\n",
    b"\r\n\r\n",
    b"\n",
    b":",
    b" ",
    b"\t",
    b"\x00",
    b"\x7f",
    b"\xff",
    b",",
    b"websocket",
    b"Upgrade",
    b"Sec-WebSocket-Accept: ",
    b"Sec-WebSocket-Extensions: x\r\n",
    ACCEPT,
    b"HTTP/1.1 ",
    b"101",
    b"[",
    b"]",
    b"@",
    b"%",
    b"wss://",
    b"X" * 300,
]

if __name__ == "__main__":
    raise SystemExit(main(test_one_input, SEEDS, TOKENS, max_len=MAX_RESPONSE_HEAD + 64))
