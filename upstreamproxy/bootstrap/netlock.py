"""The network lock: in the sandbox's network namespace, only the relay may leave.

Public API::

    TABLE = "upstreamproxy"                      # nft table ``inet upstreamproxy``
    class Destination(address, port)             # an IP literal and a TCP port
    class LockSpec(relay_uid, destinations, resolvers=(), allow_dns=False)
    destinations_for(url_or_hostport, default_port) -> tuple[Destination, ...]
    spec_for(relay_uid, egress_url, egress_proxy=None, allow_to=(), allow_dns=False) -> LockSpec
    system_resolvers(path="/etc/resolv.conf") -> tuple[str, ...]
    render_ruleset(spec) -> str                  # pure: the nft script that installs the lock
    lock(spec) -> None                           # apply it (root); NetLockError on failure
    unlock() -> bool                             # remove it; True if it was installed
    is_locked() -> bool

What the rules say (one ``output`` chain, ``policy accept``, in a table of our own, so they
never touch the platform's tables and ``unlock`` is one ``delete table``):

* packets that answer a connection someone *else* opened (``ct direction reply``) are allowed,
  so servers in the sandbox still answer, and so is IPv6 neighbour discovery and MLD (sent by
  the kernel, with no uid; without it no IPv6 destination on the link is reachable at all);
* DNS, i.e. UDP or TCP whose *original* destination port is 53 (so also a loopback resolver
  such as Docker's ``127.0.0.11``, whose queries are DNAT-ed and forwarded out), is allowed
  only to the system's resolvers, and only for the relay's uid when it must resolve the
  egress's name, or for every uid with ``allow_dns``; any other DNS is rejected;
* loopback (``oifname "lo"``) is allowed: the relay listens there, and a sandbox's local
  services keep working;
* the relay's uid (``meta skuid``) may open TCP connections to each destination (the egress's
  addresses and port; with an egress proxy, the proxy's);
* everything else is **rejected, not dropped**: TCP with a reset (``connect()`` fails at once
  with ECONNREFUSED), anything else (UDP, ICMP, IPv4 and IPv6 alike) with ICMP
  administratively-prohibited, so no tool waits for a timeout.

Applying is one ``nft -f -`` transaction that creates the table if missing, deletes it and
defines it again: idempotent (locking twice gives the same rules), atomic (no moment without
rules), and never an error when the table is absent. Addresses are resolved once, when the
lock is applied: if the egress's addresses change, lock again.

Needs root (CAP_NET_ADMIN in the namespace) and the ``nft`` tool (Debian package ``nftables``).
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..errors import UpstreamProxyError

TABLE: Final = "upstreamproxy"
CHAIN: Final = "output"
DNS_PORT: Final = 53
#: ICMPv6 that IPv6 needs on the link (RFC 4861 neighbour discovery, MLD for its multicast).
_IPV6_LINK: Final = (
    "nd-router-solicit",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
    "mld-listener-report",
    "mld2-listener-report",
)
NFT_TIMEOUT: Final = 30.0


class NetLockError(UpstreamProxyError):
    """The lock could not be applied, removed or inspected; the message says why."""


@dataclass(frozen=True, order=True)
class Destination:
    address: str  # an IP literal, canonical form
    port: int

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @property
    def family(self) -> str:
        return "ip6" if ipaddress.ip_address(self.address).version == 6 else "ip"


@dataclass(frozen=True)
class LockSpec:
    relay_uid: int
    destinations: tuple[Destination, ...]
    #: Resolvers the relay may query (for the egress's name); everyone may if ``allow_dns``.
    resolvers: tuple[str, ...] = ()
    allow_dns: bool = False


def _canonical(address: str) -> str | None:
    try:
        return str(ipaddress.ip_address(address.strip("[]").split("%", 1)[0]))
    except ValueError:
        return None


def destinations_for(target: str, default_port: int = 443) -> tuple[Destination, ...]:
    """Addresses and port of a URL (``wss://h:p/...``, ``http://proxy:3128``) or ``host:port``.

    A host name is resolved now (every A/AAAA answer); NetLockError if it resolves to nothing.
    """
    if "://" in target:
        parts = urllib.parse.urlsplit(target)
        host = parts.hostname
        defaults = {"ws": 80, "http": 80, "wss": 443, "https": 443, "socks5": 1080}
        try:
            port = parts.port or defaults.get(parts.scheme, default_port)
        except ValueError:
            raise NetLockError(f"invalid port in {target!r}") from None
    else:
        host, sep, port_text = target.rpartition(":")
        if not sep or not port_text.isdigit():
            host, port = target, default_port
        else:
            port = int(port_text)
        host = host.strip("[]")
    if not host:
        raise NetLockError(f"no host in {target!r}")
    if not 0 < port < 65536:
        raise NetLockError(f"invalid port in {target!r}")
    literal = _canonical(host)
    if literal is not None:
        return (Destination(literal, port),)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise NetLockError(f"cannot resolve {host}: {exc}") from None
    found = {_canonical(str(info[4][0])) for info in infos}
    result = tuple(sorted(Destination(a, port) for a in found if a))
    if not result:
        raise NetLockError(f"{host} resolves to no address")
    return result


def _host_of(target: str) -> str:
    if "://" in target:
        return urllib.parse.urlsplit(target).hostname or ""
    host, sep, port = target.rpartition(":")
    return (host if sep and port.isdigit() else target).strip("[]")


def spec_for(
    relay_uid: int,
    egress_url: str,
    egress_proxy: str | None = None,
    allow_to: tuple[str, ...] = (),
    allow_dns: bool = False,
) -> LockSpec:
    """The lock for a relay reaching ``egress_url`` (through ``egress_proxy`` if set).

    The relay gets DNS to the system resolvers only when it has a name to resolve (the first
    hop is not an IP literal); ``allow_dns`` gives DNS to everyone.
    """
    first_hop = egress_proxy or egress_url
    targets = (first_hop, *allow_to)
    destinations: list[Destination] = []
    for target in targets:
        destinations.extend(destinations_for(target))
    needs_dns = allow_dns or any(_canonical(_host_of(t)) is None for t in targets)
    resolvers = system_resolvers() if needs_dns else ()
    return LockSpec(relay_uid, tuple(sorted(set(destinations))), resolvers, allow_dns)


def system_resolvers(path: str | Path = "/etc/resolv.conf") -> tuple[str, ...]:
    """The ``nameserver`` addresses of resolv.conf (loopback ones need no rule, but harmless)."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ()
    found: list[str] = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            address = _canonical(fields[1])
            if address and address not in found:
                found.append(address)
    return tuple(found)


def render_ruleset(spec: LockSpec) -> str:
    """The nft script for ``spec``; pure, so tests can read exactly what will be applied."""
    if spec.relay_uid < 0:
        raise NetLockError("relay uid must not be negative")
    uid = f"meta skuid {spec.relay_uid}"
    # Replies to connections opened from outside (servers in the sandbox) always pass, and so
    # does IPv6's link plumbing, which the kernel sends with no socket (so no uid): without
    # neighbour discovery not even the relay could reach an IPv6 egress.
    rules = ["ct direction reply accept", f"icmpv6 type {{ {', '.join(_IPV6_LINK)} }} accept"]
    # DNS is judged by the *original* destination port, before any DNAT (Docker's 127.0.0.11
    # redirects port 53 to another port), and before loopback is let through: a resolver on
    # loopback (127.0.0.11, systemd-resolved's 127.0.0.53, dnsmasq) forwards queries out.
    who = "" if spec.allow_dns else f"{uid} "
    for resolver in spec.resolvers:
        family = Destination(resolver, DNS_PORT).family
        for proto in ("udp", "tcp"):
            rules.append(
                f"{who}meta l4proto {proto} ct original {family} daddr {resolver} "
                f"ct original proto-dst {DNS_PORT} accept"
            )
    rules.append(f"meta l4proto tcp ct original proto-dst {DNS_PORT} reject with tcp reset")
    rules.append(
        f"meta l4proto udp ct original proto-dst {DNS_PORT} reject with icmpx admin-prohibited"
    )
    rules.append('oifname "lo" accept')
    for dest in sorted(set(spec.destinations)):
        rules.append(f"{uid} {dest.family} daddr {dest.address} tcp dport {dest.port} accept")
    rules.append("meta l4proto tcp reject with tcp reset")
    rules.append("reject with icmpx admin-prohibited")
    body = "\n".join(f"\t\t{rule}" for rule in rules)
    return (
        f"table inet {TABLE}\n"
        f"delete table inet {TABLE}\n"
        f"table inet {TABLE} {{\n"
        f"\tchain {CHAIN} {{\n"
        f"\t\ttype filter hook output priority filter; policy accept;\n"
        f"{body}\n"
        "\t}\n"
        "}\n"
    )


def _nft(script: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    nft = shutil.which("nft") or next(
        (p for p in ("/usr/sbin/nft", "/sbin/nft") if Path(p).exists()), None
    )
    if nft is None:
        raise NetLockError("the nft tool is not installed (Debian/Ubuntu package: nftables)")
    argv = [nft, *args] if script is None else [nft, "-f", "-"]
    try:
        return subprocess.run(
            argv, input=script, capture_output=True, text=True, timeout=NFT_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetLockError(f"cannot run nft: {exc}") from None


def _failed(action: str, done: subprocess.CompletedProcess[str]) -> NetLockError:
    detail = (done.stderr or done.stdout).strip().splitlines()
    reason = detail[0] if detail else f"exit status {done.returncode}"
    if "Operation not permitted" in reason:
        reason += " (the lock needs root: CAP_NET_ADMIN in the sandbox's network namespace)"
    return NetLockError(f"cannot {action} the network lock: {reason}")


def lock(spec: LockSpec) -> None:
    """Install (or replace) the lock in this process's network namespace."""
    if not spec.destinations:
        raise NetLockError("no destination for the relay: the lock would cut it off")
    done = _nft(render_ruleset(spec))
    if done.returncode != 0:
        raise _failed("apply", done)


def is_locked() -> bool:
    done = _nft(None, "list", "table", "inet", TABLE)
    if done.returncode == 0:
        return True
    if "No such file or directory" in done.stderr:
        return False
    raise _failed("inspect", done)


def unlock() -> bool:
    """Remove the lock; True if it was installed. Idempotent."""
    was = is_locked()
    done = _nft(f"table inet {TABLE}\ndelete table inet {TABLE}\n")
    if done.returncode != 0:
        raise _failed("remove", done)
    return was
