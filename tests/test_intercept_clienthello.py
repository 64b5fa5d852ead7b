"""The ClientHello ALPN reader: parse, or raise one of its two documented exceptions."""

from __future__ import annotations

import contextlib
import ssl

from hypothesis import given, settings
from hypothesis import strategies as st

from upstreamproxy.egress.intercept.clienthello import NeedMore, NotClientHello, offered_alpn


def client_hello(offer: list[str] | None, sni: str = "api.example.test") -> bytes:
    """What Python's TLS client sends first (memory BIOs, no socket)."""
    ctx = ssl.create_default_context()
    if offer is not None:
        ctx.set_alpn_protocols(offer)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@given(st.binary(max_size=4096))
@settings(max_examples=300)
def test_arbitrary_bytes_parse_or_raise_a_documented_error(data: bytes) -> None:
    try:
        result = offered_alpn(data)
    except (NeedMore, NotClientHello):
        return
    assert result is None or all(isinstance(name, bytes) for name in result)


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/.-", min_size=1, max_size=20)


@given(st.lists(names, min_size=1, max_size=6, unique=True))
@settings(max_examples=50, deadline=None)
def test_real_client_hellos_round_trip(offer: list[str]) -> None:
    hello = client_hello(offer)
    assert offered_alpn(hello) == [name.encode() for name in offer]
    # Every strict prefix needs more; trailing bytes (the next record) change nothing.
    for cut in (0, 3, 5, len(hello) // 2, len(hello) - 1):
        try:
            offered_alpn(hello[:cut])
        except NeedMore:
            continue
        raise AssertionError(f"a {cut}-byte prefix parsed")
    assert offered_alpn(hello + b"\x17\x03\x03\x00\x01x") == [name.encode() for name in offer]


def test_hello_split_over_two_records_is_reassembled() -> None:
    hello = client_hello(["h2", "http/1.1"])
    body = hello[5:]
    half = len(body) // 2
    split = (
        bytes([0x16, 0x03, 0x01]) + half.to_bytes(2, "big") + body[:half]
        + bytes([0x16, 0x03, 0x01]) + (len(body) - half).to_bytes(2, "big") + body[half:]
    )  # fmt: skip
    assert offered_alpn(split) == [b"h2", b"http/1.1"]


def test_no_alpn_extension_is_none() -> None:
    assert offered_alpn(client_hello(None)) is None
