"""Pure parsing and building of the HTTP heads the tunnel exchanges (no I/O).

* the client's ``CONNECT host:port HTTP/1.1`` head, read by the relay and, re-built, by the egress;
* the first chunk the relay sends (request line + ``Proxy-Authorization`` + empty line);
* the status head the egress answers with inside the tunnel.

Every refusal raises :class:`HeadError` carrying the status to answer with.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from typing import Final

from .errors import HeadError

#: Headers the egress (and the relay, for its own answers) explain a refusal with.
REASON_HEADER: Final = "X-Upstreamproxy-Reason"
RULE_HEADER: Final = "X-Upstreamproxy-Rule"
#: Optional upgrade header: the relay opens this WebSocket ahead of any CONNECT (a pool).
PREOPENED_HEADER: Final = "X-Upstreamproxy-Preopened"
#: Upgrade request and 101 answer: tunnel reuse (SPEC §11) offered, and accepted.
REUSE_HEADER: Final = "X-Upstreamproxy-Reuse"
#: Largest CONNECT head accepted, terminator included.
MAX_HEAD_BYTES: Final = 8 * 1024
MAX_HEADERS: Final = 100
MAX_HOSTNAME_LENGTH: Final = 253

# A head ends at the first empty line. Lines may end in CRLF or a bare LF (RFC 9112 §2.2),
# so "\n\r\n" (LF-terminated line, then CRLF empty line) ends a head too; it also covers
# the usual "\r\n\r\n".
_TERMINATORS: Final = (b"\n\r\n", b"\n\n")
# \Z, not $: "$" also matches before a trailing newline.
_TOKEN_RE: Final = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
#: Control characters not allowed in a header value (HTAB is).
_VALUE_CTL_RE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Bytes allowed in a hostname as it appears in a CONNECT target. Non-ASCII (UTF-8) is let
# through for IDNA names; percent-encoding, userinfo, paths and whitespace are not.
_HOST_FORBIDDEN_RE: Final = re.compile(r"[\x00-\x20\x7f%@/\\?#\[\]<>\"'`{}|^,;:=!$&()*+~]")
_PORT_RE: Final = re.compile(r"^[0-9]{1,5}\Z")
# Unicode categories never valid in a host name: controls (incl. C1 such as U+0085), format
# characters (zero-width, BOM), surrogates, private use, unassigned, and all separators
# (NBSP, U+2028/U+2029, ideographic space).
_HOST_FORBIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})


@dataclass(frozen=True, slots=True)
class Target:
    """A CONNECT target: ``host`` without brackets, ``port`` in 1..65535."""

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def authority(self) -> str:
        """The target in authority form, brackets around IPv6 literals."""
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    method: str
    target: Target
    version: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        return next(iter(header_values(self.headers, name)), None)

    def header_values(self, name: str) -> list[str]:
        return header_values(self.headers, name)


@dataclass(frozen=True, slots=True)
class StatusHead:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        return next(iter(header_values(self.headers, name)), None)


def header_values(headers: tuple[tuple[str, str], ...], name: str) -> list[str]:
    """Every value of header ``name`` (case-insensitive), in order."""
    lname = name.lower()
    return [value for key, value in headers if key.lower() == lname]


def find_head_end(buffer: bytes | bytearray) -> int | None:
    """Index just past the empty line ending a head, or None if it has not arrived yet."""
    best: int | None = None
    for term in _TERMINATORS:
        index = buffer.find(term)
        if index >= 0 and (best is None or index + len(term) < best):
            best = index + len(term)
    return best


def split_head(
    buffer: bytes | bytearray, limit: int = MAX_HEAD_BYTES, too_large: int = 400
) -> tuple[bytes, bytes] | None:
    """Split ``buffer`` into (head, rest) once the head is complete.

    Returns None while more bytes are needed; raises ``too_large`` (a status) once ``limit``
    bytes hold no head.
    """
    end = find_head_end(buffer)
    if end is None:
        if len(buffer) >= limit:
            raise HeadError(too_large, f"request head exceeds {limit} bytes")
        return None
    if end > limit:
        raise HeadError(too_large, f"request head exceeds {limit} bytes")
    return bytes(buffer[:end]), bytes(buffer[end:])


def _lines(head: bytes) -> list[bytes]:
    text = head.replace(b"\r\n", b"\n")
    lines = text.split(b"\n")
    while lines and lines[-1] == b"":
        lines.pop()
    if b"\r" in text:  # every CRLF became LF: what is left is bare
        raise HeadError(400, "bare carriage return in head")
    return lines


def _parse_headers(lines: list[bytes]) -> tuple[tuple[str, str], ...]:
    if len(lines) > MAX_HEADERS:
        raise HeadError(400, f"more than {MAX_HEADERS} header fields")
    headers: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HeadError(400, "obsolete header line folding")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_RE.match(name):
            raise HeadError(400, "malformed header field")
        value = value.strip(b" \t")
        if _VALUE_CTL_RE.search(value):
            raise HeadError(400, "control character in header value")
        headers.append((name.decode("ascii"), value.decode("latin-1")))
    return tuple(headers)


def parse_target(raw: str) -> Target:
    """Parse an authority-form CONNECT target: ``host:port`` or ``[v6]:port``."""
    if not raw:
        raise HeadError(400, "empty CONNECT target")
    if raw.startswith("["):
        close = raw.find("]")
        if close < 0 or raw[close + 1 : close + 2] != ":":
            raise HeadError(400, "malformed bracketed IPv6 target")
        host, port_text = raw[1:close], raw[close + 2 :]
        if "%" in host:
            raise HeadError(400, "IPv6 zone identifiers are not allowed")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise HeadError(400, "invalid IPv6 address in target") from None
    else:
        host, sep, port_text = raw.rpartition(":")
        if not sep:
            raise HeadError(400, "CONNECT target needs an explicit port")
        # userinfo and URLs before the colon check, whose reason would mislead for them
        if "@" in host:
            raise HeadError(400, "userinfo is not allowed in a CONNECT target")
        if "/" in host:
            raise HeadError(400, "CONNECT target must be host:port, not a URL")
        if ":" in host:
            raise HeadError(400, "IPv6 targets must be bracketed")
        if not host.rstrip("."):
            raise HeadError(400, "empty host in CONNECT target")
        if "%" in host:
            raise HeadError(400, "percent-encoding is not allowed in a CONNECT target")
        if _HOST_FORBIDDEN_RE.search(host) or (
            not host.isascii()
            and any(
                not ch.isascii() and unicodedata.category(ch) in _HOST_FORBIDDEN_CATEGORIES
                for ch in host
            )
        ):
            raise HeadError(400, "forbidden character in target host")
        if len(host.rstrip(".")) > MAX_HOSTNAME_LENGTH:
            raise HeadError(400, "target host name too long")
    if not _PORT_RE.match(port_text):
        raise HeadError(400, "invalid port in CONNECT target")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise HeadError(400, "port out of range in CONNECT target")
    return Target(host, port)


def parse_connect_head(head: bytes) -> ConnectRequest:
    """Parse a complete head (as returned by :func:`split_head`)."""
    lines = _lines(head)
    if not lines:
        raise HeadError(400, "empty request head")
    try:
        request_line = lines[0].decode("ascii")
    except UnicodeDecodeError:
        # IDNA hosts must arrive A-label (punycode) encoded or UTF-8; try UTF-8 before refusing.
        try:
            request_line = lines[0].decode("utf-8")
        except UnicodeDecodeError:
            raise HeadError(400, "request line is not valid UTF-8") from None
    parts = request_line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise HeadError(400, "malformed request line")
    method, raw_target, version = parts
    if not _TOKEN_RE.match(method.encode("ascii", "replace")):
        raise HeadError(400, "malformed method")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HeadError(400, "unsupported HTTP version")
    if method != "CONNECT":
        if raw_target[:8].lower() == "https://":  # (a plain-HTTP client given HTTPS_PROXY's URL)
            raise HeadError(405, "https:// URLs must be tunnelled with CONNECT")
        raise HeadError(405, f"method {method[:16]} not allowed; this proxy only tunnels CONNECT")
    target = parse_target(raw_target)
    return ConnectRequest(method, target, version, _parse_headers(lines[1:]))


def basic_credentials(session_id: str, token: str) -> str:
    raw = f"{session_id}:{token}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def parse_basic_credentials(value: str) -> tuple[str, str]:
    """Decode a ``Basic`` Proxy-Authorization value into (user, password)."""
    scheme, _, encoded = value.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise HeadError(407, "Proxy-Authorization must use the Basic scheme")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    # ValueError too: b64decode refuses a non-ASCII str with a plain ValueError, and header
    # values are decoded as latin-1, so "Basic \xe9" must be a 407, not a crash.
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise HeadError(407, "malformed Basic credentials") from None
    user, sep, password = decoded.partition(":")
    if not sep:
        raise HeadError(407, "malformed Basic credentials")
    return user, password


def build_tunnel_request(target: Target, session_id: str, token: str) -> bytes:
    """The relay's first chunk: request line, Proxy-Authorization and nothing else."""
    return (
        f"CONNECT {target.authority} HTTP/1.1\r\n"
        f"Proxy-Authorization: {basic_credentials(session_id, token)}\r\n"
        "\r\n"
    ).encode()


