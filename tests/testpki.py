"""The tests' throwaway certificates, made with trustme -- never with the code under test.

``upstreamproxy.certs`` issues the egress's own CA and leaves; a test that built its CA with
it would trust whatever that code produces. Here trustme makes every CA and server
certificate; where the product needs its ``CertificateAuthority`` object (the interception
engine signs leaves with it), :meth:`TestCA.product` loads trustme's PEM with
``cryptography`` directly.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from upstreamproxy.certs import CertificateAuthority


@dataclass(frozen=True)
class TestLeaf:
    __test__ = False  # not a pytest test class

    _cert: trustme.LeafCert

    def cert_pem(self) -> bytes:
        return self._cert.cert_chain_pems[0].bytes()

    def chain_pem(self) -> bytes:
        return b"".join(blob.bytes() for blob in self._cert.cert_chain_pems)

    def key_pem(self) -> bytes:
        return self._cert.private_key_pem.bytes()


class TestCA:
    __test__ = False

    def __init__(self, name: str = "upstreamproxy test CA") -> None:
        self._ca = trustme.CA(organization_name=name)

    def cert_pem(self) -> bytes:
        return self._ca.cert_pem.bytes()

    def key_pem(self) -> bytes:
        return self._ca.private_key_pem.bytes()

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem())

    def issue(self, names: list[str]) -> TestLeaf:
        return TestLeaf(self._ca.issue_cert(*names))

    def write(self, cert_path: Path, key_path: Path) -> None:
        cert_path.write_bytes(self.cert_pem())
        key_path.write_bytes(self.key_pem())
        key_path.chmod(0o600)

    def product(self) -> CertificateAuthority:
        """This CA as the egress's signing CA (for LeafCache and interception)."""
        key = serialization.load_pem_private_key(self.key_pem(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return CertificateAuthority(self.cert, key)


def make_ca(name: str = "upstreamproxy test CA") -> TestCA:
    return TestCA(name)


def interception_pki(folder: Path, host: str = "api.test") -> tuple[TestCA, ssl.SSLContext]:
    """For an intercepting egress in front of an HTTPS origin: the egress's CA (``ca.pem``,
    ``ca-key.pem``), the origin's CA (``origin-ca.pem``, the egress's ``--upstream-ca``) and a
    server context for ``host`` signed by it, all written to ``folder``."""
    egress_ca = make_ca("egress interception CA")
    egress_ca.write(folder / "ca.pem", folder / "ca-key.pem")
    origin_ca = make_ca("origin CA")
    (folder / "origin-ca.pem").write_bytes(origin_ca.cert_pem())
    leaf = origin_ca.issue([host])
    (folder / "origin.pem").write_bytes(leaf.chain_pem())
    (folder / "origin.key").write_bytes(leaf.key_pem())
    origin_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    origin_ctx.load_cert_chain(folder / "origin.pem", folder / "origin.key")
    return egress_ca, origin_ctx
