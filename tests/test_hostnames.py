"""Host normalisation, IP literals, non-canonical IPv4 and host patterns."""

from __future__ import annotations

import contextlib
import re
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from upstreamproxy.egress import hostnames
from upstreamproxy.egress.hostnames import (
    IDNA_BACKEND,
    HostPattern,
    is_ambiguous_ipv4,
    normalise_host,
    parse_ip_literal,
)

# "EXAMPLE.com" in full-width letters with an ideographic full stop
FULLWIDTH_EXAMPLE_COM = "\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25\u3002\uff43\uff4f\uff4d"

# (inputs that must all normalise to the same thing, expected)
EQUIVALENT = [
    (
        ["example.com", "EXAMPLE.COM", "Example.Com", " example.com ", "\texample.com\n"],
        "example.com",
    ),
    (
        ["example.com.", "EXAMPLE.com.", "example.com:443", "example.com.:8443", " example.com:1 "],
        "example.com",
    ),
    (
        [
            "bücher.example",
            "BÜCHER.example",
            "Bücher.Example.",
            "xn--bcher-kva.example",
            "XN--BCHER-KVA.example",
            "bücher.example:443",
        ],
        "xn--bcher-kva.example",
    ),
    (
        [FULLWIDTH_EXAMPLE_COM, "example\u3002com", "example\uff0ecom", "example\uff61com"],
        "example.com",
    ),
    (["例え.テスト", "xn--r8jz45g.xn--zckzah"], "xn--r8jz45g.xn--zckzah"),
    (["_dmarc.Example.com"], "_dmarc.example.com"),
    (["r3---sn-abc.googlevideo.com"], "r3---sn-abc.googlevideo.com"),
    (["localhost", "LOCALHOST.", "localhost:80"], "localhost"),
    (["1.2.3.4", "1.2.3.4:80", " 1.2.3.4. "], "1.2.3.4"),
    (["::1", "[::1]", "[::1]:443", "[0:0:0:0:0:0:0:1]", " [::1] "], "::1"),
    (
        ["2001:DB8::1", "[2001:db8:0::1]:8443", "2001:0db8:0000:0000:0000:0000:0000:0001"],
        "2001:db8::1",
    ),
    (["a" * 63 + ".com"], "a" * 63 + ".com"),
    (["x"], "x"),
]

INVALID = [
    ("", "empty host"),
    ("   ", "empty host"),
    (".", "empty host name"),
    ("..", "empty label"),
    ("a..b", "empty label"),
    (".example.com", "empty label"),
    ("example.com..", "empty label"),
    ("-a.com", "starts or ends with '-'"),
    ("a-.com", "starts or ends with '-'"),
    ("a b.com", "only letters, digits"),
    ("ex%41mple.com", "only letters, digits"),
    ("user@example.com", "only letters, digits"),
    ("example.com/path", "only letters, digits"),
    ("exa\x00mple.com", "only letters, digits"),
    ("a" * 64 + ".com", "longer than 63"),
    (".".join(["a" * 63] * 4) + ".a", "longer than 253"),
    ("a" * 2000, "longer than 1024"),
    ("[::1", "unclosed '['"),
    ("[::1]x", "after ']'"),
    ("[example.com]", "not a valid IPv6"),
    ("[1.2.3.4]", "not a valid IPv6"),
    ("1:2:3:4:5:6:7:8:9", "not a valid IPv6"),
    ("fe80::1%eth0", "zone identifiers"),
    ("[fe80::1%25eth0]:443", "zone identifiers"),
    ("example.com:0", "port must be"),
    ("example.com:65536", "port must be"),
    ("example.com:", "port must be"),
    ("example.com:http", "port must be"),
    ("example.com:-1", "port must be"),
    ("[::1]:99999", "port must be"),
    ("xn--zz.com", "not valid Punycode"),
    ("xn--abc-.com", "starts or ends with '-'"),
    ("xn--example.com", "not a canonical IDNA A-label"),  # decodes to upper-case Greek
    ("xn--abc-0.com", "not valid Punycode"),
    ("a\u200db.com", "invalid international"),
    ("\u2024.com", "invalid international"),
    ("💩.example", "invalid international"),
]

