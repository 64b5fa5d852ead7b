"""``upstreamproxy ca create|show``, in-process through cli.main."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

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
