"""A same-uid attacker inside the sandbox, for real (run by test_privsep.py, not collected).

Usage: ``python ptrace_attacker.py SECRET STOP_FILE MAX_SECONDS TOKEN_PATH MARKER``; prints
one JSON report.

It does what issue 9 describes: watch ``/proc`` for the session's processes (an upstreamproxy
command line mentioning MARKER, the token file's path that ``start`` is given, and their
children; the machine may run other sessions, and the sandbox user's own ``upstreamproxy
exec`` would be fair game but holds no token) and, from the moment each appears and again on
every pass, try everything an unprivileged process of our uid can do to lift the secret:

* ``ptrace(PTRACE_SEIZE)`` (the start-up race: a tracer that gets in before ``prctl`` keeps
  control, and could then read the token with PEEKDATA once it is read);
* open and read ``/proc/PID/mem`` over every mapping (what gdb, process_vm_readv and friends
  amount to), ``/proc/PID/environ`` and ``/proc/PID/cmdline``;
* open the token file itself (STOP_FILE's directory holds nothing for it; the path is argv 4).

Before that it proves its tools work: it starts a *decoy* of its own uid holding the secret in
memory and must seize it and find the secret there (unless Yama ``ptrace_scope`` >= 2 forbids
ptrace to everyone, in which case only ``/proc/PID/mem`` reading is expected to fail too).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PTRACE_SEIZE = 0x4206
MAX_SCAN = 512 * 1024 * 1024

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long


def seize(pid: int) -> int:
    """0 on success, else the errno."""
    if libc.ptrace(PTRACE_SEIZE, pid, None, None) == 0:
        return 0
    return ctypes.get_errno()


def scan_memory(pid: int, secret: bytes) -> tuple[int, bool]:
    """(errno or 0, found) reading every readable mapping through /proc/PID/mem."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError as exc:
        return exc.errno or errno.EIO, False
    scanned = 0
    try:
        for line in maps:
            fields = line.split()
            if len(fields) < 2 or not fields[1].startswith("r"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end - start > 64 * 1024 * 1024 or scanned > MAX_SCAN:
                continue
            try:
                data = os.pread(mem, end - start, start)
            except OSError:
                continue
            scanned += len(data)
            if secret in data:
                return 0, True
    finally:
        os.close(mem)
    return 0, False


def read_file(path: str) -> tuple[int, bytes]:
    try:
        return 0, Path(path).read_bytes()
    except OSError as exc:
        return exc.errno or errno.EIO, b""


def parent_of(pid: int) -> int:
    _, stat = read_file(f"/proc/{pid}/stat")
    try:
        return int(stat.rsplit(b")", 1)[1].split()[1])
    except (IndexError, ValueError):
        return 0


def ptrace_scope() -> int:
    try:
        return int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except OSError:
        return 0


def control(secret: bytes) -> dict[str, object]:
    """Attack a decoy of our own uid holding the secret: the tools must work on it."""
    code = (
        "import sys, time\n"
        "held = bytearray(sys.stdin.buffer.readline())\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    decoy = subprocess.Popen(
        [sys.executable, "-c", code, "upstreamproxy-decoy"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert decoy.stdin is not None and decoy.stdout is not None
    decoy.stdin.write(b"decoy-" + secret + b"\n")
    decoy.stdin.flush()
    decoy.stdout.readline()
    try:
        seized = seize(decoy.pid)
        mem_errno, found = scan_memory(decoy.pid, b"decoy-" + secret)
    finally:
        decoy.kill()
        decoy.wait()
    return {"seize_errno": seized, "mem_errno": mem_errno, "found": found}


def main() -> int:
    secret = sys.argv[1].encode()
    stop_file = Path(sys.argv[2])
    deadline = time.monotonic() + float(sys.argv[3])
    token_path = sys.argv[4]
    marker = sys.argv[5].encode()
    me = os.getpid()
    report: dict[str, object] = {
        "uid": os.getuid(),
        "ptrace_scope": ptrace_scope(),
        "control": control(secret),
    }
    seen: dict[int, dict[str, object]] = {}
    attempts = 0
    successes: list[str] = []
    token_errnos: set[int] = set()
    print("watching", flush=True)
    while time.monotonic() < deadline and not stop_file.exists():
        err, _ = read_file(token_path)
        token_errnos.add(err)
        if err == 0:
            successes.append("read the token file")
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid == me:
                continue
            _, cmdline = read_file(f"/proc/{pid}/cmdline")
            if b"upstreamproxy" not in cmdline or b"ptrace_attacker" in cmdline:
                continue
            if pid not in seen and marker not in cmdline and parent_of(pid) not in seen:
                continue
            info = seen.setdefault(pid, {"cmdlines": []})
            text = cmdline.decode(errors="replace")[:200]
            if text not in info["cmdlines"]:  # type: ignore[operator]
                info["cmdlines"].append(text)  # type: ignore[attr-defined]
            if secret in cmdline:
                successes.append(f"secret in the command line of {pid}")
            attempts += 1
            seized = seize(pid)
            info["seize_errnos"] = sorted({*info.get("seize_errnos", []), seized})  # type: ignore[misc]
            if seized == 0:
                successes.append(f"PTRACE_SEIZE of {pid} succeeded")
            mem_errno, found = scan_memory(pid, secret)
            info["mem_errnos"] = sorted({*info.get("mem_errnos", []), mem_errno})  # type: ignore[misc]
            if mem_errno == 0:
                successes.append(f"opened /proc/{pid}/mem")
            if found:
                successes.append(f"secret in the memory of {pid}")
            env_errno, environ = read_file(f"/proc/{pid}/environ")
            info["environ_errnos"] = sorted({*info.get("environ_errnos", []), env_errno})  # type: ignore[misc]
            if secret in environ:
                successes.append(f"secret in the environment of {pid}")
        time.sleep(0.001)
    report.update(
        processes={str(k): v for k, v in seen.items()},
        attempts=attempts,
        successes=sorted(set(successes)),
        token_file_errnos=sorted(token_errnos),
    )
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
