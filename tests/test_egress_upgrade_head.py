"""The upgrade's request-head parser and the pure parts of the native upgrade (no sockets).

Rule of the property tests (as for the codec's fuzz harness): parse, or raise the documented
:class:`UpgradeHeadError` -- anything else is a bug.
"""

from __future__ import annotations

import base64
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upstreamproxy.egress.native_upgrade import (
    Refusal,
    answer,
    check_upgrade,
    claims,
    switching_protocols,
)
from upstreamproxy.egress.upgrade_head import (
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    RequestHead,
    UpgradeHeadError,
    head_end,
    parse_request_head,
)
from upstreamproxy.errors import HeadError
from upstreamproxy.ws_handshake import accept_key

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RELAY_HEAD = (
    "GET /v1/code/upstreamproxy/ws HTTP/1.1\r\n"
    "Host: egress.example:443\r\n"
    "Upgrade: websocket\r\n"
    "Connection: Upgrade\r\n"
    f"Sec-WebSocket-Key: {KEY}\r\n"
    "Sec-WebSocket-Version: 13\r\n"
    "Authorization: Bearer eyJhbGciOiJFZERTQSJ9.eyJzaWQiOiJzZXNzLTEyMyJ9.c2lnbmF0dXJl\r\n"
    "Content-Type: application/proto\r\n"
    "User-Agent: Python/3.11 websockets/14.1\r\n"
    "\r\n"
).encode()


def head(*lines: str, request: str = "GET /ws HTTP/1.1") -> bytes:
    return ("\r\n".join((request, *lines)) + "\r\n\r\n").encode("latin-1")


def upgrade(*extra: str, drop: str = "") -> RequestHead:
    fields = [
        "Host: e",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
    ]
    fields = [f for f in fields if not (drop and f.lower().startswith(drop.lower()))]
    return parse_request_head(head(*fields, *extra))


# -- the parser, case by case ----------------------------------------------------------------


def test_relay_head_parses() -> None:
    parsed = parse_request_head(RELAY_HEAD)
    assert parsed.method == "GET"
    assert parsed.target == parsed.path == "/v1/code/upstreamproxy/ws"
    assert parsed.version == (1, 1)
    assert parsed.header("SEC-WEBSOCKET-KEY") == KEY
    assert parsed.header("content-type") == "application/proto"
    assert parsed.header("x-missing") is None


def test_names_are_case_insensitive_and_ows_is_trimmed() -> None:
    parsed = parse_request_head(head("hOsT:e", "X-A: \t spaced value \t", "X-Empty:"))
    assert parsed.headers == {"host": "e", "x-a": "spaced value", "x-empty": ""}


def test_repeated_fields_are_combined_in_order() -> None:
    parsed = parse_request_head(head("Host: e", "Connection: keep-alive", "connection: Upgrade"))
    assert parsed.header("connection") == "keep-alive, Upgrade"


def test_query_is_kept_in_the_target_not_the_path() -> None:
    parsed = parse_request_head(head("Host: e", request="GET /ws?x=1&y HTTP/1.0"))
    assert (parsed.target, parsed.path, parsed.version) == ("/ws?x=1&y", "/ws", (1, 0))


def test_obs_text_in_a_value_is_kept_as_latin1() -> None:
    parsed = parse_request_head(b"GET / HTTP/1.1\r\nHost: e\r\nX: caf\xe9\r\n\r\n")
    assert parsed.header("x") == "caf\xe9"


