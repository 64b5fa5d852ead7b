"""Pure pieces of the WebSocket opening handshake (RFC 6455 §4), shared by relay and egress.

No I/O: the relay's client handshake and the egress's upgrade build and check heads with
these. Everything after the handshake (frames) lives in :mod:`upstreamproxy.tunnel.wsframes`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

#: RFC 6455 §1.3: appended to the client's key before hashing.
GUID: Final = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
VERSION: Final = "13"


def new_key() -> str:
    """A fresh ``Sec-WebSocket-Key``: 16 random bytes, base64."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value the server answers ``key`` with."""
    digest = hashlib.sha1((key + GUID).encode("ascii"), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode("ascii")


# -- the client side: URLs, request heads, response heads -------------------------------
#
# Everything below is what the relay's native client handshake needs
# (:mod:`upstreamproxy.relay_handshake` does the I/O): the egress and proxy URLs parsed, the
# upgrade and proxy CONNECT heads built, and the answers parsed and checked. Errors are
# :class:`HandshakeError` subclasses whose *names* say what went wrong (the relay answers
# ``502 cannot reach the egress: <name>``); their messages never quote a header value we sent
# (the token) and quote at most a bounded, printable excerpt of what the peer sent.

#: A response head (status line and headers) larger than this is refused before it is
#: buffered further: an egress or proxy answers an upgrade in well under 1 KiB.
MAX_RESPONSE_HEAD: Final = 16 * 1024
#: Header lines in one response head.
MAX_HEADERS: Final = 128
HEAD_END: Final = b"\r\n\r\n"

#: A header name: RFC 9110 token characters.
_NAME: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Header values and reason phrases: visible ASCII, SP, HTAB and obs-text (RFC 9110 §5.5);
#: any other control character is refused.
_BAD_VALUE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_REQUEST_VALUE: Final = re.compile(r"[\r\n\x00]")


class HandshakeError(Exception):
    """The handshake cannot go on; the subclass's name says why."""


class InvalidEgressUrl(HandshakeError):
    """The egress URL is not a usable ``ws://`` or ``wss://`` URL."""


class InvalidProxy(HandshakeError):
    """The ``--egress-proxy`` URL is not a usable proxy URL."""


class InvalidRequestHeader(HandshakeError):
    """A header value we were asked to send holds a line break or a NUL (never quoted)."""


class MalformedResponse(HandshakeError):
    """The answer is not an HTTP/1.x response head."""


class ResponseTooLarge(HandshakeError):
    """The answer's head is larger than :data:`MAX_RESPONSE_HEAD` (or has too many headers)."""


class InvalidUpgrade(HandshakeError):
    """A ``101`` that is not the WebSocket we asked for (Upgrade, Connection, extensions)."""


class InvalidAccept(HandshakeError):
    """A ``101`` whose ``Sec-WebSocket-Accept`` does not match our key."""


@dataclass(frozen=True)
class Target:
    """Where a ``ws://``/``wss://`` URL points."""

    secure: bool
    host: str  # IPv6 literals without brackets
    port: int
    resource: str  # path and query, at least "/"

    @property
    def authority(self) -> str:
        """``host:port`` (IPv6 bracketed), as a proxy CONNECT names it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def host_header(self) -> str:
        """The ``Host`` value: the port only when it is not the scheme's default."""
        if self.port == (443 if self.secure else 80):
            return f"[{self.host}]" if ":" in self.host else self.host
        return self.authority


@dataclass(frozen=True)
class ProxyTarget:
    """An ``http://``, ``https://`` or ``socks*://`` proxy URL, parsed."""

    scheme: str
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @property
    def is_http(self) -> bool:
        return self.scheme in ("http", "https")


def _split_url(url: str, error: type[HandshakeError]) -> urllib.parse.SplitResult:
    if any(c in url for c in "\r\n\t\0 "):
        raise error("the URL holds whitespace or a control character")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise error("the URL does not parse") from None
    if not parts.hostname:
        raise error("the URL names no host")
    return parts


def _ascii_host(host: str, error: type[HandshakeError]) -> str:
    """The host as sent on the wire: IDNA for a non-ASCII name."""
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise error("the host name is not a valid IDNA name") from None


@functools.lru_cache(maxsize=16)  # pure; the relay parses its one URL per handshake
def parse_ws_url(url: str) -> Target:
    """Parse the egress URL (InvalidEgressUrl if it is not a ``ws://``/``wss://`` URL)."""
    parts = _split_url(url, InvalidEgressUrl)
    if parts.scheme not in ("ws", "wss"):
        raise InvalidEgressUrl("the URL must start with ws:// or wss://")
    if parts.username is not None or parts.password is not None:
        raise InvalidEgressUrl("the URL must not carry credentials (the token is sent apart)")
    if parts.fragment:
        raise InvalidEgressUrl("a WebSocket URL has no fragment")
    secure = parts.scheme == "wss"
    assert parts.hostname is not None
    host = _ascii_host(parts.hostname, InvalidEgressUrl)
    port = parts.port if parts.port is not None else (443 if secure else 80)
    if port == 0:
        raise InvalidEgressUrl("port 0")
    resource = parts.path or "/"
    if parts.query:
        resource += "?" + parts.query
    if any(not 0x21 <= ord(c) <= 0x7E for c in resource):
        raise InvalidEgressUrl("the path must be percent-encoded ASCII")
    return Target(secure, host, port, resource)


_PROXY_DEFAULT_PORTS: Final = {
    "http": 80,
    "https": 443,
    "socks5": 1080,
    "socks5h": 1080,
    "socks4": 1080,
    "socks4a": 1080,
}


@functools.lru_cache(maxsize=16)
def parse_proxy_url(url: str) -> ProxyTarget:
    """Parse ``--egress-proxy`` (InvalidProxy if it is not a usable proxy URL)."""
    parts = _split_url(url, InvalidProxy)
    if parts.scheme not in _PROXY_DEFAULT_PORTS:
        raise InvalidProxy("the proxy URL must be http://, https:// or socks*://")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidProxy("a proxy URL has no path")
    assert parts.hostname is not None
    host = _ascii_host(parts.hostname, InvalidProxy)
    port = parts.port if parts.port is not None else _PROXY_DEFAULT_PORTS[parts.scheme]
    if port == 0:
        raise InvalidProxy("port 0")
    username = password = None
    if parts.username is not None:
        username = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
    return ProxyTarget(parts.scheme, host, port, username, password)


def _head(start_line: str, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [start_line]
    for name, value in headers:
        if _BAD_REQUEST_VALUE.search(value):
            raise InvalidRequestHeader(f"the {name} value holds a line break or a NUL")
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8")


def build_upgrade_request(target: Target, key: str, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    """The upgrade GET head: Host, Upgrade, Connection, key and version, then ``extra``."""
    return _head(
        f"GET {target.resource} HTTP/1.1",
        [
            ("Host", target.host_header),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", VERSION),
            *extra,
        ],
    )


def build_proxy_connect(target: Target, proxy: ProxyTarget, user_agent: str) -> bytes:
    """The CONNECT head asking an HTTP proxy for a tunnel to ``target``."""
    headers = [("Host", target.authority), ("User-Agent", user_agent)]
    if proxy.username is not None:
        userpass = f"{proxy.username}:{proxy.password or ''}".encode()
        headers.append(("Proxy-Authorization", "Basic " + base64.b64encode(userpass).decode()))
    return _head(f"CONNECT {target.authority} HTTP/1.1", headers)


def find_head_end(buffer: bytes | bytearray, searched: int = 0) -> int | None:
    """The offset just past the head's empty line, or None if it is not complete yet.

    ``searched``: how many bytes an earlier call already searched (the next search starts
    3 bytes before, where a split ``\\r\\n\\r\\n`` may begin). ResponseTooLarge once more
    than :data:`MAX_RESPONSE_HEAD` bytes hold no end.
    """
    at = buffer.find(HEAD_END, max(0, searched - 3), MAX_RESPONSE_HEAD)
    if at >= 0:
        return at + len(HEAD_END)
    if len(buffer) >= MAX_RESPONSE_HEAD:
        raise ResponseTooLarge(f"no end of the response head in {MAX_RESPONSE_HEAD} bytes")
    return None


@dataclass(frozen=True)
class Response:
    """A parsed response head; header names as sent, looked up case-insensitively."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    #: Values by lower-cased name, built once (an upgrade check looks up five names).
    _index: dict[str, list[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, list[str]] = {}
        for name, value in self.headers:
            index.setdefault(name.lower(), []).append(value)
        object.__setattr__(self, "_index", index)

    def get_all(self, name: str) -> list[str]:
        return list(self._index.get(name.lower(), ()))

    def get(self, name: str, default: str = "") -> str:
        values = self.get_all(name)
        return values[0] if values else default


def _excerpt(data: bytes) -> str:
    return repr(data[:40])


def parse_response_head(head: bytes) -> Response:
    """Parse a complete head (status line, header lines, the empty line).

    Strict where leniency could let a confused answer pass: CRLF line ends, ``HTTP/1.0`` or
    ``HTTP/1.1``, a 3-digit status, token header names, no obs-fold, no control characters.
    """
    if len(head) > MAX_RESPONSE_HEAD:
        raise ResponseTooLarge(f"response head over {MAX_RESPONSE_HEAD} bytes")
    if not head.endswith(HEAD_END):
        raise MalformedResponse("the response head does not end with an empty line")
    lines = head[: -len(HEAD_END)].split(b"\r\n")
    status_line = lines[0]
    version, _, rest = status_line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if (
        version not in (b"HTTP/1.1", b"HTTP/1.0")
        or len(code) != 3
        or not code.isdigit()
        or not code.isascii()
        or _BAD_VALUE.search(reason)
    ):
        raise MalformedResponse(f"not an HTTP/1.x status line: {_excerpt(status_line)}")
    status = int(code)
    if status < 100:
        raise MalformedResponse(f"status {status} is not an HTTP status")
    if len(lines) - 1 > MAX_HEADERS:
        raise ResponseTooLarge(f"more than {MAX_HEADERS} header lines")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _NAME.fullmatch(name):
            raise MalformedResponse(f"not a header line: {_excerpt(line)}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise MalformedResponse(f"control character in the {name.decode()} header")
        headers.append((name.decode("ascii"), value.decode("latin-1")))
    return Response(status, reason.decode("latin-1"), tuple(headers))


def _tokens(values: list[str]) -> list[str]:
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


def check_upgrade(response: Response, key: str) -> None:
    """Check a ``101`` answers *our* upgrade (RFC 6455 §4.1, client requirements 2-6).

    We ask for no extension and no subprotocol, so an answer that names one is refused.
    """
    if response.status != 101:
        raise InvalidUpgrade(f"status {response.status}, not 101")
    if _tokens(response.get_all("Upgrade")) != ["websocket"]:
        raise InvalidUpgrade("the Upgrade header is not websocket")
    if "upgrade" not in _tokens(response.get_all("Connection")):
        raise InvalidUpgrade("the Connection header does not say upgrade")
    accepts = response.get_all("Sec-WebSocket-Accept")
    if len(accepts) != 1:
        raise InvalidAccept(f"{len(accepts)} Sec-WebSocket-Accept headers, not 1")
    if not hmac.compare_digest(accepts[0].encode("latin-1"), accept_key(key).encode("ascii")):
        raise InvalidAccept("Sec-WebSocket-Accept does not match our key")
    if _tokens(response.get_all("Sec-WebSocket-Extensions")):
        raise InvalidUpgrade("an extension we did not ask for")
    if _tokens(response.get_all("Sec-WebSocket-Protocol")):
        raise InvalidUpgrade("a subprotocol we did not ask for")
