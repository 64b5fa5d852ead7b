"""Host names as policy sees them: one normal form, IP literals, and ``*.suffix`` patterns.

Pure functions, no I/O. The same :func:`normalise_host` runs when a policy is loaded and when
a CONNECT target is looked up, so a rule and a target that mean the same host compare equal
as plain strings.

Public API::

    normalise_host(raw: str) -> str
        Trimmed, ``:port`` and IPv6 brackets stripped, lower-case, one trailing dot removed,
        IDNA A-labels; IPv6 literals in compressed form. ValueError on anything invalid.
    parse_ip_literal(host: str) -> IPv4Address | IPv6Address | None
        The address if ``host`` is a canonical IP literal (dotted quad, or IPv6 with or without
        brackets); None otherwise.
    is_ambiguous_ipv4(host: str) -> bool
        True for a non-canonical spelling of an IPv4 address that resolvers accept
        (``2130706433``, ``0177.0.0.1``, ``0x7f.0.0.1``, ``127.1``, ...). The egress refuses
        these with ``non-canonical-ip-literal`` instead of guessing what they mean.
    HostPattern.parse(raw: str) -> HostPattern         exact name/IP, or ``*.suffix``
    HostPattern.matches(host: str) -> bool             ``host`` already normalised

The egress, per target: ``host = normalise_host(target.host)``; refuse if
``is_ambiguous_ipv4(host)``; if ``parse_ip_literal(host)`` is an address, apply the address
policy to it directly; otherwise match host patterns, then resolve and check every address.

IDNA: with the ``idna`` package installed (it is, as a dependency of aiohttp's yarl), names are
mapped with UTS #46 (non-transitional: ``ß`` stays ``ß``) and encoded with IDNA 2008.
Without it, Python's ``encodings.idna`` (IDNA 2003, nameprep) is used, which maps ``ß`` to
``ss``. :data:`IDNA_BACKEND` says which one is active. ASCII labels never go through the IDNA
codec, so real-world names that IDNA 2008 would refuse (``_dmarc``, ``r3---sn-abc``) work.
An existing ``xn--`` label must be valid Punycode that round-trips and decodes to non-ASCII
text that is already in mapped (lower-case) form.
"""

from __future__ import annotations

import encodings.idna as _stdlib_idna
import functools
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from types import ModuleType
from typing import Final

_idna: ModuleType | None
try:
    import idna as _idna
except ImportError:  # pragma: no cover - idna ships with aiohttp/yarl
    _idna = None

#: Which IDNA implementation :func:`normalise_host` uses: ``"idna"`` or ``"encodings.idna"``.
IDNA_BACKEND: Final = "idna" if _idna is not None else "encodings.idna"

#: Longest name accepted, in A-label form, without the trailing dot (RFC 1035).
MAX_NAME_LENGTH: Final = 253
MAX_LABEL_LENGTH: Final = 63
#: Input longer than this is refused before any Unicode processing is attempted.
MAX_RAW_LENGTH: Final = 1024

# Letters, digits, hyphen, plus underscore (SRV/DMARC-style names, some CDNs); no hyphen at
# either end (RFC 1123). Checked on the lower-cased A-label form.
_LABEL_RE: Final = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_PORT_RE: Final = re.compile(r"^[0-9]{1,5}$")
# Label separators IDNA 2003 recognises besides "." (UTS #46 maps them itself).
_IDEOGRAPHIC_DOTS: Final = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
# What inet_aton() and the WHATWG URL parser read as a number: decimal, octal, hex.
_NUMERIC_LABEL_RE: Final = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")


