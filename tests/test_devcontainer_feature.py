"""The Dev Container Feature's files, checked without an engine (the real thing runs in
tests/test_devcontainer.py, marker ``containers``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = ROOT / "env"
FEATURE = ENV / "devcontainer-features" / "upstreamproxy"


def feature() -> dict[str, object]:
    document: dict[str, object] = json.loads((FEATURE / "devcontainer-feature.json").read_text())
    return document


@pytest.mark.parametrize("name", ["upstreamproxy-start.sh", "profile.d/upstreamproxy.sh"])
def test_the_features_copies_are_the_env_files(name: str) -> None:
    """A Feature is installed from its folder alone, so it carries copies; they must not drift."""
    assert (FEATURE / name).read_bytes() == (ENV / name).read_bytes(), (
        f"env/devcontainer-features/upstreamproxy/{name} differs from env/{name}: "
        f"cp env/{name} env/devcontainer-features/upstreamproxy/{name}"
    )


def test_feature_metadata_follows_the_convention() -> None:
    document = feature()
    assert document["id"] == FEATURE.name  # a Feature's id is its folder's name
    assert re.fullmatch(r"\d+\.\d+\.\d+", str(document["version"]))
    assert document["entrypoint"] == "/usr/local/share/upstreamproxy/entrypoint.sh"
    assert document["postStartCommand"] == "/usr/local/share/upstreamproxy/poststart.sh"
    # installsAfter would make the devcontainers CLI fetch those Features: no offline use.
    assert "installsAfter" not in document and "dependsOn" not in document
    assert document["containerEnv"] == {"UPSTREAMPROXY_STATE_DIR": "/run/upstreamproxy"}
    for script in ("install.sh", "entrypoint.sh", "poststart.sh"):
        path = FEATURE / script
        assert path.stat().st_mode & 0o111, f"{script} must be executable"
        for shell in ("sh", "bash"):
            subprocess.run([shell, "-n", str(path)], check=True)
    options = document["options"]
    assert isinstance(options, dict)
    for name, option in options.items():
        assert option["type"] in ("string", "boolean"), name
        assert "default" in option and option["description"], name


def test_every_option_reaches_install_sh_and_a_real_setting() -> None:
    """Options arrive as upper-case variables; each one but version/source becomes an
    ``UPSTREAMPROXY_*`` default that ``upstreamproxy start`` reads."""
    install = (FEATURE / "install.sh").read_text()
    options = feature()["options"]
    assert isinstance(options, dict)
    mapped = {}  # UPSTREAMPROXY_* setting -> the option variable it is written from
    for line in install.splitlines():
        settings = re.findall(r"UPSTREAMPROXY_\w+", line)
        sources = re.findall(r'"\$(?:\(quote "\$)?([A-Z]+)"', line)
        if settings and sources:
            mapped[settings[0]] = sources[0]
    mapped["UPSTREAMPROXY_FAIL_CLOSED"] = "FAILCLOSED"  # via a normalised boolean
    for option in options:
        variable = re.sub(r"[^A-Za-z0-9_]", "_", option).upper()
        assert f"{variable}=${{{variable}" in install, f"install.sh ignores option {option}"
        if option not in ("version", "source"):
            assert variable in mapped.values() or variable == "FAILCLOSED", option
    done = subprocess.run(
        [sys.executable, "-m", "upstreamproxy", "start", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    known = set(re.findall(r"UPSTREAMPROXY_\w+", done.stdout))
    assert set(mapped) <= known, set(mapped) - known


def test_devcontainer_example_uses_the_feature() -> None:
    document = json.loads((ENV / "devcontainer.json").read_text())
    assert "./upstreamproxy" in document["features"]
    assert set(document["features"]["./upstreamproxy"]) <= set(feature()["options"])  # type: ignore[arg-type]
    assert document["init"] is True  # a reaping PID 1
    assert "postStartCommand" not in document  # the Feature's entrypoint starts the session
    (mount,) = document["mounts"]
    assert "target=/run/secrets/upstreamproxy," in mount  # the tokenFile default's directory
    assert document["remoteUser"] == "vscode"


def test_env_readme_snippet_is_what_the_container_test_builds() -> None:
    text = (ENV / "README.md").read_text()
    section = text.split("## Installing into a sandbox image", 1)[1].split("\n## ", 1)[0]
    assert "pip wheel --wheel-dir env/devcontainer-features/upstreamproxy/wheels ." in section
    assert "env/devcontainer-features/upstreamproxy\n" in section  # the build context
    assert "RUN SOURCE=wheels /tmp/upstreamproxy-feature/install.sh" in section
    test = (ROOT / "tests" / "test_devcontainer.py").read_text()
    assert "readme_dockerfile()" in test
