"""The CONNECT head parser, case by case and by property.

Every head is fed three ways, as h11's tests do: whole, one byte at a time through
``split_head``, and followed by trailing garbage (which must end up in ``rest``, untouched).
"""

from __future__ import annotations

import base64
import ipaddress
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upstreamproxy.connect_head import (
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    ConnectRequest,
    Target,
    basic_credentials,
    build_status_head,
    build_tunnel_request,
    find_head_end,
    parse_basic_credentials,
    parse_connect_head,
    parse_status_head,
    parse_target,
    split_head,
)
from upstreamproxy.errors import HeadError, ProtocolError

ROOT = Path(__file__).resolve().parent.parent
FAST = settings(max_examples=200, deadline=None)
GARBAGE = b"\x16\x03\x01\x02\x00GARBAGE\r\n\r\n\x00\xff"


# --- feeding ---------------------------------------------------------------------------------


def feed_whole(data: bytes) -> tuple[bytes, bytes] | None:
    return split_head(data)


def feed_bytewise(data: bytes) -> tuple[bytes, bytes] | None:
    buffer = bytearray()
    for i in range(len(data)):
        buffer += data[i : i + 1]
        parts = split_head(buffer)
        if parts is not None:
            assert parts[1] == b"", "a head must complete exactly on its last byte"
            return parts
    return None


def feed_with_garbage(data: bytes) -> tuple[bytes, bytes] | None:
    parts = split_head(data + GARBAGE)
    if parts is not None:
        assert parts[1] == GARBAGE
    return parts


FEEDERS: dict[str, Callable[[bytes], tuple[bytes, bytes] | None]] = {
    "whole": feed_whole,
    "bytewise": feed_bytewise,
    "garbage": feed_with_garbage,
}


def parse(data: bytes, feeder: str) -> ConnectRequest:
    parts = FEEDERS[feeder](data)
    assert parts is not None, "head never completed"
    head, _ = parts
    assert head == data
    return parse_connect_head(head)


def head(target: str, *headers: str, version: str = "HTTP/1.1", eol: str = "\r\n") -> bytes:
    lines = [f"CONNECT {target} {version}", *headers]
    return (eol.join(lines) + eol + eol).encode()


# --- valid heads -----------------------------------------------------------------------------

