"""Leaf certificates for intercepted names, issued from the egress CA and cached.

One entry per name: the :class:`~upstreamproxy.certs.Leaf` and a server ``SSLContext`` loaded
with it. The cache holds at most ``cap`` entries (least recently used evicted first) and drops
an entry ``refresh_before`` ahead of the certificate's ``notAfter``, so a served certificate
always has some life left and no entry outlives its certificate.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ...certs import DEFAULT_LEAF_TTL, LEAF_BACKDATE, CertificateAuthority, Leaf, issue_leaf
from ...errors import ConfigError
from ..hostnames import normalise_host, parse_ip_literal
from .metrics import NOOP_METRICS, InterceptMetrics

DEFAULT_CACHE_CAP: Final = 1024
MAX_REFRESH_BEFORE: Final = dt.timedelta(hours=1)
ALPN_PROTOCOLS: Final = ("http/1.1",)


def normalize_name(name: str) -> str:
    """Canonical form of a host name or IP literal, for comparing CONNECT host, SNI and Host:
    an address in its compressed form (brackets dropped), a name as the policy sees it
    (:func:`~upstreamproxy.egress.hostnames.normalise_host`: lower-case, no trailing dot,
    IDNA A-labels). Raises ValueError for anything that is neither."""
    text = name.strip()
    address = parse_ip_literal(text)
    if address is not None:
        return address.compressed
    if text.startswith("[") or ":" in text:
        raise ValueError(f"{name!r} is not a host name or IP address")
    return normalise_host(text)


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def server_context(leaf: Leaf) -> ssl.SSLContext:
    """A TLS server context presenting ``leaf`` (and its CA) and offering only HTTP/1.1."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
    _load_chain(ctx, leaf.chain_pem() + leaf.key_pem())
    return ctx


def _load_chain(ctx: ssl.SSLContext, pem: bytes) -> None:
    """``load_cert_chain`` wants a path: use an anonymous memory file where the OS has one,
    else a private temporary directory, so the key never sits in a named file for long."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        try:
            fd: int = memfd_create("upstreamproxy-leaf", os.MFD_CLOEXEC)
        except OSError:
            pass
        else:
            try:
                view = memoryview(pem)
                while view:
                    view = view[os.write(fd, view) :]
                ctx.load_cert_chain(f"/proc/self/fd/{fd}")
                return
            except (FileNotFoundError, NotADirectoryError):
                pass  # no /proc: fall through to a temporary file
            finally:
                os.close(fd)
    with tempfile.TemporaryDirectory(prefix="upstreamproxy-leaf-") as tmp:
        path = Path(tmp) / "leaf.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        try:
            ctx.load_cert_chain(path)
        finally:
            with contextlib.suppress(OSError):
                path.unlink()


@dataclass(frozen=True)
class _Entry:
    leaf: Leaf
    context: ssl.SSLContext
    expires_at: dt.datetime


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeafCache:
    """Issue-on-miss, LRU-capped cache of per-name leaf certificates and server contexts."""

    def __init__(
        self,
        ca: CertificateAuthority,
        ttl: dt.timedelta = DEFAULT_LEAF_TTL,
        cap: int = DEFAULT_CACHE_CAP,
        backdate: dt.timedelta = LEAF_BACKDATE,
        *,
        refresh_before: dt.timedelta | None = None,
        metrics: InterceptMetrics = NOOP_METRICS,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        if ttl <= dt.timedelta(0):
            raise ConfigError("leaf ttl", "must be positive")
        if cap < 1:
            raise ConfigError("leaf cache cap", "must be at least 1")
        if backdate < dt.timedelta(0):
            raise ConfigError("leaf backdate", "must not be negative")
        self.ca = ca
        self.ttl = ttl
        self.cap = cap
        self.backdate = backdate
        self.refresh_before = (
            refresh_before if refresh_before is not None else min(ttl / 10, MAX_REFRESH_BEFORE)
        )
        self.metrics = metrics
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.issued = 0
        self.hits = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"LeafCache({len(self._entries)}/{self.cap} entries, ttl={self.ttl})"

    def get(self, name: str) -> ssl.SSLContext:
        """A server context for ``name`` (host name or IP literal; ValueError if neither)."""
        return self._entry(name).context

    def leaf(self, name: str) -> Leaf:
        """The certificate :meth:`get` serves for ``name``."""
        return self._entry(name, count=False).leaf

    def _entry(self, name: str, count: bool = True) -> _Entry:
        key = normalize_name(name)
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None:
            if now < entry.expires_at:
                self._entries.move_to_end(key)
                if count:
                    self.hits += 1
                    self.metrics.leaf_cache_hit()
                return entry
            del self._entries[key]
        leaf = issue_leaf(self.ca, [key], ttl=self.ttl, backdate=self.backdate)
        entry = _Entry(leaf, server_context(leaf), leaf.not_after - self.refresh_before)
        self.issued += 1
        self.metrics.leaf_issued()
        self._entries[key] = entry
        while len(self._entries) > self.cap:
            self._entries.popitem(last=False)
            self.evictions += 1
        return entry
