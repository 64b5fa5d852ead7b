"""Real apt through relay and egress, from a tiny repository the test builds, over plain HTTP
(``http_proxy``, forwarded by the relay) and HTTPS (``APT_CONFIG`` names the CA bundle).

The repository holds one package made with ``dpkg-deb``, indexed with ``dpkg-scanpackages``
(dpkg-dev) and described by a Release file; sources are marked ``[trusted=yes]`` (the
test does not sign). apt runs with only the injected environment; every ``-o`` option below
moves apt's state, cache, sources, preferences and log into a scratch directory, so the
machine's own apt state is never read for sources nor written.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import tools_fixtures
from tools_fixtures import READY_PREFIX, Started, World, start_session

world = tools_fixtures.world

PACKAGE = "upstreamproxy-demo"
VERSION = "1.0"
PAYLOAD = "installed by apt through the relay\n"


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")


def build_repository(root: Path) -> Path:
    """A flat repository (``deb URL ./``) in ``root``: pool/*.deb, Packages(.gz), Release."""
    work = root.parent / "pkg-build"
    (work / "DEBIAN").mkdir(parents=True)
    (work / "DEBIAN" / "control").write_text(
        f"Package: {PACKAGE}\nVersion: {VERSION}\nArchitecture: all\n"
        "Maintainer: upstreamproxy tests <tests@example.invalid>\n"
        "Description: a package fetched through the relay\n"
    )
    share = work / "usr" / "share" / PACKAGE
    share.mkdir(parents=True)
    (share / "hello.txt").write_text(PAYLOAD)
    (root / "pool").mkdir(parents=True)
    deb = root / "pool" / f"{PACKAGE}_{VERSION}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(work), str(deb)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    packages = subprocess.run(
        ["dpkg-scanpackages", "--multiversion", "pool", "/dev/null"],
        cwd=root,
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    (root / "Packages").write_bytes(packages)
    (root / "Packages.gz").write_bytes(gzip.compress(packages))
    lines = [
        "Origin: upstreamproxy-tests",
        "Label: upstreamproxy-tests",
        "Suite: stable",
        "Codename: tests",
        "Date: Thu, 01 Jan 2026 00:00:00 UTC",
        "Architectures: all amd64 arm64",
        "SHA256:",
    ]
    for name in ("Packages", "Packages.gz"):
        data = (root / name).read_bytes()
        lines.append(f" {hashlib.sha256(data).hexdigest()} {len(data)} {name}")
    (root / "Release").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def session(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    need("dpkg-deb")
    need("dpkg-scanpackages")
    build_repository(world.www / "repo")
    started = start_session(world, tmp_path_factory.mktemp("apt"))
    assert started.ready_line.startswith(READY_PREFIX), started.stop()
    yield started
    started.stop()


def apt_options(scratch: Path, source: str) -> list[str]:
    """Everything apt reads or writes moved under ``scratch`` (nothing of the machine's)."""
    for sub in ("state/lists/partial", "cache/archives/partial", "etc/preferences.d", "log"):
        (scratch / sub).mkdir(parents=True, exist_ok=True)
    (scratch / "state" / "status").write_text("")
    (scratch / "etc" / "sources.list").write_text(source + "\n")
    settings = {
        "Dir::State": scratch / "state",
        "Dir::State::status": scratch / "state" / "status",
        "Dir::Cache": scratch / "cache",
        "Dir::Etc::SourceList": scratch / "etc" / "sources.list",
        "Dir::Etc::SourceParts": scratch / "etc" / "sources.list.d",
        "Dir::Etc::Preferences": scratch / "etc" / "preferences",
        "Dir::Etc::PreferencesParts": scratch / "etc" / "preferences.d",
        "Dir::Log": scratch / "log",
        "Debug::NoLocking": "1",
        # pytest's temporary directories are 0700: the _apt user could not write into them.
        "APT::Sandbox::User": "root",
        "Acquire::Retries": "0",
        "Acquire::http::Timeout": "30",
        "Acquire::https::Timeout": "30",
    }
    options: list[str] = []
    for key, value in settings.items():
        options += ["-o", f"{key}={value}"]
    return options


def apt_get(
    options: list[str], env: dict[str, str], cwd: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["apt-get", "-q", *options, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )


def machine_lists() -> set[str]:
    lists = Path("/var/lib/apt/lists")
    return {p.name for p in lists.iterdir()} if lists.is_dir() else set()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_apt_update_and_download_through_the_relay(
    world: World, session: Started, tmp_path: Path, scheme: str
) -> None:
    need("apt-get")
    url = (
        world.plain_url("deb.test", "/files/repo")
        if scheme == "http"
        else world.url("pkgs.test", "/files/repo")
    )
    options = apt_options(tmp_path / "apt", f"deb [trusted=yes] {url} ./")
    env = session.tool_env(tmp_path)
    before = machine_lists()

    update = apt_get(options, env, tmp_path, "update")
    assert update.returncode == 0, update.stdout + update.stderr
    assert "Err:" not in update.stdout and "W:" not in update.stderr, update.stdout + update.stderr
    lists = [p.name for p in (tmp_path / "apt" / "state" / "lists").iterdir()]
    assert any(name.endswith("_Packages") or "Packages" in name for name in lists), lists

    download = apt_get(options, env, tmp_path, "download", PACKAGE)
    assert download.returncode == 0, download.stdout + download.stderr
    deb = tmp_path / f"{PACKAGE}_{VERSION}_all.deb"
    contents = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True, timeout=30
    ).stdout
    assert PAYLOAD.encode() in contents

    # Nothing landed in the machine's own lists.
    assert machine_lists() == before


def test_apt_install_download_only(world: World, session: Started, tmp_path: Path) -> None:
    """``apt-get install`` resolves and fetches into the scratch cache (no dpkg run)."""
    need("apt-get")
    options = apt_options(
        tmp_path / "apt", f"deb [trusted=yes] {world.plain_url('deb.test', '/files/repo')} ./"
    )
    env = session.tool_env(tmp_path)
    assert apt_get(options, env, tmp_path, "update").returncode == 0
    install = apt_get(options, env, tmp_path, "install", "-y", "--download-only", PACKAGE)
    assert install.returncode == 0, install.stdout + install.stderr
    archives = tmp_path / "apt" / "cache" / "archives"
    assert (archives / f"{PACKAGE}_{VERSION}_all.deb").is_file()


def test_apt_https_needs_the_apt_config(world: World, session: Started, tmp_path: Path) -> None:
    """Without APT_CONFIG, apt's https method trusts only the system store: the update fails."""
    need("apt-get")
    options = apt_options(
        tmp_path / "apt", f"deb [trusted=yes] {world.url('pkgs.test', '/files/repo')} ./"
    )
    env = session.tool_env(tmp_path)
    del env["APT_CONFIG"]
    update = apt_get(options, env, tmp_path, "update")
    output = update.stdout + update.stderr
    assert "Err:" in output or update.returncode != 0, output
    assert "certificate" in output.lower(), output