VALID: list[tuple[str, bytes, str, int]] = [
    ("simple", head("example.com:443", "Host: example.com:443"), "example.com", 443),
    ("no-headers", head("example.com:443"), "example.com", 443),
    ("http-1.0", head("example.com:443", version="HTTP/1.0"), "example.com", 443),
    ("bare-lf", head("example.com:443", "Host: x", eol="\n"), "example.com", 443),
    ("lf-lines-crlf-end", b"CONNECT example.com:443 HTTP/1.1\nHost: x\n\r\n", "example.com", 443),
    ("crlf-lines-lf-end", b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\n", "example.com", 443),
    ("ipv4", head("192.0.2.1:8443"), "192.0.2.1", 8443),
    ("port-1", head("example.com:1"), "example.com", 1),
    ("port-65535", head("example.com:65535"), "example.com", 65535),
    ("port-leading-zeros", head("example.com:00443"), "example.com", 443),
    ("trailing-dot", head("example.com.:443"), "example.com.", 443),
    ("underscore-and-dash", head("my_host-1.internal:443"), "my_host-1.internal", 443),
    ("case-kept", head("ExAmple.COM:443"), "ExAmple.COM", 443),
    ("punycode", head("xn--bcher-kva.example:443"), "xn--bcher-kva.example", 443),
    ("utf8-idna", head("bücher.example:443"), "bücher.example", 443),
    ("utf8-cjk", head("例え.テスト:443"), "例え.テスト", 443),
    ("longest-host", head("a" * 253 + ":443"), "a" * 253, 443),
    ("longest-host-trailing-dot", head("a" * 253 + ".:443"), "a" * 253 + ".", 443),
    ("ipv6", head("[2001:db8::1]:443"), "2001:db8::1", 443),
    ("ipv6-loopback", head("[::1]:443"), "::1", 443),
    ("ipv6-normalised", head("[2001:0DB8:0:0:0:0:0:1]:443"), "2001:db8::1", 443),
    (
        "ipv6-v4-mapped",
        head("[::ffff:192.0.2.1]:443"),
        str(ipaddress.IPv6Address("::ffff:192.0.2.1")),
        443,
    ),
    ("header-tab-value", head("a.example:443", "X-A:\tv\t"), "a.example", 443),
    (
        "max-headers",
        head("a.example:443", *[f"X-{i}: {i}" for i in range(MAX_HEADERS)]),
        "a.example",
        443,
    ),
]


@pytest.mark.parametrize("feeder", FEEDERS)
@pytest.mark.parametrize(
    ("data", "host", "port"), [v[1:] for v in VALID], ids=[v[0] for v in VALID]
)
def test_valid_head(data: bytes, host: str, port: int, feeder: str) -> None:
    request = parse(data, feeder)
    assert request.method == "CONNECT"
    assert request.target == Target(host, port)
    assert request.version in ("HTTP/1.1", "HTTP/1.0")


def test_headers_are_kept_in_order_with_values_trimmed() -> None:
    data = head(
        "a.example:443",
        "Host: a.example:443",
        "Proxy-Authorization:  Basic dTpw  ",
        "X-Dup: 1",
        "x-dup: 2",
        "X-Empty:",
        "X-Latin: caf\xe9",
    )
    request = parse_connect_head(data.decode().encode("latin-1"))
    assert request.header("proxy-authorization") == "Basic dTpw"
    assert request.header_values("X-DUP") == ["1", "2"]
    assert request.header("x-empty") == ""
    assert request.header("x-latin") == "café"
    assert request.header("missing") is None
    assert [name for name, _ in request.headers][:2] == ["Host", "Proxy-Authorization"]


def test_head_of_exactly_the_limit_is_accepted() -> None:
    base = head("a.example:443", "X-Pad: ")
    data = head("a.example:443", "X-Pad: " + "p" * (MAX_HEAD_BYTES - len(base)))
    assert len(data) == MAX_HEAD_BYTES
    for feeder in FEEDERS:
        assert parse(data, feeder).header("x-pad") == "p" * (MAX_HEAD_BYTES - len(base))


# --- malformed heads -------------------------------------------------------------------------


def _too_big_complete() -> bytes:
    return head("a.example:443", "X-Pad: " + "p" * MAX_HEAD_BYTES)


MALFORMED: list[tuple[str, bytes, int]] = [
    # method
    ("get-origin-form", b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", 405),
    ("get-absolute-form", b"GET http://example.com/ HTTP/1.1\r\n\r\n", 405),
    ("post", b"POST http://example.com/ HTTP/1.1\r\n\r\n", 405),
    ("lower-case-connect", b"connect example.com:443 HTTP/1.1\r\n\r\n", 405),
    ("method-not-token", b"CONN(ECT example.com:443 HTTP/1.1\r\n\r\n", 400),
    ("method-utf8", "CONNÉCT example.com:443 HTTP/1.1\r\n\r\n".encode(), 400),
    # request line shape and version
    ("http-2", head("example.com:443", version="HTTP/2.0"), 400),
    ("http-1.2", head("example.com:443", version="HTTP/1.2"), 400),
    ("http-1", head("example.com:443", version="HTTP/1"), 400),
    ("version-lower-case", head("example.com:443", version="http/1.1"), 400),
    ("version-missing", b"CONNECT example.com:443\r\n\r\n", 400),
    ("extra-part", b"CONNECT example.com:443 HTTP/1.1 x\r\n\r\n", 400),
    ("double-space", b"CONNECT  example.com:443 HTTP/1.1\r\n\r\n", 400),
    ("leading-space", b" CONNECT example.com:443 HTTP/1.1\r\n\r\n", 400),
    ("trailing-space", b"CONNECT example.com:443 HTTP/1.1 \r\n\r\n", 400),
    ("tab-separator", b"CONNECT\texample.com:443 HTTP/1.1\r\n\r\n", 400),
    ("empty-target", b"CONNECT  HTTP/1.1\r\n\r\n", 400),
    ("empty-head", b"\r\n\r\n", 400),
    ("leading-empty-line", b"\r\nCONNECT example.com:443 HTTP/1.1\r\n\r\n", 400),
    ("invalid-utf8", b"CONNECT ex\xffample.com:443 HTTP/1.1\r\n\r\n", 400),
    # ports
    ("missing-port", head("example.com"), 400),
    ("empty-port", head("example.com:"), 400),
    ("port-0", head("example.com:0"), 400),
    ("port-65536", head("example.com:65536"), 400),
    ("port-99999", head("example.com:99999"), 400),
    ("port-6-digits", head("example.com:000443"), 400),
    ("port-plus", head("example.com:+443"), 400),
    ("port-minus", head("example.com:-1"), 400),
    ("port-hex", head("example.com:0x1bb"), 400),
    ("port-suffix", head("example.com:443a"), 400),
    ("port-path", head("example.com:443/x"), 400),
    ("port-arabic-indic", head("example.com:٤٤٣"), 400),
    ("port-fullwidth", head("example.com:\uff14\uff14\uff13"), 400),
    # host
    ("empty-host", head(":443"), 400),
    ("dot-host", head(".:443"), 400),
    ("userinfo", head("user@example.com:443"), 400),
    ("userinfo-password", head("user:pass@example.com:443"), 400),
    ("absolute-uri", head("https://example.com:443"), 400),
    ("percent-encoded", head("exa%6Dple.com:443"), 400),
    ("percent-encoded-dot", head("example%2Ecom:443"), 400),
    ("path", head("example.com/x:443"), 400),
    ("backslash", head("example.com\\x:443"), 400),
    ("query", head("example.com?x:443"), 400),
    ("host-too-long", head("a" * 254 + ":443"), 400),
    ("tab-in-host", head("exa\tmple.com:443"), 400),
    ("space-in-host", b"CONNECT exa mple.com:443 HTTP/1.1\r\n\r\n", 400),
    ("nul-in-host", head("exa\x00mple.com:443"), 400),
    ("del-in-host", head("exa\x7fmple.com:443"), 400),
    ("nbsp-in-host", head("exa\u00a0mple.com:443"), 400),
    ("nel-in-host", head("exa\u0085mple.com:443"), 400),
    ("zero-width-space-in-host", head("exa\u200bmple.com:443"), 400),
    ("bom-in-host", head("\ufeffexample.com:443"), 400),
    ("ideographic-space-in-host", head("exa\u3000mple.com:443"), 400),
    ("line-separator-in-host", head("exa\u2028mple.com:443"), 400),
    # IPv6
    ("ipv6-unbracketed", head("2001:db8::1:443"), 400),
    ("ipv6-unbracketed-loopback", head("::1:443"), 400),
    ("ipv6-no-port", head("[2001:db8::1]"), 400),
    ("ipv6-empty-port", head("[2001:db8::1]:"), 400),
    ("ipv6-zone", head("[fe80::1%eth0]:443"), 400),
    ("ipv6-zone-percent-encoded", head("[fe80::1%25eth0]:443"), 400),
    ("ipv6-unclosed", head("[::1:443"), 400),
    ("ipv6-double-close", head("[::1]]:443"), 400),
    ("ipv6-junk-after-bracket", head("[::1]x:443"), 400),
    ("ipv6-empty", head("[]:443"), 400),
    ("ipv6-not-an-address", head("[example.com]:443"), 400),
    ("ipv6-bracketed-v4", head("[192.0.2.1]:443"), 400),
    ("ipv6-too-many-groups", head("[1:2:3:4:5:6:7:8:9]:443"), 400),
    ("ipv6-port-0", head("[::1]:0"), 400),
    ("ipv6-port-65536", head("[::1]:65536"), 400),
    # headers and line structure
    ("bare-cr-line-end", b"CONNECT example.com:443 HTTP/1.1\rHost: x\r\n\r\n", 400),
    ("bare-cr-in-value", head("example.com:443", "X-A: a\rb"), 400),
    ("fold-space", head("example.com:443", "X-A: a", " folded"), 400),
    ("fold-tab", head("example.com:443", "X-A: a", "\tfolded"), 400),
    ("header-no-colon", head("example.com:443", "NoColon"), 400),
    ("header-empty-name", head("example.com:443", ": value"), 400),
    ("header-space-before-colon", head("example.com:443", "Host : x"), 400),
    ("header-name-not-token", head("example.com:443", "Ho(st: x"), 400),
    ("header-name-utf8", head("example.com:443", "Hóst: x"), 400),
    ("header-value-nul", head("example.com:443", "X-A: a\x00b"), 400),
    ("header-value-control", head("example.com:443", "X-A: a\x01b"), 400),
    ("header-value-del", head("example.com:443", "X-A: a\x7fb"), 400),
    (
        "too-many-headers",
        head("a.example:443", *[f"X-{i}: {i}" for i in range(MAX_HEADERS + 1)]),
        400,
    ),
]


@pytest.mark.parametrize("feeder", FEEDERS)
@pytest.mark.parametrize(
    ("data", "status"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_head(data: bytes, status: int, feeder: str) -> None:
    with pytest.raises(HeadError) as info:
        parse(data, feeder)
    assert info.value.status == status
    assert isinstance(info.value, ProtocolError)
    assert info.value.reason


@pytest.mark.parametrize("feeder", FEEDERS)
def test_oversized_complete_head_is_400(feeder: str) -> None:
    with pytest.raises(HeadError) as info:
        FEEDERS[feeder](_too_big_complete())
    assert info.value.status == 400


@pytest.mark.parametrize("feeder", FEEDERS)
def test_oversized_unterminated_head_is_400(feeder: str) -> None:
    data = b"CONNECT example.com:443 HTTP/1.1\r\nX-Pad: " + b"p" * MAX_HEAD_BYTES
    with pytest.raises(HeadError) as info:
        FEEDERS[feeder](data)
    assert info.value.status == 400


def test_oversize_is_detected_at_the_limit_not_later() -> None:
    # A relay must not buffer beyond the limit waiting for a terminator that cannot help.
    assert split_head(b"A" * (MAX_HEAD_BYTES - 1)) is None
    with pytest.raises(HeadError):
        split_head(b"A" * MAX_HEAD_BYTES)


def test_split_head_waits_for_the_empty_line() -> None:
    data = head("example.com:443", "Host: x")
    for cut in range(len(data)):
        assert split_head(data[:cut]) is None
    assert find_head_end(data) == len(data)


def test_split_head_stops_at_the_first_empty_line() -> None:
    first = head("a.example:443")
    second = head("b.example:443")
    assert split_head(first + second) == (first, second)


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("user@example.com:443", "userinfo"),
        ("user:pass@example.com:443", "userinfo"),
        ("https://example.com:443", "not a URL"),
        ("2001:db8::1:443", "bracketed"),
        ("[fe80::1%eth0]:443", "zone"),
        ("exa%6Dple.com:443", "percent-encoding"),
        ("example.com", "explicit port"),
        ("example.com:65536", "out of range"),
    ],
)
def test_target_refusals_say_why(target: str, reason: str) -> None:
    with pytest.raises(HeadError) as info:
        parse_target(target)
    assert reason in info.value.reason


# --- building the first chunk and Basic credentials --------------------------------------------


def test_build_tunnel_request_exact_bytes() -> None:
    assert build_tunnel_request(Target("example.com", 443), "sess", "tok") == (
        b"CONNECT example.com:443 HTTP/1.1\r\nProxy-Authorization: Basic c2Vzczp0b2s=\r\n\r\n"
    )


@pytest.mark.parametrize(
    "target", [Target("example.com", 443), Target("2001:db8::1", 8443), Target("bücher.example", 1)]
)
def test_tunnel_request_parses_back(target: Target) -> None:
    request = parse(build_tunnel_request(target, "session-1", "tok:en"), "bytewise")
    assert request.target == target
    assert [name for name, _ in request.headers] == ["Proxy-Authorization"]
    value = request.header("Proxy-Authorization")
    assert value is not None
    assert parse_basic_credentials(value) == ("session-1", "tok:en")


def test_client_proxy_authorization_is_not_forwarded() -> None:
    client = parse_connect_head(
        head("example.com:443", "Proxy-Authorization: Basic ZXZpbDpldmls", "X-Other: 1")
    )
    forwarded = parse_connect_head(build_tunnel_request(client.target, "s", "t"))
    assert forwarded.header_values("Proxy-Authorization") == [basic_credentials("s", "t")]
    assert forwarded.header("X-Other") is None


def test_basic_credentials_format() -> None:
    assert basic_credentials("sess", "tok") == "Basic c2Vzczp0b2s="


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Basic c2Vzczp0b2s=", ("sess", "tok")),
        ("basic c2Vzczp0b2s=", ("sess", "tok")),
        ("BASIC c2Vzczp0b2s=", ("sess", "tok")),
        ("  Basic   c2Vzczp0b2s=  ", ("sess", "tok")),
        ("Basic " + base64.b64encode(b"s:t:o:k").decode(), ("s", "t:o:k")),
        ("Basic " + base64.b64encode(b":").decode(), ("", "")),
        ("Basic " + base64.b64encode("sé:tö".encode()).decode(), ("sé", "tö")),
    ],
)
def test_parse_basic_credentials(value: str, expected: tuple[str, str]) -> None:
    assert parse_basic_credentials(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Basic",
        "Basic ",
        "Bearer c2Vzczp0b2s=",
        "Digest c2Vzczp0b2s=",
        "Basic !!!!",
        "Basic c2Vzczp0b2s",  # bad padding
        "Basic c2Vz czp0b2s=",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:x").decode(),  # not UTF-8
        "Basic \xe9",  # regression: non-ASCII used to escape as a bare ValueError
        "Basic c2Vzczp0b2s=\u00e9",
    ],
)
def test_malformed_basic_credentials_is_407(value: str) -> None:
    with pytest.raises(HeadError) as info:
        parse_basic_credentials(value)
    assert info.value.status == 407
    assert "c2Vz" not in info.value.reason  # the reason never echoes the credential


