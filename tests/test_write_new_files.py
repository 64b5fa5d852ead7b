"""``certs.write_new_files``: a set of files (a key pair, a CA) appears whole or not at all."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from upstreamproxy.certs import write_new_files


def pair(folder: Path) -> list[tuple[Path, bytes, int]]:
    return [(folder / "key.pem", b"new key\n", 0o600), (folder / "cert.pem", b"new cert\n", 0o644)]


def test_both_files_are_written_with_their_modes(tmp_path: Path) -> None:
    write_new_files(pair(tmp_path))
    assert (tmp_path / "key.pem").read_bytes() == b"new key\n"
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "cert.pem").stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["cert.pem", "key.pem"]  # no temporary left


def test_replace_puts_the_old_files_back_when_a_later_one_cannot_be_replaced(
    tmp_path: Path,
) -> None:
    """`ca create --force` renamed the new key over the old one, then failed on the
    certificate (a directory there; in Kubernetes, a busy subPath mount): a new key beside the
    old certificate, and the old key gone. The old key is put back now."""
    (tmp_path / "key.pem").write_bytes(b"old key\n")
    (tmp_path / "cert.pem").mkdir()
    with pytest.raises(OSError) as failed:
        write_new_files(pair(tmp_path), replace=True)
    assert failed.value.filename == str(tmp_path / "cert.pem")
    assert (tmp_path / "key.pem").read_bytes() == b"old key\n"
    assert sorted(os.listdir(tmp_path)) == ["cert.pem", "key.pem"]  # no temporary, no backup


def test_replace_replaces_both_and_keeps_no_backup(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_bytes(b"old key\n")
    (tmp_path / "cert.pem").write_bytes(b"old cert\n")
    write_new_files(pair(tmp_path), replace=True)
    assert (tmp_path / "key.pem").read_bytes() == b"new key\n"
    assert (tmp_path / "cert.pem").read_bytes() == b"new cert\n"
    assert sorted(os.listdir(tmp_path)) == ["cert.pem", "key.pem"]


@pytest.fixture
def no_hard_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated: link(2) as a file system without hard links answers it (vfat, exFAT, some
    FUSE and SMB mounts); none can be mounted here without a loop device."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", refuse)


@pytest.mark.usefixtures("no_hard_links")
def test_without_hard_links_the_files_are_created_exclusively(tmp_path: Path) -> None:
    write_new_files(pair(tmp_path))
    assert (tmp_path / "cert.pem").read_bytes() == b"new cert\n"
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["cert.pem", "key.pem"]


@pytest.mark.usefixtures("no_hard_links")
def test_without_hard_links_a_taken_path_is_kept_and_the_half_pair_removed(
    tmp_path: Path,
) -> None:
    (tmp_path / "cert.pem").write_bytes(b"someone else's\n")
    with pytest.raises(FileExistsError):
        write_new_files(pair(tmp_path))
    assert (tmp_path / "cert.pem").read_bytes() == b"someone else's\n"
    assert sorted(os.listdir(tmp_path)) == ["cert.pem"]