HOSTILE: list[tuple[bytes, int, str]] = [
    (b"GET /ws HTTP/1.1\r\nHost: e\r\n", 400, "truncated-head"),
    (b"", 400, "truncated-head"),
    (b"GET /ws HTTP/1.1\r\n\r\n", 400, "missing-host"),
    (head("Host: a", "Host: b"), 400, "duplicate-host"),
    (head("Host: e", " folded"), 400, "obs-fold"),
    (head("Host: e", "X: a", "\tfolded"), 400, "obs-fold"),
    (head("Host: e", "X: a\nY: b"), 400, "bare-cr-or-lf"),
    (head("Host: e", "X: a\rb"), 400, "bare-cr-or-lf"),
    (head("Host: e", "X a"), 400, "malformed-header"),
    (head("Host: e", "X : a"), 400, "malformed-header"),
    (head("Host: e", ": a"), 400, "malformed-header"),
    (head("Host: e", "X(: a"), 400, "malformed-header"),
    (head("Host: e", "X: a\x00b"), 400, "bad-header-character"),
    (head("Host: e", "X: a\x7fb"), 400, "bad-header-character"),
    (head("Host: e", request="GET /ws HTTP/2.0"), 505, "http-version-not-supported"),
    (head("Host: e", request="GET /ws HTTP/0.9"), 505, "http-version-not-supported"),
    (head("Host: e", request="GET /ws HTTP/1.10"), 400, "malformed-request-line"),
    (head("Host: e", request="GET  /ws HTTP/1.1"), 400, "malformed-request-line"),
    (head("Host: e", request="GET /w s HTTP/1.1"), 400, "malformed-request-line"),
    (head("Host: e", request="GET /ws"), 400, "malformed-request-line"),
    (head("Host: e", request="G(T /ws HTTP/1.1"), 400, "malformed-request-line"),
    (head("Host: e", request="GET /w\xe9 HTTP/1.1"), 400, "malformed-request-line"),
    (head("Host: e", request="\x16\x03\x01 /ws HTTP/1.1"), 400, "malformed-request-line"),
    (head("Host: e", request="GET /ws HTTP/1.1\n"), 400, "malformed-request-line"),
    (b"\r\n" + head("Host: e"), 400, "malformed-request-line"),
    (head("Host: e", *(f"X-{i}: v" for i in range(MAX_HEADERS))), 431, "too-many-headers"),
    (head("Host: e", "X: " + "a" * MAX_HEAD_BYTES), 431, "head-too-large"),
    (head("Host: e", request="GET /" + "a" * 8200 + " HTTP/1.1"), 431, "head-too-large"),
    (b"\x00\xff" * 5000 + b"\r\n\r\n", 431, "head-too-large"),
]


@pytest.mark.parametrize(("data", "status", "code"), HOSTILE)
def test_hostile_heads_get_a_typed_error(data: bytes, status: int, code: str) -> None:
    with pytest.raises(UpgradeHeadError) as info:
        parse_request_head(data)
    assert (info.value.status, info.value.code) == (status, code)
    assert isinstance(info.value, HeadError)


def test_errors_never_quote_the_input() -> None:
    secret = "Bearer SECRET-TOKEN-VALUE"
    for bad in (
        head("Host: e", f"Authorization: {secret}\x00"),
        head("Host: e", f"Authorization : {secret}"),
        head("Host: e", f" Authorization: {secret}"),
        head(f"Authorization: {secret}"),
        head("Host: e", f"Authorization: {secret}" + "x" * MAX_HEAD_BYTES),
    ):
        with pytest.raises(UpgradeHeadError) as info:
            parse_request_head(bad)
        assert "SECRET" not in str(info.value) and "SECRET" not in info.value.reason


def test_limits_are_at_most_aiohttps() -> None:
    # aiohttp 3.x served the upgrade with max_line_size=max_field_size=8190, max_headers=128.
    assert MAX_HEAD_BYTES <= 8192 and MAX_HEADERS <= 128
    exactly = head("Host: e", "X: " + "a" * (MAX_HEAD_BYTES - 34))
    assert len(exactly) == MAX_HEAD_BYTES
    assert parse_request_head(exactly).header("x") is not None
    with pytest.raises(UpgradeHeadError):
        parse_request_head(head("Host: e", "X: " + "a" * (MAX_HEAD_BYTES - 33)))


def test_head_end_resumes_where_it_left_off() -> None:
    data = RELAY_HEAD + b"\x82\x85frame"
    end = len(RELAY_HEAD)
    assert head_end(data) == end
    assert head_end(data[: end - 1]) == -1
    # The terminator split across reads is still found when resuming from the old length.
    for cut in range(end - 4, end):
        assert head_end(data, cut) == end