# --- the in-tunnel status head ---------------------------------------------------------------


def test_established_status_head() -> None:
    data = build_status_head(200)
    assert data == b"HTTP/1.1 200 Connection established\r\n\r\n"
    status = parse_status_head(data)
    assert (status.status, status.reason, status.headers) == (200, "Connection established", ())


def test_deny_status_head_with_reason_and_rule() -> None:
    data = build_status_head(
        403,
        (("X-Upstreamproxy-Reason", "host-not-allowed"), ("X-Upstreamproxy-Rule", "r7")),
        b"denied\n",
    )
    parts = split_head(data)
    assert parts is not None
    head_bytes, body = parts
    status = parse_status_head(head_bytes)
    assert (status.status, status.reason) == (403, "Forbidden")
    assert status.header("x-upstreamproxy-reason") == "host-not-allowed"
    assert status.header("X-Upstreamproxy-Rule") == "r7"
    assert status.header("Content-Length") == str(len(body)) == "7"
    assert status.header("Connection") == "close"
    assert body == b"denied\n"


def test_status_head_values_are_made_safe() -> None:
    data = build_status_head(
        403, (("X-Upstreamproxy-Reason", "例え.jp\r\nSet-Cookie: x\x00"),), b""
    )
    parts = split_head(data)
    assert parts is not None and parts[1] == b""
    status = parse_status_head(parts[0])
    assert status.header("Set-Cookie") is None
    reason = status.header("X-Upstreamproxy-Reason")
    assert reason is not None and "\r" not in reason and "\n" not in reason


