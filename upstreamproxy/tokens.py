"""Short-lived, Ed25519-signed session tokens: issue with a private key, verify with public keys.

Pure: no I/O except the explicit key-file helpers, and the clock is always a parameter, so any
egress replica verifies a token with public keys alone.

Token format (ASCII, URL-safe, no padding)::

    v1.<base64url(claims JSON)>.<base64url(Ed25519 signature)>

The signature covers the bytes ``v1.<base64url(claims JSON)>``, so the version cannot be
swapped. Claims (JSON object; unknown claims are ignored):

=========  ==========================================================================
``sid``    session id (1..128 of ``A-Za-z0-9._~@+=-``; never ``:``, it goes in Basic auth)
``policy`` policy name (1..128 of ``A-Za-z0-9._-``)
``aud``    audience, compared exactly with the verifier's (1..256 printable ASCII)
``kid``    key id that selects the verifying public key (1..64 of ``A-Za-z0-9._-``)
``iat``    issued at, integer Unix seconds
``exp``    expires at, integer Unix seconds, after ``iat``
``nbf``    optional, not valid before, integer Unix seconds
=========  ==========================================================================

Public API::

    issue_token(private_key, kid, session_id, policy, audience, ttl_seconds, now,
                not_before=None) -> str
    TokenVerifier(public_keys: Mapping[str, Ed25519PublicKey], audience: str,
                  leeway_seconds: int = 30)
    TokenVerifier.verify(token: str | Secret, now: float) -> SessionClaims   (raises AuthError)
    SessionClaims(session_id, policy, audience, key_id, issued_at, expires_at, not_before)
    key_fingerprint(public_key) -> str           default key id for new keys
    generate_key() -> Ed25519PrivateKey
    private_key_pem(key) -> bytes / public_key_pem(key) -> bytes
    load_private_key(path) -> Ed25519PrivateKey                       (raises ConfigError)
    load_public_keys(sources: path | Iterable[path]) -> dict[str, Ed25519PublicKey]
    kid_from_path(path) -> str

Refusals raise :class:`AuthError` whose ``reason`` is one of :data:`REFUSAL_REASONS`:
``too-large`` (over :data:`MAX_TOKEN_LENGTH`, checked before any parsing), ``unsigned`` (no
signature segment), ``malformed``, ``unknown-key``, ``bad-signature``, ``wrong-audience``,
``not-yet-valid`` (``nbf`` or ``iat`` later than now + leeway) and ``expired`` (now at or past
``exp`` + leeway). Exceptions never carry token text and never chain to an exception that does.

Key files are PEM (PKCS#8 private, SubjectPublicKeyInfo public). The key id of a key file is
its file name without ``.public.pem``, ``.private.pem`` or ``.pem``; ``token keygen`` names the
files after :func:`key_fingerprint` (``ed25519-`` + 16 hex digits of SHA-256 over the raw
public key) unless told otherwise, and a file so named must hold that very key.

Rotation: put the new public key next to the old one on every egress, then issue with the new
private key, then remove the old public key once its tokens have expired.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .errors import AuthError, ConfigError
from .secret import Secret

VERSION: Final = "v1"
#: Longest token looked at; anything longer is refused as ``too-large`` before parsing.
MAX_TOKEN_LENGTH: Final = 4096
DEFAULT_LEEWAY_SECONDS: Final = 30
SIGNATURE_LENGTH: Final = 64
#: Timestamps beyond this (year 2255) are refused; keeps arithmetic and JSON sane.
MAX_TIMESTAMP: Final = 1 << 33

REFUSAL_REASONS: Final = frozenset(
    {
        "too-large",
        "unsigned",
        "malformed",
        "unknown-key",
        "bad-signature",
        "wrong-audience",
        "not-yet-valid",
        "expired",
    }
)

_KID_RE: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")
_SID_RE: Final = re.compile(r"^[A-Za-z0-9._~@+=-]{1,128}\Z")
_POLICY_RE: Final = re.compile(r"^[A-Za-z0-9._-]{1,128}\Z")
_AUD_RE: Final = re.compile(r"^[\x21-\x7e]{1,256}\Z")
_B64_RE: Final = re.compile(r"^[A-Za-z0-9_-]*\Z")
_PEM_SUFFIXES: Final = (".public.pem", ".private.pem", ".pem")
_FINGERPRINT_RE: Final = re.compile(r"^ed25519-[0-9a-f]{16}\Z")


@dataclass(frozen=True, slots=True)
class SessionClaims:
    """The verified contents of a token (holds no token text; safe to log)."""

    session_id: str
    policy: str
    audience: str
    key_id: str
    issued_at: int
    expires_at: int
    not_before: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes | None:
    """Strict, canonical base64url without padding; None if ``text`` is anything else."""
    if not _B64_RE.match(text) or len(text) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    # Refuse non-zero padding bits: one token, one spelling.
    return data if _b64encode(data) == text else None


def _signing_input(claims_segment: str) -> bytes:
    return f"{VERSION}.{claims_segment}".encode("ascii")


def _check_field(name: str, value: object, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(f"{name} must match {pattern.pattern}")
    return value


def _check_time(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIMESTAMP:
        raise ValueError(f"{name} must be an integer Unix time in 0..{MAX_TIMESTAMP}")
    return value


def _claims_from(obj: dict[str, Any]) -> SessionClaims:
    """Type-check the claims object (ValueError names the first bad field)."""
    nbf = obj.get("nbf")
    claims = SessionClaims(
        session_id=_check_field("sid", obj.get("sid"), _SID_RE),
        policy=_check_field("policy", obj.get("policy"), _POLICY_RE),
        audience=_check_field("aud", obj.get("aud"), _AUD_RE),
        key_id=_check_field("kid", obj.get("kid"), _KID_RE),
        issued_at=_check_time("iat", obj.get("iat")),
        expires_at=_check_time("exp", obj.get("exp")),
        not_before=None if nbf is None else _check_time("nbf", nbf),
    )
    if claims.expires_at <= claims.issued_at:
        raise ValueError("exp must be after iat")
    return claims


def issue_token(
    private_key: Ed25519PrivateKey,
    kid: str,
    session_id: str,
    policy: str,
    audience: str,
    ttl_seconds: int,
    now: float,
    not_before: int | None = None,
) -> str:
    """Sign a token for ``session_id`` valid from ``now`` for ``ttl_seconds``.

    ``now`` is Unix seconds (``time.time()``), rounded down. ValueError on a bad argument.
    """
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be a positive integer")
    issued_at = int(now)
    body: dict[str, Any] = {
        "sid": session_id,
        "policy": policy,
        "aud": audience,
        "kid": kid,
        "iat": issued_at,
        "exp": issued_at + ttl_seconds,
    }
    if not_before is not None:
        body["nbf"] = not_before
    _claims_from(body)  # the verifier's rules, applied at the source
    payload = json.dumps(body, separators=(",", ":"), sort_keys=True).encode("ascii")
    segment = _b64encode(payload)
    signature = private_key.sign(_signing_input(segment))
    token = f"{VERSION}.{segment}.{_b64encode(signature)}"
    if len(token) > MAX_TOKEN_LENGTH:
        raise ValueError(f"token would exceed {MAX_TOKEN_LENGTH} characters")
    return token


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError("duplicate claim")
        result[key] = value
    return result


def _parse_claims(segment: str) -> dict[str, Any] | None:
    raw = _b64decode(segment)
    if raw is None:
        return None
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return obj if isinstance(obj, dict) else None


def _valid_claims(obj: dict[str, Any]) -> SessionClaims | None:
    try:
        return _claims_from(obj)
    except ValueError:
        return None


#: Signature-verified tokens a :class:`TokenVerifier` remembers (oldest dropped first).
VERIFIED_CACHE_SIZE: Final = 1024


class TokenVerifier:
    """Verifies tokens against one or more public keys (several at once during rotation)."""

    __slots__ = ("_audience", "_keys", "_leeway", "_verified")

    def __init__(
        self,
        public_keys: Mapping[str, Ed25519PublicKey],
        audience: str,
        leeway_seconds: int = DEFAULT_LEEWAY_SECONDS,
    ) -> None:
        if not public_keys:
            raise ConfigError("public_keys", "at least one public key is required")
        for kid, key in public_keys.items():
            if not isinstance(kid, str) or not _KID_RE.match(kid):
                raise ConfigError("public_keys", f"invalid key id {kid!r}")
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError("public_keys", f"key {kid!r} is not an Ed25519 public key")
        if not isinstance(audience, str) or not _AUD_RE.match(audience):
            raise ConfigError("audience", "must be 1..256 printable ASCII characters")
        if isinstance(leeway_seconds, bool) or not 0 <= leeway_seconds <= 3600:
            raise ConfigError("leeway_seconds", "must be between 0 and 3600")
        self._keys = dict(public_keys)
        self._audience = audience
        self._leeway = int(leeway_seconds)
        #: Tokens whose signature and claims checked out, with their claims: the relay sends
        #: the same token on every upgrade, and an Ed25519 verify costs more than the rest
        #: of an upgrade's parsing. Only the signature is cached - audience and time are
        #: checked on every call. Bounded; a reload builds a new verifier (an empty cache).
        self._verified: dict[str, SessionClaims] = {}

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    @property
    def audience(self) -> str:
        return self._audience

    def verify(self, token: str | Secret, now: float) -> SessionClaims:
        """The token's claims, or AuthError with one of :data:`REFUSAL_REASONS`.

        Nothing but AuthError escapes for any ``str`` input; the error never includes the token.
        """
        text = token.reveal() if isinstance(token, Secret) else token
        if not isinstance(text, str):
            raise AuthError("malformed")
        if len(text) > MAX_TOKEN_LENGTH:
            raise AuthError("too-large")
        claims = self._verified.get(text)
        if claims is None:
            claims = self._verify_signed(text)
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                del self._verified[next(iter(self._verified))]  # the oldest entry
            self._verified[text] = claims
        if claims.audience != self._audience:
            raise AuthError("wrong-audience")
        if claims.not_before is not None and now + self._leeway < claims.not_before:
            raise AuthError("not-yet-valid")
        if now + self._leeway < claims.issued_at:
            raise AuthError("not-yet-valid")
        if now >= claims.expires_at + self._leeway:
            raise AuthError("expired")
        return claims

    def _verify_signed(self, text: str) -> SessionClaims:
        """Format, claims and signature: everything about a token that does not change."""
        if not text.isascii():
            raise AuthError("malformed")
        parts = text.split(".")
        if len(parts) == 2 or (len(parts) == 3 and parts[2] == ""):
            raise AuthError("unsigned")
        if len(parts) != 3 or parts[0] != VERSION:
            raise AuthError("malformed")
        _, segment, signature_text = parts
        obj = _parse_claims(segment)
        signature = _b64decode(signature_text)
        if obj is None or signature is None:
            raise AuthError("malformed")
        claims = _valid_claims(obj)
        if claims is None:
            raise AuthError("malformed")
        key = self._keys.get(claims.key_id)
        if key is None:
            raise AuthError("unknown-key")
        if not self._signature_ok(key, signature, segment):
            raise AuthError("bad-signature")
        return claims

    @staticmethod
    def _signature_ok(key: Ed25519PublicKey, signature: bytes, segment: str) -> bool:
        if len(signature) != SIGNATURE_LENGTH:
            return False
        try:
            key.verify(signature, _signing_input(segment))
        except InvalidSignature:
            return False
        return True

    def __repr__(self) -> str:
        return (
            f"TokenVerifier(key_ids={sorted(self._keys)!r}, audience={self._audience!r}, "
            f"leeway_seconds={self._leeway})"
        )


# --- keys ------------------------------------------------------------------------------------


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """A stable key id: ``ed25519-`` and 16 hex digits of SHA-256 over the raw public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519-" + hashlib.sha256(raw).hexdigest()[:16]


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_kid(kid: str, field: str = "kid") -> str:
    """``kid`` if it is a valid key id, else ConfigError naming ``field``."""
    if not _KID_RE.match(kid):
        raise ConfigError(field, f"{kid!r}: key ids are 1..64 of A-Z a-z 0-9 . _ -")
    return kid


