"""A real Docker engine and locally made images for the container tests.

There is no image registry here, so base images are made from Debian's packages with
``debootstrap`` and ``docker import``; the project goes in as wheels built on the host.
Containers use host networking only (the engine runs with ``--bridge=none``), so every byte
stays on loopback. Tests that need the engine use the ``docker_engine`` fixture, which says why
they cannot run when no engine can be had (``.ci/run`` starts one).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Cached artefacts (wheels, rootfs tarballs) shared by the container tests of one machine.
CACHE = Path(os.environ.get("UPSTREAMPROXY_TEST_CACHE", "/var/tmp/upstreamproxy-test-cache"))
DEBIAN_SUITE = "bookworm"
#: What every test base image has: a Python to install the wheels into, and TLS roots.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
ENGINE_WAIT = 60.0


def _run(*args: str, timeout: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        check=True,
        text=True,
        capture_output=True,
        timeout=timeout,
        **kw,  # type: ignore[call-overload]
    )


def engine_problem() -> str | None:
    """Why no Docker engine can be used here, or None when ``docker info`` answers."""
    if shutil.which("docker") is None:
        return "no docker client (Debian package docker.io)"
    try:
        subprocess.run(["docker", "info"], check=True, capture_output=True, timeout=20)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"no Docker engine answers `docker info` ({type(exc).__name__}); .ci/run starts one"
    return None


def debian_mirror() -> str:
    """The Debian mirror apt already uses on this machine (the only registry we may reach)."""
    for path in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if path.is_file():
            match = re.search(r"(?:URIs:|deb)\s+(https?://\S+/debian)\b", path.read_text())
            if match:
                return match.group(1)
    return "http://deb.debian.org/debian"


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def base_image(tag: str, packages: tuple[str, ...] = ()) -> str:
    """A Debian image made with debootstrap (``minbase`` + BASE_PACKAGES + ``packages``).

    Built once per machine and tag; the tag should name the package set.
    """
    if image_exists(tag):
        return tag
    if shutil.which("debootstrap") is None:
        pytest.fail("debootstrap is missing (Debian package debootstrap; .ci/run installs it)")
    include = ",".join(dict.fromkeys(BASE_PACKAGES + packages))
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir="/var/tmp") as rootfs:
        _run(
            "debootstrap",
            "--variant=minbase",
            f"--include={include}",
            DEBIAN_SUITE,
            rootfs,
            debian_mirror(),
            timeout=900,
        )
        # The image's own apt must not try to reach anything; tests never run apt inside it.
        shutil.rmtree(Path(rootfs, "var/cache/apt/archives"), ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        subprocess.run(
            ["docker", "import", "-", tag],
            stdin=tar.stdout,
            check=True,
            capture_output=True,
            timeout=600,
        )
        tar.wait(timeout=60)
    return tag


def project_wheels() -> Path:
    """Wheels of the project and every runtime dependency, built on the host (cached by source).

    Built for the host's Python: the test images' Python must match (Debian 12 has 3.11).
    """
    stamp = (
        subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or "nogit"
    )
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "upstreamproxy", "pyproject.toml"],
        capture_output=True,
        text=True,
    ).stdout
    dest = CACHE / "wheels" / (stamp + ("-dirty" if dirty else ""))
    if dirty or not (dest / ".complete").exists():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        _run(sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(dest), str(ROOT))
        (dest / ".complete").touch()
    return dest


def docker(
    *args: str, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the docker client; on failure the error carries its stderr."""
    proc = subprocess.run(["docker", *args], text=True, capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args[:3])}... failed ({proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def wait_for(predicate: object, deadline: float, what: str) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {deadline:.0f}s waiting for {what}")


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """Skip (saying why) where no engine can be had; CI always has one."""
    problem = engine_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)


#: The test base for the egress image: Debian's Python (3.11, like the host's wheels).
EGRESS_BASE = "upstreamproxy-test/bookworm:base"
#: What of the repository goes into the image's build context (the .dockerignore admits these).
IMAGE_CONTEXT = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "upstreamproxy")


def build_context(dest: Path, wheels: Path | None) -> Path:
    """The repository's build context in ``dest``, plus ``wheels/`` for an offline build."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in IMAGE_CONTEXT:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest / name)
    if wheels is not None:
        shutil.copytree(wheels, dest / "wheels", ignore=shutil.ignore_patterns(".complete"))
    return dest


def build_command(context: Path, tag: str, base: str) -> list[str]:
    """The README's offline build line: the classic builder, the base as a build argument."""
    return ["docker", "build", "--build-arg", f"BASE_IMAGE={base}", "-t", tag, str(context)]


def egress_image() -> str:
    """The egress image built offline from the Dockerfile (cached per wheel set)."""
    wheels = project_wheels()
    tag = f"upstreamproxy-test/egress:{wheels.name[:20]}"
    dockerfile = hashlib.sha256((ROOT / "Dockerfile").read_bytes()).hexdigest()[:12]
    tag += f"-{dockerfile}"
    if image_exists(tag) and not wheels.name.endswith("-dirty"):
        return tag
    base = base_image(EGRESS_BASE)
    with tempfile.TemporaryDirectory(prefix="egress-context-", dir="/var/tmp") as tmp:
        context = build_context(Path(tmp) / "context", wheels)
        command = build_command(context, tag, base)
        proc = subprocess.run(
            command,
            text=True,
            capture_output=True,
            timeout=900,
            env=os.environ | {"DOCKER_BUILDKIT": "0"},
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
    # Older builds (other commits) are not needed again: keep the cache to one image.
    repo = tag.split(":")[0]
    listed = docker("images", repo, "--format", "{{.Repository}}:{{.Tag}}", check=False)
    for old in set(listed.stdout.split()) - {tag}:
        docker("rmi", old, check=False)  # an image a container still uses stays
    return tag
