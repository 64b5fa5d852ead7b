"""The egress image, built from the Dockerfile and run as the README shows (marker ``containers``).

Built offline with the classic builder (no BuildKit here): the base image is made with
debootstrap (``--build-arg BASE_IMAGE``) and the project goes in as wheels built on the host
(``wheels/`` in the build context). Run as its non-root uid with a read-only root file system,
host networking with the listeners on 127.0.0.1 only, policy, keys and CA mounted read-only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import TLSFiles, run
from containers import docker, docker_engine, egress_image  # noqa: F401
from fleet import (
    ETC,
    FleetConfig,
    SigningKey,
    container_run_args,
    free_port,
    http_status,
    https_origin,
)

from upstreamproxy.relay import Relay, RelayConfig
from upstreamproxy.secret import Secret
from upstreamproxy.tokens import issue_token

pytestmark = [pytest.mark.containers, pytest.mark.usefixtures("docker_engine")]
DRAIN_GRACE = 15


@pytest.fixture(scope="module")
def image_tag() -> str:
    return egress_image()


def test_image_is_non_root_and_has_only_the_venv(image_tag: str) -> None:
    config = json.loads(docker("image", "inspect", image_tag).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["upstreamproxy", "egress"]
    assert config["Healthcheck"]["Test"][1].startswith("/opt/upstreamproxy/bin/python3")
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["UPSTREAMPROXY_AUDIENCE"] == "upstreamproxy"
    # No pip, no sources, no compiler in the runtime image.
    probe = docker(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "/bin/sh",
        image_tag,
        "-c",
        "ls /opt/upstreamproxy/bin; ls /src 2>&1; command -v gcc cc || true",
    ).stdout
    assert "upstreamproxy" in probe.split()
    assert "pip" not in probe.split() and "No such file" in probe


def container_pid_uid(name: str) -> int:
    pid = docker("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^Uid:\s+(\d+)", status, re.M)
    assert match
    return int(match[1])


async def test_image_runs_read_only_non_root_tunnels_and_drains(
    image_tag: str, tmp_path: Path, tls: TLSFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path.chmod(0o755)
    config = FleetConfig.create(tmp_path, tls.ca.cert_pem(), "localhost")
    port, metrics_port = free_port(), free_port()
    name = f"upstreamproxy-image-{os.getpid()}"
    args = container_run_args(
        image_tag,
        name,
        config,
        port,
        metrics_port,
        [f"--ca-cert={ETC}/ca/ca.pem", f"--drain-grace={DRAIN_GRACE}"],
    )
    docker("rm", "-f", name, check=False)
    docker(*args)
    relay: Relay | None = None
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(150):
            if await http_status(f"{base}/readyz") == 200:
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail(docker("logs", name, check=False).stderr[-3000:])
        assert await http_status(f"{base}/healthz") == 200
        assert await http_status(f"http://127.0.0.1:{metrics_port}/metrics") == 200
        assert container_pid_uid(name) == 10001
        inspect = json.loads(docker("inspect", name).stdout)[0]
        assert inspect["HostConfig"]["ReadonlyRootfs"] is True
        # Listening on loopback only, though the network is the host's.
        listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
        for p in (port, metrics_port):
            addresses = {
                line.split()[3]
                for line in listening.splitlines()
                if line.split()[3].endswith(f":{p}")
            }
            assert addresses == {f"127.0.0.1:{p}"}, addresses
        # The image's HEALTHCHECK command, run where Docker runs it.
        test = inspect["Config"]["Healthcheck"]["Test"]
        assert test[0] == "CMD"
        docker("exec", name, *test[1:])
        # The CA endpoint serves the mounted ca.pem.
        ca = await run("curl", "-sS", "--noproxy", "*", f"{base}/v1/code/upstreamproxy/ca-cert")
        assert ca.stdout == tls.ca.cert_pem()

        key: SigningKey = config.signing[0]
        token = key.token("image-session")
        relay = Relay(
            RelayConfig(
                egress_url=f"ws://127.0.0.1:{port}/v1/code/upstreamproxy/ws",
                session_id="image-session",
                token=Secret(token),
            )
        )
        await relay.start()
        async with https_origin(tls.server_context()) as origin_port:
            url = f"https://localhost:{origin_port}"
            curl = ["curl", "-sS", "--cacert", str(tls.ca_file), "-x", relay.proxy_url, "-p"]
            done = await run(*curl, "-o", "/dev/null", "-w", "%{http_code}", f"{url}/bytes/100000")
            assert done.stdout == b"200", done.stderr
            # A token for another audience: refused at the upgrade with the reason in the log.
            other = Relay(
                RelayConfig(
                    egress_url=f"ws://127.0.0.1:{port}/v1/code/upstreamproxy/ws",
                    session_id="other",
                    token=Secret(_token_for_audience(key, "someone-else")),
                )
            )
            await other.start()
            try:
                refused = await run(
                    *curl[:4],
                    "-x",
                    other.proxy_url,
                    "-p",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    f"{url}/bytes/10",
                )
                assert refused.returncode != 0
            finally:
                await other.stop()
            for _ in range(50):  # the container's log reaches `docker logs` a moment later
                if "wrong-audience" in docker("logs", name).stderr:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("no `wrong-audience` line in the egress log")

            # SIGTERM during a long download: readiness 503 at once, the download finishes,
            # the container exits 0 well within the grace.
            download = asyncio.ensure_future(
                run(
                    *curl,
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{size_download}",
                    f"{url}/slow/4/300000",
                    timeout=60,
                )
            )
            await asyncio.sleep(1.5)
            started = time.monotonic()
            docker("kill", "--signal", "TERM", name)
            for _ in range(50):
                if await http_status(f"{base}/readyz") == 503:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("readiness did not turn 503 after SIGTERM")
            result = await download
            assert result.stdout == b"200 300000", result.stderr
            code = docker("wait", name, timeout=DRAIN_GRACE + 30).stdout.strip()
            took = time.monotonic() - started
            with capsys.disabled():
                print(f"\n[image] drained and exited {code} in {took:.1f}s after SIGTERM")
            assert code == "0" and took < DRAIN_GRACE
            logs = docker("logs", name).stderr
            assert "draining" in logs
            assert token.rsplit(".", 1)[-1] not in logs
    finally:
        if relay is not None:
            await relay.stop()
        docker("rm", "-f", name, check=False)


def _token_for_audience(key: SigningKey, audience: str) -> str:
    return issue_token(
        key.private,  # type: ignore[arg-type]
        key.kid,
        "other",
        "default",
        audience,
        900,
        time.time(),
    )