@pytest.mark.parametrize("name", ["", "Bad Name", "X-A\r\nX-B", "Ünï"])
def test_status_head_rejects_invalid_header_names(name: str) -> None:
    with pytest.raises(ValueError):
        build_status_head(403, ((name, "v"),))


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"HTTP/1.1 200 Connection established\r\n\r\n", 200, "Connection established"),
        (b"HTTP/1.0 200 OK\r\n\r\n", 200, "OK"),
        (b"HTTP/1.1 200\r\n\r\n", 200, ""),
        (b"HTTP/1.1 502 Bad Gateway\nX-A: b\n\n", 502, "Bad Gateway"),
        (
            b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
            407,
            "Proxy Authentication Required",
        ),
    ],
)
def test_parse_status_head(data: bytes, status: int, reason: str) -> None:
    for feeder in FEEDERS:
        parts = FEEDERS[feeder](data)
        assert parts is not None
        parsed = parse_status_head(parts[0])
        assert (parsed.status, parsed.reason) == (status, reason)


@pytest.mark.parametrize(
    "data",
    [
        b"\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.2 200 OK\r\n\r\n",
        b"http/1.1 200 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 600 Nope\r\n\r\n",
        b"HTTP/1.1 099 Nope\r\n\r\n",
        b"HTTP/1.1 200OK\r\n\r\n",
        b"HTTP/1.1  200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\rX-A: b\r\n\r\n",  # regression: used to be a 400
        b"HTTP/1.1 200 OK\r\nX-A: b\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: \x00\r\n\r\n",
    ],
)
def test_malformed_status_head_is_502(data: bytes) -> None:
    with pytest.raises(HeadError) as info:
        parse_status_head(data)
    assert info.value.status == 502


