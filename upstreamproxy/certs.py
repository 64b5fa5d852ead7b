"""X.509 helpers: the egress CA, per-name leaf certificates, CA validation.

Keys are ECDSA P-256 (small, fast to generate, accepted by every TLS stack we serve).
Leaf certificates are backdated a little so a sandbox whose clock lags still accepts them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import ipaddress
import os
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ConfigError

DEFAULT_CA_DAYS: Final = 3650
DEFAULT_LEAF_TTL: Final = dt.timedelta(hours=24)
LEAF_BACKDATE: Final = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass(frozen=True)
class Leaf:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def chain_pem(self) -> bytes:
        return self.cert_pem() + self.ca_cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(
    common_name: str = "upstreamproxy egress CA", valid_days: int = DEFAULT_CA_DAYS
) -> CertificateAuthority:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - LEAF_BACKDATE)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert, key)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return x509.DNSName(name)


def issue_leaf(
    ca: CertificateAuthority,
    names: list[str],
    ttl: dt.timedelta = DEFAULT_LEAF_TTL,
    backdate: dt.timedelta = LEAF_BACKDATE,
) -> Leaf:
    """Issue a server certificate for ``names`` (DNS names or IP literals)."""
    if not names:
        raise ValueError("a leaf certificate needs at least one name")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + ttl, ca.cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Leaf(cert, key, ca.cert)


def parse_ca_certificate(pem: bytes, source: str = "ca certificate") -> x509.Certificate:
    """Parse ``pem`` and require a CA certificate (basicConstraints CA:TRUE), else ConfigError."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ConfigError(source, "not a PEM certificate") from None
    if len(certs) != 1:
        raise ConfigError(source, f"expected exactly one certificate, found {len(certs)}")
    cert = certs[0]
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise ConfigError(source, "certificate has no basicConstraints; not a CA") from None
    if not constraints.ca:
        raise ConfigError(source, "certificate is not a CA (basicConstraints CA:FALSE)")
    return cert


def write_private_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically write ``data`` to ``path`` with ``mode``, never exposing it wider."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: link(2) errors of a file system without hard links (vfat, exFAT, some FUSE and SMB mounts).
_NO_HARD_LINKS: Final = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK})


def write_new_files(files: Sequence[tuple[Path, bytes, int]], *, replace: bool = False) -> None:
    """Create every ``(path, data, mode)`` in ``files``, or none of them, never replacing anything.

    Each is written in full to a temporary file in its directory first (so a full disk or a
    failed write changes nothing); only then are they put in place, one by one: linked, each
    link failing (``FileExistsError``) if anything is at its path - a file, a directory, a
    dangling symlink, one made by a concurrent run. Where the file system has no hard links the
    name is created exclusively (``O_EXCL``) and the data copied. On any failure or
    interruption the paths already placed are removed again (only while they are still the
    files this call wrote) and the temporary files always are. An ``OSError`` names the path it
    was for (a failed ``write`` alone would name none).

    With ``replace`` what is at the paths is replaced instead (renamed over), after a hard link
    to each old file is kept aside: if a later rename fails (a directory at the path, a busy
    bind mount) the old files are put back, so it is still all or nothing (without hard links,
    the files renamed before the failure stay replaced).
    """
    temps: list[tuple[Path, Path, bytes, int]] = []  # (path, its temporary file, data, mode)
    placed: list[tuple[Path, os.stat_result]] = []  # what this call put at each path
    kept: list[tuple[Path, Path]] = []  # with replace: (path, its old file set aside)
    try:
        for path, data, mode in files:
            path.parent.mkdir(parents=True, exist_ok=True)  # (its error names the directory)
            try:
                fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
                temps.append((path, Path(name), data, mode))
                try:
                    os.fchmod(fd, mode)
                    _write_all(fd, data)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(path)) from None
        for path, tmp, data, mode in temps:
            try:
                if replace:
                    if (old := _set_aside(path)) is not None:
                        kept.append((path, old))
                    os.replace(tmp, path)
                    placed.append((path, path.lstat()))
                else:
                    placed.append((path, _place_new(tmp, path, data, mode)))
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(path)) from None
    except BaseException:
        for path, info in placed:
            with contextlib.suppress(OSError):
                if os.path.samestat(path.lstat(), info):
                    path.unlink()
        for path, old in kept:
            with contextlib.suppress(OSError):
                os.replace(old, path)  # what was there before, back in place
        raise
    finally:
        for _, tmp, _, _ in temps:
            tmp.unlink(missing_ok=True)
        for _, old in kept:
            old.unlink(missing_ok=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _place_new(tmp: Path, path: Path, data: bytes, mode: int) -> os.stat_result:
    """``tmp`` at ``path``, which must not exist; what is there now (ours)."""
    try:
        os.link(tmp, path, follow_symlinks=False)
        return path.lstat()
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode)
    try:
        info = os.fstat(fd)
        os.fchmod(fd, mode)  # the umask narrowed the open's
        _write_all(fd, data)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)  # ours: O_EXCL made it
        raise
    os.close(fd)
    return info


def _set_aside(path: Path) -> Path | None:
    """A hard link to the file at ``path`` under a temporary name, or None (nothing there, not
    a file, or no hard links here)."""
    for _ in range(8):
        aside = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")
        try:
            os.link(path, aside, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError:
            return None  # missing, a directory, or a file system without hard links
        return aside
    return None


def write_ca(
    ca: CertificateAuthority, cert_path: Path, key_path: Path, *, replace: bool = False
) -> None:
    """Both files or neither: a key without its certificate (or the old certificate beside a
    new key) would be a CA no egress can load."""
    files = [(key_path, ca.key_pem(), 0o600), (cert_path, ca.cert_pem(), 0o644)]
    write_new_files(files, replace=replace)


def load_ca(cert_path: Path, key_path: Path) -> CertificateAuthority:
    cert = parse_ca_certificate(cert_path.read_bytes(), str(cert_path))
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ConfigError(str(key_path), "not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(str(key_path), "CA key must be an ECDSA key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise ConfigError(str(key_path), "CA key does not match the CA certificate")
    return CertificateAuthority(cert, key)
