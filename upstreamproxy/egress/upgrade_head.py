"""The request head of a WebSocket upgrade, parsed without I/O (RFC 9112 §2-§5).

The egress reads the head of each connection's first request itself (``listener.py``) and
serves the tunnel endpoint's upgrade natively (``native_upgrade.py``); this module turns
the bytes of that head into a :class:`RequestHead` or an :class:`UpgradeHeadError`.

Strict on purpose -- the only legitimate sender is a relay (or a CCR-style client), whose
heads are small and canonical:

* the head is at most :data:`MAX_HEAD_BYTES` (8 KiB) in all, its end included; aiohttp,
  which served the upgrade before, allowed 8190 bytes per line and 128 header lines, so
  about 1 MiB per head: this is tighter in total, per line and in count;
* lines end with CRLF; a bare CR or LF, a control character, a space before a colon, a
  folded line (obs-fold) or a line that is not ``name: value`` is an error;
* the request line is ``METHOD SP TARGET SP HTTP/1.x`` (1.0 or 1.1, anything else: 505);
* exactly one ``Host`` (RFC 9112 §3.2: missing or repeated is a 400);
* repeated fields are combined in order with ``", "`` (RFC 9110 §5.3); names are matched
  case-insensitively (:meth:`RequestHead.header`).

Error messages never quote the input: a header may hold a token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from ..errors import HeadError

#: The whole head, request line to the empty line that ends it, CRLFs included.
MAX_HEAD_BYTES: Final = 8192
#: One line (request line or field line), CRLF excluded.
MAX_LINE_BYTES: Final = 8190
#: Field lines in one head.
MAX_HEADERS: Final = 64
HEAD_END: Final = b"\r\n\r\n"

# RFC 9110 §5.6.2: token = 1*tchar.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(_TOKEN + rb" ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
# field-value: VCHAR / obs-text, with single SP/HTAB allowed inside; OWS around it.
_FIELD_LINE = re.compile(
    rb"(" + _TOKEN + rb"):[ \t]*((?:[\x21-\x7e\x80-\xff](?:[\t \x21-\x7e\x80-\xff]*"
    rb"[\x21-\x7e\x80-\xff])?)?)[ \t]*"
)
_METHOD = re.compile(_TOKEN)


class UpgradeHeadError(HeadError):
    """The head cannot be served: ``status`` to answer, ``code`` a stable machine-readable
    name (sent as ``X-Upstreamproxy-Reason``), ``reason`` a short safe explanation."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(status, reason)
        self.code = code


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    #: As sent: origin-form (``/path?query``), absolute-form, ``*`` or authority-form.
    target: str
    version: tuple[int, int]
    #: Lower-case names; repeated fields combined with ``", "``.
    headers: dict[str, str]

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def path(self) -> str:
        """The target's path without the query (origin-form only; else the whole target)."""
        return self.target.partition("?")[0]


def head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """Index just past the head's terminating empty line in ``buffer``, or -1 if not there yet.

    ``start`` lets a caller that buffers piecewise resume the search where it left off.
    """
    index = buffer.find(HEAD_END, max(0, start - 3))
    return -1 if index < 0 else index + 4


def parse_request_head(data: bytes) -> RequestHead:
    """Parse one complete request head (``data`` ends with CRLF CRLF) or raise
    :class:`UpgradeHeadError`."""
    if len(data) > MAX_HEAD_BYTES:
        raise UpgradeHeadError(431, "head-too-large", f"request head over {MAX_HEAD_BYTES} bytes")
    if not data.endswith(HEAD_END):
        raise UpgradeHeadError(400, "truncated-head", "request head is incomplete")
    lines = data[:-4].split(b"\r\n")
    if len(lines) - 1 > MAX_HEADERS:
        raise UpgradeHeadError(431, "too-many-headers", f"more than {MAX_HEADERS} header fields")
    request_line = lines[0]
    if len(request_line) > MAX_LINE_BYTES:
        raise UpgradeHeadError(431, "line-too-long", "request line too long")
    match = _REQUEST_LINE.fullmatch(request_line)
    if match is None:
        raise UpgradeHeadError(400, "malformed-request-line", "malformed request line")
    major, minor = int(match[2]), int(match[3])
    if (major, minor) not in ((1, 0), (1, 1)):
        raise UpgradeHeadError(505, "http-version-not-supported", "only HTTP/1.0 and 1.1")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if len(line) > MAX_LINE_BYTES:
            raise UpgradeHeadError(431, "line-too-long", "header line too long")
        field = _FIELD_LINE.fullmatch(line)
        if field is None:
            raise _field_error(line)
        name = field[1].decode("ascii").lower()
        value = field[2].decode("latin-1")
        previous = headers.get(name)
        if previous is None:
            headers[name] = value
        elif name == "host":
            raise UpgradeHeadError(400, "duplicate-host", "more than one Host field")
        else:
            headers[name] = f"{previous}, {value}"
    if "host" not in headers:
        raise UpgradeHeadError(400, "missing-host", "no Host field")
    method_end = request_line.index(b" ")
    return RequestHead(
        request_line[:method_end].decode("ascii"),
        match[1].decode("ascii"),
        (major, minor),
        headers,
    )


def _field_error(line: bytes) -> UpgradeHeadError:
    """Why a field line did not match (slow path: errors only)."""
    if line[:1] in (b" ", b"\t"):
        return UpgradeHeadError(400, "obs-fold", "folded header line (obs-fold)")
    if b"\r" in line or b"\n" in line:
        return UpgradeHeadError(400, "bare-cr-or-lf", "bare CR or LF in the head")
    name, colon, _ = line.partition(b":")
    if not colon:
        return UpgradeHeadError(400, "malformed-header", "header line without a colon")
    if _METHOD.fullmatch(name) is None:
        return UpgradeHeadError(400, "malformed-header", "invalid header name")
    return UpgradeHeadError(400, "bad-header-character", "invalid character in a header value")
