"""The CA "super bundle": the system trust store plus the egress CA, in one PEM file.

Public API::

    find_system_bundle() -> Path | None
    fetch_ca_cert(url, timeout, ssl_context=None, proxy=None) -> bytes
    build_super_bundle(system_pem: bytes, custom_pems: list[bytes]) -> bytes
    write_bundle(path: Path, data: bytes) -> None
    prepare_ca_bundle(out_path, ca_url=None, ca_file=None, timeout=5.0, *,
                      extra_bundles=(), system_bundle=None, ssl_context=None) -> BundleReport
    SYSTEM_BUNDLE_CANDIDATES, MAX_CA_RESPONSE_SIZE, MAX_BUNDLE_FILE_SIZE

Every failure is a ConfigError naming the setting to blame (``ca_url``, ``ca_file``,
``system_bundle``, ``ca_bundle``); URLs in messages have credentials, query and fragment
removed.

Why a *super* bundle rather than only the egress CA: tools such as curl (``CURL_CA_BUNDLE``),
requests (``REQUESTS_CA_BUNDLE``), pip (``PIP_CERT``) and OpenSSL (``SSL_CERT_FILE``) *replace*
their trust store with the file they are given. One file with the system roots and the egress
CA keeps both non-intercepted and intercepted hosts working, for every tool alike.

Output format: each certificate re-encoded from its DER as a canonical
``-----BEGIN CERTIFICATE-----`` block, nothing else. Re-encoding drops comments, OpenSSL
"TRUSTED CERTIFICATE" aux blocks (which Node and Go do not read) and anything that is not a
certificate, so a private key pasted into a custom CA file can never end up in a
world-readable bundle. Duplicates (same DER) are dropped across all inputs, first one wins.
System certificates are copied without interpretation (distributions ship a few that strict
parsers dislike, and dropping a root silently would break hosts); each custom PEM must be a
CA certificate (basicConstraints CA:TRUE, via certs.parse_ca_certificate).

The fetch never goes through a proxy: the opener has an explicitly empty ProxyHandler, so the
``HTTPS_PROXY`` that upstreamproxy itself exports can never loop the relay into itself.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from typing import Final, cast

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..capped_file import CappedFileError, TimedOut, TooLarge, read_capped
from ..certs import parse_ca_certificate, write_private_file
from ..errors import ConfigError

# Known locations, most specific first. The first that holds at least one certificate wins.
SYSTEM_BUNDLE_CANDIDATES: Final[tuple[str, ...]] = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Gentoo, Arch (p11-kit link)
    "/etc/pki/tls/certs/ca-bundle.crt",  # RHEL, CentOS, Fedora (compat link)
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # RHEL/Fedora ca-trust (real file)
    "/etc/ssl/cert.pem",  # Alpine, macOS, OpenBSD
    "/var/lib/ca-certificates/ca-bundle.pem",  # openSUSE, SLES
    "/etc/ssl/ca-bundle.pem",  # older SUSE
)
MAX_CA_RESPONSE_SIZE: Final = 1024 * 1024
MAX_BUNDLE_FILE_SIZE: Final = 16 * 1024 * 1024
MAX_REDIRECTS: Final = 3
BUNDLE_MODE: Final = 0o644

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_BEGIN_CERT: Final = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class BundleReport:
    """What :func:`prepare_ca_bundle` wrote, for the logs.

    ``system_source`` is the file the system roots came from; ``system_source_kind`` is
    ``system`` (a distribution path or OpenSSL's default), or ``certifi`` (fallback).
    ``custom_sources`` are the redacted CA URL and/or CA file; ``extra_sources`` the extra
    bundles actually merged (pass them to proxy_env as ``merged_ca_files``).
    ``duplicates`` counts certificates dropped as already present.
    """

    path: Path
    system_source: str
    system_source_kind: str
    system_certs: int
    custom_sources: tuple[str, ...]
    custom_certs: int
    extra_sources: tuple[str, ...]
    extra_certs: int
    duplicates: int
    total_certs: int
    sha256: str
    warnings: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        custom = ", ".join(self.custom_sources) or "none"
        return (
            f"wrote {self.total_certs} certificates to {self.path}: {self.system_certs} from "
            f"{self.system_source} ({self.system_source_kind}), {self.custom_certs} custom "
            f"({custom}), {self.extra_certs} from {len(self.extra_sources)} extra bundle(s), "
            f"{self.duplicates} duplicates dropped"
        )


# ---------------------------------------------------------------------------------------------
# PEM handling (pure)


def _certificate_ders(pem: bytes) -> tuple[list[bytes], int]:
    """DER of every CERTIFICATE block in ``pem``; also the number of blocks skipped."""
    ders: list[bytes] = []
    skipped = 0
    for match in _PEM_BLOCK.finditer(pem):
        if match.group(1) != b"CERTIFICATE":
            skipped += 1
            continue
        try:
            der = base64.b64decode(b"".join(match.group(2).split()), validate=True)
        except (binascii.Error, ValueError):
            skipped += 1
            continue
        if der:
            ders.append(der)
        else:
            skipped += 1
    return ders, skipped


def _der_to_pem(der: bytes) -> bytes:
    body = base64.b64encode(der)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n"


def _custom_ders(pem: bytes, source: str) -> list[bytes]:
    """Validate a custom CA PEM (one or more CA certificates, nothing else) and return DERs."""
    blocks = list(_PEM_BLOCK.finditer(pem))
    if not blocks:
        raise ConfigError(source, "not a PEM certificate")
    ders: list[bytes] = []
    for match in blocks:
        kind = match.group(1).decode("ascii")
        if kind != "CERTIFICATE":
            raise ConfigError(
                source,
                f"contains a PEM block of type {kind!r}; only CERTIFICATE blocks are allowed",
            )
        cert = parse_ca_certificate(match.group(0), source)
        ders.append(cert.public_bytes(Encoding.DER))
    return ders


@dataclass
class _Assembler:
    seen: set[bytes] = field(default_factory=set)
    out: list[bytes] = field(default_factory=list)
    duplicates: int = 0

    def add(self, ders: Iterable[bytes]) -> int:
        added = 0
        for der in ders:
            if der in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(der)
            self.out.append(_der_to_pem(der))
            added += 1
        return added

    def pem(self) -> bytes:
        return b"".join(self.out)


def build_super_bundle(system_pem: bytes, custom_pems: list[bytes]) -> bytes:
    """System certificates then each custom CA, re-encoded, deduplicated by DER.

    Raises ConfigError (field ``ca_certificate``) if a custom PEM is not purely CA
    certificates. Non-certificate blocks in ``system_pem`` are skipped.
    """
    assembler = _Assembler()
    assembler.add(_certificate_ders(system_pem)[0])
    for index, pem in enumerate(custom_pems):
        assembler.add(_custom_ders(pem, f"ca_certificate[{index}]"))
    return assembler.pem()


# ---------------------------------------------------------------------------------------------
# Files


def _read_capped(
    path: Path, limit: int, setting: str, stream_timeout: float | None = None
) -> bytes:
    """``path`` whole, at most ``limit`` bytes. A regular file only, unless ``stream_timeout``
    is given: then a pipe (``--ca-file <(cat ca.pem)``), FIFO or character device too, read
    without blocking, finished within that many seconds."""
    try:
        return read_capped(path, limit, stream_timeout=stream_timeout).data
    except OSError as exc:
        raise ConfigError(setting, f"cannot read {path}: {exc.strerror}") from None
    except TooLarge:
        raise ConfigError(setting, f"{path} is larger than {limit} bytes") from None
    except TimedOut as exc:
        raise ConfigError(setting, f"{path} {exc}") from None  # did not finish within N s
    except CappedFileError as exc:  # not a regular file (with streams: nor a pipe, ...)
        raise ConfigError(setting, f"cannot read {path}: {exc}") from None


def _bundle_data(path: Path) -> bytes | None:
    """``path``'s bytes if it is a regular file holding a PEM certificate, else None: one
    capped, non-blocking read (a FIFO or device swapped in cannot block it or be opened)."""
    try:
        data = read_capped(path, MAX_BUNDLE_FILE_SIZE).data
    except (OSError, CappedFileError):
        return None
    return data if _BEGIN_CERT in data else None


def find_system_bundle(candidates: Sequence[str] = SYSTEM_BUNDLE_CANDIDATES) -> Path | None:
    """The first existing, non-empty PEM bundle among ``candidates`` and OpenSSL's defaults.

    Environment variables (SSL_CERT_FILE, ...) are deliberately not consulted: they may point
    at a bundle upstreamproxy wrote earlier. Pass the user's own CA files to
    :func:`prepare_ca_bundle` as ``extra_bundles`` instead.
    """
    found = _read_system_bundle(candidates)
    return None if found is None else found[0]


def _read_system_bundle(candidates: Sequence[str]) -> tuple[Path, bytes] | None:
    """The first usable candidate (see :func:`find_system_bundle`) and what it held when it
    was chosen: read once, so a file changed after the choice cannot fail the start."""
    paths = ssl.get_default_verify_paths()
    for candidate in (*candidates, paths.cafile, paths.openssl_cafile):
        if candidate and (data := _bundle_data(Path(candidate))) is not None:
            return Path(candidate), data
    return None


def write_bundle(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0644 (world-readable, owner-writable).

    Written to a temporary file in the same directory, fsynced, then renamed over ``path``:
    readers see the old bundle or the new one, never a partial file; on failure nothing is
    left behind.
    """
    if _BEGIN_CERT not in data:
        raise ConfigError("ca_bundle", "refusing to write a bundle without certificates")
    try:
        write_private_file(path, data, BUNDLE_MODE)
    except OSError as exc:
        raise ConfigError("ca_bundle", f"cannot write {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------
# Fetching the egress CA


def redact_url(url: str) -> str:
    """``url`` without user info, query or fragment: safe to log."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<unparseable url>"
    return urllib.parse.urlunsplit((parts.scheme, host + port, parts.path, "", ""))


class _SameOrSaferRedirects(urllib.request.HTTPRedirectHandler):
    """Follow at most MAX_REDIRECTS redirects, to http(s) only, and never https -> http."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: object,
        code: int,
        msg: str,
        headers: object,
        newurl: str,
    ) -> urllib.request.Request | None:
        old = urllib.parse.urlsplit(req.full_url).scheme
        new = urllib.parse.urlsplit(newurl).scheme
        if new not in ("http", "https") or (old == "https" and new == "http"):
            raise ConfigError("ca_url", f"refusing redirect from {old} to {redact_url(newurl)}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)  # type: ignore[arg-type]


def _opener(
    ssl_context: ssl.SSLContext | None, proxy: str | None = None
) -> urllib.request.OpenerDirector:
    # Built by hand so that only these handlers exist: an explicit ProxyHandler (never the
    # HTTPS_PROXY we export ourselves; only the egress proxy ``start`` was given), http(s)
    # only (no file:, ftp:, data:).
    opener = urllib.request.OpenerDirector()
    proxies = {"http": proxy, "https": proxy} if proxy else {}
    for handler in (
        urllib.request.ProxyHandler(proxies),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(context=ssl_context),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        _SameOrSaferRedirects(),
    ):
        opener.add_handler(handler)
    return opener


def fetch_ca_cert(
    url: str, timeout: float, ssl_context: ssl.SSLContext | None = None, proxy: str | None = None
) -> bytes:
    """GET the egress CA certificate (PEM) from ``url``, directly or via ``proxy`` (the
    http(s):// proxy the relay reaches the egress through), never via the environment's.

    ``timeout`` bounds each connect/read and the whole transfer (checked between reads, so
    the worst case is about twice ``timeout``). The body is capped at MAX_CA_RESPONSE_SIZE.
    The bytes are returned unvalidated; :func:`build_super_bundle` validates them.
    Raises ConfigError("ca_url", ...).
    """
    safe = redact_url(url)
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ConfigError("ca_url", f"{safe}: only http and https URLs are supported")
    if timeout <= 0:
        raise ConfigError("ca_url", "timeout must be positive")
    deadline = time.monotonic() + timeout
    headers = {"Accept": "application/x-pem-file, text/plain, */*", "User-Agent": "upstreamproxy"}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 (scheme checked above)
    try:
        with _opener(ssl_context, proxy).open(request, timeout=timeout) as raw:
            response = cast(HTTPResponse, raw)
            length = response.headers.get("Content-Length")
            declared = int(length) if length and length.strip().isdigit() else 0
            if declared > MAX_CA_RESPONSE_SIZE:
                raise ConfigError(
                    "ca_url", f"{safe}: response larger than {MAX_CA_RESPONSE_SIZE} bytes"
                )
            return _read_body(response, deadline, safe, timeout)
    except ConfigError:
        raise
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:  # urllib refused to follow it (scheme, or too many)
            raise ConfigError("ca_url", f"{safe}: refusing redirect (HTTP {exc.code})") from None
        raise ConfigError("ca_url", f"{safe}: HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise ConfigError("ca_url", f"{safe}: timed out after {timeout:g}s") from None
        raise ConfigError("ca_url", f"{safe}: {_describe(reason)}") from None
    except TimeoutError:
        raise ConfigError("ca_url", f"{safe}: timed out after {timeout:g}s") from None
    except (OSError, HTTPException, ValueError) as exc:
        raise ConfigError("ca_url", f"{safe}: {_describe(exc)}") from None


def _read_body(response: HTTPResponse, deadline: float, safe: str, timeout: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise ConfigError("ca_url", f"{safe}: timed out after {timeout:g}s")
        chunk = response.read1(64 * 1024)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_CA_RESPONSE_SIZE:
            raise ConfigError(
                "ca_url", f"{safe}: response larger than {MAX_CA_RESPONSE_SIZE} bytes"
            )
        chunks.append(chunk)


def _describe(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


# ---------------------------------------------------------------------------------------------
# The whole step


def _certifi_bundle() -> tuple[Path, bytes] | None:
    try:
        import certifi
    except ImportError:
        return None
    path = Path(certifi.where())
    data = _bundle_data(path)
    return None if data is None else (path, data)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def prepare_ca_bundle(
    out_path: Path,
    ca_url: str | None = None,
    ca_file: Path | None = None,
    timeout: float = 5.0,
    *,
    extra_bundles: Sequence[str | Path] = (),
    system_bundle: Path | None = None,
    ssl_context: ssl.SSLContext | None = None,
    proxy: str | None = None,
) -> BundleReport:
    """Bootstrap step 3: build and atomically write the super bundle to ``out_path``.

    System roots come from ``system_bundle`` if given, else the first usable candidate (see
    :func:`find_system_bundle`), else certifi. The custom CA comes from ``ca_url`` (fetched
    directly, see :func:`fetch_ca_cert`) and/or ``ca_file``; each must be CA certificates only.
    ``extra_bundles`` are more trust files to fold in unvalidated, typically the user's own
    ``SSL_CERT_FILE``/``NODE_EXTRA_CA_CERTS`` (see ``proxy_env.user_ca_files``); missing or
    unreadable ones, and ``out_path`` itself (a bundle from an earlier run, which may hold a
    rotated-out egress CA), are skipped with a warning.

    Raises ConfigError on any failure; ``out_path`` is then left untouched.
    """
    warnings: list[str] = []
    # Each source is read once: what decided it usable is what goes in.
    if system_bundle is not None:
        system_path, kind = system_bundle, "given"
        system_data = _read_capped(system_bundle, MAX_BUNDLE_FILE_SIZE, "system_bundle")
    elif (found := _read_system_bundle(SYSTEM_BUNDLE_CANDIDATES)) is not None:
        (system_path, system_data), kind = found, "system"
    elif (found := _certifi_bundle()) is not None:
        (system_path, system_data), kind = found, "certifi"
        warnings.append("no system CA bundle found; using certifi's")
    else:
        raise ConfigError("system_bundle", "no system CA bundle found and certifi unavailable")
    system_ders, skipped = _certificate_ders(system_data)
    if not system_ders:
        raise ConfigError("system_bundle", f"{system_path} holds no certificates")
    if skipped:
        warnings.append(
            f"skipped {skipped} non-certificate or undecodable PEM blocks in {system_path}"
        )

    custom: list[tuple[str, str, bytes]] = []  # (setting, description, pem)
    if ca_url is not None:
        custom.append(
            ("ca_url", redact_url(ca_url), fetch_ca_cert(ca_url, timeout, ssl_context, proxy))
        )
    if ca_file is not None:
        custom.append(
            (
                "ca_file",
                str(ca_file),
                # A pipe too, for --ca-file <(...), bounded like the fetch: it has a writer
                # that may never finish (a FIFO nobody writes, /dev/zero).
                _read_capped(Path(ca_file), MAX_CA_RESPONSE_SIZE, "ca_file", timeout),
            )
        )

    assembler = _Assembler()
    system_count = assembler.add(system_ders)
    custom_count = 0
    for setting, description, pem in custom:
        try:
            ders = _custom_ders(pem, setting)
        except ConfigError as exc:
            raise ConfigError(setting, f"{description}: {exc.problem}") from None
        for der in ders:
            _warn_if_not_current(x509.load_der_x509_certificate(der), description, warnings)
        custom_count += assembler.add(ders)

    extra_sources: list[str] = []
    extra_count = 0
    for extra in extra_bundles:
        extra_path = Path(extra)
        if _same_file(extra_path, out_path):
            warnings.append(f"extra bundle {extra_path} is the output bundle itself; skipped")
            continue
        data = _bundle_data(extra_path)
        if data is None:
            warnings.append(
                f"extra bundle {extra_path} is missing or holds no PEM certificates; skipped"
            )
            continue
        extra_count += assembler.add(_certificate_ders(data)[0])
        extra_sources.append(str(extra_path))

    data = assembler.pem()
    write_bundle(out_path, data)
    return BundleReport(
        path=out_path,
        system_source=str(system_path),
        system_source_kind=kind,
        system_certs=system_count,
        custom_sources=tuple(description for _, description, _ in custom),
        custom_certs=custom_count,
        extra_sources=tuple(extra_sources),
        extra_certs=extra_count,
        duplicates=assembler.duplicates,
        total_certs=len(assembler.out),
        sha256=hashlib.sha256(data).hexdigest(),
        warnings=tuple(warnings),
    )


def _warn_if_not_current(cert: x509.Certificate, source: str, warnings: list[str]) -> None:
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc < now:
        warnings.append(f"custom CA from {source} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    elif cert.not_valid_before_utc > now:
        warnings.append(
            f"custom CA from {source} is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (clock skew?)"
        )
