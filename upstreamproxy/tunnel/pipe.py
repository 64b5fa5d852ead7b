"""Payload bytes that cross a process without entering user space: ``splice(2)``.

On a bulk download each process would otherwise copy every byte twice (socket to user space
and back). Where both sockets of a tunnel are plain TCP, the download direction can move the
payload through a pipe instead: the kernel hands pages from one socket to the other.

* egress: upstream bytes are spliced into the pipe, the frame and chunk headers are sent with
  ``MSG_MORE`` and the pipe is spliced into the WebSocket - one message, no copy;
* relay: a frame's header and chunk prefix are peeked, read and checked by the
  :class:`~.wsframes.FrameReader` as usual, then its payload is spliced from the WebSocket
  into the pipe and from the pipe to the client.

Only the egress→relay→client direction is spliced: the relay's frames are masked, so their
payload must pass through user space to be unmasked. TLS sockets, in-memory transports and
intercepted tunnels never splice. A link switches to splicing only after a read that filled
:data:`SPLICE_AFTER` bytes (a bulk transfer; a short exchange costs no extra syscalls).

One pipe serves the whole process: the event loop runs one callback at a time, and what a
callback puts in the pipe is taken out (sent, or read back into user space when the writer
cannot take it) before it returns - :func:`settle` enforces that. Whatever is read back is
written through the transport as usual, so backpressure and deadlines are unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
import termios
from typing import Any, Final

from ..codec import MAX_CHUNK_PAYLOAD
from ..options import env_flag
from .payload import Piped

log = logging.getLogger("upstreamproxy.tunnel")

#: The pipe's capacity (the default ``pipe-max-size``): room for :data:`SPLICE_MAX` however
#: the kernel's pages are filled.
PIPE_SIZE: Final = 1024 * 1024
#: The most one splice moves: a whole chunk (``MAX_CHUNK_PAYLOAD``). Four times what a read
#: takes - these bytes are never in user space, and fewer, larger chunks are most of the gain.
SPLICE_MAX: Final = MAX_CHUNK_PAYLOAD
#: A read at least this large marks a bulk transfer: the link starts to splice.
SPLICE_AFTER: Final = 64 * 1024
#: Bytes peeked at a frame boundary: the largest header (10, unmasked) plus the largest chunk
#: prefix (a tag and a 10-byte varint; ours are at most 5).
PEEK: Final = 21
_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
#: Off with ``--no-splice`` or ``UPSTREAMPROXY_NO_SPLICE=1`` (read here, so ``start``'s relay
#: child follows it too).
_enabled = hasattr(os, "splice") and not env_flag("NO_SPLICE")


class _Pipe:
    __slots__ = ("capacity", "held", "read_fd", "write_fd")

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.capacity = 64 * 1024
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        with contextlib.suppress(OSError, AttributeError):
            self.capacity = fcntl.fcntl(self.write_fd, fcntl.F_GETPIPE_SZ)
        self.held = 0  # bytes in the pipe now (0 between callbacks)


_pipe: _Pipe | None = None


class Counters:
    """Bytes this process moved through its pipe (for tests and the curious): ``spliced_in``
    from sockets, ``spliced_out`` to sockets, ``taken`` read back into user space."""

    spliced_in = 0
    spliced_out = 0
    taken = 0


def _the_pipe() -> _Pipe | None:
    global _pipe, _enabled
    if _pipe is None and _enabled:
        try:
            _pipe = _Pipe()
        except OSError as exc:  # out of fds: carry on without splicing
            _enabled = False
            log.warning("splice disabled: no pipe (%s)", exc.strerror or exc)
    return _pipe


def prepare() -> bool:
    """Make the process's pipe now (at start: its two fds are then part of the baseline, and
    running out of fds later cannot turn splicing off); whether splicing is on."""
    return _the_pipe() is not None


def _forget_pipe() -> None:  # a forked child gets its own pipe
    global _pipe
    if _pipe is not None:
        with contextlib.suppress(OSError):
            os.close(_pipe.read_fd)
            os.close(_pipe.write_fd)
    _pipe = None


os.register_at_fork(after_in_child=_forget_pipe)


def set_enabled(enabled: bool) -> None:
    """Turn splicing on or off for this process (``--no-splice``, tests)."""
    global _enabled
    _enabled = enabled and hasattr(os, "splice")


def plain_socket(transport: asyncio.BaseTransport | None) -> socket.socket | None:
    """The socket of a plain (not TLS) stream transport of asyncio's selector loop whose
    reading can be redirected to a splice, or None."""
    if not _enabled or transport is None or transport.get_extra_info("sslcontext") is not None:
        return None
    sock: Any = getattr(transport, "_sock", None)
    if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_STREAM:
        return None
    if not callable(getattr(transport, "_read_ready__get_buffer", None)):
        return None
    if not hasattr(transport, "_read_ready_cb"):
        return None
    return sock


def redirect_reads(transport: asyncio.Transport, ready: Any) -> None:
    """Make ``ready`` what ``transport`` calls when its socket is readable (its own reader
    stays registered, so pausing and resuming work as before). :func:`plain_read` is the
    transport's own read; ``set_protocol`` undoes this."""
    transport._read_ready_cb = ready  # type: ignore[attr-defined]


