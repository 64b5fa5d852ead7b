"""Process hardening: make the relay process non-dumpable, with no core dumps.

Public API::

    make_non_dumpable() -> HardeningResult
    is_dumpable(pid: int | None = None) -> bool      # raises HardeningError if it cannot tell
    tracer_pid() -> int | None                       # TracerPid of this process (None: unknown)
    refuse_if_traced() -> None                       # HardeningError if a tracer is attached
    ptrace_scope() -> int | None                     # kernel.yama.ptrace_scope; None: no Yama
    class HardeningResult                             # what was done, by which mechanism
    class HardeningError(UpstreamProxyError)

Why: the relay holds the session token in memory. A process of the same user could otherwise
lift it with ``gdb -p``, ``/proc/<pid>/mem``, ``process_vm_readv`` or a core dump.
``prctl(PR_SET_DUMPABLE, 0)`` makes the kernel refuse those to anything lacking
``CAP_SYS_PTRACE`` and makes ``/proc/<pid>/*`` owned by root; ``RLIMIT_CORE = (0, 0)`` stops
core files being written at all. Call :func:`make_non_dumpable` as early as possible, and
*after* any uid/gid change: the kernel resets the flag to ``fs.suid_dumpable`` on every
credential change.

Mechanism: python-prctl when it is importable (the optional ``prctl`` extra; it needs the
libcap headers to build, so it is usually absent), otherwise ``prctl(2)`` through ctypes on
the C library. Either way the flag is read back with ``PR_GET_DUMPABLE`` and the result names
the mechanism, for the logs. On other platforms the result says ``unsupported`` (core dumps
are still disabled where ``resource`` exists).

Reading the flag of *another* process (:func:`is_dumpable` with a pid, for tests and
``doctor``) needs care: the flag is not in ``/proc/<pid>/status``, and access checks cannot
tell it apart for a root target (an observer with CAP_SYS_PTRACE bypasses the flag; one
without it fails the capability-subset check whatever the flag). Two read-only methods are
tried in order; neither needs privileges nor disturbs the target (nor the caller: changing
even a thread's fsuid would reset the *caller's* dumpable flag, so no credential tricks):

1. ``ioctl(pidfd, PIDFD_GET_INFO)`` asking for ``PIDFD_INFO_COREDUMP`` (Linux >= 6.16): the
   kernel reports the live process's dumpable mode directly (USER = dumpable, SKIP/ROOT = not).
2. The owner of ``/proc/<pid>/status``: for a non-dumpable process the kernel
   (``task_dump_owner``) makes it root of the process's user namespace; otherwise it is the
   process's effective uid. Works on any kernel, but only for targets not running as root.

If neither can answer (an older kernel *and* a root target) HardeningError says so.

**The start-up window.** The flag protects a process only from the moment it is set. A process
of the same uid that attaches (``PTRACE_SEIZE``) between ``execve`` and the ``prctl`` stays
attached afterwards and controls the process: it can even fake the read-back. One check narrows
this, and one deployment closes it:

* :func:`refuse_if_traced` is called after hardening and before the token is read: a process
  with a tracer (``TracerPid`` in ``/proc/self/status``) refuses to read the token.
  A tracer that also fakes that read can still win; so
* the recommended deployment (``start`` as root, the relay under its own uid, see
  :mod:`.privsep`) leaves no window at all: no sandbox uid may ever trace a process that is
  root or another uid, whatever its dumpable flag. Same-uid sessions should have Yama
  ``kernel.yama.ptrace_scope >= 1`` (THREAT_MODEL.md).
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Final, Literal

from ..errors import UpstreamProxyError

PR_GET_DUMPABLE: Final = 3
PR_SET_DUMPABLE: Final = 4
# get_dumpable() values: 0 = disabled, 1 = SUID_DUMP_USER, 2 = SUID_DUMP_ROOT (dumps only
# as root, so "not dumpable" for the same-user threat we care about).
_SUID_DUMP_USER: Final = 1

# include/uapi/linux/pidfd.h: struct pidfd_info is 80 bytes since Linux 6.16 (mask u64,
# cgroupid u64, eleven u32 ids and the s32 exit code, then coredump_mask u32 at offset 64,
# coredump_signal u32, supported_mask u64). The ioctl number encodes the size we pass; the
# kernel accepts any size >= 64 and reports in ``mask`` which fields it filled.
_PIDFD_INFO_SIZE: Final = 80
_PIDFD_COREDUMP_MASK_OFFSET: Final = 64
_PIDFD_GET_INFO: Final = (3 << 30) | (_PIDFD_INFO_SIZE << 16) | (0xFF << 8) | 11  # _IOWR
_PIDFD_INFO_COREDUMP: Final = 1 << 4
_PIDFD_COREDUMP_SKIP: Final = 1 << 1
_PIDFD_COREDUMP_USER: Final = 1 << 2
_PIDFD_COREDUMP_ROOT: Final = 1 << 3

Mechanism = Literal["python-prctl", "ctypes-libc", "unsupported"]


class HardeningError(UpstreamProxyError):
    """Dumpability could not be changed or determined."""


@dataclass(frozen=True)
class HardeningResult:
    """What :func:`make_non_dumpable` achieved.

    ``mechanism``: how PR_SET_DUMPABLE was issued (``unsupported`` off Linux or when libc has
    no ``prctl``). ``dumpable``: the flag read back afterwards, None if unreadable.
    ``core_limit``: RLIMIT_CORE (soft, hard) afterwards, None if unavailable.
    ``problems``: a human-readable reason for everything that did not work.
    """

    mechanism: Mechanism
    dumpable: bool | None
    core_limit: tuple[int, int] | None
    problems: tuple[str, ...] = field(default=())

    @property
    def supported(self) -> bool:
        return self.mechanism != "unsupported"

    @property
    def ok(self) -> bool:
        """True when the process is non-dumpable and cannot write a core file."""
        return self.dumpable is False and self.core_limit == (0, 0)

    def describe(self) -> str:
        """One line for the logs."""
        state = {None: "unknown", True: "yes", False: "no"}[self.dumpable]
        core = "unknown" if self.core_limit is None else "{}/{}".format(*self.core_limit)
        text = f"mechanism={self.mechanism} dumpable={state} core_limit={core}"
        if self.problems:
            text += " problems=" + "; ".join(self.problems)
        return text


def _is_linux() -> bool:
    return sys.platform.startswith("linux")


def _libc_prctl(option: int, arg2: int = 0) -> int:
    """Call prctl(2) through libc; raises OSError with errno, AttributeError if absent."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.restype = ctypes.c_int
    # prctl is variadic; on the Linux ABIs we support, unsigned longs are passed identically.
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    result = int(prctl(option, arg2, 0, 0, 0))
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def _set_dumpable_off() -> tuple[Mechanism, list[str]]:
    """Issue PR_SET_DUMPABLE 0; return the mechanism that worked (or was tried) and problems."""
    problems: list[str] = []
    try:
        prctl = importlib.import_module("prctl")
    except ImportError:
        pass
    else:
        try:
            prctl.set_dumpable(False)
        except Exception as exc:  # an extension module may raise anything: fall back to ctypes
            problems.append(f"python-prctl set_dumpable failed ({type(exc).__name__})")
        else:
            return "python-prctl", problems
    try:
        _libc_prctl(PR_SET_DUMPABLE, 0)
    except AttributeError:
        problems.append("libc has no prctl symbol")
        return "unsupported", problems
    except OSError as exc:
        # e.g. a seccomp profile that denies prctl: report it, the caller decides.
        problems.append(f"prctl(PR_SET_DUMPABLE, 0) failed: {exc.strerror}")
    return "ctypes-libc", problems


