"""JVM tools with only the injected environment: JAVA_TOOL_OPTIONS and the PKCS#12 trust store.

A small Java program is compiled with javac and run with java; it fetches through the relay
with both of the JDK's HTTP clients (HttpURLConnection and java.net.http.HttpClient), over
HTTPS (verified against the trust store made from the super bundle) and plain HTTP. Maven
resolves a parent POM from an HTTPS repository on the test origin.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import tools_fixtures
from tools_fixtures import HELLO, READY_PREFIX, UNTRUSTED, Started, World, start_session

world = tools_fixtures.world

FETCH_JAVA = r"""
import java.io.InputStream;
import java.net.HttpURLConnection;
import java.net.URI;
import java.net.URL;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;

public class Fetch {
    public static void main(String[] args) throws Exception {
        String url = args[1];
        if (args[0].equals("urlconnection")) {
            HttpURLConnection c = (HttpURLConnection) new URL(url).openConnection();
            c.setConnectTimeout(20000);
            c.setReadTimeout(20000);
            try (InputStream in = c.getInputStream()) {
                System.out.print(new String(in.readAllBytes(), "UTF-8"));
            }
        } else {
            HttpClient client = HttpClient.newBuilder()
                .connectTimeout(Duration.ofSeconds(20)).build();
            HttpResponse<String> r = client.send(
                HttpRequest.newBuilder(URI.create(url)).timeout(Duration.ofSeconds(20)).build(),
                HttpResponse.BodyHandlers.ofString());
            System.out.print(r.body());
        }
    }
}
"""


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")


@pytest.fixture(scope="module")
def session(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    started = start_session(world, tmp_path_factory.mktemp("jvm"))
    assert started.ready_line.startswith(READY_PREFIX), started.stop()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def fetch_class(session: Started, tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("javac")
    build = tmp_path_factory.mktemp("java")
    (build / "Fetch.java").write_text(FETCH_JAVA)
    done = subprocess.run(
        ["javac", "Fetch.java"],
        cwd=build,
        env=session.tool_env(build),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return build


def java(
    classes: Path, env: dict[str, str], client: str, url: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["java", "-cp", str(classes), "Fetch", client, url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("client", ["urlconnection", "httpclient"])
def test_java_fetches_https_through_the_relay(
    world: World, session: Started, fetch_class: Path, tmp_path: Path, client: str
) -> None:
    done = java(fetch_class, session.tool_env(tmp_path), client, world.url())
    assert done.returncode == 0, done.stderr
    assert done.stdout == HELLO


@pytest.mark.parametrize("client", ["urlconnection", "httpclient"])
def test_java_fetches_plain_http_through_the_relay(
    world: World, session: Started, fetch_class: Path, tmp_path: Path, client: str
) -> None:
    done = java(fetch_class, session.tool_env(tmp_path), client, world.plain_url())
    assert done.returncode == 0, done.stderr
    assert done.stdout == HELLO


def test_java_rejects_an_untrusted_origin(
    world: World, session: Started, fetch_class: Path, tmp_path: Path
) -> None:
    done = java(fetch_class, session.tool_env(tmp_path), "urlconnection", world.url(UNTRUSTED))
    assert done.returncode != 0
    assert "PKIX path building failed" in done.stderr


def test_java_needs_the_trust_store(
    world: World, session: Started, fetch_class: Path, tmp_path: Path
) -> None:
    """The proxy properties alone reach the origin; the JDK's own roots do not trust it."""
    env = session.tool_env(tmp_path)
    env["JAVA_TOOL_OPTIONS"] = " ".join(
        option
        for option in env["JAVA_TOOL_OPTIONS"].split()
        if not option.startswith("-Djavax.net.ssl.")
    )
    done = java(fetch_class, env, "urlconnection", world.url())
    assert done.returncode != 0
    assert "PKIX path building failed" in done.stderr


def child_pom(world: World) -> str:
    group, artifact, version = tools_fixtures.MAVEN_PARENT
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <parent>
    <groupId>{group}</groupId><artifactId>{artifact}</artifactId><version>{version}</version>
    <relativePath/>
  </parent>
  <artifactId>child</artifactId>
  <packaging>pom</packaging>
  <repositories>
    <repository>
      <id>relay-test</id>
      <url>{world.url("pkgs.test", "/maven2")}</url>
    </repository>
  </repositories>
</project>
"""


def test_maven_resolves_from_an_https_repository(
    world: World, session: Started, tmp_path: Path
) -> None:
    """Maven downloads the parent POM over HTTPS through the relay, TLS verified."""
    need("mvn")
    project = tmp_path / "project"
    project.mkdir()
    (project / "pom.xml").write_text(child_pom(world))
    local_repo = tmp_path / "m2"
    env = session.tool_env(tmp_path)
    done = subprocess.run(
        [
            "mvn",
            "-B",
            "-ntp",
            f"-Dmaven.repo.local={local_repo}",
            "validate",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    group, artifact, version = tools_fixtures.MAVEN_PARENT
    fetched = local_repo.joinpath(*group.split("."), artifact, version, f"{artifact}-{version}.pom")
    assert b"resolved through the relay" in fetched.read_bytes()