AMBIGUOUS = [
    "2130706433",  # decimal 127.0.0.1
    "017700000001",  # octal, one part
    "0x7f000001",  # hex, one part
    "0X7F000001",
    "0177.0.0.1",  # octal first part
    "0x7f.0.0.1",  # hex first part
    "0x7F.0x0.0x0.0x1",  # all hex
    "127.1",  # two parts
    "127.0.1",  # three parts
    "0x7f.1",  # hex, two parts
    "0177.0x0.1",  # mixed octal and hex
    "127.000.000.001",  # leading zeros
    "127.0.0.01",
    "010.0.0.1",  # reads as 8.0.0.1
    "0",
    "0x",
    "00",
    "4294967295",
    "127.0.0.1.",  # not ambiguous alone (see canonical), but with a leading zero it is:
    "0127.0.0.1.",
    "256.1.1.1",  # numeric but not an address
    "1.2.3.4.5",
    "host.123",
    "example.0x1f",
]

NOT_AMBIGUOUS = [
    "127.0.0.1",
    "1.2.3.4",
    "0.0.0.0",
    "255.255.255.255",
    "example.com",
    "1.2.3.4.example",
    "0x7f.example",
    "123.example",
    "host.0xg",
    "host.1a",
    "localhost",
    "::1",
    "xn--bcher-kva.example",
]


@pytest.mark.parametrize(("inputs", "expected"), EQUIVALENT)
def test_equivalent_spellings_normalise_alike(inputs: list[str], expected: str) -> None:
    for raw in inputs:
        assert normalise_host(raw) == expected, raw


@pytest.mark.parametrize(("raw", "message"), INVALID)
def test_invalid_hosts_are_refused_clearly(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        normalise_host(raw)


def test_non_str_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        normalise_host(b"example.com")  # type: ignore[arg-type]


def test_idna_backend_is_the_idna_package() -> None:
    assert IDNA_BACKEND == "idna"


def test_eszett_is_kept_non_transitional() -> None:
    assert normalise_host("faß.de") == "xn--fa-hia.de"


def test_stdlib_idna_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostnames, "_idna", None)
    assert normalise_host("Bücher.Example.") == "xn--bcher-kva.example"
    assert normalise_host("example\u3002com") == "example.com"
    assert normalise_host("xn--bcher-kva.example") == "xn--bcher-kva.example"
    assert normalise_host("faß.de") == "fass.de"  # IDNA 2003 maps ß to ss
    with pytest.raises(ValueError):
        normalise_host("a b.example")


@pytest.mark.parametrize("host", AMBIGUOUS)
def test_ambiguous_ipv4(host: str) -> None:
    if host == "127.0.0.1.":
        assert not is_ambiguous_ipv4(host)  # one trailing dot is dropped first
        return
    assert is_ambiguous_ipv4(host)


@pytest.mark.parametrize("host", NOT_AMBIGUOUS)
def test_not_ambiguous_ipv4(host: str) -> None:
    assert not is_ambiguous_ipv4(host)


@pytest.mark.parametrize("host", [h for h in AMBIGUOUS if h != "127.0.0.1."])
def test_ambiguous_forms_survive_normalisation_and_are_detected(host: str) -> None:
    # normalise_host keeps them (they are names syntactically); the egress checks afterwards.
    assert is_ambiguous_ipv4(normalise_host(host))
    assert parse_ip_literal(normalise_host(host)) is None


def test_fullwidth_digits_become_a_canonical_literal() -> None:
    host = normalise_host("\uff11\uff12\uff17.\uff10.\uff10.\uff11")  # full-width digits
    assert host == "127.0.0.1"
    assert parse_ip_literal(host) == IPv4Address("127.0.0.1")
    assert is_ambiguous_ipv4(normalise_host("\uff11\uff12\uff17.\uff11"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", IPv4Address("127.0.0.1")),
        ("8.8.8.8", IPv4Address("8.8.8.8")),
        (" 8.8.8.8 ", IPv4Address("8.8.8.8")),
        ("::1", IPv6Address("::1")),
        ("[::1]", IPv6Address("::1")),
        ("::ffff:127.0.0.1", IPv6Address("::ffff:7f00:1")),
        ("2001:DB8::1", IPv6Address("2001:db8::1")),
        ("127.1", None),
        ("0x7f.0.0.1", None),
        ("0177.0.0.1", None),
        ("2130706433", None),
        ("127.0.0.01", None),
        ("[127.0.0.1]", None),
        ("fe80::1%eth0", None),
        ("[fe80::1%eth0]", None),
        ("example.com", None),
        ("", None),
        ("1.2.3.4:80", None),
    ],
)
def test_parse_ip_literal(text: str, expected: IPv4Address | IPv6Address | None) -> None:
    assert parse_ip_literal(text) == expected


