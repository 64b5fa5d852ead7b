"""The secrets directory: credential values the egress injects and the sandbox never sees.

Layout is a Kubernetes Secret volume: one file per key, usually a symlink ``KEY -> ..data/KEY``
where ``..data`` is itself a symlink to a timestamped directory that the kubelet swaps atomically
on update. Rules, in the order they are applied to each directory entry:

- names starting with ``.`` are skipped silently (that is ``..data`` and the timestamped dirs);
- symlinks are followed only when the final target lies *inside* the directory;
- only regular files of at most :data:`MAX_SECRET_BYTES` are read (bigger ones are ignored);
- the content must be UTF-8; trailing CR/LF characters are stripped (``kubectl create secret
  --from-file`` and ``echo`` both leave a newline that no header value wants), nothing else is.

An entry that breaks a rule is ignored and reported by name with a reason. An *I/O error* (the
directory is missing or unreadable, a file cannot be read) fails the whole reload: the store keeps
the last good values and reports the error, so a transient problem never strips credentials.

Values live only inside :class:`~upstreamproxy.secret.Secret`; nothing here logs, formats or
raises with a value in it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

from ...capped_file import CappedFileError, read_capped
from ...errors import UpstreamProxyError
from ...secret import Secret
from .rules import is_secret_name

log = logging.getLogger("upstreamproxy.egress.intercept.secrets")

MAX_SECRET_BYTES: Final = 1024 * 1024
# A kubelet update swaps ``..data`` between our resolving a key and opening it; a vanished target
# is retried this many times before the entry is treated as a dangling symlink.
_VANISHED_RETRIES: Final = 3


class MissingSecretError(UpstreamProxyError):
    """A template references a secret that is not in the store. Carries the name only."""

    def __init__(self, name: str) -> None:
        super().__init__(f"secret {name!r} is not present in the secrets directory")
        self.name = name


class _Vanished(Exception):
    pass


@dataclass(frozen=True)
class ReloadReport:
    """The outcome of one :meth:`SecretStore.reload` (names and reasons, never values)."""

    ok: bool
    names: frozenset[str]
    ignored: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None


class SecretStore:
    """Secret values loaded from ``directory``; :meth:`reload` swaps in a fresh map atomically."""

    def __init__(self, directory: str | os.PathLike[str], *, load: bool = True) -> None:
        self._directory = Path(directory)
        self._values: Mapping[str, Secret] = MappingProxyType({})
        self.generation = 0
        self.loaded_at: float | None = None
        self.last_report = ReloadReport(ok=False, names=frozenset(), error="never loaded")
        if load:
            self.reload()

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def last_error(self) -> str | None:
        return self.last_report.error

    def __repr__(self) -> str:
        return (
            f"SecretStore({str(self._directory)!r}, {len(self._values)} secrets, "
            f"generation {self.generation})"
        )

    def names(self) -> frozenset[str]:
        return frozenset(self._values)

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def get(self, name: str) -> Secret:
        try:
            return self._values[name]
        except KeyError:
            raise MissingSecretError(name) from None

    def missing(self, names: Iterable[str]) -> set[str]:
        """The subset of ``names`` that is not loaded (for readiness and policy checks)."""
        values = self._values
        return {name for name in names if name not in values}

    def reload(self) -> ReloadReport:
        """Read the directory again. On an I/O error keep the previous values and report it."""
        for _attempt in range(_VANISHED_RETRIES):
            try:
                values, ignored = self._scan(dangling_ok=False)
                break
            except _Vanished:
                continue
            except OSError as exc:
                return self._failed(exc)
        else:
            try:
                values, ignored = self._scan(dangling_ok=True)
            except (OSError, _Vanished) as exc:
                return self._failed(exc)
        self._values = MappingProxyType(values)  # the swap: one reference assignment
        self.generation += 1
        self.loaded_at = time.time()
        report = ReloadReport(ok=True, names=frozenset(values), ignored=MappingProxyType(ignored))
        self.last_report = report
        for name, reason in sorted(ignored.items()):
            log.warning("secrets directory %s: ignoring %r: %s", self._directory, name, reason)
        log.info(
            "secrets directory %s: loaded %d secret(s): %s",
            self._directory,
            len(values),
            ", ".join(sorted(values)) or "-",
        )
        return report

    async def watch(self, interval: float = 30.0) -> None:
        """Reload every ``interval`` seconds until cancelled (the caller keeps the task)."""
        while True:
            await asyncio.sleep(interval)
            self.reload()

    def _failed(self, exc: BaseException) -> ReloadReport:
        if isinstance(exc, OSError):
            detail = f"{exc.strerror or type(exc).__name__}"
            if exc.filename:
                detail = f"{exc.filename}: {detail}"
        else:
            detail = "an entry kept vanishing while being read"
        error = f"cannot read the secrets directory ({detail}); keeping the last good values"
        self.last_report = ReloadReport(ok=False, names=frozenset(self._values), error=error)
        log.error("secrets directory %s: %s", self._directory, error)
        return self.last_report

    def _scan(self, dangling_ok: bool) -> tuple[dict[str, Secret], dict[str, str]]:
        root = os.path.realpath(self._directory)
        if not os.path.isdir(root):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(self._directory))
        values: dict[str, Secret] = {}
        ignored: dict[str, str] = {}
        for entry in sorted(os.listdir(root)):
            if entry.startswith("."):
                continue
            if not is_secret_name(entry):
                ignored[entry] = "not a valid secret name"
                continue
            outcome = self._read_entry(root, entry, dangling_ok)
            if isinstance(outcome, Secret):
                values[entry] = outcome
            else:
                ignored[entry] = outcome
        return values, ignored

    @staticmethod
    def _read_entry(root: str, entry: str, dangling_ok: bool) -> Secret | str:
        """The entry's value, or the reason it is ignored. Raises OSError for I/O failures."""
        real = os.path.realpath(os.path.join(root, entry))
        if os.path.commonpath([root, real]) != root or real == root:
            return "symlink resolves outside the secrets directory"
        try:
            # Regular files only, never past the cap: a FIFO planted in the directory must not
            # hang the reload, nor /dev/zero fill memory.
            data = read_capped(real, MAX_SECRET_BYTES, follow_symlinks=False).data
        except FileNotFoundError:
            if dangling_ok:
                return "dangling symlink"
            raise _Vanished() from None
        except CappedFileError as exc:  # not a regular file, larger than MAX_SECRET_BYTES
            return str(exc)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "symlink changed while being read"
            raise
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return "not UTF-8 text"
        return Secret(text.rstrip("\r\n"))
