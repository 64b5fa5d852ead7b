"""A same-uid attacker racing ``start`` (run by test_privsep.py, not collected).

Usage: ``python ptrace_racer.py MARKER STOP_FILE MAX_SECONDS``. Prints ``watching``, then
spins over ``/proc`` until a process whose command line contains MARKER appears, tries
``PTRACE_SEIZE`` on it at once and, if that worked, stays attached (without ever stopping or
hiding from the tracee) until STOP_FILE exists; prints one JSON line: ``{"pid", "errno"}``.
This is the naive form of the attack issue 9 describes; the full form also fakes the
tracee's reads of ``/proc/self/status`` and ``PR_GET_DUMPABLE``, which no check inside the
tracee can see through (THREAT_MODEL.md).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from pathlib import Path

PTRACE_SEIZE = 0x4206

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long


def main() -> int:
    marker = sys.argv[1].encode()
    stop_file = Path(sys.argv[2])
    deadline = time.monotonic() + float(sys.argv[3])
    me = os.getpid()
    print("watching", flush=True)
    result: dict[str, int | None] = {"pid": None, "errno": None}
    while time.monotonic() < deadline and result["pid"] is None:
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == me:
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as handle:
                    cmdline = handle.read()
            except OSError:
                continue
            if marker in cmdline and b"ptrace_racer" not in cmdline:
                pid = int(name)
                ok = libc.ptrace(PTRACE_SEIZE, pid, None, None) == 0
                result = {"pid": pid, "errno": 0 if ok else ctypes.get_errno()}
                break
    while result["errno"] == 0 and time.monotonic() < deadline and not stop_file.exists():
        time.sleep(0.05)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
