"""``upstreamproxy token``: make signing keys, issue session tokens, verify them.

::

    upstreamproxy token keygen --out-dir DIR [--kid K]
        DIR/K.private.pem (0600) and DIR/K.public.pem (0644); K defaults to the key's
        fingerprint. Prints K. Writes both files or neither, and never replaces one.
    upstreamproxy token issue --key DIR/K.private.pem --session S --policy P --audience A
                              [--ttl SECONDS] [--kid K]
        Prints the token, and nothing else, to stdout. The key id defaults to the file name.
    upstreamproxy token verify --public-keys DIR_OR_FILE --audience A [--token-file F]
        Reads the token from F or stdin; prints the claims as JSON, or exits 1 naming the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Final

from .. import tokens
from ..certs import write_new_files
from ..errors import AuthError, ConfigError
from ..options import add_option

HELP: Final = "make signing keys, issue and verify signed session tokens"

DEFAULT_TTL_SECONDS: Final = 3600
# A token file or stdin is read only this far; longer input is refused as too-large.
_READ_LIMIT: Final = tokens.MAX_TOKEN_LENGTH + 1024


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="token_command", metavar="ACTION", required=True)

    keygen = sub.add_parser("keygen", help="create an Ed25519 signing key pair")
    add_option(keygen, "--out-dir", "TOKEN_KEY_DIR", "directory for the key files", type=Path)
    keygen.add_argument(
        "--kid", default=None, help="key id (default: a fingerprint of the public key)"
    )
    keygen.set_defaults(_token_run=_keygen)

    issue = sub.add_parser("issue", help="print a signed session token")
    add_option(issue, "--key", "TOKEN_KEY", "PEM Ed25519 private key", type=Path)
    issue.add_argument(
        "--kid", default=None, help="key id (default: the key file name without .private.pem)"
    )
    issue.add_argument("--session", required=True, help="session id")
    issue.add_argument("--policy", required=True, help="policy name")
    add_option(issue, "--audience", "TOKEN_AUDIENCE", "audience (the egress's name)")
    add_option(
        issue, "--ttl", "TOKEN_TTL", "lifetime in seconds", default=DEFAULT_TTL_SECONDS, type=int
    )
    issue.set_defaults(_token_run=_issue)

    verify = sub.add_parser("verify", help="check a token; print its claims as JSON")
    add_option(
        verify,
        "--public-keys",
        "TOKEN_PUBLIC_KEYS",
        "directory of *.pem public keys, or one key file",
        type=Path,
    )
    add_option(verify, "--audience", "TOKEN_AUDIENCE", "expected audience")
    verify.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="read the token from this file (default: stdin)",
    )
    verify.add_argument(
        "--leeway",
        type=int,
        default=tokens.DEFAULT_LEEWAY_SECONDS,
        help="clock skew tolerated, seconds (default: %(default)s)",
    )
    verify.set_defaults(_token_run=_verify)


def run(args: argparse.Namespace) -> int:
    result: int = args._token_run(args)
    return result


def _required(value: object, flag: str) -> None:
    if value is None or value == "":
        raise ConfigError(flag, "is required")


def _keygen(args: argparse.Namespace) -> int:
    _required(args.out_dir, "--out-dir")
    out_dir: Path = args.out_dir
    key = tokens.generate_key()
    kid = (
        tokens.check_kid(args.kid, "--kid")
        if args.kid
        else tokens.key_fingerprint(key.public_key())
    )
    private_path = out_dir / f"{kid}.private.pem"
    public_path = out_dir / f"{kid}.public.pem"
    taken = "already exists; choose another key id"
    for path in (private_path, public_path):
        if os.path.lexists(path):  # (a dangling symlink too)
            raise ConfigError("--kid", f"{path} {taken}")
    try:
        # Both files or neither, and nothing replaced: a failed run (a full disk, a key file
        # made meanwhile by another run) leaves no half key pair and clobbers no key.
        write_new_files(
            [
                (private_path, tokens.private_key_pem(key), 0o600),
                (public_path, tokens.public_key_pem(key.public_key()), 0o644),
            ]
        )
    except FileExistsError as exc:
        if exc.filename not in (str(private_path), str(public_path)):
            raise ConfigError("--out-dir", f"cannot write {exc.filename}: {exc.strerror}") from None
        raise ConfigError("--kid", f"{exc.filename} {taken}") from None
    except OSError as exc:  # not a directory, read-only, full: as `ca create` says it
        raise ConfigError("--out-dir", f"cannot write {exc.filename}: {exc.strerror}") from None
    print(kid)
    print(f"private key: {private_path}\npublic key:  {public_path}", file=sys.stderr)
    return 0


def _issue(args: argparse.Namespace) -> int:
    _required(args.key, "--key")
    _required(args.audience, "--audience")
    key = tokens.load_private_key(args.key)
    kid = tokens.check_kid(args.kid, "--kid") if args.kid else tokens.kid_from_path(args.key)
    try:
        token = tokens.issue_token(
            key,
            kid=kid,
            session_id=args.session,
            policy=args.policy,
            audience=args.audience,
            ttl_seconds=args.ttl,
            now=time.time(),
        )
    except ValueError as exc:
        raise ConfigError("token", str(exc)) from None
    if sys.stdout is None:  # started with fd 1 closed: the token would go nowhere
        raise ConfigError("stdout", "is closed; nowhere to print the token")
    sys.stdout.write(token + "\n")
    return 0


def _read_token(path: Path | None) -> str:
    if path is None:
        if sys.stdin is None:  # started with fd 0 closed
            raise ConfigError("--token-file", "not given, and stdin is closed")
        data = sys.stdin.buffer.read(_READ_LIMIT)
    else:
        try:
            with path.open("rb") as handle:
                data = handle.read(_READ_LIMIT)
        except OSError as exc:
            raise ConfigError("--token-file", f"cannot read {path}: {exc.strerror}") from None
    # Undecodable bytes become U+FFFD, which the verifier refuses as malformed.
    return data.decode("ascii", errors="replace").strip()


def _verify(args: argparse.Namespace) -> int:
    _required(args.public_keys, "--public-keys")
    _required(args.audience, "--audience")
    verifier = tokens.TokenVerifier(
        tokens.load_public_keys(args.public_keys), args.audience, leeway_seconds=args.leeway
    )
    token = _read_token(args.token_file)
    try:
        claims = verifier.verify(token, now=time.time())
    except AuthError as exc:
        print(f"upstreamproxy: token refused: {exc.reason}", file=sys.stderr)
        return 1
    print(json.dumps(claims.as_dict(), indent=2, sort_keys=True))
    return 0
