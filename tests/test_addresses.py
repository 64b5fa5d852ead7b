"""Special-purpose address classification, CIDR sets and the address verdict."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from upstreamproxy.egress.addresses import (
    CidrSet,
    blocked_reason,
    check_address,
    embedded_ipv4,
)
from upstreamproxy.errors import ConfigError

PUBLIC_V4 = "8.8.8.8"

# (address, expected reason or None). Each range is probed at its first and last address and
# the addresses just outside it.
V4_CASES = [
    # 0.0.0.0/8
    ("0.0.0.0", "unspecified"),
    ("0.0.0.1", "this-network"),
    ("0.255.255.255", "this-network"),
    ("1.0.0.0", None),
    # 10/8
    ("9.255.255.255", None),
    ("10.0.0.0", "private"),
    ("10.255.255.255", "private"),
    ("11.0.0.0", None),
    # 100.64/10
    ("100.63.255.255", None),
    ("100.64.0.0", "cgnat"),
    ("100.127.255.255", "cgnat"),
    ("100.128.0.0", None),
    ("100.100.100.200", "cloud-metadata"),
    # 127/8
    ("126.255.255.255", None),
    ("127.0.0.0", "loopback"),
    ("127.0.0.1", "loopback"),
    ("127.255.255.255", "loopback"),
    ("128.0.0.0", None),
    # 169.254/16
    ("169.253.255.255", None),
    ("169.254.0.0", "link-local"),
    ("169.254.169.253", "link-local"),
    ("169.254.169.254", "cloud-metadata"),
    ("169.254.169.255", "link-local"),
    ("169.254.170.2", "cloud-metadata"),
    ("169.254.255.255", "link-local"),
    ("169.255.0.0", None),
    # 172.16/12
    ("172.15.255.255", None),
    ("172.16.0.0", "private"),
    ("172.31.255.255", "private"),
    ("172.32.0.0", None),
    # 192.0.0/24
    ("191.255.255.255", None),
    ("192.0.0.0", "ietf-protocol"),
    ("192.0.0.192", "cloud-metadata"),
    ("192.0.0.255", "ietf-protocol"),
    ("192.0.1.0", None),
    # 192.0.2/24
    ("192.0.2.0", "documentation"),
    ("192.0.2.255", "documentation"),
    ("192.0.3.0", None),
    # 192.88.99/24
    ("192.88.98.255", None),
    ("192.88.99.0", "6to4-relay-anycast"),
    ("192.88.99.255", "6to4-relay-anycast"),
    ("192.88.100.0", None),
    # 192.168/16
    ("192.167.255.255", None),
    ("192.168.0.0", "private"),
    ("192.168.255.255", "private"),
    ("192.169.0.0", None),
    # 198.18/15
    ("198.17.255.255", None),
    ("198.18.0.0", "benchmarking"),
    ("198.19.255.255", "benchmarking"),
    ("198.20.0.0", None),
    # 198.51.100/24
    ("198.51.99.255", None),
    ("198.51.100.0", "documentation"),
    ("198.51.100.255", "documentation"),
    ("198.51.101.0", None),
    # 203.0.113/24
    ("203.0.112.255", None),
    ("203.0.113.0", "documentation"),
    ("203.0.113.255", "documentation"),
    ("203.0.114.0", None),
    # 224/4
    ("223.255.255.255", None),
    ("224.0.0.0", "multicast"),
    ("239.255.255.255", "multicast"),
    # 240/4 and broadcast
    ("240.0.0.0", "reserved"),
    ("255.255.255.254", "reserved"),
    ("255.255.255.255", "broadcast"),
    # Azure WireServer: public, blocked on purpose
    ("168.63.129.16", "cloud-metadata"),
    ("168.63.129.17", None),
    # ordinary public addresses
    ("1.1.1.1", None),
    ("8.8.8.8", None),
    ("93.184.215.14", None),
]

V6_CASES = [
    ("::", "unspecified"),
    ("::1", "loopback"),
    # 100::/64 discard-only
    ("ff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    ("100::", "discard-only"),
    ("100::ffff:ffff:ffff:ffff", "discard-only"),
    ("100:0:0:1::", "reserved"),
    # fe80::/10
    ("fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    ("fe80::", "link-local"),
    ("fe80::1", "link-local"),
    ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "link-local"),
    # fec0::/10
    ("fec0::", "site-local"),
    ("feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "site-local"),
    # fc00::/7
    ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    ("fc00::", "ula"),
    ("fd12:3456::1", "ula"),
    ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "ula"),
    ("fd00:ec2::254", "cloud-metadata"),
    ("fd00:ec2::23", "cloud-metadata"),
    ("fd00:ec2::253", "ula"),
    # ff00::/8
    ("ff00::", "multicast"),
    ("ff02::1", "multicast"),
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "multicast"),
    # 2001:db8::/32
    ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", None),
    ("2001:db8::", "documentation"),
    ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", "documentation"),
    ("2001:db9::", None),
    # 3fff::/20
    ("3fff::", "documentation"),
    ("3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", "documentation"),
    ("3fff:1000::", None),
    # 2001:2::/48 benchmarking, rest of 2001::/23 IETF protocol assignments
    ("2001:2::", "benchmarking"),
    ("2001:2:0:ffff:ffff:ffff:ffff:ffff", "benchmarking"),
    ("2001:2:1::", "ietf-protocol"),
    ("2001:1::1", "ietf-protocol"),
    ("2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", "ietf-protocol"),
    ("2001:200::", None),
    # outside 2000::/3
    ("1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    ("4000::", "reserved"),
    ("5f00::1", "reserved"),
    ("64:ff9b:0:1::", "reserved"),
    # global unicast
    ("2000::", None),
    ("2606:4700:4700::1111", None),
    ("2a00:1450:4001:80b::200e", None),
    ("3ffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),
]

BLOCKED_V4 = {
    "0.0.0.0": "unspecified",
    "0.1.2.3": "this-network",
    "127.0.0.1": "loopback",
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "192.168.1.1": "private",
    "169.254.1.1": "link-local",
    "169.254.169.254": "cloud-metadata",
    "100.64.0.1": "cgnat",
    "192.0.0.8": "ietf-protocol",
    "192.0.2.1": "documentation",
    "198.18.0.1": "benchmarking",
    "224.0.0.1": "multicast",
    "240.0.0.1": "reserved",
    "255.255.255.255": "broadcast",
}


def _v4(text: str) -> int:
    return int(IPv4Address(text))


def mapped(v4: str) -> str:
    return str(IPv6Address((0xFFFF << 32) | _v4(v4)))


def compatible(v4: str) -> str:
    return str(IPv6Address(_v4(v4)))


def translated(v4: str) -> str:
    return str(IPv6Address((0xFFFF << 48) | _v4(v4)))


def nat64(v4: str) -> str:
    return str(IPv6Address(int(IPv6Address("64:ff9b::")) | _v4(v4)))


def nat64_local_96(v4: str) -> str:
    return str(IPv6Address(int(IPv6Address("64:ff9b:1::")) | _v4(v4)))


def nat64_local_48(v4: str) -> str:
    value = _v4(v4)
    high, low = value >> 16, value & 0xFFFF
    return str(IPv6Address(int(IPv6Address("64:ff9b:1::")) | (high << 64) | (low << 40)))


def nat64_local_56(v4: str) -> str:
    value = _v4(v4)
    high, low = value >> 24, value & 0xFFFFFF
    return str(IPv6Address(int(IPv6Address("64:ff9b:1::")) | (high << 64) | (low << 32)))


def nat64_local_64(v4: str) -> str:
    return str(IPv6Address(int(IPv6Address("64:ff9b:1::")) | (_v4(v4) << 24)))


def six_to_four(v4: str) -> str:
    return str(IPv6Address((0x2002 << 112) | (_v4(v4) << 80) | 1))


def teredo(client: str, server: str = "65.54.227.120") -> str:
    value = (0x20010000 << 96) | (_v4(server) << 64) | (0x8000 << 48) | (0x63BF << 32)
    return str(IPv6Address(value | (~_v4(client) & 0xFFFFFFFF)))


WRAPPERS: dict[str, Callable[[str], str]] = {
    "ipv4-mapped": mapped,
    "ipv4-compatible": compatible,
    "ipv4-translated": translated,
    "nat64": nat64,
    "nat64-local-96": nat64_local_96,
    "nat64-local-48": nat64_local_48,
    "nat64-local-56": nat64_local_56,
    "nat64-local-64": nat64_local_64,
    "6to4": six_to_four,
    "teredo": teredo,
}


def _prefix(kind: str) -> str:
    return "nat64" if kind.startswith("nat64") else kind


@pytest.mark.parametrize(("address", "reason"), V4_CASES)
def test_ipv4_ranges(address: str, reason: str | None) -> None:
    assert blocked_reason(IPv4Address(address)) == reason


@pytest.mark.parametrize(("address", "reason"), V6_CASES)
def test_ipv6_ranges(address: str, reason: str | None) -> None:
    assert blocked_reason(IPv6Address(address)) == reason


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
@pytest.mark.parametrize(("inner", "reason"), sorted(BLOCKED_V4.items()))
def test_embedded_blocked_ipv4_is_judged_by_its_ipv4(kind: str, inner: str, reason: str) -> None:
    address = IPv6Address(WRAPPERS[kind](inner))
    if kind == "ipv4-compatible" and inner == "0.0.0.0":
        assert blocked_reason(address) == "unspecified"  # that is "::"
        return
    assert blocked_reason(address) == f"{_prefix(kind)}:{reason}"


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
@pytest.mark.parametrize("inner", ["8.8.8.8", "1.1.1.1", "93.184.215.14"])
def test_embedded_public_ipv4_is_allowed(kind: str, inner: str) -> None:
    address = IPv6Address(WRAPPERS[kind](inner))
    assert blocked_reason(address) is None
    assert check_address(address, CidrSet(), CidrSet()) == (True, "public")


@pytest.mark.parametrize(
    ("address", "kind", "inner"),
    [
        ("::ffff:127.0.0.1", "ipv4-mapped", ["127.0.0.1"]),
        ("::10.0.0.1", "ipv4-compatible", ["10.0.0.1"]),
        ("::ffff:0:10.0.0.1", "ipv4-translated", ["10.0.0.1"]),
        ("64:ff9b::192.168.0.1", "nat64", ["192.168.0.1"]),
        ("64:ff9b:1::8.8.8.8", "nat64", ["8.8.8.8"]),
        ("2002:c000:0201::1", "6to4", ["192.0.2.1"]),
        # RFC 4380's example: server 65.54.227.120, client 192.0.2.45
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "teredo", ["192.0.2.45", "65.54.227.120"]),
    ],
)
def test_embedded_ipv4_extraction(address: str, kind: str, inner: list[str]) -> None:
    embedded = embedded_ipv4(IPv6Address(address))
    assert embedded is not None
    assert embedded.kind == kind
    assert [str(a) for a in embedded.addresses] == inner


@pytest.mark.parametrize("address", ["::", "::1", "2606:4700::1", "fe80::1", "2001:db8::1"])
def test_no_embedded_ipv4(address: str) -> None:
    assert embedded_ipv4(IPv6Address(address)) is None


def test_teredo_documentation_example_is_blocked_by_client() -> None:
    assert blocked_reason(ip_address("2001:0:4136:e378:8000:63bf:3fff:fdd2")) == (
        "teredo:documentation"
    )


def test_teredo_blocked_server_is_refused_too() -> None:
    address = IPv6Address(teredo("8.8.8.8", server="10.0.0.1"))
    assert blocked_reason(address) == "teredo-server:private"


def test_teredo_client_is_bit_inverted() -> None:
    # 127.0.0.1 stored without inversion would read back as 128.255.255.254 (public).
    raw = IPv6Address((0x20010000 << 96) | (_v4("8.8.8.8") << 64) | _v4("127.0.0.1"))
    assert blocked_reason(raw) is None
    assert blocked_reason(IPv6Address(teredo("127.0.0.1", "8.8.8.8"))) == "teredo:loopback"


def test_nat64_local_any_consistent_position_is_checked() -> None:
    # The /48 layout of 127.0.0.1 is also a consistent /56 and /64 layout (0.0.1.0, 0.1.0.0);
    # its /96 reading, 0.0.0.0, is only the zero suffix and is dropped.
    address = IPv6Address(nat64_local_48("127.0.0.1"))
    embedded = embedded_ipv4(address)
    assert embedded is not None
    assert embedded.addresses == (
        IPv4Address("127.0.0.1"),
        IPv4Address("0.0.1.0"),
        IPv4Address("0.1.0.0"),
    )
    assert blocked_reason(address) == "nat64:loopback"


def test_nat64_local_all_zero_is_unspecified() -> None:
    assert blocked_reason(IPv6Address("64:ff9b:1::")) == "nat64:unspecified"


def test_nat64_local_ambiguity_errs_towards_refusing() -> None:
    # /64 layout of the public 93.184.215.10: its /96 reading is 10.0.0.0.
    address = IPv6Address(nat64_local_64("93.184.215.10"))
    assert blocked_reason(address) == "nat64:private"
    allow = CidrSet.parse(["64:ff9b:1::/48"], "allow")
    assert check_address(address, allow, CidrSet()) == (True, "allow-list:64:ff9b:1::/48")


def test_zone_id_does_not_change_the_class() -> None:
    assert blocked_reason(IPv6Address("fe80::1%eth0")) == "link-local"
    assert blocked_reason(IPv6Address("::ffff:7f00:1%1")) == "ipv4-mapped:loopback"


def test_agrees_with_stdlib_on_global_ipv4() -> None:
    # Everything the stdlib calls non-global we block too (we block more, never less).
    for address, _reason in V4_CASES:
        ip = IPv4Address(address)
        if not ip.is_global:
            assert blocked_reason(ip) is not None, address


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_property_stdlib_non_global_ipv4_is_blocked(value: int) -> None:
    ip = IPv4Address(value)
    if not ip.is_global:
        assert blocked_reason(ip) is not None


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_property_mapped_matches_ipv4(value: int) -> None:
    ip = IPv4Address(value)
    inner = blocked_reason(ip)
    outer = blocked_reason(IPv6Address((0xFFFF << 32) | value))
    assert outer == (None if inner is None else f"ipv4-mapped:{inner}")


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_property_any_ipv6_classifies(value: int) -> None:
    reason = blocked_reason(IPv6Address(value))
    assert reason is None or isinstance(reason, str)


# --- CidrSet ---------------------------------------------------------------------------------


def test_cidr_set_parse_and_contains() -> None:
    cidrs = CidrSet.parse(["10.0.0.0/8", " 2001:db8::/32 ", "192.0.2.7"], "egress.block")
    assert len(cidrs) == 3
    assert cidrs.contains(IPv4Address("10.9.9.9"))
    assert cidrs.contains(IPv4Address("192.0.2.7"))
    assert not cidrs.contains(IPv4Address("192.0.2.8"))
    assert cidrs.contains(IPv6Address("2001:db8::5"))
    assert not cidrs.contains(IPv6Address("2001:db9::5"))
    assert IPv4Address("10.0.0.1") in cidrs
    assert "10.0.0.1" not in cidrs
    assert str(cidrs.match(IPv4Address("10.1.1.1"))) == "10.0.0.0/8"


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_cidr_set_matches_embedded_ipv4(kind: str) -> None:
    cidrs = CidrSet.parse(["93.184.0.0/16"], "block")
    assert cidrs.contains(IPv6Address(WRAPPERS[kind]("93.184.215.14")))
    assert not cidrs.contains(IPv6Address(WRAPPERS[kind]("8.8.8.8")))


def test_cidr_set_mapped_rule_becomes_ipv4_rule() -> None:
    cidrs = CidrSet.parse(["::ffff:10.0.0.0/104"], "block")
    assert [str(n) for n in cidrs] == ["10.0.0.0/8"]
    assert cidrs.contains(IPv4Address("10.2.3.4"))
    assert cidrs.contains(IPv6Address("::ffff:10.2.3.4"))


@pytest.mark.parametrize(
    ("entries", "problem"),
    [
        (["10.0.0.1/8"], "host bits set; did you mean 10.0.0.0/8?"),
        (["not-an-ip"], "not a CIDR"),
        (["10.0.0.0/33"], "not a CIDR"),
        (["010.0.0.0/8"], "not a CIDR"),
        ([""], "empty CIDR entry"),
        (["fe80::1%eth0/128"], "zone identifiers are not allowed"),
        ([42], "expected a CIDR string"),
        ("10.0.0.0/8", "expected a list"),
    ],
)
def test_cidr_set_parse_errors_name_the_field(entries: object, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        CidrSet.parse(entries, "policy.default.block_cidrs")  # type: ignore[arg-type]
    assert info.value.field == "policy.default.block_cidrs"
    assert problem in info.value.problem


def test_cidr_set_equality_and_repr() -> None:
    a = CidrSet.parse(["10.0.0.0/8", "::1/128"], "x")
    b = CidrSet.parse(["::1/128", "10.0.0.0/8", "10.0.0.0/8"], "x")
    assert a == b
    assert hash(a) == hash(b)
    assert len(b) == 2
    assert repr(a) == "CidrSet(['10.0.0.0/8', '::1/128'])"


# --- check_address ---------------------------------------------------------------------------

ALLOW = CidrSet.parse(["10.1.0.0/16", "fd00:1::/32"], "allow")
BLOCK = CidrSet.parse(["10.1.2.0/24", "93.184.0.0/16", "2606:4700::/32"], "block")


@pytest.mark.parametrize(
    ("address", "allowed", "reason"),
    [
        ("8.8.8.8", True, "public"),
        ("2a00:1450::1", True, "public"),
        # block list wins over everything
        ("93.184.215.14", False, "block-list:93.184.0.0/16"),
        ("::ffff:93.184.215.14", False, "block-list:93.184.0.0/16"),
        ("64:ff9b::93.184.215.14", False, "block-list:93.184.0.0/16"),
        ("2606:4700::1111", False, "block-list:2606:4700::/32"),
        ("10.1.2.3", False, "block-list:10.1.2.0/24"),
        # special ranges denied unless allowed
        ("10.2.0.1", False, "private"),
        ("10.1.3.4", True, "allow-list:10.1.0.0/16"),
        ("::ffff:10.1.3.4", True, "allow-list:10.1.0.0/16"),
        ("::ffff:10.2.0.1", False, "ipv4-mapped:private"),
        ("fd00:1::5", True, "allow-list:fd00:1::/32"),
        ("fd00:2::5", False, "ula"),
        ("127.0.0.1", False, "loopback"),
        ("169.254.169.254", False, "cloud-metadata"),
    ],
)
def test_check_address(address: str, allowed: bool, reason: str) -> None:
    verdict = check_address(ip_address(address), ALLOW, BLOCK)
    assert verdict == (allowed, reason)
    ok, why = verdict
    assert (ok, why) == (verdict.allowed, verdict.reason)


def test_check_address_defaults_to_empty_lists() -> None:
    assert check_address(IPv4Address("10.0.0.1")) == (False, "private")
    assert check_address(IPv4Address("1.1.1.1")) == (True, "public")


def test_allow_list_must_cover_every_blocked_nat64_candidate() -> None:
    # /48 layout of 10.0.0.1 also reads 0.0.1.0 (/56) and 0.1.0.0 (/64): 10/8 is not enough.
    address = IPv6Address(nat64_local_48("10.0.0.1"))
    only_ten = CidrSet.parse(["10.0.0.0/8"], "allow")
    assert not check_address(address, only_ten, CidrSet()).allowed
    both = CidrSet.parse(["10.0.0.0/8", "0.0.0.0/8"], "allow")
    assert check_address(address, both, CidrSet()).allowed
    # naming the IPv6 address itself is always enough
    direct = CidrSet([ipaddress.ip_network("64:ff9b:1::/48")])
    assert check_address(address, direct, CidrSet()) == (True, "allow-list:64:ff9b:1::/48")
