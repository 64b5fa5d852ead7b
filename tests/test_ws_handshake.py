"""The pure WebSocket handshake pieces (:mod:`upstreamproxy.ws_handshake`): URLs, request
heads, response heads and the upgrade check. Case by case, then by property: every input
parses or raises a documented :class:`HandshakeError`, never anything else."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from upstreamproxy.ws_handshake import (
    GUID,
    MAX_HEADERS,
    MAX_RESPONSE_HEAD,
    HandshakeError,
    InvalidAccept,
    InvalidEgressUrl,
    InvalidProxy,
    InvalidRequestHeader,
    InvalidUpgrade,
    MalformedResponse,
    ProxyTarget,
    Response,
    ResponseTooLarge,
    Target,
    accept_key,
    build_proxy_connect,
    build_upgrade_request,
    check_upgrade,
    find_head_end,
    new_key,
    parse_proxy_url,
    parse_response_head,
    parse_ws_url,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's example


def test_rfc_example_accept_key() -> None:
    assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    expected = base64.b64encode(hashlib.sha1((KEY + GUID).encode()).digest()).decode()
    assert accept_key(KEY) == expected


def test_new_keys_are_16_random_bytes() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(len(base64.b64decode(k)) == 16 for k in keys)


@pytest.mark.parametrize(
    ("url", "target", "host_header"),
    [
        ("ws://egress/ws", Target(False, "egress", 80, "/ws"), "egress"),
        ("wss://egress/ws", Target(True, "egress", 443, "/ws"), "egress"),
        ("wss://egress:8443", Target(True, "egress", 8443, "/"), "egress:8443"),
        ("ws://EGRESS:80/a?b=c", Target(False, "egress", 80, "/a?b=c"), "egress"),
        ("ws://[::1]:9000/x", Target(False, "::1", 9000, "/x"), "[::1]:9000"),
        ("wss://[::1]/x", Target(True, "::1", 443, "/x"), "[::1]"),
        ("ws://bücher.example/", Target(False, "xn--bcher-kva.example", 80, "/"), None),
    ],
)
def test_ws_urls(url: str, target: Target, host_header: str | None) -> None:
    parsed = parse_ws_url(url)
    assert parsed == target
    if host_header is not None:
        assert parsed.host_header == host_header


@pytest.mark.parametrize(
    "url",
    [
        "http://egress/ws",
        "ws:///nohost",
        "ws://egress:99999/",
        "ws://egress:0/",
        "ws://egress:x/",
        "ws://user:pw@egress/",
        "ws://egress/#frag",
        "ws://egress/a b",
        "ws://egress/\r\nX: 1",
        "ws://egress/ü",
        "ws://[::1/",
        "",
    ],
)
def test_bad_ws_urls(url: str) -> None:
    with pytest.raises(InvalidEgressUrl):
        parse_ws_url(url)


@pytest.mark.parametrize(
    ("url", "proxy"),
    [
        ("http://proxy:3128", ProxyTarget("http", "proxy", 3128)),
        ("http://proxy", ProxyTarget("http", "proxy", 80)),
        ("https://proxy/", ProxyTarget("https", "proxy", 443)),
        ("http://[::1]:3128", ProxyTarget("http", "::1", 3128)),
        ("http://u%40x:p%3Aw@proxy:1", ProxyTarget("http", "proxy", 1, "u@x", "p:w")),
        ("http://u@proxy:1", ProxyTarget("http", "proxy", 1, "u", "")),
        ("socks5h://proxy", ProxyTarget("socks5h", "proxy", 1080)),
    ],
)
def test_proxy_urls(url: str, proxy: ProxyTarget) -> None:
    parsed = parse_proxy_url(url)
    assert parsed == proxy
    assert (parsed.username, parsed.password) == (proxy.username, proxy.password)


@pytest.mark.parametrize(
    "url",
    ["ftp://proxy:21", "http://", "http://[::1", "http://proxy/path", "garbage", "http://p:0"],
)
def test_bad_proxy_urls(url: str) -> None:
    with pytest.raises(InvalidProxy):
        parse_proxy_url(url)


def test_proxy_credentials_are_not_in_the_repr() -> None:
    proxy = parse_proxy_url("http://user:hunter2@proxy:1")
    assert "hunter2" not in repr(proxy) and "user" not in repr(proxy)


def test_upgrade_request_head() -> None:
    head = build_upgrade_request(
        Target(False, "::1", 8080, "/ws?x=1"), KEY, [("Authorization", "Bearer t")]
    )
    assert head == (
        b"GET /ws?x=1 HTTP/1.1\r\nHost: [::1]:8080\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer t\r\n\r\n"
    )


@pytest.mark.parametrize("value", ["a\r\nb", "a\nb", "a\rb", "a\0b"])
def test_header_values_cannot_inject_lines_and_are_not_quoted(value: str) -> None:
    with pytest.raises(InvalidRequestHeader) as info:
        build_upgrade_request(Target(False, "e", 80, "/"), KEY, [("Authorization", value)])
    assert value not in str(info.value) and "a\\" not in str(info.value)


def test_proxy_connect_head() -> None:
    target = Target(True, "::1", 443, "/ws")
    assert build_proxy_connect(target, ProxyTarget("http", "p", 1), "ua/1") == (
        b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\nUser-Agent: ua/1\r\n\r\n"
    )
    with_auth = build_proxy_connect(target, ProxyTarget("http", "p", 1, "u", "p:w"), "ua/1")
    assert b"Proxy-Authorization: Basic " + base64.b64encode(b"u:p:w") + b"\r\n" in with_auth


# -- response heads -------------------------------------------------------------------------


def good_101(key: str = KEY, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n" + extra + b"\r\n"
    )


def test_good_101_parses_and_checks() -> None:
    response = parse_response_head(good_101())
    assert (response.status, response.reason) == (101, "Switching Protocols")
    assert response.get("upgrade") == "websocket"
    check_upgrade(response, KEY)


@pytest.mark.parametrize(
    "extra",
    [b"Connection: keep-alive, Upgrade\r\n", b"Sec-WebSocket-Extensions:\r\n", b"X-A:  b \r\n"],
)
def test_tolerated_variants(extra: bytes) -> None:
    head = good_101(extra=extra).replace(b"Connection: Upgrade\r\n", b"")
    if b"Connection" not in extra:
        head = head.replace(b"\r\n\r\n", b"\r\nConnection: upgrade\r\n\r\n")
    check_upgrade(parse_response_head(head), KEY)


def test_status_without_reason_and_http_10() -> None:
    assert parse_response_head(b"HTTP/1.1 101\r\n\r\n").status == 101
    assert parse_response_head(b"HTTP/1.0 200 OK\r\n\r\n").status == 200


@pytest.mark.parametrize(
    ("head", "error"),
    [
        (b"garbage\r\n\r\n", MalformedResponse),
        (b"HTTP/2 101 X\r\n\r\n", MalformedResponse),
        (b"HTTP/1.1 1O1 X\r\n\r\n", MalformedResponse),
        (b"HTTP/1.1 099 X\r\n\r\n", MalformedResponse),
        (b"HTTP/1.1 101 X\x01\r\n\r\n", MalformedResponse),
        (b"HTTP/1.1 101 X\r\nno colon\r\n\r\n", MalformedResponse),
        (b"HTTP/1.1 101 X\r\n: empty name\r\n\r\n", MalformedResponse),
        (b"HTTP/1.1 101 X\r\nbad name: v\r\n\r\n", MalformedResponse),
        (b"HTTP/1.1 101 X\r\nA: b\r\n folded\r\n\r\n", MalformedResponse),
        (b"HTTP/1.1 101 X\r\nA: b\x00c\r\n\r\n", MalformedResponse),
        (b"HTTP/1.1 101 X\r\nA: b\rc\r\n\r\n", MalformedResponse),
        (b"HTTP/1.1 101 X\n\n", MalformedResponse),
        (b"HTTP/1.1 101 X\r\n", MalformedResponse),
        (b"HTTP/1.1 101 X\r\n" + b"A: b\r\n" * (MAX_HEADERS + 1) + b"\r\n", ResponseTooLarge),
        (b"HTTP/1.1 101 X\r\nA: " + b"b" * MAX_RESPONSE_HEAD + b"\r\n\r\n", ResponseTooLarge),
    ],
)
def test_malformed_heads(head: bytes, error: type[HandshakeError]) -> None:
    with pytest.raises(error):
        parse_response_head(head)


@pytest.mark.parametrize(
    ("head", "error"),
    [
        (good_101().replace(b"101", b"200", 1), InvalidUpgrade),
        (good_101().replace(b"Upgrade: websocket\r\n", b""), InvalidUpgrade),
        (good_101().replace(b"Upgrade: websocket", b"Upgrade: h2c"), InvalidUpgrade),
        (good_101().replace(b"Connection: Upgrade", b"Connection: close"), InvalidUpgrade),
        (good_101().replace(b"Connection: Upgrade\r\n", b""), InvalidUpgrade),
        (good_101(key=new_key()), InvalidAccept),
        (good_101().replace(b"Sec-WebSocket-Accept", b"X-Other"), InvalidAccept),
        (good_101(extra=b"Sec-WebSocket-Accept: x\r\n"), InvalidAccept),
        (good_101(extra=b"Sec-WebSocket-Extensions: permessage-deflate\r\n"), InvalidUpgrade),
        (good_101(extra=b"Sec-WebSocket-Protocol: chat\r\n"), InvalidUpgrade),
    ],
)
def test_upgrade_check_refusals(head: bytes, error: type[HandshakeError]) -> None:
    with pytest.raises(error):
        check_upgrade(parse_response_head(head), KEY)


def test_find_head_end_across_splits() -> None:
    head = good_101() + b"frame"
    for cut in range(len(head) + 1):
        searched = 0
        buffer = bytearray()
        found = None
        for piece in (head[:cut], head[cut:]):
            buffer += piece
            found = find_head_end(buffer, searched)
            if found is not None:
                break
            searched = len(buffer)
        assert found == len(head) - len(b"frame"), cut


def test_find_head_end_bounds_the_buffer() -> None:
    assert find_head_end(b"x" * (MAX_RESPONSE_HEAD - 1)) is None
    with pytest.raises(ResponseTooLarge):
        find_head_end(b"x" * MAX_RESPONSE_HEAD)
    # An end just past the limit is not looked for: the head would be too large.
    with pytest.raises(ResponseTooLarge):
        find_head_end(b"x" * MAX_RESPONSE_HEAD + b"\r\n\r\n")


# -- properties -----------------------------------------------------------------------------

header_names = st.text(
    alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789"),
    min_size=1,
    max_size=20,
)
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40
).map(str.strip)


@given(st.binary(max_size=400))
def test_any_bytes_parse_or_raise_a_handshake_error(data: bytes) -> None:
    try:
        end = find_head_end(data)
    except HandshakeError:
        return
    if end is None:
        return
    try:
        response = parse_response_head(data[:end])
    except HandshakeError:
        return
    assert isinstance(response, Response)
    with contextlib.suppress(HandshakeError):
        check_upgrade(response, KEY)


@given(st.lists(st.tuples(header_names, header_values), max_size=20), st.integers(100, 599))
def test_response_heads_round_trip(headers: list[tuple[str, str]], status: int) -> None:
    head = f"HTTP/1.1 {status} Reason Phrase\r\n".encode()
    head += b"".join(f"{n}: {v}\r\n".encode() for n, v in headers) + b"\r\n"
    response = parse_response_head(head)
    assert response.status == status and response.reason == "Reason Phrase"
    assert list(response.headers) == headers
    for name, value in headers:
        assert value in response.get_all(name.upper())


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_a_mutated_101_never_passes_for_another_key(prefix: bytes, suffix: bytes) -> None:
    """Whatever surrounds a valid 101 for one key, it never checks out for another key."""
    data = prefix + good_101(key=new_key()) + suffix
    try:
        end = find_head_end(data)
        if end is None:
            return
        response = parse_response_head(data[:end])
        check_upgrade(response, KEY)
    except HandshakeError:
        return
    raise AssertionError("a 101 for another key passed")


@given(
    st.sampled_from(["ws", "wss"]),
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True),
    st.one_of(st.none(), st.integers(1, 65535)),
    st.from_regex(r"(/[A-Za-z0-9._~%-]{0,10}){0,4}(\?[A-Za-z0-9=&]{1,20})?", fullmatch=True),
)
def test_ws_urls_round_trip_into_the_request_line(
    scheme: str, host: str, port: int | None, resource: str
) -> None:
    url = f"{scheme}://{host}{'' if port is None else f':{port}'}{resource}"
    target = parse_ws_url(url)
    default = 443 if scheme == "wss" else 80
    assert target.port == (port or default)
    head = build_upgrade_request(target, KEY)
    first, host_line = head.split(b"\r\n")[:2]
    assert (
        first == f"GET {resource if resource.startswith('/') else '/' + resource} HTTP/1.1".encode()
    )
    expected_host = host if target.port == default else f"{host}:{target.port}"
    assert host_line == f"Host: {expected_host}".encode()


@given(st.text(max_size=60))
def test_any_url_parses_or_raises_a_handshake_error(url: str) -> None:
    for parse in (parse_ws_url, parse_proxy_url):
        with contextlib.suppress(HandshakeError):
            parse(url)


# -- the fuzz harness stays runnable ------------------------------------------------------------


def test_fuzz_harness_runs() -> None:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, str(root / "fuzz" / "fuzz_ws_handshake.py"), "--iterations", "5000"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "no findings" in result.stdout
