"""Who is calling: the upgrade's bearer token becomes a :class:`Session`.

The egress checks the token twice: at the WebSocket upgrade (``Authorization: Bearer``) and
inside the tunnel (``Proxy-Authorization: Basic session:token``), which must name the same
session and carry the same token.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..connect_head import parse_basic_credentials
from ..errors import AuthError, ConfigError, HeadError
from ..tokens import TokenVerifier, public_keys_fingerprint
from .policy import file_fingerprint


@dataclass(frozen=True)
class Session:
    session_id: str
    policy: str = "default"


class Authenticator(Protocol):
    def authenticate(self, token: str) -> Session:
        """Return the token's session or raise :class:`AuthError`."""

    def reload(self) -> ConfigError | None:
        """Re-read keys/tokens from their source; on error keep the old ones, return the error."""

    def changed(self) -> bool:
        """Whether the source files differ from what was last loaded (or tried)."""

    def source(self) -> str | None:
        """What :meth:`reload` re-reads, for the log (None: nothing, a fixed table)."""


class StaticTokens:
    """A fixed token -> session table (development and tests; production uses signed tokens)."""

    def __init__(self, tokens: Mapping[str, Session], path: Path | None = None) -> None:
        self._tokens = dict(tokens)
        self._path = path
        self._seen = file_fingerprint(path) if path is not None else ""

    def changed(self) -> bool:
        return self._path is not None and file_fingerprint(self._path) != self._seen

    def source(self) -> str | None:
        return None if self._path is None else f"tokens from {self._path}"

    def reload(self) -> ConfigError | None:
        if self._path is None:
            return None
        self._seen = file_fingerprint(self._path)
        try:
            self._tokens = StaticTokens.from_file(self._path)._tokens
        except ConfigError as exc:
            return exc
        return None

    def authenticate(self, token: str) -> Session:
        for known, session in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return session
        raise AuthError("unknown-token")

    @classmethod
    def from_file(cls, path: Path) -> StaticTokens:
        """Lines of ``SESSION_ID TOKEN [POLICY]``; ``#`` comments and blank lines ignored."""
        tokens: dict[str, Session] = {}
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError("static_tokens", f"cannot read {path}: {exc.strerror}") from None
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) not in (2, 3):
                raise ConfigError(
                    "static_tokens", f"{path}:{number}: expected SESSION_ID TOKEN [POLICY]"
                )
            policy = fields[2] if len(fields) == 3 else "default"
            tokens[fields[1]] = Session(fields[0], policy)
        if not tokens:
            raise ConfigError("static_tokens", f"{path} holds no tokens")
        return cls(tokens, path)


def bearer_token(header: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header, or AuthError."""
    if not header:
        raise AuthError("missing-authorization")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("malformed-authorization")
    if len(token) > 8192:
        raise AuthError("token-too-large")
    if not token.isascii() or not token.isprintable():
        raise AuthError("malformed-authorization")
    return token


def check_tunnel_credentials(proxy_authorization: str | None, session: Session, token: str) -> None:
    """The in-tunnel Proxy-Authorization must carry the upgrade's session and token (407)."""
    if proxy_authorization is None:
        raise HeadError(407, "missing Proxy-Authorization inside the tunnel")
    user, password = parse_basic_credentials(proxy_authorization)
    same_session = hmac.compare_digest(user.encode(), session.session_id.encode())
    same_token = hmac.compare_digest(password.encode(), token.encode())
    if not (same_session and same_token):
        raise HeadError(407, "Proxy-Authorization does not match the session's token")


class SignedTokens:
    """Verifies Ed25519-signed session tokens with public keys only (stateless replicas).

    Built from a factory so SIGHUP (and the change watcher) can re-read rotated keys.
    """

    def __init__(
        self,
        verifier: TokenVerifier | Callable[[], TokenVerifier],
        clock: Callable[[], float] = time.time,
        sources: Sequence[Path | str] = (),
    ) -> None:
        self._sources = tuple(sources)  # the key files and directories, to see changes
        self._seen = public_keys_fingerprint(self._sources)
        self._factory = verifier if callable(verifier) else None
        self._verifier = verifier() if callable(verifier) else verifier
        self._clock = clock

    def changed(self) -> bool:
        return bool(self._sources) and public_keys_fingerprint(self._sources) != self._seen

    def source(self) -> str | None:
        if self._factory is None or not self._sources:
            return None
        return "public keys from " + ", ".join(str(s) for s in self._sources)

    def reload(self) -> ConfigError | None:
        if self._factory is None:
            return None
        self._seen = public_keys_fingerprint(self._sources)
        try:
            self._verifier = self._factory()
        except ConfigError as exc:
            return exc
        return None

    def authenticate(self, token: str) -> Session:
        claims = self._verifier.verify(token, self._clock())
        return Session(claims.session_id, claims.policy)