def test_parser_is_fast_enough() -> None:
    """A typical relay head parses in well under 50 µs (measured in bulk; loose bound for a
    loaded CI machine; the README quotes the figure from an idle one)."""
    rounds = 2000
    started = time.perf_counter()
    for _ in range(rounds):
        check_upgrade(parse_request_head(RELAY_HEAD))
    per_head = (time.perf_counter() - started) / rounds
    assert per_head < 200e-6, f"{per_head * 1e6:.1f} µs per head"


# -- the parser, by property -----------------------------------------------------------------

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
names = st.text(TCHAR, min_size=1, max_size=20).filter(lambda n: n.lower() != "host")
values = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=0, max_size=40
).map(lambda v: v.replace(" ", ""))
inner_space_values = st.tuples(values, values).map(lambda t: f"{t[0]} {t[1]}".strip())
methods = st.text(TCHAR, min_size=1, max_size=10)
targets = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60)
field_lists = st.lists(st.tuples(names, st.one_of(values, inner_space_values)), max_size=20)


@given(methods, targets, st.sampled_from([(1, 0), (1, 1)]), field_lists, st.booleans())
@settings(max_examples=300)
def test_well_formed_heads_round_trip(
    method: str,
    target: str,
    version: tuple[int, int],
    fields: list[tuple[str, str]],
    host_first: bool,
) -> None:
    lines = [f"{name}: {value}" for name, value in fields]
    lines.insert(0 if host_first else len(lines), "Host: h")
    data = head(*lines, request=f"{method} {target} HTTP/{version[0]}.{version[1]}")
    parsed = parse_request_head(data)
    assert (parsed.method, parsed.target, parsed.version) == (method, target, version)
    expected: dict[str, list[str]] = {"host": ["h"]}
    for name, value in fields:
        expected.setdefault(name.lower(), []).append(value)
    assert parsed.headers == {name: ", ".join(vals) for name, vals in expected.items()}


@given(st.binary(max_size=400))
@settings(max_examples=500)
def test_arbitrary_bytes_parse_or_raise_the_documented_error(data: bytes) -> None:
    for candidate in (data, data + b"\r\n\r\n", b"GET / HTTP/1.1\r\nHost: e\r\n" + data):
        try:
            parse_request_head(candidate)
        except UpgradeHeadError as exc:
            assert exc.status in (400, 431, 505)


@given(st.integers(0, len(RELAY_HEAD) - 1), st.integers(0, 255))
@settings(max_examples=500)
def test_one_byte_mutations_of_a_relay_head(index: int, byte: int) -> None:
    mutated = bytearray(RELAY_HEAD)
    mutated[index] = byte
    try:
        parsed = parse_request_head(bytes(mutated))
    except UpgradeHeadError:
        return
    try:
        check_upgrade(parsed)
    except Refusal as refusal:
        assert refusal.status in (400, 426)


@given(st.lists(st.integers(1, 64), min_size=1, max_size=40))
@settings(max_examples=200)
def test_head_end_is_found_however_the_bytes_arrive(cuts: list[int]) -> None:
    data = RELAY_HEAD + b"trailing"
    buffer = bytearray()
    scanned, position, found = 0, 0, -1
    for size in cuts:
        buffer += data[position : position + size]
        position += size
        found = head_end(buffer, scanned)
        if found >= 0:
            break
        scanned = len(buffer)
    if position >= len(RELAY_HEAD):
        assert found == len(RELAY_HEAD)
    else:
        assert found == -1


# -- what the native upgrade answers (pure parts) --------------------------------------------


def test_a_relay_upgrade_is_accepted() -> None:
    assert check_upgrade(parse_request_head(RELAY_HEAD)) == KEY


def test_connection_and_upgrade_are_token_lists() -> None:
    lists = upgrade("Connection: keep-alive, Upgrade", drop="Connection")
    assert check_upgrade(lists) == KEY
    assert check_upgrade(upgrade("Upgrade: h2c")) == KEY  # combined list


