"""read_capped: regular files whole up to a cap; pipes and devices only when asked, bounded."""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bounded import promptly
from hypothesis import given
from hypothesis import strategies as st

from upstreamproxy import capped_file
from upstreamproxy.capped_file import (
    CappedRead,
    NotRegularFile,
    ReadError,
    TimedOut,
    TooLarge,
    read_capped,
)

LIMIT = 1000


class Pipe:
    """A pipe's read end as a path (what ``<(cmd)`` gives) and its write end."""

    def __init__(self) -> None:
        self.read_end, self._write_end = os.pipe()
        self.path = Path(f"/dev/fd/{self.read_end}")
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        os.write(self._write_end, data)

    def close_writer(self) -> None:
        with self._lock:  # closed once only: the number may be reused at once
            if self._write_end >= 0:
                os.close(self._write_end)
                self._write_end = -1

    def close(self) -> None:
        self.close_writer()
        os.close(self.read_end)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    pipe = Pipe()
    yield pipe
    pipe.close()


# -- regular files -------------------------------------------------------------------------------


def test_a_regular_file_is_read_whole_with_its_fstat(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"content\n")
    path.chmod(0o640)
    result = read_capped(path, LIMIT)
    assert isinstance(result, CappedRead)
    assert result.data == b"content\n"
    assert stat.S_ISREG(result.info.st_mode) and stat.S_IMODE(result.info.st_mode) == 0o640
    assert result.info.st_ino == path.stat().st_ino
    path.write_bytes(b"")
    assert read_capped(path, LIMIT).data == b""


def test_exactly_at_the_cap_is_read_one_over_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"a" * LIMIT)
    assert read_capped(path, LIMIT).data == b"a" * LIMIT
    path.write_bytes(b"a" * (LIMIT + 1))
    with pytest.raises(TooLarge, match=rf"^larger than {LIMIT} bytes$") as info:
        read_capped(path, LIMIT)
    assert info.value.limit == LIMIT


def test_a_file_that_reports_no_size_is_still_capped_while_read() -> None:
    # /proc files are regular with st_size 0: only the read loop's cap stops them.
    with pytest.raises(TooLarge):
        read_capped("/proc/self/maps", 10)


def test_a_missing_file_is_the_plain_oserror_of_open(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        read_capped(tmp_path / "absent", LIMIT)
    assert not isinstance(info.value, ReadError)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        read_capped(tmp_path / "file" / "below", LIMIT)


def test_a_failing_read_is_a_read_error() -> None:
    # /proc/self/mem opens, but reading at offset 0 (never mapped) fails with EIO.
    with pytest.raises(ReadError) as info:
        read_capped("/proc/self/mem", LIMIT)
    assert info.value.errno == errno.EIO and info.value.strerror


@pytest.mark.parametrize("streams", [False, True], ids=["regular", "streams"])
def test_a_directory_is_refused(tmp_path: Path, streams: bool) -> None:
    with pytest.raises(NotRegularFile, match=r"^not a regular file"):
        read_capped(tmp_path, LIMIT, stream_timeout=1.0 if streams else None)


# -- FIFOs and devices, refused by default --------------------------------------------------------


def test_a_fifo_nobody_writes_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(NotRegularFile, match=r"^not a regular file$"):
        promptly(lambda: read_capped(tmp_path / "fifo", LIMIT))


def watch_opens(
    monkeypatch: pytest.MonkeyPatch,
    before: Callable[[int], None] | None = None,
    after: Callable[[int], None] | None = None,
) -> list[tuple[str, int]]:
    """Every ``os.open`` from now on, as (path, flags); ``before``/``after`` run around each
    real open with its flags (to swap the file under the reader)."""
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if before is not None:
            before(flags)
        fd = real_open(path, flags, *args, **kwargs)
        opened.append((str(path), flags))
        if after is not None:
            after(flags)
        return fd

    monkeypatch.setattr(os, "open", spy)
    return opened


@pytest.mark.parametrize("o_path", [True, False], ids=["o-path", "stat-then-open"])
def test_dev_zero_is_refused_without_being_opened(
    monkeypatch: pytest.MonkeyPatch, o_path: bool
) -> None:
    # Opening a device can act (a tape rewinds, a watchdog arms): it is refused after an
    # O_PATH lookup (which opens nothing) or, without O_PATH, after a stat().
    if not o_path:
        monkeypatch.setattr(capped_file, "_O_PATH", 0)
    opened = watch_opens(monkeypatch)
    with pytest.raises(NotRegularFile):
        read_capped("/dev/zero", LIMIT)
    assert all(flags & os.O_PATH for _, flags in opened) and len(opened) == int(o_path)


def test_a_device_swapped_in_after_the_check_is_never_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"checked")

    def swap(flags: int) -> None:
        if flags & os.O_PATH:  # the check is done: now the path names a device
            path.unlink()
            path.symlink_to("/dev/zero")

    opens = watch_opens(monkeypatch, after=swap)
    assert read_capped(path, LIMIT).data == b"checked"  # what was checked is what was read
    opened = [name for name, _ in opens]
    assert opened[0] == str(path) and opened[1].startswith("/proc/self/fd/")
    assert "/dev/zero" not in opened


def test_a_fifo_swapped_in_after_the_stat_is_still_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"x")

    def swap(flags: int) -> None:
        path.unlink()
        os.mkfifo(path)

    watch_opens(monkeypatch, before=swap)
    with pytest.raises(NotRegularFile):
        promptly(lambda: read_capped(path, LIMIT))


# -- symbolic links ------------------------------------------------------------------------------


