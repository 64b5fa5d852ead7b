"""Reading and deleting the session token file.

Public API::

    read_token(path: str | os.PathLike[str]) -> TokenFile     # raises ConfigError if malformed
    delete_token_file(path: str | os.PathLike[str]) -> bool   # True if deleted, False if gone
    class TokenFile: token: Secret | None, reason, warnings: tuple[str, ...], owner_uid
    MAX_TOKEN_FILE_SIZE = 64 KiB

Outcomes of :func:`read_token`, matching the bootstrap's policy:

* no file, an empty file, or only whitespace: ``token`` is None and ``reason`` says which.
  That is the normal "proxy disabled" state, not an error.
* a usable token: ``token`` is a :class:`~upstreamproxy.secret.Secret` with surrounding
  whitespace (the trailing newline of ``echo tok > file``, a CRLF) stripped.
* anything malformed raises ConfigError naming the file: larger than 64 KiB (checked before
  reading it all), not a regular file (a FIFO would block start-up), a symbolic link (see
  below), not ASCII, or a
  character inside the token that is whitespace, a control character or non-ASCII. Tokens
  travel in ``Authorization: Bearer`` and Basic credentials, so anything else could only
  break the handshake, or split a header.

``warnings`` notes a file readable by group or others (the token should be 0600/0400) and a
file with other hard links (deleting this name leaves the token reachable under the others).
No message ever contains the token or any part of it.

**A symbolic link is refused** (the last path component; directories on the way may be links).
Deleting a link would leave its target, i.e. a copy of the token, on disk; deleting the target
instead would let whoever can write the link's directory make a root ``start`` delete any file
that looks like a token. The error names the fix: pass the file itself. For a Kubernetes secret
volume that is ``<mount>/..data/<key>`` (``..data`` is a link to a directory, which is fine);
those volumes are read-only, so ``start`` reports that it could not delete the file.
Delete the file only once the relay listens (DESIGN.md, bootstrap step 5), so that a
supervisor can retry a failed start.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import Final

from ..capped_file import CappedFileError, ReadError, read_capped
from ..errors import ConfigError
from ..secret import Secret

MAX_TOKEN_FILE_SIZE: Final = 64 * 1024
_SURROUNDING_WHITESPACE: Final = b" \t\r\n\v\f"


@dataclass(frozen=True)
class TokenFile:
    """Result of :func:`read_token`. ``token`` None means "no token": see ``reason``."""

    token: Secret | None
    reason: str | None = None
    warnings: tuple[str, ...] = field(default=())
    #: The file's owner (None when there was no file).
    owner_uid: int | None = None


def _field(path: str | os.PathLike[str]) -> str:
    return f"token file {os.fspath(path)}"


def read_token(path: str | os.PathLike[str]) -> TokenFile:
    """Read the session token from ``path``; see the module docstring for the outcomes."""
    name = _field(path)
    try:
        data, info = read_capped(path, MAX_TOKEN_FILE_SIZE, follow_symlinks=False)
    except FileNotFoundError:
        return TokenFile(None, f"{name} does not exist")
    except NotADirectoryError:
        return TokenFile(None, f"{name} does not exist (a parent is not a directory)")
    except ReadError as exc:
        raise ConfigError(name, f"cannot read: {exc.strerror}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            raise ConfigError(
                name,
                f"is a symbolic link (to {os.readlink(path)}); deleting it would leave the "
                "token in the file it points to, so pass that file itself "
                "(for a Kubernetes secret volume: <mount>/..data/<key>)",
            ) from None
        raise ConfigError(name, f"cannot open: {exc.strerror}") from None
    except CappedFileError as exc:  # not a regular file (a FIFO would block start-up), too large
        raise ConfigError(name, str(exc)) from None

    warnings: list[str] = []
    if info.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.append(
            f"{name} is readable by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
            "it should be 0600 or 0400"
        )
    if info.st_nlink > 1:
        warnings.append(
            f"{name} has {info.st_nlink} hard links; deleting it leaves the token reachable "
            "under the other names"
        )

    token = data.strip(_SURROUNDING_WHITESPACE)
    if not token:
        reason = "is empty" if not data else "contains only whitespace"
        return TokenFile(None, f"{name} {reason}", tuple(warnings), info.st_uid)
    # Printable ASCII only, checked without ever echoing the offending character or position.
    if any(byte < 0x21 or byte > 0x7E for byte in token):
        raise ConfigError(name, "token contains whitespace, a control character or non-ASCII data")
    return TokenFile(Secret(token.decode("ascii")), None, tuple(warnings), info.st_uid)


def delete_token_file(path: str | os.PathLike[str]) -> bool:
    """Unlink the token file. True if it was deleted, False if it was already gone.

    Other failures (a read-only secret mount, EACCES) raise OSError; under the fail-open
    policy the caller logs them and carries on. (:func:`read_token` refuses symlinks, so the
    name deleted here is the file that was read.)
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            return False
        raise
    return True
