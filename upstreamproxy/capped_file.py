"""Reading a small file whole: never past a size cap, never hanging on a FIFO or a device.

Public API::

    read_capped(path, limit, *, follow_symlinks=True, stream_timeout=None, dir_fd=None)
        -> CappedRead
    class CappedRead: data: bytes, info: os.stat_result     # info: fstat of what was read
    CappedFileError                the file was refused; str() says why
    ├── NotRegularFile             "not a regular file" (streams: "..., pipe or character device")
    ├── TooLarge                   "larger than LIMIT bytes"
    └── TimedOut                   "did not finish within N s" (streams only)
    ReadError(OSError)             fstat() or read() failed once the file was open

A failure to open propagates as the plain :class:`OSError` of ``os.open`` (callers tell
``FileNotFoundError`` and ``ELOOP`` apart); :class:`ReadError` tells a file opened but not read.

By default only a **regular file** is read. Anything else is refused *without opening it*:
opening a device has effects of its own (a tape rewinds, a watchdog arms). The path is looked
up once, as an ``O_PATH`` descriptor (which opens nothing), checked with ``fstat``, and only
then reopened for reading through ``/proc/self/fd``, so a path swapped after the check (a
symbolic link to a device) changes nothing. (Without ``O_PATH`` or ``/proc``: ``stat`` by name,
then open.) The open uses ``O_NONBLOCK`` (a FIFO cannot block it; it does nothing to a regular
file) and ``O_NOCTTY``, and the ``fstat`` of the descriptor decides again: not a regular file,
or a size over ``limit``, is refused before a byte is read. At most ``limit + 1`` bytes are
read, so a file that grows after the ``fstat`` costs no more than the cap either.

``follow_symlinks=False`` adds ``O_NOFOLLOW``: a symbolic link as the last component fails
with ``OSError(ELOOP)`` (links among the directories on the way are followed). ``dir_fd``
resolves a relative ``path`` in that open directory, as ``os.open`` does.

``stream_timeout`` (seconds) also accepts pipes, FIFOs and character devices, for a path such
as ``<(cat ca.pem)`` (``/dev/fd/63``) or ``/dev/stdin``. They are read without blocking, each
read waiting in ``poll`` for data, until end of file, within ``stream_timeout`` seconds of the
open: a FIFO nobody writes raises :class:`TimedOut`, an endless one (``/dev/zero``)
:class:`TooLarge` as soon as the cap is passed.
"""

from __future__ import annotations

import errno
import math
import os
import select
import stat
import time
from typing import Final, NamedTuple

_CHUNK: Final = 64 * 1024
_O_PATH: Final = getattr(os, "O_PATH", 0)
_PROC_FDS: Final = "/proc/self/fd"


class CappedFileError(Exception):
    """The file was refused; ``str()`` is the reason, worded for "<file>: <reason>"."""


class NotRegularFile(CappedFileError):
    def __init__(self, streams: bool = False) -> None:
        super().__init__(
            "not a regular file, pipe or character device" if streams else "not a regular file"
        )


class TooLarge(CappedFileError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


class TimedOut(CappedFileError):
    def __init__(self, timeout: float) -> None:
        super().__init__(f"did not finish within {timeout:g} s")
        self.timeout = timeout


class ReadError(OSError):
    """``fstat`` or ``read`` failed on the opened file (errno and strerror as the OS gave)."""


class CappedRead(NamedTuple):
    data: bytes
    #: ``fstat`` of the descriptor that was read (mode, owner, links: no second lookup).
    info: os.stat_result


def read_capped(
    path: str | os.PathLike[str],
    limit: int,
    *,
    follow_symlinks: bool = True,
    stream_timeout: float | None = None,
    dir_fd: int | None = None,
) -> CappedRead:
    """All of ``path``, at most ``limit`` bytes; see the module docstring for what is refused."""
    streams = stream_timeout is not None
    fd = _open_checked(path, follow_symlinks, streams, dir_fd)
    try:
        try:
            info = os.fstat(fd)
        except OSError as exc:
            raise ReadError(exc.errno, exc.strerror) from None
        if not _accepted(info.st_mode, streams):
            raise NotRegularFile(streams)
        if stat.S_ISREG(info.st_mode):
            if info.st_size > limit:
                raise TooLarge(limit)
            data = _read_file(fd, limit)
        else:
            assert stream_timeout is not None
            data = _read_stream(fd, limit, stream_timeout)
    finally:
        os.close(fd)
    return CappedRead(data, info)


def _open_checked(
    path: str | os.PathLike[str], follow_symlinks: bool, streams: bool, dir_fd: int | None
) -> int:
    """``path`` opened for reading, refused before the open if it is not a kind we read."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    nofollow = 0 if follow_symlinks else os.O_NOFOLLOW
    if _O_PATH and os.path.isdir(_PROC_FDS):
        # The file is looked up once, as an O_PATH descriptor (which opens nothing: a device
        # does not act), checked with fstat, and reopened through /proc: a swap of the path
        # after the check (a symlink to a device) cannot change what is opened.
        handle = os.open(path, _O_PATH | os.O_CLOEXEC | nofollow, dir_fd=dir_fd)
        try:
            seen = os.fstat(handle)
            if stat.S_ISLNK(seen.st_mode):  # O_PATH|O_NOFOLLOW opens the link itself
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.fspath(path))
            if not _accepted(seen.st_mode, streams):
                raise NotRegularFile(streams)
            return os.open(f"{_PROC_FDS}/{handle}", flags)
        finally:
            os.close(handle)
    # No O_PATH or no /proc: check by name, then open (a swap in between is caught by the
    # caller's fstat, after the open).
    try:
        seen = os.stat(path, follow_symlinks=follow_symlinks, dir_fd=dir_fd)
    except OSError:
        pass  # os.open below raises it again, as the callers expect to see it
    else:
        if not stat.S_ISLNK(seen.st_mode) and not _accepted(seen.st_mode, streams):
            raise NotRegularFile(streams)
    return os.open(path, flags | nofollow, dir_fd=dir_fd)


def _accepted(mode: int, streams: bool) -> bool:
    return stat.S_ISREG(mode) or (streams and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)))


def _read_file(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        try:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
        except OSError as exc:
            raise ReadError(exc.errno, exc.strerror) from None
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > limit:  # the file grew after the fstat
        raise TooLarge(limit)
    return b"".join(chunks)


def _read_stream(fd: int, limit: int, timeout: float) -> bytes:
    # Wait in poll() before each read: a read() of a FIFO that has no writer yet returns EOF
    # at once, where a blocking reader would wait for one; poll() waits (no POLLHUP until a
    # writer has come and gone), and reports POLLHUP once a pipe's writer has left.
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    total = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimedOut(timeout)
        if not poller.poll(math.ceil(remaining * 1000)):
            continue
        try:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
        except BlockingIOError:
            continue
        except OSError as exc:
            raise ReadError(exc.errno, exc.strerror) from None
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise TooLarge(limit)
