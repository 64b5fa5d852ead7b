"""The files ``start`` writes for tools that read no CA variable (pure parts and the writer)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import pkcs12
from testpki import make_ca

from upstreamproxy.bootstrap.tool_files import (
    apt_config_text,
    java_truststore,
    wgetrc_text,
    write_tool_files,
)


def test_wgetrc_appends_the_bundle_after_the_users_lines() -> None:
    text = wgetrc_text(Path("/s/ca.pem"), "ca_certificate = /old.pem\nuser_agent = x\n")
    assert text.index("ca_certificate = /old.pem") < text.index("ca_certificate = /s/ca.pem")
    assert text.rstrip().endswith("ca_certificate = /s/ca.pem")
    assert (
        wgetrc_text(Path("/s/ca.pem"), option="ca-certificate")
        .rstrip()
        .endswith("ca-certificate = /s/ca.pem")
    )


def test_apt_config_includes_the_users_file() -> None:
    text = apt_config_text(Path("/s/ca.pem"), "/etc/my-apt.conf")
    assert '#include "/etc/my-apt.conf";' in text
    assert 'Acquire::https::CAInfo "/s/ca.pem";' in text
    with pytest.raises(ValueError):
        apt_config_text(Path('/s/"evil.pem'))


def test_java_truststore_holds_each_certificate_once() -> None:
    first, second = make_ca("first test CA"), make_ca("second test CA")
    pem = first.cert_pem() + second.cert_pem() + first.cert_pem() + b"garbage\n"
    store = pkcs12.load_pkcs12(java_truststore(pem), None)
    subjects = sorted(c.certificate.subject.rfc4514_string() for c in store.additional_certs)
    assert subjects == sorted(ca.cert.subject.rfc4514_string() for ca in (first, second))
    assert store.key is None
    with pytest.raises(ValueError):
        java_truststore(b"no certificates here\n")


def test_write_tool_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".wgetrc").write_text("timeout = 7\n")
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(make_ca("bundle CA").cert_pem())
    files, problems = write_tool_files(tmp_path, bundle, {"HOME": str(home)})
    assert problems == []
    assert files.wgetrc is not None and "timeout = 7" in files.wgetrc.read_text()
    assert files.wget2rc is not None and f"ca-certificate = {bundle}" in files.wget2rc.read_text()
    assert files.apt_config is not None and str(bundle) in files.apt_config.read_text()
    assert files.java_truststore is not None
    for path in (files.wgetrc, files.wget2rc, files.apt_config, files.java_truststore):
        assert path.stat().st_mode & 0o777 == 0o644


def test_write_tool_files_reports_what_it_cannot_make(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a certificate\n")
    files, problems = write_tool_files(tmp_path, bundle, {"HOME": str(tmp_path)})
    assert files.java_truststore is None
    assert any(p.startswith("java:") for p in problems)
    assert files.wgetrc is not None  # the others are still made


def test_a_users_rc_file_that_never_ends_neither_hangs_nor_fills_memory(tmp_path: Path) -> None:
    """``WGETRC`` naming a FIFO blocked start for good (after the relay listened, where SIGTERM
    could not stop it), and ``/dev/zero`` was read whole before the 64 KiB cap was applied."""
    os.mkfifo(tmp_path / "fifo")
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(make_ca("bundle CA").cert_pem())
    code = (
        "import sys; from pathlib import Path\n"
        "from upstreamproxy.bootstrap.tool_files import write_tool_files\n"
        "base = Path(sys.argv[1])\n"
        "env = {'HOME': str(base), 'WGETRC': str(base / 'fifo'), 'WGET2RC': '/dev/zero'}\n"
        "files, problems = write_tool_files(base, base / 'ca.pem', env)\n"
        "assert problems == [], problems\n"
        "for rc in (files.wgetrc, files.wget2rc):\n"
        "    assert rc is not None and rc.stat().st_size < 4096, rc\n"
    )

    def cap_memory() -> None:  # so a regression fails with MemoryError, not the OOM killer
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=cap_memory,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert done.returncode == 0, done.stderr