def kid_from_path(path: Path | str) -> str:
    """The key id a key file stands for: its name less ``.public.pem``/``.private.pem``/``.pem``."""
    name = Path(path).name
    for suffix in _PEM_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return check_kid(name[: -len(suffix)], str(path))
    raise ConfigError(str(path), "key file names must end in .pem (or give the key id itself)")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """An unencrypted PEM Ed25519 private key, else ConfigError naming the file."""
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(str(path), "not an unencrypted PEM Ed25519 private key")
    return key


def _load_public_key(path: Path) -> Ed25519PublicKey:
    data = _read(path)
    if b"PRIVATE KEY" in data:
        raise ConfigError(str(path), "holds a private key; give verifiers public keys only")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(str(path), "not a PEM Ed25519 public key")
    return key


def _key_files(source: Path) -> list[Path]:
    if not source.is_dir():
        return [source]
    # Skip hidden entries (Kubernetes' ..data links) and private keys kept alongside.
    return sorted(
        entry
        for entry in source.iterdir()
        if entry.name.endswith(".pem")
        and not entry.name.startswith(".")
        and not entry.name.endswith(".private.pem")
        and entry.is_file()
    )


def private_key_files(sources: Iterable[Path | str]) -> list[Path]:
    """The ``*.private.pem`` files in the key directories among ``sources``: skipped when
    loading (``token keygen`` writes both halves into one directory), but a signing key has
    no business where only verifying happens."""
    found: list[Path] = []
    for source in sources:
        source_path = Path(source)
        with contextlib.suppress(OSError):
            if source_path.is_dir():
                found += sorted(e for e in source_path.iterdir() if e.name.endswith(".private.pem"))
    return found


