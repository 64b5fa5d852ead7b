"""``upstreamproxy ca``: create the egress CA, inspect a CA certificate.

::

    upstreamproxy ca create --out-dir DIR [--common-name NAME] [--days N] [--force]
        DIR/ca.pem (0644: what the ca-cert endpoint serves and sandboxes bundle) and
        DIR/ca-key.pem (0600: stays on the egress, never served). Refuses to replace an
        existing CA unless --force: every sandbox trusting the old one would break.
    upstreamproxy ca show --cert FILE
        Prints the subject, SHA-256 fingerprint and validity of a CA certificate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..certs import DEFAULT_CA_DAYS, create_ca, parse_ca_certificate, write_ca
from ..errors import ConfigError
from ..options import add_option

HELP: Final = "create the egress CA (for TLS interception) or show a CA certificate"

CERT_NAME: Final = "ca.pem"
KEY_NAME: Final = "ca-key.pem"
DEFAULT_COMMON_NAME: Final = "upstreamproxy egress CA"
MAX_DAYS: Final = 36500


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ca_command", metavar="ACTION", required=True)

    create = sub.add_parser("create", help="create a new CA certificate and key")
    add_option(create, "--out-dir", "CA_DIR", "directory for ca.pem and ca-key.pem", type=Path)
    create.add_argument(
        "--common-name",
        default=DEFAULT_COMMON_NAME,
        help="subject common name (default: %(default)s)",
    )
    create.add_argument(
        "--days",
        type=int,
        default=DEFAULT_CA_DAYS,
        help="validity in days (default: %(default)s)",
    )
    create.add_argument("--force", action="store_true", help="replace an existing CA in --out-dir")
    create.set_defaults(_ca_run=_create)

    show = sub.add_parser("show", help="print a CA certificate's subject, fingerprint, validity")
    add_option(show, "--cert", "CA_CERT", "PEM CA certificate", type=Path)
    show.set_defaults(_ca_run=_show)


def run(args: argparse.Namespace) -> int:
    result: int = args._ca_run(args)
    return result


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def describe(cert: x509.Certificate, now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < not_before:
        state = "not yet valid"
    elif now > not_after:
        state = "EXPIRED"
    else:
        state = f"valid, {(not_after - now).days} days left"
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        key_text = f"ECDSA {key.curve.name}"
    elif isinstance(key, rsa.RSAPublicKey):
        key_text = f"RSA {key.key_size}"
    else:
        key_text = type(key).__name__
    return "\n".join(
        [
            f"subject:     {cert.subject.rfc4514_string()}",
            f"issuer:      {cert.issuer.rfc4514_string()}",
            f"serial:      {cert.serial_number:x}",
            f"sha256:      {fingerprint(cert)}",
            f"not before:  {not_before.isoformat()}",
            f"not after:   {not_after.isoformat()}",
            f"status:      {state}",
            f"public key:  {key_text}",
        ]
    )


def _create(args: argparse.Namespace) -> int:
    if args.out_dir is None:
        raise ConfigError("--out-dir", "is required")
    out_dir: Path = args.out_dir
    if not 1 <= args.days <= MAX_DAYS:
        raise ConfigError("--days", f"must be between 1 and {MAX_DAYS}")
    common_name = str(args.common_name).strip()
    if not common_name or len(common_name) > 64:
        raise ConfigError("--common-name", "must be 1 to 64 characters")
    cert_path, key_path = out_dir / CERT_NAME, out_dir / KEY_NAME
    existing = [p for p in (key_path, cert_path) if p.exists() or p.is_symlink()]
    if existing and not args.force:
        raise ConfigError(
            "--out-dir",
            f"{existing[0]} already exists; replacing a CA breaks every sandbox that trusts it "
            "(use --force to replace it anyway)",
        )
    ca = create_ca(common_name, args.days)
    try:
        write_ca(ca, cert_path, key_path, replace=args.force)
    except OSError as exc:
        raise ConfigError("--out-dir", f"cannot write {exc.filename}: {exc.strerror}") from None
    print(describe(ca.cert))
    print(f"certificate: {cert_path}\nprivate key: {key_path}", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    if args.cert is None:
        raise ConfigError("--cert", "is required")
    try:
        pem = Path(args.cert).read_bytes()
    except OSError as exc:
        raise ConfigError("--cert", f"cannot read {args.cert}: {exc.strerror}") from None
    print(describe(parse_ca_certificate(pem, str(args.cert))))
    return 0
