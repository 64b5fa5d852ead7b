"""Which IP addresses the egress may dial: special-purpose ranges, CIDR lists, embedded IPv4.

Pure functions, no I/O. The egress resolves a host once, runs **every** address through
:func:`check_address`, and dials only the addresses that pass (DNS-rebinding safe).

Public API::

    IPAddress = IPv4Address | IPv6Address

    blocked_reason(ip: IPAddress) -> str | None
        Machine-readable reason ``ip`` is special-purpose, or None for an ordinary public address.
    embedded_ipv4(ip: IPv6Address) -> EmbeddedIPv4 | None
        The IPv4 address(es) an IPv6 address carries (mapped, compatible, translated,
        NAT64, 6to4, Teredo), or None.
    CidrSet.parse(entries: Iterable[str], field: str) -> CidrSet     (ConfigError names field)
    CidrSet.contains(ip: IPAddress) -> bool
    CidrSet.match(ip: IPAddress) -> IPv4Network | IPv6Network | None
    check_address(ip: IPAddress, allow: CidrSet, block: CidrSet) -> AddressVerdict
        ``(allowed, reason)``: block list wins, then special-purpose ranges are denied unless
        the allow list names the address, otherwise allowed.

Reasons returned by :func:`blocked_reason` (stable; audit logs and metrics key on them):

=====================  =========================================================================
``unspecified``        0.0.0.0/32, ::/128
``this-network``       0.0.0.0/8
``loopback``           127.0.0.0/8, ::1/128
``private``            10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16
``link-local``         169.254.0.0/16, fe80::/10
``cloud-metadata``     instance metadata endpoints (see ``CLOUD_METADATA``)
``cgnat``              100.64.0.0/10 (shared address space)
``ietf-protocol``      192.0.0.0/24, 2001::/23 outside Teredo and benchmarking
``documentation``      192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32, 3fff::/20
``benchmarking``       198.18.0.0/15, 2001:2::/48
``6to4-relay-anycast`` 192.88.99.0/24
``multicast``          224.0.0.0/4, ff00::/8
``reserved``           240.0.0.0/4; any IPv6 outside 2000::/3 not listed here
``broadcast``          255.255.255.255/32
``ula``                fc00::/7
``site-local``         fec0::/10 (deprecated, still routed by some stacks)
``discard-only``       100::/64
=====================  =========================================================================

IPv6 addresses that carry an IPv4 address are judged by that IPv4 address, and the reason
is prefixed with the form: ``ipv4-mapped:`` (::ffff:0:0/96), ``ipv4-compatible:`` (::/96),
``ipv4-translated:`` (::ffff:0:0:0/96), ``nat64:`` (64:ff9b::/96, 64:ff9b:1::/48),
``6to4:`` (2002::/16), ``teredo:`` (2001::/32, the bit-inverted client address) and
``teredo-server:`` (the Teredo server address). When the carried IPv4 address is public,
NAT64, 6to4 and Teredo addresses are allowed (None): they are how IPv6-only networks reach
the IPv4 internet.

The local-use NAT64 prefix 64:ff9b:1::/48 may be deployed with any RFC 6052 prefix length
(/48, /56, /64, /96), so the IPv4 address could sit at several positions and the egress
cannot know which. Every position consistent with RFC 6052 (reserved bits 64..71 and the
suffix zero) is read, and the address is refused if any reading is blocked. This errs towards
refusing: with a /64 layout, a public IPv4 address whose last octet is e.g. 10 or 127 reads
as private at the /96 position and is refused; naming the prefix in the allow list lifts that.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_network,
)
from typing import Final, NamedTuple, TypeAlias

from ..errors import ConfigError

IPAddress: TypeAlias = IPv4Address | IPv6Address
IPNetwork: TypeAlias = IPv4Network | IPv6Network

#: Instance-metadata endpoints, reported as ``cloud-metadata`` rather than the range they sit
#: in. 168.63.129.16 (Azure WireServer) is a public address, blocked here on purpose.
CLOUD_METADATA: Final[frozenset[IPAddress]] = frozenset(
    {
        IPv4Address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
        IPv4Address("169.254.170.2"),  # AWS ECS task metadata / credentials
        IPv4Address("169.254.170.23"),  # AWS EKS pod identity agent
        IPv4Address("100.100.100.200"),  # Alibaba Cloud
        IPv4Address("192.0.0.192"),  # Oracle Cloud (legacy)
        IPv4Address("168.63.129.16"),  # Azure WireServer
        IPv6Address("fd00:ec2::254"),  # AWS IMDS over IPv6
        IPv6Address("fd00:ec2::23"),  # AWS EKS pod identity agent over IPv6
    }
)

# Most specific first: the first match wins.
_V4_RANGES: Final[tuple[tuple[IPv4Network, str], ...]] = tuple(
    (IPv4Network(cidr), reason)
    for cidr, reason in (
        ("0.0.0.0/32", "unspecified"),
        ("0.0.0.0/8", "this-network"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "cgnat"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "ietf-protocol"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4-relay-anycast"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
    )
)

# IPv6 ranges that are judged directly (no embedded IPv4). Most specific first.
_V6_RANGES: Final[tuple[tuple[IPv6Network, str], ...]] = tuple(
    (IPv6Network(cidr), reason)
    for cidr, reason in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("100::/64", "discard-only"),
        ("2001:2::/48", "benchmarking"),
        ("2001::/23", "ietf-protocol"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("fc00::/7", "ula"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)

_GLOBAL_UNICAST: Final = IPv6Network("2000::/3")
_MAPPED: Final = IPv6Network("::ffff:0:0/96")
_COMPATIBLE: Final = IPv6Network("::/96")
_TRANSLATED: Final = IPv6Network("::ffff:0:0:0/96")
_NAT64_WELL_KNOWN: Final = IPv6Network("64:ff9b::/96")
_NAT64_LOCAL: Final = IPv6Network("64:ff9b:1::/48")
_SIX_TO_FOUR: Final = IPv6Network("2002::/16")
_TEREDO: Final = IPv6Network("2001::/32")

_U32: Final = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class EmbeddedIPv4:
    """The IPv4 address(es) carried by an IPv6 address.

    ``kind`` is the reason prefix (``ipv4-mapped``, ``nat64``, ``teredo``, ...). ``addresses``
    holds one address, except for Teredo (client, then server) and local-use NAT64 (every
    RFC 6052 position that is consistent with the address).
    """

    kind: str
    addresses: tuple[IPv4Address, ...]

    def labelled(self) -> Iterator[tuple[str, IPv4Address]]:
        """``(reason prefix, address)`` pairs; Teredo's server gets ``teredo-server``."""
        for index, address in enumerate(self.addresses):
            if self.kind == "teredo" and index == 1:
                yield "teredo-server", address
            else:
                yield self.kind, address