def test_symlinks_are_followed_by_default(tmp_path: Path) -> None:
    (tmp_path / "target").write_bytes(b"via link")
    (tmp_path / "link").symlink_to("target")
    assert read_capped(tmp_path / "link", LIMIT).data == b"via link"
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "fifo-link").symlink_to("fifo")
    with pytest.raises(NotRegularFile):
        promptly(lambda: read_capped(tmp_path / "fifo-link", LIMIT))


def test_follow_symlinks_false_refuses_a_final_link_only(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "target").write_bytes(b"data")
    (tmp_path / "link").symlink_to("real/target")
    with pytest.raises(OSError) as info:
        read_capped(tmp_path / "link", LIMIT, follow_symlinks=False)
    assert info.value.errno == errno.ELOOP and not isinstance(info.value, ReadError)
    # a link among the directories is fine
    (tmp_path / "dir-link").symlink_to("real")
    assert read_capped(tmp_path / "dir-link" / "target", LIMIT, follow_symlinks=False).data == (
        b"data"
    )
    # a dangling final link is ELOOP too (O_NOFOLLOW), not "does not exist"
    (tmp_path / "dangling").symlink_to("nothing")
    with pytest.raises(OSError) as info:
        read_capped(tmp_path / "dangling", LIMIT, follow_symlinks=False)
    assert info.value.errno == errno.ELOOP


# -- streams: pipes, FIFOs and character devices, with a deadline ---------------------------------


def test_a_pipe_whose_writer_already_left_is_read(pipe: Pipe) -> None:
    path = pipe.path
    pipe.write(b"-----BEGIN CERTIFICATE-----\n")
    pipe.close_writer()
    assert promptly(lambda: read_capped(path, LIMIT, stream_timeout=5)).data == (
        b"-----BEGIN CERTIFICATE-----\n"
    )


def test_a_pipe_written_in_pieces_is_read_to_its_end(pipe: Pipe) -> None:
    path = pipe.path
    data = os.urandom(150 * 1024)  # more than a pipe buffer: the writer must wait for us

    def write() -> None:
        for start in range(0, len(data), 10_000):
            pipe.write(data[start : start + 10_000])
            time.sleep(0.001)
        pipe.close_writer()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    assert promptly(lambda: read_capped(path, len(data), stream_timeout=10)).data == data
    writer.join(10)


def test_a_pipe_over_the_cap_is_refused(pipe: Pipe) -> None:
    path = pipe.path
    pipe.write(b"a" * (LIMIT + 1))
    with pytest.raises(TooLarge):
        promptly(lambda: read_capped(path, LIMIT, stream_timeout=5))


def test_an_empty_pipe_whose_writer_left_is_empty(pipe: Pipe) -> None:
    path = pipe.path
    pipe.close_writer()
    started = time.monotonic()
    assert promptly(lambda: read_capped(path, LIMIT, stream_timeout=5)).data == b""
    assert time.monotonic() - started < 2


def test_a_pipe_that_never_finishes_times_out(pipe: Pipe) -> None:
    path = pipe.path
    pipe.write(b"partial")  # then nothing, and the writer stays
    started = time.monotonic()
    with pytest.raises(TimedOut, match=r"^did not finish within 0\.3 s$") as info:
        promptly(lambda: read_capped(path, LIMIT, stream_timeout=0.3))
    assert 0.25 < time.monotonic() - started < 3
    assert info.value.timeout == 0.3


def test_a_fifo_nobody_writes_times_out(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    started = time.monotonic()
    with pytest.raises(TimedOut):
        promptly(lambda: read_capped(tmp_path / "fifo", LIMIT, stream_timeout=0.3))
    assert time.monotonic() - started < 3


def test_a_fifo_whose_writer_comes_late_is_read(tmp_path: Path) -> None:
    # A reader that saw EOF before the writer opened would get nothing: poll() waits for it.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write_later() -> None:
        time.sleep(0.2)
        with fifo.open("wb") as handle:
            handle.write(b"late but whole")

    writer = threading.Thread(target=write_later, daemon=True)
    writer.start()
    assert promptly(lambda: read_capped(fifo, LIMIT, stream_timeout=5)).data == b"late but whole"
    writer.join(10)


def test_dev_zero_as_a_stream_hits_the_cap_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(TooLarge):
        promptly(lambda: read_capped("/dev/zero", 1024 * 1024, stream_timeout=5))
    assert time.monotonic() - started < 2


def test_dev_null_as_a_stream_is_empty() -> None:
    assert read_capped("/dev/null", LIMIT, stream_timeout=5).data == b""


def test_a_regular_file_ignores_the_stream_timeout(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"x" * 10)
    assert read_capped(path, LIMIT, stream_timeout=0.0).data == b"x" * 10


# -- properties ----------------------------------------------------------------------------------


@given(data=st.binary(max_size=300), limit=st.integers(min_value=0, max_value=200))
def test_a_file_reads_whole_or_raises_too_large(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, limit: int
) -> None:
    path = tmp_path_factory.mktemp("capped") / "file"
    path.write_bytes(data)
    try:
        result = read_capped(path, limit)
    except TooLarge:
        assert len(data) > limit
    else:
        assert len(data) <= limit and result.data == data


@given(data=st.binary(max_size=300), limit=st.integers(min_value=0, max_value=200))
def test_a_pipe_reads_whole_or_raises_too_large(data: bytes, limit: int) -> None:
    pipe = Pipe()
    try:
        pipe.write(data)  # well under a pipe buffer: no writer thread needed
        pipe.close_writer()
        try:
            result = read_capped(pipe.path, limit, stream_timeout=5)
        except TooLarge:
            assert len(data) > limit
        else:
            assert len(data) <= limit and result.data == data
    finally:
        pipe.close()