_REASONS: Final = {
    200: "Connection established",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "Error")


_UNSAFE_VALUE_RE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _safe_header_value(value: str) -> str:
    value = _UNSAFE_VALUE_RE.sub(" ", value).strip(" \t")
    return value.encode("latin-1", "replace").decode("latin-1")


def build_status_head(
    status: int, headers: tuple[tuple[str, str], ...] = (), body: bytes = b""
) -> bytes:
    """A complete HTTP/1.1 response head (and short body) as the tunnel's first answer.

    Non-200 answers carry a Content-Length and ``Connection: close`` so a client reads the
    body and stops; 200 carries nothing after the empty line.

    Header values often quote untrusted text (a host name in a deny reason), and this runs on
    error paths, so values are made safe rather than refused: control characters become a
    space (no CRLF injection) and characters outside latin-1 become ``?``. A header *name*
    that is not a token is a programming error and raises ValueError.
    """
    lines = [f"HTTP/1.1 {status} {reason_phrase(status)}"]
    for name, value in headers:
        if not _TOKEN_RE.match(name.encode("ascii", "replace")):
            raise ValueError(f"invalid header name {name!r}")
        lines.append(f"{name}: {_safe_header_value(value)}")
    if status != 200:
        lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body if status != 200 else b"")


def parse_status_head(head: bytes) -> StatusHead:
    """Parse the egress's in-tunnel status head (``HTTP/1.x NNN reason``)."""
    try:
        lines = _lines(head)
    except HeadError:  # bare CR: the egress misbehaved, so this is a 502, not the client's 400
        raise HeadError(502, "malformed status head from egress") from None
    if not lines:
        raise HeadError(502, "empty status head from egress")
    match = re.match(rb"^HTTP/1\.[01] ([1-5][0-9]{2})(?: (.*))?$", lines[0])
    if not match:
        raise HeadError(502, "malformed status line from egress")
    try:
        headers = _parse_headers(lines[1:])
    except HeadError:
        raise HeadError(502, "malformed header in egress status head") from None
    return StatusHead(int(match.group(1)), (match.group(2) or b"").decode("latin-1"), headers)
