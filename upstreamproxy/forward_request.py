"""Plain-HTTP forwarding, the pure part: which requests are forwarded and how they change.

Public API::

    is_forward_request(head: bytes) -> bool          # route a client's first head here?
    may_be_forward_request(start: bytes) -> bool     # ... could it be, from its first bytes?
    parse_forward_target(target: bytes) -> ForwardTarget
    rewrite_request(request: h11.Request) -> tuple[ForwardTarget, h11.Request]
    rewrite_response(response) -> the same type, hop-by-hop headers dropped
    has_body(request) -> bool
    refusal_response(status, reason, extra=(), hint="") -> bytes
    direct_route_hint(host) -> str
    class ForwardTarget, ForwardRefused, TunnelRefused

No I/O, clocks or asyncio (tests/test_purity.py checks it); :mod:`.http_forward` is the
asyncio layer that uses these.

Rules (RFC 9110 §7.6, RFC 9112 §3.2.2):

* The client's absolute-form target becomes origin-form; ``Host`` is replaced by the target's
  authority (a proxy must ignore the client's Host for an absolute-form request).
* Hop-by-hop headers are dropped in both directions: the fixed list below plus every name the
  ``Connection`` header lists. ``Proxy-Authorization`` is in that list: a client's proxy
  credentials never reach an origin (nor the egress: the tunnel carries only the session's).
  ``Upgrade`` is dropped, so the origin never switches protocols on a forwarded connection.
* Framing headers are kept for h11 to frame with; with both ``Transfer-Encoding`` and
  ``Content-Length`` the latter is dropped (RFC 9112 §6.3: the former wins; forwarding both is
  how request smuggling starts).
* Only ``http://`` is accepted in absolute form: an ``https://`` URL sent to a proxy in the
  clear would be sent by us in the clear too, so it is refused (400; use CONNECT).
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass
from typing import Final

import h11

from .connect_head import REASON_HEADER, RULE_HEADER, Target, build_status_head, parse_target
from .errors import HeadError

DEFAULT_PORT: Final = 80
#: Largest request head a forwarded request may have - the first on a connection (which the
#: relay's tunnel core reads) as much as later ones; over it the answer is 431.
MAX_REQUEST_HEAD: Final = 16 * 1024
#: Headers the egress puts on a refusal that the client is also shown.
PASSED_REFUSAL_HEADERS: Final = frozenset({REASON_HEADER.lower(), RULE_HEADER.lower()})

# RFC 9110 §7.6.1 and the de-facto ones (Keep-Alive, Proxy-Connection).
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
    }
)
#: Hop-by-hop too, but h11 frames with them, so they are kept (and re-framed by h11).
FRAMING: Final = frozenset({"content-length", "transfer-encoding"})


class ForwardRefused(Exception):
    """A request the forwarder answers itself with ``status`` and ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class TunnelRefused(ForwardRefused):
    """``open_tunnel`` could not give a stream: the egress's (or relay's) status and reason.

    ``headers`` are the refusal's headers from the egress (X-Upstreamproxy-Reason/Rule).
    """

    def __init__(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(status, reason)
        self.headers = headers


@dataclass(frozen=True)
class ForwardTarget:
    host: str
    port: int
    #: origin-form request target: path and query, ``/`` when the URL has no path.
    path: bytes

    @property
    def key(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def authority(self) -> str:
        return Target(self.host, self.port).authority

    @property
    def host_header(self) -> str:
        """``Host`` for the origin: the default port is left out, as clients do."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORT else f"{host}:{self.port}"


def is_forward_request(head: bytes) -> bool:
    """True for a head whose request line is ``<method other than CONNECT> http://...``."""
    line = head.split(b"\n", 1)[0]
    parts = line.split(b" ")
    return len(parts) == 3 and parts[0] != b"CONNECT" and parts[1][:7].lower() == b"http://"


def may_be_forward_request(start: bytes) -> bool:
    """False while ``start`` (a head's first bytes) may still begin a CONNECT: until then the
    CONNECT head limit applies, and :data:`MAX_REQUEST_HEAD` only after."""
    return bool(start) and b"CONNECT "[: len(start)] != start[:8]


def parse_forward_target(raw: bytes) -> ForwardTarget:
    """An absolute-form ``http://`` target; raises ForwardRefused(400) for anything else."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ForwardRefused(400, "non-ASCII request target") from None
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ForwardRefused(400, f"malformed request URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise ForwardRefused(400, "https:// URLs must be tunnelled with CONNECT")
    if scheme != "http":
        raise ForwardRefused(400, "only http:// URLs are forwarded; use CONNECT otherwise")
    if "@" in parts.netloc:
        raise ForwardRefused(400, "userinfo is not allowed in a proxied URL")
    host = parts.hostname
    if not host:
        raise ForwardRefused(400, "proxied URL has no host")
    port = DEFAULT_PORT if port is None else port
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        target = parse_target(authority)
    except HeadError as exc:
        raise ForwardRefused(400, exc.reason) from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if not path.startswith("/"):
        raise ForwardRefused(400, "malformed request URL path")
    return ForwardTarget(target.host, target.port, path.encode("ascii"))


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return tokens


def _filter_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers (fixed ones and those ``Connection`` names); keep framing."""
    listed = _connection_tokens(headers) - {name.encode() for name in FRAMING}
    drop = {name.encode() for name in HOP_BY_HOP} | listed
    kept = [(name, value) for name, value in headers if name not in drop]
    if any(name == b"transfer-encoding" for name, _ in kept):
        kept = [(name, value) for name, value in kept if name != b"content-length"]
    return kept


def rewrite_request(request: h11.Request) -> tuple[ForwardTarget, h11.Request]:
    """The request to send to the origin, and where to send it."""
    target = parse_forward_target(bytes(request.target))
    headers = [(name, value) for name, value in _filter_headers(list(request.headers))]
    forwarded = h11.Request(
        method=request.method,
        target=target.path,
        headers=[
            (b"host", target.host_header.encode("ascii")),
            *((name, value) for name, value in headers if name != b"host"),
        ],
        http_version="1.1",
    )
    return target, forwarded


def rewrite_response(
    response: h11.Response | h11.InformationalResponse,
) -> h11.Response | h11.InformationalResponse:
    """The origin's response head for the client: hop-by-hop headers dropped."""
    headers = _filter_headers(list(response.headers))
    cls = type(response)
    return cls(status_code=response.status_code, headers=headers, reason=response.reason)


def has_body(request: h11.Request) -> bool:
    """True when the request carries a body (chunked, or a non-zero Content-Length)."""
    for name, value in request.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def direct_route_hint(host: str) -> str:
    """A hint for a refused host that is likely next to the sandbox, else ``""``.

    Single-label names (compose services) and private or link-local addresses are usually
    reached directly; NO_PROXY decides that in the tool, before the relay sees anything.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        local = "." not in host.rstrip(".")
    else:
        local = address.is_private or address.is_link_local
    if not local:
        return ""
    return (
        f"{host} looks local to the sandbox: if it is reached directly (a service next to "
        f"this one), add it to NO_PROXY, e.g. `upstreamproxy start --no-proxy {host}`"
    )


def refusal_response(
    status: int, reason: str, extra: tuple[tuple[str, str], ...] = (), hint: str = ""
) -> bytes:
    """The whole response the forwarder answers a refused request with (connection closes).

    ``X-Upstreamproxy-Reason`` stays the machine-readable reason; ``hint`` goes in the body.
    """
    headers = [(REASON_HEADER, reason)]
    headers += [
        (name, value)
        for name, value in extra
        if name.lower() in PASSED_REFUSAL_HEADERS and name.lower() != REASON_HEADER.lower()
    ]
    headers.append(("Content-Type", "text/plain; charset=utf-8"))
    body = (reason + "\n" + (hint + "\n" if hint else "")).encode("utf-8", "replace")
    return build_status_head(status, tuple(headers), body)