# --- properties ------------------------------------------------------------------------------

# Bytes that steer generated input into the parser's interesting branches.
_FRAGMENTS = [
    b"CONNECT ",
    b"GET ",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/2",
    b" ",
    b"\t",
    b"\r\n",
    b"\n",
    b"\r",
    b":",
    b"[",
    b"]",
    b"%",
    b"@",
    b"::1",
    b"example.com",
    b"443",
    b"0",
    b"65536",
    b"\x00",
    b"\x7f",
    b"\xc2\xa0",
    b"\xff",
    b"Host: x",
    b"Proxy-Authorization: Basic Og==",
    b" folded",
    b"\xe4\xbe\x8b",
]
head_like = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(_FRAGMENTS), max_size=24).map(b"".join),
    st.builds(
        lambda target, rest: b"CONNECT " + target + b" HTTP/1.1\r\n" + rest + b"\r\n\r\n",
        st.binary(max_size=40) | st.lists(st.sampled_from(_FRAGMENTS), max_size=6).map(b"".join),
        st.binary(max_size=40),
    ),
)


@FAST
@given(head_like)
def test_parse_connect_head_returns_or_raises_head_error(data: bytes) -> None:
    try:
        request = parse_connect_head(data)
    except HeadError as exc:
        assert exc.status in (400, 405)
    else:
        assert request.method == "CONNECT"
        assert 1 <= request.target.port <= 65535
        assert parse_connect_head(build_tunnel_request(request.target, "s", "t")).target == (
            request.target
        )


