"""The header policy of an intercepted exchange. Pure: h11 events in, decisions out.

Requests are checked (:func:`check_request_head`) and then rebuilt for the upstream
(:func:`prepare_request`): hop-by-hop headers and the names listed in ``Connection`` are dropped,
framing is re-declared from what h11 parsed, and the rule's rewrites delete every value of their
header before adding the configured one. Responses get the same hop-by-hop treatment
(:func:`prepare_response_headers`). Because every message is re-serialised by h11, the upstream
never sees the client's raw framing bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import h11

from ...errors import UpstreamProxyError
from ...secret import Secret
from .leaves import normalize_name
from .rules import InterceptRule, SecretUnusableError
from .secretstore import MissingSecretError

Headers = list[tuple[bytes, bytes]]

# Connection-specific headers (RFC 9110 7.6.1) plus the proxy ones. Transfer-Encoding is
# re-declared by us; Content-Length is kept, re-declared, or dropped according to the framing.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# Never dropped because a peer listed them in Connection: a request without Host is invalid.
_END_TO_END_REQUIRED: Final = frozenset({b"host"})

MAX_AUDIT_PATH: Final = 2048
_SCHEME_RE: Final = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*:")
_HOST_PORT_RE: Final = re.compile(r"(\[[^\]]+\]|[^:\[\]]+)(?::([0-9]{1,5}))?\Z")


class Refusal(UpstreamProxyError):
    """The engine answers the request itself with ``status``; ``reason`` is a stable code.

    ``detail`` is a short human explanation, safe to show to the sandbox (names, never values).
    """

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"{status} {reason}" + (f": {detail}" if detail else ""))
        self.status = status
        self.reason = reason
        self.detail = detail


def connection_listed(headers: Sequence[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names listed in ``Connection`` (lower-case)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return names


def strip_hop_by_hop(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """``headers`` without hop-by-hop headers and without the names listed in Connection."""
    drop = (HOP_BY_HOP | connection_listed(headers)) - _END_TO_END_REQUIRED
    return [(name, value) for name, value in headers if name not in drop]


def header_values(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]


def parse_host_header(value: bytes) -> tuple[str, int | None]:
    """``host[:port]`` (``[v6]`` in brackets) → (normalized host, port or None); ValueError."""
    text = value.decode("ascii").strip()
    match = _HOST_PORT_RE.match(text)
    if match is None:
        raise ValueError("malformed Host header")
    port = int(match.group(2)) if match.group(2) else None
    if port is not None and not 0 < port < 65536:
        raise ValueError("port out of range in Host header")
    return normalize_name(match.group(1)), port


def check_request_head(request: h11.Request, expected_host: str, port: int) -> None:
    """Refuse what interception does not relay. ``expected_host`` is the normalized SNI."""
    method = request.method.upper()
    if method == b"CONNECT":
        raise Refusal(
            501,
            "connect-not-supported",
            "CONNECT inside an intercepted connection is not supported",
        )
    if header_values(request.headers, b"upgrade") or b"upgrade" in connection_listed(
        request.headers
    ):
        raise Refusal(
            501,
            "upgrade-not-supported",
            "protocol upgrades (WebSocket, h2c) are not relayed on intercepted hosts",
        )
    target = request.target
    if not (target.startswith(b"/") or (target == b"*" and method == b"OPTIONS")):
        if _SCHEME_RE.match(target):
            raise Refusal(
                400,
                "absolute-form-refused",
                "absolute-form request targets are not accepted; send origin-form",
            )
        raise Refusal(400, "bad-request-target", "the request target must start with '/'")
    hosts = header_values(request.headers, b"host")
    if len(hosts) != 1:
        raise Refusal(
            400,
            "host-missing" if not hosts else "host-duplicated",
            "exactly one Host header is required",
        )
    try:
        host, host_port = parse_host_header(hosts[0])
    except (ValueError, UnicodeDecodeError):
        raise Refusal(400, "host-invalid", "the Host header is not a valid host[:port]") from None
    if host != expected_host or (host_port is not None and host_port != port):
        raise Refusal(400, "host-mismatch", "the Host header does not match the TLS server name")
    if header_values(request.headers, b"transfer-encoding") and header_values(
        request.headers, b"content-length"
    ):
        # h11 would honour Transfer-Encoding; a proxy must not guess which framing the client
        # meant (that disagreement is request smuggling).
        raise Refusal(
            400, "conflicting-framing", "both Content-Length and Transfer-Encoding are present"
        )


@dataclass(frozen=True)
class PreparedRequest:
    """The upstream request head. ``headers`` may hold injected values: never log it."""

    method: bytes
    target: bytes
    headers: Headers
    has_body: bool
    injected: tuple[str, ...]  # secret names
    rewritten: tuple[str, ...]  # header names

    def __repr__(self) -> str:
        return (
            f"PreparedRequest({self.method!r}, {self.target!r}, "
            f"{len(self.headers)} headers, injected={self.injected!r})"
        )


def request_framing(headers: Sequence[tuple[bytes, bytes]]) -> tuple[str, int]:
    """("chunked", 0) or ("length", N) for a request h11 accepted (bodiless is length 0)."""
    if header_values(headers, b"transfer-encoding"):
        return "chunked", 0
    lengths = header_values(headers, b"content-length")
    return "length", int(lengths[0]) if lengths else 0


def prepare_request(
    request: h11.Request, rule: InterceptRule, lookup: Callable[[str], Secret]
) -> PreparedRequest:
    """Rebuild the request head for the upstream, injecting the rule's credentials."""
    framing, length = request_framing(request.headers)
    headers = [(n, v) for n, v in strip_hop_by_hop(request.headers) if n != b"content-length"]
    if framing == "chunked":
        headers.append((b"transfer-encoding", b"chunked"))
    elif length or request.method.upper() in (b"POST", b"PUT", b"PATCH"):
        headers.append((b"content-length", str(length).encode()))
    injected: list[str] = []
    rewritten: list[str] = []
    for rewrite in rule.rewrites:
        try:
            value = rewrite.render(lookup)
        except MissingSecretError as exc:
            raise Refusal(
                502,
                "secret-missing",
                f"secret {exc.name!r} for header {rewrite.header} is not available "
                "on the egress; the request was not sent",
            ) from None
        except SecretUnusableError as exc:
            raise Refusal(
                502,
                "secret-unusable",
                f"secret {exc.name!r} for header {rewrite.header} {exc.problem}; "
                "the request was not sent",
            ) from None
        name = rewrite.name
        headers = [(n, v) for n, v in headers if n != name]
        headers.append((rewrite.header.encode("ascii"), value.reveal().encode("ascii")))
        rewritten.append(rewrite.header)
        injected.extend(n for n in rewrite.secret_names() if n not in injected)
    return PreparedRequest(
        request.method,
        request.target,
        headers,
        has_body=framing == "chunked" or length > 0,
        injected=tuple(injected),
        rewritten=tuple(rewritten),
    )


def prepare_response_headers(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """Response headers for the client. A chunked upstream body is re-chunked by h11, so any
    Content-Length next to Transfer-Encoding is dropped (RFC 9112 6.3) rather than forwarded."""
    chunked = bool(header_values(headers, b"transfer-encoding"))
    kept = strip_hop_by_hop(headers)
    if chunked:
        kept = [(n, v) for n, v in kept if n != b"content-length"]
    return kept


def audit_path(target: bytes) -> str:
    """The request path for audit lines: no query string (it may carry the client's tokens)."""
    path = target.split(b"?", 1)[0][:MAX_AUDIT_PATH]
    return path.decode("ascii", errors="replace")
