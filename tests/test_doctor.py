"""``upstreamproxy doctor`` against a running session: each verdict from a real tool run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tools_fixtures
from tools_fixtures import (
    BLOCKED,
    UNTRUSTED,
    Started,
    World,
    clean_env,
    cli,
)

from upstreamproxy.bootstrap.doctor import (
    TOOLS,
    TunnelSeen,
    Verdict,
    classify,
    node_honours_env_proxy,
    parse_node_version,
)

# Fixtures shared by the bootstrap tests (conftest.py belongs to the spine tests).
started = tools_fixtures.started
world = tools_fixtures.world


def doctor(
    started: Started, tmp_path: Path, *args: str, path: str | None = None
) -> tuple[int, dict[str, Any], str]:
    env = clean_env(tmp_path, UPSTREAMPROXY_STATE_DIR=str(started.state_dir))
    if path is not None:
        env["PATH"] = path
    done = cli("doctor", "--json", "--timeout", "30", *args, env=env, timeout=120)
    document = json.loads(done.stdout) if done.stdout.startswith("{") else {}
    return done.returncode, document, done.stderr


def verdicts(document: dict[str, Any]) -> dict[str, str]:
    return {r["tool"]: r["verdict"] for r in document["results"]}


def installed(tool: str) -> bool:
    if tool == "java":
        return shutil.which("java") is not None and shutil.which("javac") is not None
    if tool == "apt":
        return shutil.which("apt-get") is not None
    if tool == "python":
        return shutil.which("python3") is not None or shutil.which("python") is not None
    if tool == "pip":
        return shutil.which("pip") is not None or shutil.which("pip3") is not None
    return shutil.which(tool) is not None


def node_is_new() -> bool:
    out = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=10).stdout
    version = parse_node_version(out)
    return version is not None and node_honours_env_proxy(version)


def test_every_installed_tool_reaches_the_origin(
    world: World, started: Started, tmp_path: Path
) -> None:
    rc, document, err = doctor(started, tmp_path, "--url", world.url())
    assert document, err
    seen = verdicts(document)
    assert list(seen) == list(TOOLS)
    for tool in ("curl", "wget", "git", "pip", "npm", "python", "java", "mvn", "apt"):
        assert seen[tool] == ("reached" if installed(tool) else "not-installed"), [
            (r["tool"], r["verdict"], r["detail"]) for r in document["results"]
        ]
    node = next(r for r in document["results"] if r["tool"] == "node")
    if not installed("node"):
        assert node["verdict"] == "not-installed"
    elif node_is_new():
        assert node["verdict"] == "reached"
    else:
        # Node 20's https module ignores HTTPS_PROXY: said honestly, with the fix.
        assert node["verdict"] == "proxy-not-honoured"
        assert "22.21" in node["fix"] and "proxy-aware agent" in node["fix"]
    assert rc == (0 if all(v in ("reached", "not-installed") for v in seen.values()) else 1)
    for result in document["results"]:
        if result["verdict"] == "reached":
            assert result["tunnels"] and result["tunnels"][0]["status"] == 200


def test_plain_http_probes(world: World, started: Started, tmp_path: Path) -> None:
    """``--http-url``: each tool sends an absolute-form request, which the relay forwards."""
    rc, document, err = doctor(
        started,
        tmp_path,
        "--url",
        world.url(),
        "--http-url",
        world.plain_url(),
        "--tools",
        "curl,wget,python,java,mvn,apt",
    )
    assert document, err
    plain = {r["tool"]: r for r in document["http_results"]}
    for tool in ("curl", "wget", "python", "java", "apt"):
        expected = "reached" if installed(tool) else "not-installed"
        assert plain[tool]["verdict"] == expected, plain[tool]
        if expected == "reached":
            assert plain[tool]["tunnels"][0]["plain"] is True
            assert plain[tool]["tunnels"][0]["target"] == f"plain.test:{world.plain_port}"
    assert plain["mvn"]["verdict"] == "not-applicable"
    assert rc == 0, document


def test_plain_http_blocked_by_policy(world: World, started: Started, tmp_path: Path) -> None:
    rc, document, err = doctor(
        started,
        tmp_path,
        "--url",
        f"http://{BLOCKED}:{world.plain_port}/",
        "--tools",
        "curl,wget,python",
    )
    assert rc == 1, err
    for result in document["results"]:
        assert result["verdict"] == "blocked-by-policy", result
        assert "allow" in result["fix"]


def test_blocked_by_policy(started: Started, tmp_path: Path) -> None:
    rc, document, err = doctor(
        started, tmp_path, "--url", f"https://{BLOCKED}/", "--tools", "curl,python"
    )
    assert rc == 1, err
    for result in document["results"]:
        assert result["verdict"] == "blocked-by-policy"
        assert "no-matching-rule" in result["detail"] and "allow" in result["fix"]


def test_tls_trust_failure(world: World, started: Started, tmp_path: Path) -> None:
    rc, document, err = doctor(
        started, tmp_path, "--url", world.url(UNTRUSTED), "--tools", "curl,wget,git,python,java,apt"
    )
    assert rc == 1, err
    for result in document["results"]:
        assert result["verdict"] == "tls-trust-failure", result
        assert str(started.state_dir / "ca-bundle.pem") in result["fix"]


def test_proxy_not_honoured_and_not_installed(
    world: World, started: Started, tmp_path: Path
) -> None:
    # A PATH where "curl" ignores the proxy (as a ~/.curlrc with noproxy would make it) and
    # nothing else but python exists.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    (bin_dir / "curl").write_text(f"#!/bin/sh\nexec {curl} --noproxy '*' \"$@\"\n")
    (bin_dir / "curl").chmod(0o755)
    (bin_dir / "python3").symlink_to(sys.executable)
    rc, document, err = doctor(
        started, tmp_path, "--url", world.url(), "--tools", "curl,npm,python", path=str(bin_dir)
    )
    assert rc == 1, err
    results = {r["tool"]: r for r in document["results"]}
    assert results["curl"]["verdict"] == "proxy-not-honoured"
    assert results["curl"]["tunnels"] == []
    assert "curlrc" in results["curl"]["fix"]
    assert results["npm"]["verdict"] == "not-installed"
    assert results["python"]["verdict"] == "reached"


def test_text_report(world: World, started: Started, tmp_path: Path) -> None:
    env = clean_env(tmp_path, UPSTREAMPROXY_STATE_DIR=str(started.state_dir))
    done = cli("doctor", "--url", world.url(), "--tools", "curl,python", env=env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dumpable: no" in done.stdout
    assert "curl    reached" in done.stdout and "python  reached" in done.stdout
    assert "2 of 2 installed tools reached" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give the URL to probe"),
        (("--url", "ftp://hello.test/"), "must be an https:// or http:// URL"),
        (("--url", "https://x.test/", "--http-url", "https://y.test/"), "must be an http://"),
        (("--url", "https://localhost/"), "matches NO_PROXY"),
        (("--url", "https://x.test/", "--tools", "curl,lynx"), "unknown tool"),
    ],
)
def test_usage_errors(
    started: Started, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    env = clean_env(tmp_path, UPSTREAMPROXY_STATE_DIR=str(started.state_dir))
    done = cli("doctor", *args, env=env)
    assert done.returncode == 2 and message in done.stderr


def test_no_session(tmp_path: Path) -> None:
    done = cli(
        "doctor", "--url", "https://x.test/", "--state-dir", str(tmp_path), env=clean_env(tmp_path)
    )
    assert done.returncode == 1 and "no session is running" in done.stderr


# -- classification, case by case ---------------------------------------------------------------

BUNDLE = "/state/ca-bundle.pem"


@pytest.mark.parametrize(
    ("tool", "rc", "out", "err", "tunnels", "verdict", "in_detail"),
    [
        ("curl", 0, "200", "", [TunnelSeen("h:443", 200)], Verdict.REACHED, "HTTP 200"),
        ("curl", 0, "404", "", [TunnelSeen("h:443", 200)], Verdict.REACHED, "HTTP 404"),
        (
            "wget",
            8,
            "",
            "ERROR 404: Not Found.",
            [TunnelSeen("h:443", 200)],
            Verdict.REACHED,
            "HTTP 404",
        ),
        (
            "wget",
            5,
            "",
            "ERROR: The certificate of 'h' is not trusted.",
            [TunnelSeen("h:443", 200)],
            Verdict.TLS_TRUST_FAILURE,
            "not trusted",
        ),
        (
            "java",
            1,
            "",
            "javax.net.ssl.SSLHandshakeException: PKIX path building failed",
            [TunnelSeen("h:443", 200)],
            Verdict.TLS_TRUST_FAILURE,
            "PKIX",
        ),
        (
            "java",
            0,
            "HTTP 200\n",
            "",
            [TunnelSeen("h:80", 200, plain=True, origin_status=200)],
            Verdict.REACHED,
            "HTTP 200",
        ),
        (
            "apt",
            100,
            "Err:1 https://h ./ InRelease\n  Certificate verification failed",
            "",
            [TunnelSeen("h:443", 200)],
            Verdict.TLS_TRUST_FAILURE,
            "Certificate verification",
        ),
        (
            "apt",
            0,
            "Ign:1 http://h ./ InRelease\nErr:2 http://h ./ Release\n  404  Not Found",
            "",
            [TunnelSeen("h:80", 200, plain=True)],
            Verdict.REACHED,
            "repository answered",
        ),
        (
            "mvn",
            1,
            "Could not find artifact upstreamproxy.doctor:probe:pom:0 in central",
            "",
            [TunnelSeen("h:443", 200)],
            Verdict.REACHED,
            "repository answered",
        ),
        (
            "wget",
            8,
            "",
            "ERROR 403: Forbidden.",
            [TunnelSeen("h:80", 403, "no-matching-rule", plain=True)],
            Verdict.BLOCKED_BY_POLICY,
            "no-matching-rule",
        ),
        (
            "curl",
            56,
            "000",
            "CONNECT tunnel failed, response 403",
            [TunnelSeen("h:443", 403, "no-matching-rule", "-")],
            Verdict.BLOCKED_BY_POLICY,
            "no-matching-rule",
        ),
        (
            "curl",
            56,
            "000",
            "",
            [TunnelSeen("h:443", 407, "bad-credentials")],
            Verdict.FAILED,
            "credentials",
        ),
        (
            "curl",
            56,
            "000",
            "",
            [TunnelSeen("h:443", 502, "cannot reach the egress")],
            Verdict.FAILED,
            "HTTP 502",
        ),
        (
            "curl",
            60,
            "000",
            "curl: (60) SSL certificate problem: unable to get local issuer",
            [TunnelSeen("h:443", 200)],
            Verdict.TLS_TRUST_FAILURE,
            "SSL certificate problem",
        ),
        (
            "git",
            128,
            "",
            "fatal: repository 'https://h/' not found",
            [TunnelSeen("h:443", 200)],
            Verdict.REACHED,
            "not found",
        ),
        (
            "git",
            128,
            "",
            "fatal: unable to access 'https://h/': server certificate verification "
            "failed. CAfile: none",
            [TunnelSeen("h:443", 200)],
            Verdict.TLS_TRUST_FAILURE,
            "verification failed",
        ),
        (
            "pip",
            1,
            "",
            "ERROR: No matching distribution found for upstreamproxy-doctor-probe",
            [TunnelSeen("h:443", 200)],
            Verdict.REACHED,
            "index answered",
        ),
        (
            "pip",
            1,
            "",
            "Could not fetch URL https://h/x/: There was a problem confirming the ssl "
            "certificate: ... SSLError(SSLCertVerificationError(1, '[SSL: "
            "CERTIFICATE_VERIFY_FAILED] ...'))\nERROR: No matching distribution found",
            [TunnelSeen("h:443", 200)],
            Verdict.TLS_TRUST_FAILURE,
            "CERTIFICATE_VERIFY_FAILED",
        ),
        (
            "npm",
            1,
            "",
            "npm error code E404\nnpm error 404 Not Found - GET https://h/x",
            [TunnelSeen("h:443", 200)],
            Verdict.REACHED,
            "E404",
        ),
        (
            "npm",
            1,
            "",
            "npm error code UNABLE_TO_VERIFY_LEAF_SIGNATURE",
            [TunnelSeen("h:443", 200)],
            Verdict.TLS_TRUST_FAILURE,
            "UNABLE_TO_VERIFY",
        ),
        (
            "node",
            1,
            "",
            "ENOTFOUND: getaddrinfo ENOTFOUND h",
            [],
            Verdict.PROXY_NOT_HONOURED,
            "did not use the proxy variables",
        ),
        ("python", 0, "HTTP 200\n", "", [TunnelSeen("h:443", 200)], Verdict.REACHED, "HTTP 200"),
        ("python", 1, "", "URLError: boom", [TunnelSeen("h:443", 200)], Verdict.FAILED, "boom"),
        ("python", None, "", "", [TunnelSeen("h:443", 200)], Verdict.FAILED, "timed out"),
    ],
)
def test_classify(
    tool: str,
    rc: int | None,
    out: str,
    err: str,
    tunnels: list[TunnelSeen],
    verdict: Verdict,
    in_detail: str,
) -> None:
    got, detail, fix = classify(
        tool,
        rc,
        out,
        err,
        tunnels,
        bundle=BUNDLE,
        version="v20.20.2",
        env={"NODE_USE_ENV_PROXY": "1"},
        timeout=5,
    )
    assert got is verdict
    assert in_detail in detail
    assert (fix == "") == (verdict is Verdict.REACHED)


@pytest.mark.parametrize(
    ("version", "honours"),
    [
        ("v20.20.2", False),
        ("v22.20.0", False),
        ("v22.21.0", True),
        ("v23.11.0", False),
        ("v24.4.1", False),
        ("v24.5.0", True),
        ("v25.0.0", True),
    ],
)
def test_node_versions(version: str, honours: bool) -> None:
    parsed = parse_node_version(version)
    assert parsed is not None and node_honours_env_proxy(parsed) is honours
    _, _, fix = classify(
        "node", 1, "", "", [], bundle=BUNDLE, version=version, env={"NODE_USE_ENV_PROXY": "1"}
    )
    assert ("22.21" in fix) is not honours


def test_jvm_version_ignores_the_picked_up_line(
    world: World, started: Started, tmp_path: Path
) -> None:
    """The JVM prints "Picked up JAVA_TOOL_OPTIONS: -Dhttps.proxyHost=127.0.0.1 ..." first."""
    if not installed("java"):
        pytest.skip("no JDK")
    _, document, err = doctor(started, tmp_path, "--url", world.url(), "--tools", "java")
    assert document, err
    version = document["results"][0]["version"]
    assert version and not version.startswith("127."), version


def test_a_probe_that_ends_as_its_timeout_fires_is_a_timeout_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tool's own time limit equals doctor's (curl --max-time): when the timer fires just
    as the tool exits, proc.kill() raised ProcessLookupError out of doctor (a frozen egress)."""
    import asyncio

    from upstreamproxy.bootstrap import doctor as doctor_module

    real_wait_for = asyncio.wait_for

    async def exits_then_times_out(awaitable: Any, timeout: float | None) -> Any:
        await real_wait_for(awaitable, 10)
        raise TimeoutError

    probe = doctor_module.Probe(
        "python", sys.executable, ["-c", "pass"], {}, lambda rc, out, err: None
    )

    async def go() -> doctor_module.ProbeResult:
        monkeypatch.setattr(asyncio, "wait_for", exits_then_times_out)
        return await doctor_module._run_probe(
            probe, {}, "http://127.0.0.1:9", "127.0.0.1", 9, tmp_path, 1.0, "bundle.pem"
        )

    result = asyncio.run(go())  # raised ProcessLookupError
    assert result.tool == "python" and result.verdict is not Verdict.REACHED


