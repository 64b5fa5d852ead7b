"""The Dev Container Feature in real containers (marker ``containers``: ``pytest -m containers``).

The image is what ``env/README.md`` says to build: the Dockerfile in its "Installing into a
sandbox image" section, run verbatim on a local Debian 12 base (debootstrap, no registry)
with the Feature's folder as the build context and the project's host-built wheels in it.
On the host, the loopback world of tools_fixtures: an HTTPS origin whose certificate the
*egress* CA signed, and the real egress. Containers use host networking only, so the relay
in the container reaches the egress on the host's 127.0.0.1 and nothing leaves loopback.

Every tool runs as the container's non-root user ``vscode``; the session is started by the
Feature's entrypoint as root, as in a dev container. Each tool call either works through the
relay or, with no live session, gets no proxy settings at all (never a dead proxy).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from containers import (
    CACHE,
    base_image,
    docker,
    docker_engine,
    image_exists,
    project_wheels,
    wait_for,
)
from tools_fixtures import HELLO, SESSION_ID, TOKEN, World, world, write_token

pytestmark = pytest.mark.containers
__all__ = ["docker_engine", "world"]  # fixtures used by name

ROOT = Path(__file__).resolve().parent.parent
FEATURE = ROOT / "env" / "devcontainer-features" / "upstreamproxy"
ENV_README = ROOT / "env" / "README.md"
BASE_TAG = "upstreamproxy-test/devcontainer-base:bookworm-1"
BASE_EXTRA = ("curl", "git", "sudo", "procps")
USER = "vscode"
STATE = "/run/upstreamproxy"
TOKEN_DIR = "/run/secrets/upstreamproxy"
READY = re.compile(r"ready: relay http://127\.0\.0\.1:\d+ -> ")


# -- the image ------------------------------------------------------------------------------------


def readme_dockerfile() -> str:
    """The ``dockerfile`` block of env/README.md's "Installing into a sandbox image"."""
    text = ENV_README.read_text()
    section = text.split("## Installing into a sandbox image", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```dockerfile\n(.*?)```", section, re.S)
    assert match, "env/README.md lost its Dockerfile snippet"
    return match.group(1)


def _tree_digest(digest: hashlib._Hash, base: Path) -> None:
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        if "__pycache__" in path.parts or path.name.endswith((".pyc", ".pyo")):
            continue
        digest.update(str(path.relative_to(base)).encode() + b"\0" + path.read_bytes() + b"\0")


@pytest.fixture(scope="module")
def image(docker_engine: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The dev container image, cached by the hash of everything that goes into it."""
    base = base_image(BASE_TAG, BASE_EXTRA)
    dockerfile = readme_dockerfile()
    dockerfile, count = re.subn(r"(?m)^FROM \S+", f"FROM {base}", dockerfile, count=1)
    assert count == 1
    wheels = project_wheels()
    digest = hashlib.sha256(dockerfile.encode())
    _tree_digest(digest, FEATURE)
    _tree_digest(digest, ROOT / "upstreamproxy")
    digest.update((ROOT / "pyproject.toml").read_bytes())
    digest.update("\n".join(sorted(p.name for p in wheels.glob("*.whl"))).encode())
    digest.update(docker("image", "inspect", "-f", "{{.Id}}", base).stdout.encode())
    tag = f"upstreamproxy-test/devcontainer:{digest.hexdigest()[:16]}"
    if image_exists(tag):
        return tag
    context = tmp_path_factory.mktemp("feature-context")
    shutil.copytree(FEATURE, context, dirs_exist_ok=True)
    shutil.copytree(wheels, context / "wheels", ignore=shutil.ignore_patterns(".complete"))
    (context.parent / f"{context.name}.Dockerfile").write_text(dockerfile)
    docker(
        "build",
        "-q",
        "-t",
        tag,
        "-f",
        str(context.parent / f"{context.name}.Dockerfile"),
        str(context),
        timeout=900,
    )
    return tag


# -- containers -----------------------------------------------------------------------------------


@dataclass
class Container:
    name: str
    token_dir: Path
    world: World

    def exec(
        self, *argv: str, user: str = USER, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        flags = ["-u", user]
        for key, value in (env or {}).items():
            flags += ["-e", f"{key}={value}"]
        return docker("exec", *flags, self.name, *argv, timeout=timeout, check=False)

    def sh(self, script: str, user: str = USER, flags: str = "-lc") -> str:
        """Run ``script`` in bash (a login shell by default); its stdout, asserting success."""
        done = self.exec("bash", flags, script, user=user)
        assert done.returncode == 0, f"{script!r}: {done.stdout}\n{done.stderr}"
        return done.stdout

    def logs(self) -> str:
        done = docker("logs", self.name, check=False)
        return done.stdout + done.stderr

    def restart(self) -> None:
        docker("restart", "-t", "1", self.name, timeout=120)

    def provision_token(self, mode: int = 0o600) -> None:
        """What the platform does before each start: a fresh token in the mounted directory."""
        write_token(self.token_dir / "token").chmod(mode)

    def start_pid(self) -> list[str]:
        return self.exec("cat", f"{STATE}/start.pid").stdout.split()

    def proxy_env(self, flags: str = "-lc") -> str:
        """HTTPS_PROXY as a new shell of the user sees it ("unset" when there is none)."""
        return self.sh('printf %s "${HTTPS_PROXY-unset}"', flags=flags)

    def curl(self, name: str = "hello.test") -> str:
        return self.sh(f"curl -sS --max-time 20 {self.world.url(name)}")

    def process_state(self, pid: int) -> str:
        stat = self.exec("cat", f"/proc/{pid}/stat", user="root").stdout
        return stat.rsplit(")", 1)[1].split()[0] if stat else "gone"

    def zombies(self) -> list[str]:
        out = self.exec("ps", "-eo", "stat=,pid=,ppid=,comm=", user="root").stdout
        return [line for line in out.splitlines() if line.strip().startswith("Z")]


OUTCOME = re.compile(r"ready: |proxy disabled|start failed")


def wait_for_outcome(container: Container, count: int = 1) -> str:
    """Wait until the entrypoint has reported ``count`` outcomes in all; return the logs."""
    wait_for(
        lambda: len(OUTCOME.findall(container.logs())) >= count,
        90,
        f"outcome #{count} in `docker logs {container.name}`",
    )
    return container.logs()


@dataclass
class Launcher:
    image: str
    world: World
    base: Path
    names: list[str]

    def _args(self, container: Container, ro: bool, extra: tuple[str, ...]) -> list[str]:
        mount = f"{container.token_dir}:{TOKEN_DIR}" + (":ro" if ro else "")
        return [
            "--name",
            container.name,
            "--network",
            "host",
            "-e",
            f"UPSTREAMPROXY_EGRESS_URL={self.world.egress_url}",
            "-e",
            f"UPSTREAMPROXY_SESSION_ID={SESSION_ID}",
            "-v",
            mount,
            *extra,
            self.image,
        ]

    def _container(self, token_mode: int | None, token_uid: int) -> Container:
        name = f"upstreamproxy-dc-{uuid.uuid4().hex[:10]}"
        token_dir = self.base / name
        token_dir.mkdir(mode=0o700)
        os.chown(token_dir, token_uid, token_uid)
        container = Container(name, token_dir, self.world)
        if token_mode is not None:
            container.provision_token(token_mode)
            os.chown(token_dir / "token", token_uid, token_uid)
        self.names.append(name)
        return container

    def start(self, *extra: str, token_mode: int | None = 0o600, ro: bool = False) -> Container:
        """A detached container: the image's entrypoint, then ``sleep infinity`` as PID 1."""
        container = self._container(token_mode, 0)
        docker("run", "-d", *self._args(container, ro, extra))
        return container

    def run(
        self, *command: str, extra: tuple[str, ...] = (), token_uid: int = 0
    ) -> subprocess.CompletedProcess[str]:
        """``docker run --rm IMAGE COMMAND``: the entrypoint wraps the command."""
        container = self._container(0o600, token_uid)
        return docker(
            "run", "--rm", *self._args(container, False, extra), *command, check=False, timeout=120
        )


@pytest.fixture
def launcher(image: str, world: World, tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(image, world, tmp_path, [])
    yield launcher
    for name in launcher.names:
        docker("rm", "-f", name, check=False, timeout=60)


@pytest.fixture
def sandbox(launcher: Launcher) -> Container:
    """A dev container whose entrypoint started a session, with ``sleep infinity`` as PID 1."""
    container = launcher.start()
    logs = wait_for_outcome(container)
    assert READY.search(logs), logs
    # Until the entrypoint has exec'd the command, PID 1 is its shell, which reaps whatever
    # child it waits for: the tests want the `sleep` that never reaps.
    wait_for(
        lambda: container.exec("cat", "/proc/1/comm").stdout.strip() == "sleep",
        30,
        "the entrypoint to exec `sleep infinity`",
    )
    return container


# -- tools through the relay, as the non-root user ------------------------------------------------


def test_installed_in_its_own_venv_by_the_readme_snippet(sandbox: Container) -> None:
    assert sandbox.sh("command -v upstreamproxy") == "/usr/local/bin/upstreamproxy\n"
    assert sandbox.sh("readlink -f /usr/local/bin/upstreamproxy").startswith("/opt/upstreamproxy/")
    # The distribution's Python refuses pip (PEP 668) and is left alone: nothing went into it.
    assert sandbox.exec("sh", "-c", "ls /usr/lib/python3*/EXTERNALLY-MANAGED").returncode == 0
    assert sandbox.exec("python3", "-c", "import upstreamproxy").returncode != 0
    assert sandbox.exec("id", "-u").stdout.strip() == "1000"
    assert sandbox.exec("cat", "/proc/1/comm").stdout.strip() == "sleep"


def test_login_shell(sandbox: Container) -> None:
    assert sandbox.curl() == HELLO
    assert not (sandbox.token_dir / "token").exists()  # deleted on the host too: one per start


def test_interactive_shell(sandbox: Container) -> None:
    script = f"curl -sS --max-time 20 {sandbox.world.url()}"
    assert sandbox.sh(script, flags="-ic") == HELLO


def test_git_and_python_in_a_login_shell(sandbox: Container) -> None:
    url = sandbox.world.url("git.test", "/repo.git")
    out = sandbox.sh(f"cd /tmp && git clone -q {url} repo && cat repo/README")
    assert out == "cloned through the relay\n"
    script = (
        f"import urllib.request as u; print(u.urlopen('{sandbox.world.url()}').read().decode())"
    )
    assert sandbox.sh(f'python3 -c "{script}"') == HELLO + "\n"


def test_docker_exec_the_documented_way(sandbox: Container) -> None:
    url = sandbox.world.url()
    done = sandbox.exec("upstreamproxy", "exec", "--", "curl", "-sS", "--max-time", "20", url)
    assert done.returncode == 0 and done.stdout == HELLO, done.stderr
    # A bare `docker exec C curl` has only the container's variables, so no proxy: the
    # README points such users at `upstreamproxy exec` or a login shell.
    assert sandbox.exec("curl", "-sS", "--max-time", "10", url).returncode != 0


def test_entrypoint_wrapped_command(launcher: Launcher) -> None:
    """``docker run -u vscode IMAGE CMD``: the entrypoint starts the session as that user, in
    a state directory it owns, and CMD runs with the proxy environment."""
    done = launcher.run(
        "curl",
        "-sS",
        "--max-time",
        "20",
        launcher.world.url(),
        extra=("-u", USER, "-e", "UPSTREAMPROXY_STATE_DIR=/home/vscode/.cache/upstreamproxy"),
        token_uid=1000,  # the contract: readable by the user that starts the session
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == HELLO
    assert READY.search(done.stderr), done.stderr


# -- what reaches the person who started it -------------------------------------------------------


def test_warnings_and_outcome_reach_the_entrypoints_stderr(launcher: Launcher) -> None:
    # A token readable by others, on a read-only mount: two warnings, then the outcome.
    container = launcher.start(token_mode=0o644, ro=True)
    logs = wait_for_outcome(container)
    lines = logs.splitlines()
    assert len([line for line in lines if "readable by group or others" in line]) == 1, logs
    assert len([line for line in lines if "could not delete the token file" in line]) == 1, logs
    assert len([line for line in lines if READY.search(line)]) == 1, logs
    assert TOKEN not in logs
    assert TOKEN not in container.exec("cat", f"{STATE}/start.log", user="root").stdout
    assert (container.token_dir / "token").exists()  # read-only: left, as the warning says
    assert container.curl() == HELLO
    # The Feature's postStartCommand (as the remote user) repeats them for this container run.
    done = container.exec("/usr/local/share/upstreamproxy/poststart.sh")
    assert done.returncode == 0 and done.stdout == ""
    said = done.stderr.splitlines()
    assert len(said) == 3, done.stderr
    assert "readable by group or others" in said[0] and READY.search(said[2]), done.stderr


# -- restarts and crashes -------------------------------------------------------------------------


def test_restart_needs_a_fresh_token_and_says_so(sandbox: Container) -> None:
    first = sandbox.start_pid()
    sandbox.restart()  # `sleep` ignores SIGTERM: the relay dies by SIGKILL with it
    logs = wait_for_outcome(sandbox, 2)
    last = [line for line in logs.splitlines() if OUTCOME.search(line)][-1]
    assert "proxy disabled" in last and "does not exist" in last, logs
    assert sandbox.proxy_env() == "unset"
    assert sandbox.proxy_env("-ic") == "unset"
    done = sandbox.exec("upstreamproxy", "env")
    assert done.returncode != 0 and "no session" in done.stderr, done.stderr
    # The platform provisions a fresh token, restarts: the proxy is back.
    sandbox.provision_token()
    sandbox.restart()
    logs = wait_for_outcome(sandbox, 3)
    last = [line for line in logs.splitlines() if OUTCOME.search(line)][-1]
    assert READY.search(last), logs
    assert sandbox.curl() == HELLO
    assert sandbox.start_pid() != first


def test_a_sigkilled_relay_never_leaves_a_dead_proxy(sandbox: Container) -> None:
    pid, ticks, boot = sandbox.start_pid()
    assert sandbox.exec("kill", "-9", pid, user="root").returncode == 0
    # `sleep` as PID 1 never reaps, so the relay stays a zombie and /proc/PID is still there
    # (which is all the old profile snippet checked); its env files are still there too.
    try:
        wait_for(lambda: sandbox.process_state(int(pid)) == "Z", 30, "the relay to be a zombie")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: pid {pid}\n{sandbox.exec('ps', '-ef').stdout}") from None
    assert sandbox.exec("test", "-f", f"{STATE}/env.sh").returncode == 0
    assert sandbox.proxy_env() == "unset"
    assert sandbox.proxy_env("-ic") == "unset"
    assert "has ended" in sandbox.exec("upstreamproxy", "env").stderr

    # PID reuse: the files now name a live process that is not the relay (PID 1, `sleep`).
    fake = (
        f"import json; p = '{STATE}/env.json'; d = json.load(open(p)); "
        "d['session']['pid'] = 1; json.dump(d, open(p, 'w'))"
    )
    sandbox.exec("python3", "-c", fake, user="root")
    sandbox.exec("sh", "-c", f"echo '1 {ticks} {boot}' > {STATE}/start.pid", user="root")
    assert sandbox.process_state(1) == "S"
    assert sandbox.proxy_env() == "unset"
    assert sandbox.proxy_env("-ic") == "unset"
    assert "has ended" in sandbox.exec("upstreamproxy", "env").stderr
    url = sandbox.world.url()
    done = sandbox.exec("upstreamproxy", "exec", "--", "curl", "-sS", "--max-time", "10", url)
    assert "127.0.0.1" not in done.stderr  # never a connection to a dead relay

    # The next start (with a fresh token) removes the leftovers and brings the proxy back.
    sandbox.provision_token()
    done = sandbox.exec("/usr/local/share/upstreamproxy/entrypoint.sh", user="root")
    assert READY.search(done.stderr), done.stderr
    assert sandbox.curl() == HELLO
    assert sandbox.start_pid()[0] not in (pid, "1")


def test_no_zombies_after_repeated_starts(sandbox: Container) -> None:
    """PID 1 is `sleep infinity`, which never reaps: nothing a start leaves may need it."""
    for _ in range(4):
        done = sandbox.exec("/usr/local/share/upstreamproxy/entrypoint.sh", user="root")
        assert "a session is already running" in done.stderr, done.stderr
    for _ in range(2):  # starts that end at once: the proxy disabled
        done = sandbox.exec(
            "upstreamproxy",
            "start",
            "--background",
            user="root",
            env={"UPSTREAMPROXY_STATE_DIR": "/tmp/other", "UPSTREAMPROXY_TOKEN_FILE": "/none"},
        )
        assert "proxy disabled" in done.stderr, done.stderr
    hook = "/usr/local/share/upstreamproxy/upstreamproxy-start.sh"
    for _ in range(2):  # the hook in the user's own shell: root's session, ready for use
        done = sandbox.exec("sh", "-c", f". {hook} && curl -sS --max-time 20 {sandbox.world.url()}")
        assert done.stdout == HELLO, done.stderr
        assert "a session started by root is already running" in done.stderr, done.stderr
    assert sandbox.zombies() == []
    assert sandbox.curl() == HELLO


# -- the devcontainers CLI, as VS Code applies the Feature ----------------------------------------


@pytest.fixture(scope="module")
def devcontainer_cli() -> str:
    """The devcontainers CLI (npm @devcontainers/cli; .ci/run installs it)."""
    path = os.environ.get("UPSTREAMPROXY_TEST_DEVCONTAINER_CLI") or shutil.which("devcontainer")
    if path is None:
        problem = "no devcontainers CLI (npm install -g @devcontainers/cli; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    return path


def test_the_devcontainers_cli_applies_the_feature(
    devcontainer_cli: str, docker_engine: None, world: World, tmp_path: Path
) -> None:
    """`devcontainer up` builds from a local image with the local Feature (offline), runs its
    entrypoint as root and its postStartCommand; `devcontainer exec` gets the proxy through
    the user environment probe, as VS Code does."""
    base = base_image(BASE_TAG, BASE_EXTRA)
    # A fixed workspace: the CLI names its image after the folder, so reruns reuse it.
    workspace_dir = CACHE / "devcontainer-cli" / "ws"
    shutil.rmtree(workspace_dir, ignore_errors=True)
    config = workspace_dir / ".devcontainer"
    shutil.copytree(FEATURE, config / "upstreamproxy")
    shutil.copytree(
        project_wheels(), config / "upstreamproxy" / "wheels", ignore=shutil.ignore_patterns(".*")
    )
    (config / "Dockerfile").write_text(
        f"FROM {base}\nRUN useradd --create-home --shell /bin/bash --uid 1000 {USER}\n"
    )
    tokens = tmp_path / "session"
    tokens.mkdir(mode=0o700)
    write_token(tokens / "token")
    document = json.loads((ROOT / "env" / "devcontainer.json").read_text())
    document.pop("image")
    document["build"] = {"dockerfile": "Dockerfile"}
    document["features"]["./upstreamproxy"] = {"source": "wheels"}
    document["containerEnv"] = {  # the container's own settings win over the options
        "UPSTREAMPROXY_SESSION_ID": SESSION_ID,
        "UPSTREAMPROXY_EGRESS_URL": world.egress_url,
    }
    document["mounts"] = [f"source={tokens},target={TOKEN_DIR},type=bind"]
    document["runArgs"] = ["--network=host"]  # the engine has no bridge: loopback only
    (config / "devcontainer.json").write_text(json.dumps(document, indent=2))
    label = f"upstreamproxy-test={uuid.uuid4().hex[:10]}"
    workspace = ["--workspace-folder", str(workspace_dir), "--id-label", label]
    # The CLI fetches a "control manifest" from containers.dev unless its cache (in TMPDIR)
    # holds one younger than 5 minutes: an empty one keeps every byte on this machine.
    cli_tmp = tmp_path / "cli-tmp"
    cache = cli_tmp / f"devcontainercli-{getpass.getuser()}"
    cache.mkdir(parents=True)
    (cache / "control-manifest.json").write_text(
        '{"disallowedFeatures": [], "featureAdvisories": []}'
    )
    cli_env = {**os.environ, "TMPDIR": str(cli_tmp)}
    try:
        up = subprocess.run(
            [devcontainer_cli, "up", *workspace],
            capture_output=True,
            text=True,
            timeout=600,
            env=cli_env,
        )
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert json.loads(up.stdout.strip().splitlines()[-1])["outcome"] == "success"
        output = up.stdout + up.stderr
        assert "control manifest" not in output  # nothing fetched from the internet
        assert READY.search(output), output[-3000:]  # the postStartCommand said it
        assert TOKEN not in output
        assert not (tokens / "token").exists()

        def cli_exec(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [devcontainer_cli, "exec", *workspace, *argv],
                capture_output=True,
                text=True,
                timeout=120,
                env=cli_env,
            )

        done = cli_exec("curl", "-sS", "--max-time", "20", world.url())
        assert done.stdout == HELLO, done.stderr[-3000:]
        assert cli_exec("id", "-un").stdout.strip() == USER
        container = docker("ps", "-q", "--filter", f"label={label}").stdout.strip()
        assert docker("exec", container, "cat", "/proc/1/comm").stdout.strip() == "docker-init"
    finally:
        for container in docker("ps", "-aq", "--filter", f"label={label}").stdout.split():
            docker("rm", "-f", container, check=False)


LISTENER_UIDS = """
import json
url = json.load(open("/run/upstreamproxy/env.json"))["session"]["proxy_url"]
port = int(url.rsplit(":", 1)[1])
uids = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).readlines()[1:]:
        f = line.split()
        if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
            uids.add(int(f[7]))
print(json.dumps(sorted(uids)))
"""


def test_the_relay_runs_under_its_own_uid(sandbox: Container) -> None:
    """The entrypoint starts the session as root: the relay's listening socket belongs to the
    Feature's relay user, neither root nor the remote user, who cannot read its memory."""
    # Root in a container has no CAP_SYS_PTRACE to see another uid's fds: the socket table says.
    uids = json.loads(sandbox.exec("python3", "-c", LISTENER_UIDS).stdout)
    relay_uid = int(sandbox.exec("id", "-u", "upstreamproxy").stdout)
    assert relay_uid not in (0, 1000)
    assert uids == [relay_uid]
    relays = sandbox.exec("ps", "-o", "pid=", "-u", str(relay_uid)).stdout.split()
    assert relays
    for pid in relays:
        for name in ("mem", "environ"):
            done = sandbox.exec("head", "-c", "1", f"/proc/{pid}/{name}")
            assert done.returncode != 0, name  # the remote user gets nothing
    assert sandbox.curl() == HELLO