def fail(transport: asyncio.Transport, exc: BaseException) -> None:
    """A spliced read failed (a reset, say) or its handler raised: end the transport as its
    own read would have (``connection_lost(exc)``; logged unless an ``OSError``)."""
    transport._fatal_error(exc, "splice read failed")  # type: ignore[attr-defined]


def plain_read(transport: asyncio.Transport) -> None:
    """One read the transport's own way (into its protocol's buffer; EOF and errors are
    reported as usual)."""
    transport._read_ready__get_buffer()  # type: ignore[attr-defined]


def room(sink: socket.socket | None, budget: int) -> int:
    """How much to splice in for ``sink``: what its send buffer can take now (so the bytes
    leave the pipe into it, rather than back into user space), never under ``budget`` (the
    core's read budget) nor over :data:`SPLICE_MAX`."""
    if sink is None:
        return budget
    try:
        size = sink.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        queued = struct.unpack("i", fcntl.ioctl(sink.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return budget
    # SO_SNDBUF is doubled for the kernel's bookkeeping: half of it is payload.
    return min(SPLICE_MAX, max(budget, int(size) // 2 - int(queued)))


def splice_in(fd: int, count: int) -> int:
    """Move up to ``count`` bytes from the socket ``fd`` into the pipe; how many (0 at EOF
    or when there is no pipe). Raises ``BlockingIOError`` when nothing is ready, ``OSError``
    on a socket error."""
    pipe = _the_pipe()
    if pipe is None:
        return 0
    moved = os.splice(fd, pipe.write_fd, min(count, pipe.capacity - pipe.held), flags=_FLAGS)
    pipe.held += moved
    Counters.spliced_in += moved
    return moved


def take(piped: Piped) -> bytes:
    """Read ``piped``'s bytes back out of the pipe (for a writer that cannot splice)."""
    pipe = _pipe
    if pipe is None or piped.size <= 0:
        return b""
    parts = []
    left = piped.size
    while left > 0:
        try:
            got = os.read(pipe.read_fd, left)
        except BlockingIOError:
            break
        if not got:
            break
        parts.append(got)
        left -= len(got)
    pipe.held -= piped.size - left
    Counters.taken += piped.size - left
    if left:  # cannot happen while the pipe holds what was booked; say so loudly
        log.error("pipe held %d bytes fewer than booked", left)
    return b"".join(parts)


def send(
    transport: asyncio.Transport, sock: socket.socket | None, piped: Piped, head: bytes = b""
) -> None:
    """Send ``head`` then ``piped``'s bytes on ``transport``: straight from the pipe into its
    socket while the socket takes them, the rest (and everything, when the transport has
    bytes queued or no plain socket) through ``transport.write``."""
    left = piped.size
    pipe = _pipe
    sent_head = 0
    if (
        sock is not None
        and pipe is not None
        and not transport.get_write_buffer_size()
        and not transport.is_closing()
    ):
        fd = sock.fileno()
        try:
            if head:
                sent_head = sock.send(head, socket.MSG_MORE) if left else sock.send(head)
            if sent_head == len(head):
                while left > 0:
                    moved = os.splice(pipe.read_fd, fd, left, flags=_FLAGS)
                    if moved <= 0:
                        break
                    left -= moved
                    pipe.held -= moved
                    Counters.spliced_out += moved
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass  # the transport's own write meets the error and reports it
    rest = head[sent_head:]
    if left:
        rest += take(Piped(left))
    if rest:
        transport.write(rest)


def settle() -> None:
    """End of a callback that spliced: drop what nobody took (a tunnel that ended meanwhile
    - as bytes read and then dropped would be)."""
    pipe = _pipe
    if pipe is not None and pipe.held:
        take(Piped(pipe.held))