def _disable_core_dumps() -> tuple[tuple[int, int] | None, str | None]:
    try:
        import resource
    except ImportError:
        return None, "resource module unavailable; core dumps not disabled"
    problem = None
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        problem = f"setrlimit(RLIMIT_CORE, (0, 0)) failed: {exc}"
    return resource.getrlimit(resource.RLIMIT_CORE), problem


def make_non_dumpable() -> HardeningResult:
    """Clear this process's dumpable flag and set RLIMIT_CORE to (0, 0). Never raises.

    Check ``result.ok``: under ``--fail-closed`` a result that is not ok must abort start-up;
    otherwise log ``result.describe()`` and carry on.
    """
    problems: list[str] = []
    core_limit, core_problem = _disable_core_dumps()
    if core_problem:
        problems.append(core_problem)
    if not _is_linux():
        problems.append(f"PR_SET_DUMPABLE is Linux-only (platform {sys.platform})")
        return HardeningResult("unsupported", None, core_limit, tuple(problems))
    mechanism, prctl_problems = _set_dumpable_off()
    problems.extend(prctl_problems)
    dumpable: bool | None = None
    try:
        dumpable = is_dumpable()
    except HardeningError as exc:
        problems.append(str(exc))
    if dumpable:
        problems.append("process is still dumpable after PR_SET_DUMPABLE 0")
    return HardeningResult(mechanism, dumpable, core_limit, tuple(problems))