def _v4(value: int) -> IPv4Address:
    return IPv4Address(value & _U32)


def _nat64_local_candidates(value: int) -> tuple[IPv4Address, ...]:
    """RFC 6052 readings of an address under a prefix inside 64:ff9b:1::/48.

    /48, /56 and /64 readings count only when bits 64..71 and the suffix are zero, as RFC 6052
    requires; the /96 reading (the last 32 bits) always counts. A reading of 0.0.0.0 is dropped
    when another exists: it is what the zero suffix of a shorter layout looks like, and no
    translator forwards to 0.0.0.0.
    """
    readings: list[IPv4Address] = []
    if (value >> 56) & 0xFF == 0:
        # (high bits: (shift, width), low bits: (shift, width) or None, suffix width)
        layouts = (
            ((64, 16), (40, 16), 40),  # /48: bits 48..63 and 72..87
            ((64, 8), (32, 24), 32),  # /56: bits 56..63 and 72..95
            ((24, 32), None, 24),  # /64: bits 72..103
        )
        for (high_shift, high_width), low, suffix_width in layouts:
            if value & ((1 << suffix_width) - 1):
                continue
            high = (value >> high_shift) & ((1 << high_width) - 1)
            if low is None:
                readings.append(_v4(high))
            else:
                low_shift, low_width = low
                low_bits = (value >> low_shift) & ((1 << low_width) - 1)
                readings.append(_v4((high << low_width) | low_bits))
    readings.append(_v4(value))  # /96
    unique = list(dict.fromkeys(readings))
    nonzero = [r for r in unique if int(r) != 0]
    return tuple(nonzero or unique)


