"""``upstreamproxy ca create|show``, in-process through cli.main."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from full_disk import needs_unshare, run_on_full_disk

from upstreamproxy.certs import issue_leaf, load_ca
from upstreamproxy.cli import main


def test_create_writes_cert_and_private_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ca"
    assert (
        main(
            ["ca", "create", "--out-dir", str(out), "--common-name", "Acme egress", "--days", "30"]
        )
        == 0
    )
    cert, key = out / "ca.pem", out / "ca-key.pem"
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca = load_ca(cert, key)
    assert issue_leaf(ca, ["x.test"]).ca_cert == ca.cert
    printed = capsys.readouterr().out
    assert "CN=Acme egress" in printed and "sha256:" in printed and "29 days left" in printed
    assert "PRIVATE" not in printed


def test_create_refuses_to_replace_a_ca_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ca", "create", "--out-dir", str(tmp_path)]) == 0
    key_before = (tmp_path / "ca-key.pem").read_bytes()
    assert main(["ca", "create", "--out-dir", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "ca-key.pem").read_bytes() == key_before
    assert main(["ca", "create", "--out-dir", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "ca-key.pem").read_bytes() != key_before


@pytest.mark.parametrize("args", [["--days", "0"], ["--days", "40000"], ["--common-name", " "]])
def test_create_validates_options(tmp_path: Path, args: list[str]) -> None:
    assert main(["ca", "create", "--out-dir", str(tmp_path), *args]) == 2
    assert not (tmp_path / "ca-key.pem").exists()


def test_create_reads_the_out_dir_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPSTREAMPROXY_CA_DIR", str(tmp_path / "env"))
    assert main(["ca", "create"]) == 0
    assert (tmp_path / "env" / "ca.pem").exists()


def test_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["ca", "create", "--out-dir", str(tmp_path)])
    created = capsys.readouterr().out
    assert main(["ca", "show", "--cert", str(tmp_path / "ca.pem")]) == 0
    shown = capsys.readouterr().out
    assert shown == created
    assert "ECDSA secp256r1" in shown and "not after:" in shown


def test_show_refuses_non_ca_and_missing_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["ca", "create", "--out-dir", str(tmp_path)])
    ca = load_ca(tmp_path / "ca.pem", tmp_path / "ca-key.pem")
    (tmp_path / "leaf.pem").write_bytes(issue_leaf(ca, ["x.test"]).cert_pem())
    assert main(["ca", "show", "--cert", str(tmp_path / "leaf.pem")]) == 2
    assert "not a CA" in capsys.readouterr().err
    assert main(["ca", "show", "--cert", str(tmp_path / "nope.pem")]) == 2


@needs_unshare
@pytest.mark.parametrize("force", [False, True])
def test_create_on_a_full_disk_changes_nothing(tmp_path: Path, force: bool) -> None:
    """The key was written, then the certificate's write failed (a full disk): a key without
    its certificate, or with --force a new key beside the old CA's certificate, which no
    egress can load. Now both files are written in full before either is put in place."""
    out, old = tmp_path / "ca", tmp_path / "old"
    out.mkdir()
    before: dict[str, str] = {}
    if force:
        assert main(["ca", "create", "--out-dir", str(old)]) == 0
        before = {p.name: p.read_bytes().decode() for p in old.iterdir()}
    argv = [sys.executable, "-m", "upstreamproxy", "ca", "create", "--out-dir", str(out)]
    if force:  # the old pair fills the disk's two pages
        code, files, err = run_on_full_disk(out, [*argv, "--force"], pages=2, prepare=old)
    else:  # room for the key, not for the certificate
        code, files, err = run_on_full_disk(out, argv, pages=1)
    assert code == 2, err
    assert sorted(files) == sorted(before)  # no temporary file left, nothing added
    if force:  # the old pair is intact: its checksums are those of the files copied in
        for name, text in before.items():
            check = subprocess.run(["cksum"], input=text, capture_output=True, text=True)
            assert files[name] == check.stdout.strip()
    assert err.startswith("upstreamproxy: invalid configuration: --out-dir: cannot write")
    assert "No space left on device" in err and "Traceback" not in err