def _split_port(text: str) -> tuple[str, int | None, bool]:
    """Split ``text`` into (host, port, is_ipv6_literal); brackets removed."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed '[' in host")
        host, rest = text[1:end], text[end + 1 :]
        if not rest:
            return host, None, True
        if not rest.startswith(":"):
            raise ValueError("unexpected text after ']' in host")
        return host, _parse_port(rest[1:]), True
    colons = text.count(":")
    if colons > 1:
        return text, None, True  # a bare IPv6 literal; a port needs brackets
    if colons == 1:
        host, _, port = text.partition(":")
        return host, _parse_port(port), False
    return text, None, False


def _parse_port(text: str) -> int:
    if not _PORT_RE.match(text) or not 1 <= int(text) <= 65535:
        raise ValueError("port must be a number from 1 to 65535")
    return int(text)


def _normalise_ipv6(text: str) -> str:
    if "%" in text:
        raise ValueError("IPv6 zone identifiers are not allowed")
    try:
        return str(IPv6Address(text))
    except ValueError:
        raise ValueError("not a valid IPv6 literal") from None


def _check_xn_label(label: str) -> None:
    """An ``xn--`` label must be the Punycode of a non-ASCII label that is already mapped.

    "Already mapped" (lower-case, UTS #46) keeps one spelling per name: ``xn--example``
    decodes to an upper-case ``Ωίθηδ`` whose own normal form is a different A-label. Full
    IDNA 2008 validity is not required, so registered legacy names (``xn--ls8h``) still work.
    """
    decoded: str | None
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
        roundtrip = decoded.encode("punycode").decode("ascii")
    except (UnicodeError, ValueError, IndexError, OverflowError):
        decoded = None
    if decoded is None:
        raise ValueError(f"label {label!r} is not valid Punycode")
    try:
        canonical = _map_unicode(decoded) == decoded
    except ValueError:
        canonical = False
    if decoded.isascii() or roundtrip != label[4:] or not canonical:
        raise ValueError(f"label {label!r} is not a canonical IDNA A-label")


def _map_unicode(text: str) -> str:
    """Case-fold and map a non-ASCII name to the form its labels are encoded from."""
    if _idna is not None:
        try:
            mapped: str = _idna.uts46_remap(text, std3_rules=False, transitional=False)
        except _idna.IDNAError as exc:
            raise ValueError(f"invalid international name: {exc}") from None
        return mapped
    return text.translate(_IDEOGRAPHIC_DOTS).lower()


def _to_alabel(label: str) -> str:
    """IDNA-encode one non-ASCII label."""
    try:
        if _idna is not None:
            encoded: bytes = _idna.alabel(label)
        else:
            encoded = _stdlib_idna.ToASCII(label)
    except (UnicodeError, ValueError) as exc:
        raise ValueError(f"invalid international label {label!r}: {exc}") from None
    return encoded.decode("ascii").lower()


def _normalise_name(text: str) -> str:
    if not text.isascii():
        text = _map_unicode(text)
    text = text.lower()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise ValueError("empty host name")
    labels = text.split(".")
    out: list[str] = []
    for label in labels:
        if not label:
            raise ValueError("empty label in host name")
        if not label.isascii():
            label = _to_alabel(label)
        if len(label) > MAX_LABEL_LENGTH:
            raise ValueError(f"label longer than {MAX_LABEL_LENGTH} characters")
        if not _LABEL_RE.match(label):
            if label.startswith("-") or label.endswith("-"):
                raise ValueError(f"label {label!r} starts or ends with '-'")
            raise ValueError(f"label {label!r} may hold only letters, digits, '-' and '_'")
        if label.startswith("xn--"):
            _check_xn_label(label)
        out.append(label)
    name = ".".join(out)
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"host name longer than {MAX_NAME_LENGTH} characters")
    return name


def _normalise(raw: str) -> tuple[str, int | None]:
    if not isinstance(raw, str):
        raise TypeError(f"host must be a str, not {type(raw).__name__}")
    if len(raw) > MAX_RAW_LENGTH:
        raise ValueError(f"host longer than {MAX_RAW_LENGTH} characters")
    text = raw.strip()
    if not text:
        raise ValueError("empty host")
    host, port, is_ipv6 = _split_port(text)
    if is_ipv6:
        return _normalise_ipv6(host), port
    return _normalise_name(host), port


#: Distinct hosts whose literal address (or its absence) is kept: every tunnel asks for its
#: target, and most targets repeat. A pure function of the string, so caching is safe.
HOST_CACHE_SIZE: Final = 4096


def normalise_host(raw: str) -> str:
    """The normal form of a host (see the module docstring); ValueError if it is not valid.

    Idempotent: ``normalise_host(normalise_host(h)) == normalise_host(h)``. Non-canonical IPv4
    spellings such as ``0x7f.0.0.1`` pass through unchanged (they are syntactically names);
    check :func:`is_ambiguous_ipv4` on the result.
    """
    return _normalise(raw)[0]


@functools.lru_cache(maxsize=HOST_CACHE_SIZE)
def parse_ip_literal(host: str) -> IPv4Address | IPv6Address | None:
    """The address ``host`` spells canonically, else None.

    IPv4 must be a dotted quad of decimal numbers without leading zeros. IPv6 may be bracketed;
    a zone identifier (``fe80::1%eth0``) is not a literal the egress dials, so None.
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if ":" not in text:
            return None
    if "%" in text:
        return None
    try:
        if ":" in text:
            return IPv6Address(text)
        return IPv4Address(text)
    except ValueError:
        return None


def is_ambiguous_ipv4(host: str) -> bool:
    """True if ``host`` ends in a numeric label but is not a canonical dotted quad.

    That covers every non-canonical form ``inet_aton()`` or the WHATWG URL parser turns into
    an IPv4 address: a single number (``2130706433``, ``0x7f000001``, ``017700000001``), fewer
    than four parts (``127.1``, ``127.0.1``), octal (``0177.0.0.1``), hex (``0x7f.0.0.1``),
    leading zeros (``127.000.000.001``) and mixtures. It also covers names whose last label is
    a number that no parser would accept (``256.1.1.1``, ``1.2.3.4.5``, ``host.123``): no
    real top-level domain is numeric, so such a name is refused rather than guessed at.

    Meant for the output of :func:`normalise_host`; raw input is trimmed, lower-cased and
    loses one trailing dot first.
    """
    text = host.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    last = text.rpartition(".")[2]
    if not _NUMERIC_LABEL_RE.match(last):
        return False
    try:
        IPv4Address(text)
    except ValueError:
        return True
    return False


@dataclass(frozen=True, slots=True)
class HostPattern:
    """A host rule: an exact name or IP literal, or ``*.suffix``.

    ``*.example.com`` matches every name *below* example.com (``a.example.com``,
    ``a.b.example.com``) but **not** ``example.com`` itself; list the apex separately if it is
    wanted. A bare ``*``, a ``*`` anywhere but as the whole first label, a port, and a
    non-canonical IPv4 literal are refused with ValueError.
    """

    pattern: str

    @classmethod
    def parse(cls, raw: str) -> HostPattern:
        if not isinstance(raw, str):
            raise TypeError(f"host pattern must be a str, not {type(raw).__name__}")
        text = raw.strip()
        if text in ("*", "*."):
            raise ValueError("a bare '*' would match every host; name hosts or use *.suffix")
        wildcard = text.startswith("*.")
        rest = text[2:] if wildcard else text
        if "*" in rest:
            raise ValueError("'*' is only allowed as the whole first label, as in *.example.com")
        host, port = _normalise(rest)
        if port is not None:
            raise ValueError("a host pattern must not include a port; list ports in the rule")
        if is_ambiguous_ipv4(host):
            raise ValueError(f"{host!r} is not a canonical IPv4 address; write it as a.b.c.d")
        if wildcard:
            if parse_ip_literal(host) is not None:
                raise ValueError("a wildcard suffix must be a DNS name, not an IP address")
            return cls(f"*.{host}")
        return cls(host)

    @property
    def wildcard(self) -> bool:
        return self.pattern.startswith("*.")

    @property
    def suffix(self) -> str:
        """For ``*.example.com``, ``.example.com``; for an exact pattern, the empty string."""
        return self.pattern[1:] if self.wildcard else ""

    def matches(self, host: str) -> bool:
        """Whether the already-normalised ``host`` is covered by this pattern."""
        if self.wildcard:
            suffix = self.pattern[1:]
            return len(host) > len(suffix) and host.endswith(suffix)
        return host == self.pattern

    def __str__(self) -> str:
        return self.pattern