def tracer_pid() -> int | None:
    """The pid tracing this process (0: none), from ``/proc/self/status``; None if unknown."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def ptrace_scope() -> int | None:
    """``kernel.yama.ptrace_scope`` (0 classic, 1 ancestors only, 2 admin only, 3 none), or
    None when Yama is absent (then any process of the same uid may attach)."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope", encoding="ascii") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def refuse_if_traced() -> None:
    """Raise HardeningError if a tracer is attached to this process.

    Called *after* :func:`make_non_dumpable` and before the token is read: from then on no
    process of our uid can attach any more (the flag refuses it), so one attached during the
    start-up window is seen here. Off Linux, or without ``/proc``, there is nothing to check.
    """
    tracer = tracer_pid() if _is_linux() else 0
    if tracer:
        raise HardeningError(
            f"refusing to read the token: process {tracer} is tracing this one (TracerPid), "
            "so it could read the token from memory; was a debugger attached during start-up?"
        )


def is_dumpable(pid: int | None = None) -> bool:
    """Whether ``pid`` (default: this process) is dumpable, i.e. inspectable by its own user.

    Raises HardeningError off Linux, when the process does not exist, or when the flag cannot
    be read for that process on this kernel (see the module docstring).
    """
    if not _is_linux():
        raise HardeningError(f"dumpability is a Linux notion (platform {sys.platform})")
    if pid is None or pid == os.getpid():
        try:
            return _libc_prctl(PR_GET_DUMPABLE) == _SUID_DUMP_USER
        except OSError as exc:
            raise HardeningError(f"prctl(PR_GET_DUMPABLE) failed: {exc.strerror}") from None
        except AttributeError:
            raise HardeningError("libc has no prctl symbol") from None
    for method in (_via_pidfd, _via_proc_owner):
        answer = method(pid)
        if answer is not None:
            return answer
    raise HardeningError(
        f"cannot read the dumpable flag of process {pid}: it runs as root and this kernel "
        "has no PIDFD_INFO_COREDUMP (Linux >= 6.16)"
    )


def _via_pidfd(pid: int) -> bool | None:
    """Method 1: PIDFD_GET_INFO with PIDFD_INFO_COREDUMP; None when the kernel cannot say."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise HardeningError(f"no such process: {pid}") from None
    except OSError:
        return None  # ENOSYS: kernel < 5.3, or pidfd_open filtered out
    try:
        buf = bytearray(_PIDFD_INFO_SIZE)
        struct.pack_into("<Q", buf, 0, _PIDFD_INFO_COREDUMP)
        try:
            fcntl.ioctl(fd, _PIDFD_GET_INFO, buf, True)
        except ProcessLookupError:
            raise HardeningError(f"no such process: {pid}") from None
        except OSError:
            return None  # ENOTTY/EINVAL: kernel < 6.13 has no PIDFD_GET_INFO
    finally:
        os.close(fd)
    (mask,) = struct.unpack_from("<Q", buf, 0)
    (coredump_mask,) = struct.unpack_from("<I", buf, _PIDFD_COREDUMP_MASK_OFFSET)
    if not mask & _PIDFD_INFO_COREDUMP:
        return None  # 6.13-6.15: the field does not exist yet
    if coredump_mask & _PIDFD_COREDUMP_USER:
        return True
    if coredump_mask & (_PIDFD_COREDUMP_SKIP | _PIDFD_COREDUMP_ROOT):
        return False
    # Early 6.16/6.17 kernels set the mask bit but fill the value only after a crash.
    return None


def _via_proc_owner(pid: int) -> bool | None:
    """Method 2: owner of /proc/<pid>/status vs the effective uid; None for root targets."""
    path = f"/proc/{pid}/status"
    try:
        owner = os.stat(path).st_uid
        with open(path, encoding="ascii", errors="replace") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        raise HardeningError(f"no such process: {pid}") from None
    except OSError as exc:
        raise HardeningError(f"cannot read {path}: {exc.strerror}") from None
    for line in lines:
        fields = line.split()
        if fields[:1] == ["Uid:"] and len(fields) >= 3:
            euid = int(fields[2])
            # Root of the target's user namespace is 0 as seen from the common case of one
            # namespace; a root target looks the same either way, so say nothing.
            if euid == 0:
                return None
            return owner == euid
    raise HardeningError(f"{path} has no Uid line")