HANGING_TOOL = """#!/bin/sh
# A tool whose --version never ends, and whose probe leaves a helper holding its stdout and
# stderr (as git's git-remote-https does, waiting on a silent tunnel) before it hangs too.
echo $$ >> "$HANG_PIDS"
if [ "$1" = --version ]; then exec sleep 120; fi
sleep 120 &
echo $! >> "$HANG_PIDS"
exec sleep 120
"""


def test_a_hanging_tool_and_its_helpers_end_at_the_timeout(
    started: Started, world: World, tmp_path: Path
) -> None:
    """Doctor killed the tool alone at --timeout, then waited for its pipes to close: with a
    helper holding them, it hung for as long as the helper lived (git through a silent
    tunnel: for ever). A --version that hung was left running after doctor had returned."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").write_text(HANGING_TOOL)
    (bin_dir / "curl").chmod(0o755)
    pids = tmp_path / "pids"
    env = clean_env(tmp_path, UPSTREAMPROXY_STATE_DIR=str(started.state_dir))
    env.update(PATH=f"{bin_dir}:{env['PATH']}", HANG_PIDS=str(pids))
    begun = time.monotonic()
    try:
        done = cli(
            "doctor",
            "--url",
            world.url(),
            "--tools",
            "curl",
            "--timeout",
            "2",
            "--json",
            env=env,
            timeout=60,
        )
        took = time.monotonic() - begun
        assert done.returncode == 1, done
        assert json.loads(done.stdout)["results"][0]["verdict"] != "reached"
        assert took < 30, took  # --version's 10 s, then --timeout 2 and a short drain
        time.sleep(0.5)
        left = [pid for pid in map(int, pids.read_text().split()) if _alive(pid)]
        assert left == [], "doctor left the tool's processes running"
    finally:
        for pid in map(int, pids.read_text().split()) if pids.exists() else ():
            with contextlib.suppress(OSError):
                os.kill(pid, 9)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_a_connect_left_unanswered_says_so_and_points_at_the_egress() -> None:
    verdict, detail, fix = classify(
        "curl", None, "", "", [TunnelSeen("h:443", 0)], bundle="b", timeout=3.0
    )
    assert verdict is Verdict.FAILED
    assert detail == "no answer to the CONNECT for h:443 within 3s"  # was "answered no answer"
    assert "egress" in fix and "alive" in fix
