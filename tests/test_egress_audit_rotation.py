"""A rotated ``--audit-log`` file: after logrotate renames (or deletes) it, the egress opens the
path anew - at once on SIGHUP, else within ``--reload-interval`` - so audit lines are neither
written into the rotated file for ever nor, once that is deleted, into nothing."""

# ruff: noqa: F811

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_egress_admission import EchoOrigin, ask, echo_origin  # noqa: F401 (fixtures)
from test_egress_ops import (  # noqa: F401 (fixtures)
    EgressProcess,
    egress_processes,
    policy_yaml,
    start_egress,
    write_tokens,
)

from upstreamproxy.egress import audit


@pytest.fixture
def restore_audit() -> Iterator[None]:
    saved = audit._fd, audit._path
    yield
    if audit._fd is not None and audit._fd != saved[0]:
        os.close(audit._fd)
    audit._fd, audit._path = saved


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_renamed_file_is_reopened_at_its_path(tmp_path: Path, restore_audit: None) -> None:
    path = tmp_path / "audit.log"
    audit.log_to_file(path)
    audit.emit({"n": 1})
    path.rename(tmp_path / "audit.log.1")
    audit.emit({"n": 2})  # (until the egress looks: still the old file, as logrotate expects)
    assert audit.reopen_if_moved()
    audit.emit({"n": 3})
    assert [r["n"] for r in lines(tmp_path / "audit.log.1")] == [1, 2]
    assert [r["n"] for r in lines(path)] == [3]


def test_a_deleted_file_is_created_again(tmp_path: Path, restore_audit: None) -> None:
    path = tmp_path / "audit.log"
    audit.log_to_file(path)
    old = audit._fd
    path.unlink()
    assert audit.reopen_if_moved()
    assert audit._fd != old
    with pytest.raises(OSError):
        os.fstat(old)  # type: ignore[arg-type]  # closed, not leaked
    audit.emit({"n": 1})
    assert [r["n"] for r in lines(path)] == [1]


def test_the_same_file_is_kept(tmp_path: Path, restore_audit: None) -> None:
    path = tmp_path / "audit.log"
    audit.log_to_file(path)
    fd = audit._fd
    path.write_text("")  # copytruncate: the same inode, emptied; O_APPEND writes at its end
    assert not audit.reopen_if_moved()
    audit.emit({"n": 1})
    assert audit._fd == fd
    assert [r["n"] for r in lines(path)] == [1]


def test_a_path_that_cannot_be_opened_keeps_the_old_file(
    tmp_path: Path, restore_audit: None, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "logs"
    folder.mkdir()
    path = folder / "audit.log"
    audit.log_to_file(path)
    path.rename(tmp_path / "audit.log.1")
    folder.rmdir()  # the path's directory is gone: nothing to open
    with caplog.at_level(logging.ERROR, logger="upstreamproxy.egress"):
        assert not audit.reopen_if_moved()
    assert "cannot reopen the audit log" in caplog.text
    audit.emit({"n": 1})
    assert [r["n"] for r in lines(tmp_path / "audit.log.1")] == [1]


def test_without_a_file_there_is_nothing_to_reopen(restore_audit: None) -> None:
    audit._fd = audit._path = None
    assert not audit.reopen_if_moved()


async def rotated_egress(tmp_path: Path, port: int, *argv: str) -> tuple[EgressProcess, Path]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_yaml(["ok.test"], port))
    log = tmp_path / "audit.log"
    egress = await start_egress(
        "--static-tokens",
        str(write_tokens(tmp_path)),
        "--policy",
        str(policy),
        "--resolve",
        "ok.test=127.0.0.1",
        "--audit-log",
        str(log),
        *argv,
    )
    return egress, log


async def test_sighup_reopens_a_rotated_audit_file(
    tmp_path: Path, echo_origin: EchoOrigin, egress_processes: list[EgressProcess]
) -> None:
    egress, log = await rotated_egress(tmp_path, echo_origin.port, "--reload-interval", "0")
    egress_processes.append(egress)
    assert (await ask(egress.url, f"ok.test:{echo_origin.port}")).status == 200
    log.rename(tmp_path / "audit.log.1")  # what logrotate does, then its postrotate: SIGHUP
    egress.proc.send_signal(signal.SIGHUP)
    await egress.wait_log(b"audit log reopened")
    assert (await ask(egress.url, f"ok.test:{echo_origin.port}")).status == 200
    assert await egress.stop() == 0
    assert [r["status"] for r in lines(tmp_path / "audit.log.1")] == [200]
    assert [r["status"] for r in lines(log)] == [200]


async def test_a_deleted_audit_file_is_recreated_within_the_reload_interval(
    tmp_path: Path, echo_origin: EchoOrigin, egress_processes: list[EgressProcess]
) -> None:
    egress, log = await rotated_egress(tmp_path, echo_origin.port, "--reload-interval", "0.2")
    egress_processes.append(egress)
    log.unlink()  # a rotation that compressed and removed it, with no signal
    await egress.wait_log(b"audit log reopened", timeout=5)
    assert (await ask(egress.url, f"ok.test:{echo_origin.port}")).status == 200
    assert await egress.stop() == 0
    records = lines(log)
    assert [(r["host"], r["status"]) for r in records] == [("ok.test", 200)]
