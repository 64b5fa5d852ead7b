"""LeafCache: issued from the egress CA, ECDSA, short-lived, capped, expiring before notAfter."""

from __future__ import annotations

import datetime as dt
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from testpki import make_ca

from upstreamproxy.certs import CertificateAuthority
from upstreamproxy.egress.intercept import LeafCache, PrometheusInterceptMetrics, normalize_name
from upstreamproxy.errors import ConfigError

CA = make_ca("leaf cache test CA").product()


def short_lived_ca() -> CertificateAuthority:
    """A CA valid for one day, built here with cryptography (trustme's CAs live for years)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "short CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
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
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert, key)


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


def test_leaf_is_ecdsa_short_lived_backdated_and_names_the_host() -> None:
    cache = LeafCache(CA, ttl=dt.timedelta(hours=2), backdate=dt.timedelta(minutes=3))
    context = cache.get("API.Example.com.")
    assert isinstance(context, ssl.SSLContext)
    leaf = cache.leaf("api.example.com")
    cert = leaf.cert
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.example.com"]
    assert cert.issuer == CA.cert.subject
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == dt.timedelta(hours=2, minutes=3)
    assert cert.not_valid_before_utc <= dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2)


@pytest.mark.parametrize(
    ("name", "san"), [("127.0.0.1", "127.0.0.1"), ("[::1]", "::1"), ("2001:DB8::1", "2001:db8::1")]
)
def test_ip_literals_get_ip_sans(name: str, san: str) -> None:
    import ipaddress

    cache = LeafCache(CA)
    cert = cache.leaf(name).cert
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ext.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(san)]
    assert ext.get_values_for_type(x509.DNSName) == []


def test_hits_issues_and_lru_cap() -> None:
    metrics = PrometheusInterceptMetrics()
    cache = LeafCache(CA, cap=2, metrics=metrics)
    a = cache.get("a.test")
    assert cache.get("A.TEST") is a
    cache.get("b.test")
    cache.get("a.test")  # a is now most recent
    cache.get("c.test")  # evicts b
    assert len(cache) == 2 and cache.evictions == 1
    assert cache.get("a.test") is a
    assert (cache.issued, cache.hits) == (3, 3)
    cache.get("b.test")  # re-issued
    assert cache.issued == 4
    sample = metrics.registry.get_sample_value
    assert sample("upstreamproxy_intercept_certs_issued_total") == 4
    assert sample("upstreamproxy_intercept_cert_cache_hits_total") == 3


def test_entries_expire_before_the_certificate_does() -> None:
    clock = Clock()
    cache = LeafCache(CA, ttl=dt.timedelta(hours=1), clock=clock)
    first = cache.get("a.test")
    not_after = cache.leaf("a.test").not_after
    assert cache.refresh_before == dt.timedelta(minutes=6)
    clock.now = not_after - dt.timedelta(minutes=7)
    assert cache.get("a.test") is first
    clock.now = not_after - dt.timedelta(minutes=5)
    assert cache.get("a.test") is not first
    assert cache.issued == 2


def test_leaf_never_outlives_the_ca() -> None:
    short_ca = short_lived_ca()
    cache = LeafCache(short_ca, ttl=dt.timedelta(days=30))
    assert cache.leaf("a.test").not_after <= short_ca.cert.not_valid_after_utc


@pytest.mark.parametrize(
    "name", ["", "bad name", "a..b", "-a.test", "a" * 64, "x/y", "*.example.com", "[::1", "a:1"]
)
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        LeafCache(CA).get(name)


def test_normalize_name() -> None:
    assert normalize_name(" Example.COM. ") == "example.com"
    assert normalize_name("[2001:DB8:0::1]") == "2001:db8::1"
    assert normalize_name("xn--bcher-kva.de") == "xn--bcher-kva.de"
    # The policy's normaliser: a U-label is the same host as its A-label.
    assert normalize_name("Bücher.de") == "xn--bcher-kva.de"


@pytest.mark.parametrize(
    "kwargs", [{"ttl": dt.timedelta(0)}, {"cap": 0}, {"backdate": dt.timedelta(seconds=-1)}]
)
def test_bad_settings_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        LeafCache(CA, **kwargs)  # type: ignore[arg-type]
