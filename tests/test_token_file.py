"""Reading and deleting the session token file."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from upstreamproxy.bootstrap.token_file import (
    MAX_TOKEN_FILE_SIZE,
    TokenFile,
    delete_token_file,
    read_token,
)
from upstreamproxy.errors import ConfigError

TOKEN = "tok-0123456789abcdef-SECRET"


def write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def assert_no_leak(result: TokenFile | Exception, secret: str = TOKEN) -> None:
    text = repr(result) + str(result)
    if isinstance(result, TokenFile):
        text += " ".join([str(result.reason), *result.warnings])
    assert secret not in text
    assert secret[:8] not in text


@pytest.mark.parametrize(
    "data",
    [
        TOKEN.encode(),
        (TOKEN + "\n").encode(),
        (TOKEN + "\r\n").encode(),
        ("  " + TOKEN + " \n\n").encode(),
        ("\t" + TOKEN).encode(),
    ],
)
def test_reads_token_and_strips_surrounding_whitespace(tmp_path: Path, data: bytes) -> None:
    result = read_token(write(tmp_path / "token", data))
    assert result.token is not None
    assert result.token.reveal() == TOKEN
    assert result.reason is None
    assert result.warnings == ()
    assert_no_leak(result)


def test_missing_file_disables(tmp_path: Path) -> None:
    result = read_token(tmp_path / "absent")
    assert result.token is None
    assert result.reason is not None and "does not exist" in result.reason


def test_missing_parent_disables(tmp_path: Path) -> None:
    write(tmp_path / "file", b"x")
    result = read_token(tmp_path / "file" / "token")
    assert result.token is None


@pytest.mark.parametrize(("data", "reason"), [(b"", "is empty"), (b" \n\t\r\n", "only whitespace")])
def test_empty_or_blank_file_disables(tmp_path: Path, data: bytes, reason: str) -> None:
    result = read_token(write(tmp_path / "token", data))
    assert result.token is None
    assert result.reason is not None and reason in result.reason


@pytest.mark.parametrize(
    "data",
    [
        b"tok en",
        b"tok\ten",
        b"tok\nen",
        b"tok\x00en",
        b"tok\x1ben",
        b"tok\x7fen",
        "tök".encode(),
        b"\xff\xfe",
    ],
)
def test_malformed_token_is_refused_without_echoing_it(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path / "token", TOKEN.encode() + data)
    with pytest.raises(ConfigError) as info:
        read_token(path)
    assert str(path) in info.value.field
    assert_no_leak(info.value)


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "token", b"a" * (MAX_TOKEN_FILE_SIZE + 1))
    with pytest.raises(ConfigError, match="larger than"):
        read_token(path)
    # exactly at the limit is fine
    write(path, b"a" * MAX_TOKEN_FILE_SIZE)
    result = read_token(path)
    assert result.token is not None and len(result.token.reveal()) == MAX_TOKEN_FILE_SIZE


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_group_or_world_readable_file_warns(tmp_path: Path, mode: int) -> None:
    result = read_token(write(tmp_path / "token", TOKEN.encode(), mode))
    assert result.token is not None
    assert len(result.warnings) == 1
    assert f"{mode:04o}" in result.warnings[0]
    assert_no_leak(result)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_file_does_not_warn(tmp_path: Path, mode: int) -> None:
    assert read_token(write(tmp_path / "token", TOKEN.encode(), mode)).warnings == ()


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        read_token(tmp_path)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            read_token(fifo)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "read_token blocked on a FIFO"
    assert isinstance(outcome[0], ConfigError)


def test_symlink_is_refused_and_nothing_is_deleted(tmp_path: Path) -> None:
    # Deleting the link would leave the target (a copy of the token) behind; deleting the
    # target would let whoever writes the link's directory aim a root start at any file.
    target = write(tmp_path / "real-token", TOKEN.encode())
    (tmp_path / "token").symlink_to("real-token")
    with pytest.raises(ConfigError, match="is a symbolic link") as info:
        read_token(tmp_path / "token")
    assert "real-token" in str(info.value) and TOKEN not in str(info.value)
    assert target.exists() and (tmp_path / "token").is_symlink()


def test_kubernetes_layout_works_through_the_data_directory(tmp_path: Path) -> None:
    # Kubernetes secret volumes: token -> ..data/token, ..data -> ..2026_01_01_00_00_00.1
    # A link among the *directories* is fine: <mount>/..data/token is a regular file.
    (tmp_path / "..2026_01_01").mkdir()
    write(tmp_path / "..2026_01_01" / "token", TOKEN.encode())
    (tmp_path / "..data").symlink_to("..2026_01_01")
    (tmp_path / "token").symlink_to("..data/token")
    with pytest.raises(ConfigError, match=r"\.\.data/<key>"):
        read_token(tmp_path / "token")
    result = read_token(tmp_path / "..data" / "token")
    assert result.token is not None and result.token.reveal() == TOKEN


def test_hard_links_warn(tmp_path: Path) -> None:
    path = write(tmp_path / "token", TOKEN.encode())
    os.link(path, tmp_path / "copy")
    result = read_token(path)
    assert result.token is not None
    assert any("2 hard links" in w for w in result.warnings)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        path = write(tmp_path / "token", TOKEN.encode(), 0o000)
        with pytest.raises(ConfigError, match="cannot open"):
            read_token(path)
        return
    # Root reads any file, so read it as an unprivileged user, as a sandbox would.
    import shutil
    import subprocess
    import sys
    import tempfile

    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed to drop privileges"
    base = Path(tempfile.mkdtemp(prefix="token-perm-"))
    try:
        base.chmod(0o755)
        path = write(base / "token", TOKEN.encode(), 0o000)
        code = (
            "import sys\n"
            "from upstreamproxy.bootstrap.token_file import read_token\n"
            "from upstreamproxy.errors import ConfigError\n"
            "try:\n"
            f"    read_token({str(path)!r})\n"
            "except ConfigError as exc:\n"
            "    print(exc)\n"
            "    sys.exit(0)\n"
            "sys.exit(1)\n"
        )
        repo = str(Path(__file__).resolve().parent.parent)
        result = subprocess.run(
            [
                setpriv,
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-c",
                code,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
            env={"PYTHONPATH": repo, "PATH": os.environ["PATH"]},
        )
        assert result.returncode == 0, result.stderr
        assert "cannot open" in result.stdout
        assert TOKEN not in result.stdout + result.stderr
    finally:
        shutil.rmtree(base)


def test_delete_token_file(tmp_path: Path) -> None:
    path = write(tmp_path / "token", TOKEN.encode())
    assert delete_token_file(path) is True
    assert not path.exists()
    assert delete_token_file(path) is False  # already gone is fine
    assert delete_token_file(tmp_path / "nope" / "token") is False


def test_delete_removes_a_link_not_its_target(tmp_path: Path) -> None:
    target = write(tmp_path / "real", TOKEN.encode())
    (tmp_path / "token").symlink_to(target)
    assert delete_token_file(tmp_path / "token") is True
    assert target.exists()


def test_delete_other_failures_raise(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        delete_token_file(tmp_path)  # a directory: EISDIR/EPERM, not "already gone"


@given(
    st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=200
    )
)
def test_any_printable_ascii_token_round_trips(
    tmp_path_factory: pytest.TempPathFactory, token: str
) -> None:
    path = tmp_path_factory.mktemp("tok") / "token"
    write(path, token.encode() + b"\n")
    result = read_token(path)
    assert result.token is not None and result.token.reveal() == token


@given(st.binary(max_size=300))
def test_arbitrary_bytes_read_or_raise_config_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("tok") / "token"
    write(path, data)
    try:
        result = read_token(path)
    except ConfigError:
        return
    if result.token is None:
        assert not data.strip()
    else:
        assert result.token.reveal().encode() == data.strip(b" \t\r\n\v\f")
