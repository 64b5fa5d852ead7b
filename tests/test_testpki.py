"""The tests' CAs come from trustme, not from the code under test (upstreamproxy.certs)."""

from __future__ import annotations

import re
from pathlib import Path

from testpki import make_ca

from upstreamproxy.certs import parse_ca_certificate

TESTS = Path(__file__).parent
#: Tests of the product's own ``ca create`` command test certs.py itself.
ALLOWED = {"test_intercept_ca_command.py", "test_testpki.py"}


def test_no_test_builds_its_ca_with_the_code_under_test() -> None:
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name in ALLOWED:
            continue
        if re.search(r"\b(create_ca|issue_leaf|write_ca)\b", path.read_text()):
            offenders.append(path.name)
    assert offenders == []


def test_trustme_ca_is_a_ca_the_product_accepts() -> None:
    ca = make_ca("accepted")
    assert parse_ca_certificate(ca.cert_pem()).subject == ca.cert.subject
    leaf = ca.issue(["localhost"])
    assert leaf.chain_pem().count(b"BEGIN CERTIFICATE") == 1  # the root is not sent
    assert ca.product().cert == ca.cert
