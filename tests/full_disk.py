"""Run a command with one directory on a nearly full file system: a tmpfs of a few pages,
mounted in a mount namespace of the command's own (root and ``unshare`` needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

needs_unshare = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare to mount a small tmpfs in a mount namespace of its own",
)

#: Copies ``$prepare``'s files into the tmpfs first (they take their room), runs the command,
#: then prints its exit code and the directory as seen inside the namespace.
_SCRIPT = (
    'mount -t tmpfs -o "size=$1,mode=0755" none "$2" || exit 99; dir=$2; prepare=$3; shift 3; '
    '[ -z "$prepare" ] || cp -a "$prepare"/. "$dir"/ || exit 98; '
    '"$@" >&2; echo "exit $?"; for f in "$dir"/* "$dir"/.[!.]*; do [ -e "$f" ] && '
    'echo "$(basename "$f") $(cksum < "$f")"; done'
)


def run_on_full_disk(
    directory: Path, argv: Sequence[str], *, pages: int = 1, prepare: Path | None = None
) -> tuple[int, dict[str, str], str]:
    """Run ``argv`` with ``directory`` on a tmpfs of ``pages`` pages (after copying
    ``prepare``'s files into it); return its exit code, ``{name: checksum}`` of what the
    directory then held, and its standard error."""
    size = pages * os.sysconf("SC_PAGE_SIZE")
    namespace = ["unshare", "--mount", "--propagation", "private"]
    script = ["sh", "-c", _SCRIPT, "sh", str(size), str(directory), str(prepare or "")]
    done = subprocess.run(
        [*namespace, *script, *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = done.stdout.splitlines()
    assert lines and lines[0].startswith("exit "), (done.stdout, done.stderr)
    files = dict(line.split(" ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), files, done.stderr