def embedded_ipv4(ip: IPv6Address) -> EmbeddedIPv4 | None:
    """The IPv4 address(es) ``ip`` carries, or None for an ordinary IPv6 address.

    ``::`` and ``::1`` are not treated as IPv4-compatible addresses.
    """
    ip = _unscoped(ip)
    value = int(ip)
    if ip in _MAPPED:
        return EmbeddedIPv4("ipv4-mapped", (_v4(value),))
    if ip in _COMPATIBLE:
        if value <= 1:
            return None
        return EmbeddedIPv4("ipv4-compatible", (_v4(value),))
    if ip in _TRANSLATED:
        return EmbeddedIPv4("ipv4-translated", (_v4(value),))
    if ip in _NAT64_WELL_KNOWN:
        return EmbeddedIPv4("nat64", (_v4(value),))
    if ip in _NAT64_LOCAL:
        return EmbeddedIPv4("nat64", _nat64_local_candidates(value))
    if ip in _SIX_TO_FOUR:
        return EmbeddedIPv4("6to4", (_v4(value >> 80),))
    if ip in _TEREDO:
        client = _v4(~value)  # the client address is stored bit-inverted
        server = _v4(value >> 64)
        return EmbeddedIPv4("teredo", (client, server))
    return None


def _unscoped(ip: IPv6Address) -> IPv6Address:
    # A zone id ("fe80::1%eth0") changes nothing about the address's class.
    return IPv6Address(int(ip)) if ip.scope_id else ip


def _v4_reason(ip: IPv4Address) -> str | None:
    if ip in CLOUD_METADATA:
        return "cloud-metadata"
    for network, reason in _V4_RANGES:
        if ip in network:
            return reason
    return None