# --- patterns --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("example.com", "example.com", True),
        ("example.com", "www.example.com", False),
        ("EXAMPLE.com.", "example.com", True),
        ("*.example.com", "www.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),  # the apex is not covered
        ("*.example.com", "badexample.com", False),
        ("*.example.com", "example.com.evil.net", False),
        ("*.example.com", "xexample.com", False),
        ("*.Bücher.example", "shop.xn--bcher-kva.example", True),
        ("bücher.example", "xn--bcher-kva.example", True),
        ("203.0.113.5", "203.0.113.5", True),
        ("[2001:db8::1]", "2001:db8::1", True),
        ("2001:DB8:0::1", "2001:db8::1", True),
        ("*.com", "example.com", True),
    ],
)
def test_host_pattern_matches(pattern: str, host: str, matches: bool) -> None:
    assert HostPattern.parse(pattern).matches(normalise_host(host)) is matches


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("*", "bare"),
        (" * ", "bare"),
        ("*.", "bare"),
        ("**.example.com", "only allowed as the whole first label"),
        ("*example.com", "only allowed as the whole first label"),
        ("a.*.example.com", "only allowed as the whole first label"),
        ("www.*", "only allowed as the whole first label"),
        ("*.*.example.com", "only allowed as the whole first label"),
        ("example.com:443", "must not include a port"),
        ("*.example.com:443", "must not include a port"),
        ("0x7f.0.0.1", "not a canonical IPv4"),
        ("127.1", "not a canonical IPv4"),
        ("*.0.0.1", "not a canonical IPv4"),
        ("*.[::1]", "must be a DNS name"),
        ("*.1.2.3.4", "must be a DNS name"),
        ("", "empty host"),
        ("*.", "bare"),
        ("*.-bad.com", "starts or ends"),
    ],
)
def test_host_pattern_refusals(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HostPattern.parse(pattern)


def test_host_pattern_attributes() -> None:
    wild = HostPattern.parse("*.Example.COM.")
    assert wild.pattern == "*.example.com"
    assert str(wild) == "*.example.com"
    assert wild.wildcard
    assert wild.suffix == ".example.com"
    exact = HostPattern.parse("Example.com")
    assert not exact.wildcard
    assert exact.suffix == ""
    assert HostPattern.parse("example.com") == exact


# --- properties ------------------------------------------------------------------------------

_label = st.text(
    alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"),
    min_size=1,
    max_size=20,
)
_unicode_label = st.text(
    alphabet=st.characters(codec="utf-8", categories=("Ll", "Lu", "Lo", "Nd")),
    min_size=1,
    max_size=10,
)
_names = st.lists(st.one_of(_label, _unicode_label), min_size=1, max_size=5).map(".".join)


@given(st.one_of(_names, st.text(max_size=80)))
def test_property_normalise_is_idempotent(raw: str) -> None:
    try:
        once = normalise_host(raw)
    except ValueError:
        return
    assert normalise_host(once) == once
    assert once == once.strip().lower()
    assert once.isascii()
    assert not once.endswith(".")


@given(st.text(max_size=80))
def test_property_normalise_raises_only_value_error(raw: str) -> None:
    with contextlib.suppress(ValueError):
        normalise_host(raw)


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_property_canonical_ipv4_is_never_ambiguous(value: int) -> None:
    text = str(IPv4Address(value))
    assert not is_ambiguous_ipv4(text)
    assert parse_ip_literal(text) == IPv4Address(value)
    assert normalise_host(text) == text


@given(st.integers(min_value=0, max_value=2**32 - 1), st.integers(min_value=1, max_value=3))
def test_property_short_and_hex_forms_are_ambiguous(value: int, parts: int) -> None:
    address = IPv4Address(value)
    octets = list(address.packed)
    # inet_aton's short forms: the last part holds the remaining bytes
    head = octets[: parts - 1]
    tail = int.from_bytes(bytes(octets[parts - 1 :]), "big")
    short = ".".join([*map(str, head), str(tail)])
    assert is_ambiguous_ipv4(short)
    assert is_ambiguous_ipv4(".".join(hex(o) for o in octets))


@given(_names)
def test_property_wildcard_never_matches_its_apex(name: str) -> None:
    try:
        host = normalise_host(name)
        pattern = HostPattern.parse(f"*.{host}")
    except ValueError:
        return
    assume(parse_ip_literal(host) is None)
    assert not pattern.matches(host)
    assert pattern.matches(f"a.{host}")
