"""Real users for the privilege-separation and network-lock tests (root only).

``sandbox_user`` is a fresh login-less user playing the sandbox's uid; ``names`` collects the
users a test creates, directly or through ``start --relay-user``, and deletes them afterwards.
``as_user`` drops to a user with setpriv (util-linux): real, effective and saved ids, its own
group and no supplementary groups, no capabilities.
"""

from __future__ import annotations

import grp
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


def free_uid(start: int = 23000) -> int:
    used = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    uid = start + secrets.randbelow(1000)
    while uid in used:
        uid += 1
    return uid


def relay_name() -> str:
    return f"uprly{secrets.token_hex(3)}"


def userdel(name: str) -> None:
    subprocess.run(["userdel", name], capture_output=True, check=False, timeout=30)
    subprocess.run(["groupdel", name], capture_output=True, check=False, timeout=30)


def as_user(user: User, *argv: str) -> list[str]:
    return [SETPRIV, f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", *argv]


@pytest.fixture
def names() -> Iterator[list[str]]:
    created: list[str] = []
    yield created
    for name in created:
        userdel(name)


def make_user(names: list[str], prefix: str) -> User:
    """A new unprivileged user (and its group), listed in ``names`` for removal."""
    name = f"{prefix}{secrets.token_hex(3)}"
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/bin/sh", "--user-group", name],
        check=True,
        capture_output=True,
        timeout=30,
    )
    names.append(name)
    entry = pwd.getpwnam(name)
    return User(name, entry.pw_uid, entry.pw_gid)


@pytest.fixture
def sandbox_user(names: list[str]) -> User:
    return make_user(names, "upsbx")


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A base directory the sandbox user can read (0755), unlike pytest's 0700 tmp_path."""
    base = Path(tempfile.mkdtemp(prefix="upstreamproxy-users-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)