def public_keys_fingerprint(sources: Iterable[Path | str]) -> str:
    """A digest of the names and content of the key files :func:`load_public_keys` would read.

    Never raises: an unreadable source counts as content, so its repair is seen as a change too.
    """
    digest = hashlib.sha256()
    for source in sources:
        source_path = Path(source)
        try:
            paths = _key_files(source_path) if source_path.exists() else []
            for path in paths:
                digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        except OSError as exc:
            digest.update(f"{source_path}: {exc.errno}".encode())
    return digest.hexdigest()


def load_public_keys(sources: Path | str | Iterable[Path | str]) -> dict[str, Ed25519PublicKey]:
    """Public keys by key id from files and/or directories.

    A directory contributes every ``*.pem`` in it except hidden files and ``*.private.pem``.
    The key id is :func:`kid_from_path`. ConfigError if a file is unreadable, is not an Ed25519
    public key, holds a private key, is named ``ed25519-<16 hex>`` but is not the key with that
    :func:`key_fingerprint`, if two files claim the same key id, or if none is found.
    """
    if isinstance(sources, Path | str):
        sources = [sources]
    keys: dict[str, Ed25519PublicKey] = {}
    origin: dict[str, Path] = {}
    for source in sources:
        source_path = Path(source)
        if not source_path.exists():
            raise ConfigError(str(source_path), "no such file or directory")
        for path in _key_files(source_path):
            kid = kid_from_path(path)
            if kid in keys:
                raise ConfigError(str(path), f"key id {kid!r} already loaded from {origin[kid]}")
            key = _load_public_key(path)
            if _FINGERPRINT_RE.match(kid) and kid != key_fingerprint(key):
                raise ConfigError(str(path), "file is named after another key's fingerprint")
            keys[kid] = key
            origin[kid] = path
    if not keys:
        raise ConfigError("public_keys", "no public keys found")
    return keys