@FAST
@given(head_like, st.integers(1, MAX_HEAD_BYTES))
def test_split_head_never_returns_more_than_the_limit(data: bytes, limit: int) -> None:
    for candidate in (data, data * (1 + limit // max(len(data), 1))):
        try:
            parts = split_head(candidate, limit)
        except HeadError as exc:
            assert exc.status == 400
            continue
        if parts is None:
            assert len(candidate) < limit
        else:
            head_bytes, rest = parts
            assert len(head_bytes) <= limit
            assert head_bytes + rest == candidate
            assert head_bytes.endswith((b"\n\n", b"\n\r\n"))


@FAST
@given(
    st.text(max_size=60)
    | st.lists(st.sampled_from(_FRAGMENTS), max_size=8).map(
        lambda parts: b"".join(parts).decode("utf-8", "replace")
    )
)
def test_parse_target_returns_or_raises_head_error(raw: str) -> None:
    try:
        target = parse_target(raw)
    except HeadError as exc:
        assert exc.status == 400
    else:
        assert 1 <= target.port <= 65535
        assert parse_target(target.authority) == target


@FAST
@given(head_like)
def test_parse_status_head_returns_or_raises_502(data: bytes) -> None:
    try:
        parse_status_head(data)
    except HeadError as exc:
        assert exc.status == 502


@FAST
@given(st.text(max_size=60) | st.binary(max_size=60).map(lambda b: "Basic " + b.decode("latin-1")))
def test_parse_basic_credentials_returns_or_raises_407(value: str) -> None:
    try:
        parse_basic_credentials(value)
    except HeadError as exc:
        assert exc.status == 407


@FAST
@given(st.text().filter(lambda s: ":" not in s), st.text())
def test_basic_credentials_round_trip(session: str, token: str) -> None:
    assert parse_basic_credentials(basic_credentials(session, token)) == (session, token)


# --- the fuzz harness stays runnable -------------------------------------------------------


def test_fuzz_harness_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "fuzz_connect_head.py"), "--iterations", "3000"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "no findings" in result.stdout
