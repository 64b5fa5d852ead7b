"""Where the egress decides whether a tunnel may open, and opens it.

For one tunnel, in order: pick the session's policy; normalise the target host; match host and
port rules; resolve the host **once** (IP literals skip resolution); check **every** address
(special-purpose ranges, CIDR allow/block lists, the egress itself) and refuse if any fails;
dial only the checked addresses. Nothing resolves the name again for this tunnel: the TLS
re-origination of intercepted hosts dials the same checked addresses.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from typing import TYPE_CHECKING

from ..connect_head import Target
from .addresses import check_address
from .auth import Session
from .dialer import DialError, IPAddress, Upstream, dial_addresses
from .hostnames import normalise_host, parse_ip_literal
from .policy import Policy, PolicySet
from .resolver import ResolveError, Resolver

if TYPE_CHECKING:
    from .intercept import InterceptRule

log = logging.getLogger("upstreamproxy.egress.admission")

DialFn = Callable[[Sequence[IPAddress], int, float], Awaitable[Upstream]]


class Refusal(Exception):
    """The tunnel is refused: ``status`` goes in the in-tunnel answer with ``reason``/``rule``."""

    def __init__(self, status: int, reason: str, rule: str = "-") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.rule = rule


@dataclass
class AdmissionRecord:
    """What admission learned, for the audit line."""

    policy: str = "-"
    host: str = "-"
    port: int = 0
    resolved: list[str] = field(default_factory=list)
    dialled: str = "-"
    decision: str = "-"
    reason: str = "-"
    rule: str = "-"
    dial_seconds: float | None = None


@dataclass(frozen=True)
class Route:
    """An admitted tunnel: an open upstream, or an interception over checked addresses."""

    host: str
    port: int
    addresses: tuple[IPAddress, ...]
    upstream: Upstream | None = None
    intercept: InterceptRule | None = None


class Admission:
    def __init__(
        self,
        policies: Callable[[], PolicySet],
        resolver: Resolver,
        dial_timeout: float,
        dial: DialFn = dial_addresses,
        own_ports: Callable[[], set[int]] = set,
        own_addresses: Sequence[IPAddress] = (),
        listens_everywhere: bool = False,
        on_dial: Callable[[float], object] = lambda seconds: None,
    ) -> None:
        self._policies = policies
        self._resolver = resolver
        self._dial_timeout = dial_timeout
        self._dial = dial
        self._own_ports = own_ports
        self._own_addresses = frozenset(_unmapped(a) for a in own_addresses)
        self._listens_everywhere = listens_everywhere
        #: Observes every dial's duration: the tunnel's own and each upstream connection an
        #: intercepted tunnel opens (the metric missed those).
        self._on_dial = on_dial

    async def admit(self, session: Session, target: Target, record: AdmissionRecord) -> Route:
        policy = self._policies().get(session.policy)
        record.policy = session.policy
        record.port = target.port
        record.host = target.host
        if policy is None:
            record.decision = "deny"
            raise Refusal(403, "unknown-policy")
        try:
            host = normalise_host(target.host)
        except ValueError:
            raise Refusal(400, "invalid-host") from None
        record.host = host
        decision = policy.decide_host(host, target.port)
        record.rule, record.reason = decision.rule, decision.reason
        if decision.allowed:
            record.decision = "allow"
        elif policy.monitor and decision.reason != "non-canonical-ip-literal":
            record.decision = "monitor-allow"
            log.warning(
                "monitor mode: policy %s would deny %s:%d (%s)",
                policy.name,
                host,
                target.port,
                decision.reason,
            )
        else:
            record.decision = "deny"
            raise Refusal(403, decision.reason, decision.rule)
        addresses = await self._resolve(host, target.port, decision.rule)
        record.resolved = [str(a) for a in addresses]
        self._check_addresses(policy, addresses, target.port, decision.rule, record)
        if decision.intercept is not None:
            return Route(host, target.port, tuple(addresses), intercept=decision.intercept)
        upstream = await self.dial(addresses, target.port, record)
        return Route(host, target.port, tuple(addresses), upstream=upstream)

    async def dial(
        self, addresses: Sequence[IPAddress], port: int, record: AdmissionRecord
    ) -> Upstream:
        started = time.monotonic()
        try:
            upstream = await self._dial(addresses, port, self._dial_timeout)
        except DialError as exc:
            record.reason = exc.reason
            raise Refusal(exc.status, exc.reason, record.rule) from None
        finally:
            record.dial_seconds = time.monotonic() - started
            self._on_dial(record.dial_seconds)
        record.dialled = upstream.address
        return upstream

    async def _resolve(self, host: str, port: int, rule: str) -> list[IPAddress]:
        literal = parse_ip_literal(host)
        if literal is not None:
            return [literal]
        # Bounded here too, whatever the resolver (``--dial-timeout`` covers DNS): a lookup
        # that hung or raised something else left the tunnel waiting, unlogged, for the
        # open deadline (3 x --dial-timeout + 5 s) and a 504 that named no cause.
        try:
            async with asyncio.timeout(self._dial_timeout):
                return await self._resolver.resolve(host, port)
        except ResolveError as exc:
            raise Refusal(504 if exc.reason == "dns-timeout" else 502, exc.reason, rule) from None
        except TimeoutError:
            raise Refusal(504, "dns-timeout", rule) from None
        except Exception as exc:
            log.warning("resolving %s failed: %r", host, exc)
            raise Refusal(502, "dns-failed", rule) from None

    def _check_addresses(
        self,
        policy: Policy,
        addresses: Sequence[IPAddress],
        port: int,
        rule: str,
        record: AdmissionRecord,
    ) -> None:
        """Every address must pass; one bad address refuses the tunnel (rebinding safety)."""
        own_ports = self._own_ports()
        for address in addresses:
            verdict = check_address(address, policy.allow_cidrs, policy.block_cidrs)
            if not verdict.allowed:
                record.decision, record.reason = "deny", f"blocked-address:{verdict.reason}"
                raise Refusal(403, record.reason, rule)
            if port in own_ports and (
                _reaches_this_host(address)
                or _unmapped(address) in self._own_addresses
                or (self._listens_everywhere and is_local_address(address))
            ):
                record.decision, record.reason = "deny", "egress-self"
                raise Refusal(403, "egress-self", rule)


def _unmapped(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv4-mapped one dials (``::ffff:10.1.2.3`` reaches 10.1.2.3 over a
    dual-stack socket), else ``address``: so a listen address matches either spelling."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _reaches_this_host(address: IPAddress) -> bool:
    """Loopback or unspecified, also spelled IPv4-mapped (``::ffff:127.0.0.1`` dials 127.0.0.1).

    ``IPv6Address.is_loopback`` is False for mapped addresses before Python 3.13.
    """
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback or address.ipv4_mapped.is_unspecified
    return address.is_loopback or address.is_unspecified


def is_local_address(address: IPAddress) -> bool:
    """Whether ``address`` belongs to this host: binding to it succeeds only then.

    Used when the egress listens on every interface (0.0.0.0 / ::), where its own pod or host
    address is not known in advance. No packet is sent.
    """
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True
