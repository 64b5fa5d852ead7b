"""SecretStore: Kubernetes Secret volume layout, hostile entries, atomic reload."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from upstreamproxy.egress.intercept import MAX_SECRET_BYTES, MissingSecretError, SecretStore

VALUE = "s3cr3t-VALUE-never-logged"


def kubelet_write(directory: Path, values: dict[str, bytes], stamp: str = "..2024_01_01") -> None:
    """Write (or atomically update) a Secret volume the way the kubelet does."""
    directory.mkdir(exist_ok=True)
    target = directory / stamp
    target.mkdir()
    for name, value in values.items():
        (target / name).write_bytes(value)
    tmp_link = directory / "..data_tmp"
    tmp_link.symlink_to(stamp)
    os.replace(tmp_link, directory / "..data")
    for name in values:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


def test_kubernetes_layout_loads_and_strips_trailing_newlines(tmp_path: Path) -> None:
    kubelet_write(tmp_path, {"token": f"{VALUE}\n".encode(), "crlf": b"v\r\n", "inner": b"a\nb"})
    store = SecretStore(tmp_path)
    assert store.names() == {"token", "crlf", "inner"}
    assert store.get("token").reveal() == VALUE
    assert store.get("crlf").reveal() == "v"
    assert store.get("inner").reveal() == "a\nb"
    assert store.last_report.ok and store.last_error is None
    assert store.missing(["token", "nope", "other"]) == {"nope", "other"}
    assert "token" in store and "nope" not in store


def test_get_missing_raises_a_specific_error(tmp_path: Path) -> None:
    store = SecretStore(tmp_path)
    with pytest.raises(MissingSecretError) as info:
        store.get("github-token")
    assert info.value.name == "github-token"


def test_hostile_entries_are_ignored(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    kubelet_write(secrets, {"good": b"ok"})
    outside = tmp_path / "outside"
    outside.write_text("stolen")
    (secrets / "escape").symlink_to(outside)
    (secrets / "escape-rel").symlink_to("../outside")
    (secrets / "parent").symlink_to("..")
    (secrets / "dangling").symlink_to("..data/nothing")
    (secrets / "big").write_bytes(b"x" * (MAX_SECRET_BYTES + 1))
    (secrets / "exact").write_bytes(b"y" * MAX_SECRET_BYTES)
    (secrets / ".hidden").write_text("dot")
    (secrets / "binary").write_bytes(b"\xff\xfe")
    (secrets / "subdir").mkdir()
    os.mkfifo(secrets / "fifo")
    (secrets / "inner-link").symlink_to("good")  # inside: followed
    store = SecretStore(secrets)
    assert store.names() == {"good", "exact", "inner-link"}
    assert store.get("inner-link").reveal() == "ok"
    ignored = store.last_report.ignored
    assert "outside" in ignored["escape"] and "outside" in ignored["escape-rel"]
    assert "outside" in ignored["parent"]
    assert "larger" in ignored["big"]
    assert "UTF-8" in ignored["binary"]
    assert "regular" in ignored["subdir"] and "regular" in ignored["fifo"]
    assert "dangling" in ignored["dangling"]
    assert ".hidden" not in ignored and "..data" not in ignored


def test_reload_picks_up_a_kubelet_update(tmp_path: Path) -> None:
    kubelet_write(tmp_path, {"token": b"one"})
    store = SecretStore(tmp_path)
    kubelet_write(tmp_path, {"token": b"two", "new": b"n"}, stamp="..2024_01_02")
    report = store.reload()
    assert report.ok and report.names == {"token", "new"}
    assert store.get("token").reveal() == "two"
    assert store.generation == 2


def test_reload_failure_keeps_the_last_good_values(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secrets = tmp_path / "secrets"
    kubelet_write(secrets, {"token": VALUE.encode()})
    store = SecretStore(secrets)
    (secrets / "..data").unlink()
    (secrets / "..2024_01_01" / "token").unlink()
    (secrets / "..2024_01_01").rmdir()
    for name in os.listdir(secrets):
        (secrets / name).unlink()
    secrets.rmdir()
    report = store.reload()
    assert not report.ok and report.error and "keeping the last good values" in report.error
    assert store.get("token").reveal() == VALUE
    assert store.last_error == report.error
    assert store.generation == 1
    # and an unreadable file (an I/O error, not a policy violation) fails the reload too
    secrets.mkdir()
    (secrets / "token").write_text("new")
    (secrets / "token").chmod(0)
    if os.geteuid() != 0:  # root reads anything
        assert not store.reload().ok and store.get("token").reveal() == VALUE


def test_values_never_in_repr_errors_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    kubelet_write(tmp_path, {"token": VALUE.encode()})
    (tmp_path / "big").write_bytes(VALUE.encode() * 100000)
    store = SecretStore(tmp_path)
    text = repr(store) + repr(store.get("token")) + str(store.get("token")) + caplog.text
    text += repr(store.last_report)
    assert "token" in caplog.text
    assert VALUE not in text


async def test_watch_reloads_periodically(tmp_path: Path) -> None:
    import asyncio

    kubelet_write(tmp_path, {"token": b"one"})
    store = SecretStore(tmp_path)
    task = asyncio.get_running_loop().create_task(store.watch(0.05))
    kubelet_write(tmp_path, {"token": b"two"}, stamp="..2024_01_02")
    for _ in range(100):
        if store.get("token").reveal() == "two":
            break
        await asyncio.sleep(0.02)
    task.cancel()
    assert store.get("token").reveal() == "two"
