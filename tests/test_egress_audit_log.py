"""``--audit-log FILE``: one whole JSON line per ``write(2)``, appended; a failing disk is
logged once a minute, not once per tunnel; the timestamp format."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from upstreamproxy.egress import audit


@pytest.fixture
def restore_fd() -> Iterator[None]:
    saved = audit._fd
    yield
    if audit._fd is not None and audit._fd != saved:
        os.close(audit._fd)
    audit._fd = saved


def test_lines_are_appended_whole_to_the_file(tmp_path: Path, restore_fd: None) -> None:
    path = tmp_path / "audit.log"
    path.write_text('{"earlier":1}\n')
    audit.log_to_file(path)
    for n in range(3):
        audit.emit({"event": "tunnel", "n": n, "host": "example.com"})
    lines = path.read_text().splitlines()
    assert lines[0] == '{"earlier":1}'
    records = [json.loads(line) for line in lines[1:]]
    assert [r["n"] for r in records] == [0, 1, 2]
    assert all(r["event"] == "tunnel" and "time" in r for r in records)


def test_a_second_log_to_file_replaces_the_first(tmp_path: Path, restore_fd: None) -> None:
    audit.log_to_file(tmp_path / "a.log")
    audit.log_to_file(tmp_path / "b.log")
    audit.emit({"event": "x"})
    assert (tmp_path / "a.log").read_text() == ""
    assert json.loads((tmp_path / "b.log").read_text())["event"] == "x"


def test_a_full_disk_is_logged_once_not_per_line(
    restore_fd: None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "_failed_at", -1e9)
    audit.log_to_file(Path("/dev/full"))
    with caplog.at_level(logging.ERROR, logger="upstreamproxy.egress"):
        for _ in range(50):
            audit.emit({"event": "tunnel"})
    errors = [r for r in caplog.records if "audit log" in r.getMessage()]
    assert len(errors) == 1
    assert "No space left" in errors[0].getMessage()


def test_the_timestamp_is_utc_with_milliseconds() -> None:
    stamps = [audit.utc_now() for _ in range(1000)]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", s) for s in stamps)
    assert stamps == sorted(stamps)