def blocked_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be dialled by default, or None for an ordinary public address."""
    if isinstance(ip, IPv4Address):
        return _v4_reason(ip)
    ip = _unscoped(ip)
    if ip in CLOUD_METADATA:
        return "cloud-metadata"
    embedded = embedded_ipv4(ip)
    if embedded is not None:
        for kind, inner in embedded.labelled():
            reason = _v4_reason(inner)
            if reason is not None:
                return f"{kind}:{reason}"
        # Judged by what it carries: 2001::/32 (Teredo) is not "ietf-protocol", and so on.
        return None
    for network, reason in _V6_RANGES:
        if ip in network:
            return reason
    if ip not in _GLOBAL_UNICAST:
        return "reserved"
    return None


def _parse_network(entry: object, field: str) -> IPNetwork:
    if not isinstance(entry, str):
        raise ConfigError(field, f"{entry!r}: expected a CIDR string")
    text = entry.strip()
    if not text:
        raise ConfigError(field, "empty CIDR entry")
    if "%" in text:
        raise ConfigError(field, f"{text!r}: zone identifiers are not allowed")
    try:
        network = ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ip_network(text, strict=False)
        except ValueError:
            raise ConfigError(field, f"{text!r}: not a CIDR ({exc})") from None
        raise ConfigError(field, f"{text!r}: host bits set; did you mean {loose}?") from None
    # ::ffff:a.b.c.d/n is how some people write IPv4 rules; store it as the IPv4 rule it means.
    if isinstance(network, IPv6Network) and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        return IPv4Network((int(network.network_address) & _U32, network.prefixlen - 96))
    return network


class CidrSet:
    """An immutable set of CIDR networks, IPv4 and IPv6.

    :meth:`contains` also matches the IPv4 address carried by an IPv6 address (mapped,
    compatible, translated, NAT64, 6to4, Teredo) against the IPv4 networks, so a block list
    entry ``10.0.0.0/8`` also blocks ``::ffff:10.0.0.1`` and ``64:ff9b::a00:1``.
    """

    __slots__ = ("_networks", "_v4", "_v6")

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        self._networks: tuple[IPNetwork, ...] = tuple(dict.fromkeys(networks))
        self._v4 = tuple(n for n in self._networks if isinstance(n, IPv4Network))
        self._v6 = tuple(n for n in self._networks if isinstance(n, IPv6Network))

    @classmethod
    def parse(cls, entries: Iterable[str], field: str) -> CidrSet:
        """Parse CIDR strings (a bare address means /32 or /128); ConfigError names ``field``.

        Host bits must be clear (``10.0.0.1/8`` is refused with a suggestion) and zone ids
        are refused. A plain string is refused too: it is almost always a missing list.
        """
        if isinstance(entries, str | bytes):
            raise ConfigError(field, "expected a list of CIDR strings, not a single string")
        return cls(_parse_network(entry, field) for entry in entries)

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return self._networks

    def _match_v4(self, ip: IPv4Address) -> IPv4Network | None:
        for network in self._v4:
            if ip in network:
                return network
        return None

    def match(self, ip: IPAddress) -> IPNetwork | None:
        """The first network containing ``ip`` (or an IPv4 address it carries), or None."""
        if isinstance(ip, IPv4Address):
            return self._match_v4(ip)
        ip = _unscoped(ip)
        for network in self._v6:
            if ip in network:
                return network
        embedded = embedded_ipv4(ip)
        if embedded is not None:
            for inner in embedded.addresses:
                hit = self._match_v4(inner)
                if hit is not None:
                    return hit
        return None

    def contains(self, ip: IPAddress) -> bool:
        return self.match(ip) is not None

    def __contains__(self, ip: object) -> bool:
        return isinstance(ip, IPv4Address | IPv6Address) and self.contains(ip)

    def __len__(self) -> int:
        return len(self._networks)

    def __iter__(self) -> Iterator[IPNetwork]:
        return iter(self._networks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CidrSet):
            return NotImplemented
        return set(self._networks) == set(other._networks)

    def __hash__(self) -> int:
        return hash(frozenset(self._networks))

    def __repr__(self) -> str:
        return f"CidrSet([{', '.join(repr(str(n)) for n in self._networks)}])"


EMPTY: Final = CidrSet()


class AddressVerdict(NamedTuple):
    """The outcome of :func:`check_address`; unpacks as ``allowed, reason``.

    ``reason`` is ``block-list:<cidr>``, ``allow-list:<cidr>``, ``public``, or a
    :func:`blocked_reason` value such as ``private`` or ``ipv4-mapped:loopback``.
    """

    allowed: bool
    reason: str


def _allow_covers(ip: IPAddress, allow: CidrSet) -> IPNetwork | None:
    """The allow-list entry that exempts a special-purpose ``ip``, or None.

    Naming the address itself is enough. For an IPv6 address that carries IPv4 address(es),
    every carried address that is special-purpose must be covered, so allowing 10.0.0.0/8
    does not also allow a local-use NAT64 address that could mean 127.0.0.1.
    """
    if isinstance(ip, IPv4Address):
        return allow.match(ip)
    for network in allow.networks:
        if isinstance(network, IPv6Network) and ip in network:
            return network
    embedded = embedded_ipv4(ip)
    if embedded is None:
        return None
    first: IPNetwork | None = None
    for inner in embedded.addresses:
        if _v4_reason(inner) is None:
            continue
        hit = allow.match(inner)
        if hit is None:
            return None
        if first is None:
            first = hit
    return first


def check_address(ip: IPAddress, allow: CidrSet = EMPTY, block: CidrSet = EMPTY) -> AddressVerdict:
    """Decide whether the egress may dial ``ip``.

    1. An address on the block list (directly or via a carried IPv4 address) is refused.
    2. A special-purpose address is refused with its :func:`blocked_reason`, unless the allow
       list names it.
    3. Anything else is allowed (host policy has already been applied by the caller).
    """
    hit = block.match(ip)
    if hit is not None:
        return AddressVerdict(False, f"block-list:{hit}")
    reason = blocked_reason(ip)
    if reason is None:
        return AddressVerdict(True, "public")
    exempt = _allow_covers(ip, allow)
    # A range such as 169.254.0.0/16 must not open the metadata service by accident: only an
    # entry naming the metadata address itself does.
    if (
        exempt is not None
        and reason.endswith("cloud-metadata")
        and (exempt.prefixlen != exempt.max_prefixlen)
    ):
        exempt = None
    if exempt is not None:
        return AddressVerdict(True, f"allow-list:{exempt}")
    return AddressVerdict(False, reason)