@pytest.mark.parametrize(
    ("parsed", "status"),
    [
        (upgrade(drop="Upgrade"), 400),
        (upgrade("Upgrade: h2c", drop="Upgrade:"), 400),
        (upgrade(drop="Connection"), 400),
        (upgrade("Connection: keep-alive", drop="Connection"), 400),
        (upgrade(drop="Sec-WebSocket-Key"), 400),
        (
            upgrade(
                "Sec-WebSocket-Key: " + base64.b64encode(b"x" * 15).decode(),
                drop="Sec-WebSocket-Key",
            ),
            400,
        ),
        (upgrade("Sec-WebSocket-Key: not base64 at all!!!!!", drop="Sec-WebSocket-Key"), 400),
        (upgrade(f"Sec-WebSocket-Key: {KEY}"), 400),  # repeated: combined, no longer a key
        (upgrade(drop="Sec-WebSocket-Version"), 400),
        (upgrade("Sec-WebSocket-Version: 8", drop="Sec-WebSocket-Version"), 426),
        (upgrade("Sec-WebSocket-Version: 13"), 426),  # repeated: "13, 13"
        (upgrade("Content-Length: 5"), 400),
        (upgrade("Transfer-Encoding: chunked"), 400),
        (
            parse_request_head(
                head(
                    "Host: e",
                    "Upgrade: websocket",
                    "Connection: Upgrade",
                    f"Sec-WebSocket-Key: {KEY}",
                    "Sec-WebSocket-Version: 13",
                    request="GET /ws HTTP/1.0",
                )
            ),
            400,
        ),
    ],
)
def test_what_is_not_an_upgrade(parsed: RequestHead, status: int) -> None:
    with pytest.raises(Refusal) as info:
        check_upgrade(parsed)
    assert info.value.status == status
    assert info.value.body == {"error": "websocket upgrade required"}
    headers = dict(info.value.headers)
    if status == 426:
        assert headers["Sec-WebSocket-Version"] == "13"


def test_empty_content_length_is_fine() -> None:
    assert check_upgrade(upgrade("Content-Length: 0")) == KEY


def test_answers_are_complete_closing_json_responses() -> None:
    data = answer(401, {"error": "unauthorized", "reason": "unknown-token"}, (("X-R", "r"),))
    head_part, _, body = data.partition(b"\r\n\r\n")
    lines = head_part.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 401 Unauthorized"
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert fields["Connection"] == "close"
    assert fields["Content-Type"] == "application/json; charset=utf-8"
    assert int(fields["Content-Length"]) == len(body)
    assert fields["X-R"] == "r"
    assert json.loads(body) == {"error": "unauthorized", "reason": "unknown-token"}


def test_switching_protocols_head() -> None:
    data = switching_protocols(KEY)
    assert data == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )
    assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 §1.3's example


@pytest.mark.parametrize(
    ("buffer", "expected"),
    [
        (b"", None),
        (b"G", None),
        (b"GET /ws", None),
        (b"GET /ws ", True),
        (b"GET /ws?x=1 HTTP/1.1", True),
        (b"GET /wss HTTP/1.1", False),
        (b"GET /ws/ HTTP/1.1", False),
        (b"GET /healthz HTTP/1.1", False),
        (b"POST /ws HTTP/1.1", False),
        (b"get /ws HTTP/1.1", False),
        (b"GET http://e/ws HTTP/1.1", False),
        (b"\x16\x03\x01", False),
        (b"\r\nGET /ws HTTP/1.1", False),
    ],
)
def test_claims_decides_on_the_request_line(buffer: bytes, expected: bool | None) -> None:
    assert claims(buffer, b"GET /ws") is expected


@given(st.binary(max_size=30), st.integers(0, 30))
def test_claims_never_changes_its_mind(data: bytes, cut: int) -> None:
    """Once decided on a prefix, more bytes give the same answer."""
    first = claims(data[:cut], b"GET /ws")
    if first is not None:
        assert claims(data, b"GET /ws") is first


def test_the_parser_does_no_io() -> None:
    """The same static check as ``test_purity.py``'s (imports, followed through the package)."""
    import test_purity

    test_purity.test_module_imports_no_io("egress/upgrade_head.py")
