"""The container image and the Kubernetes manifests agree with the real egress server.

There is no Docker engine or cluster here, so the ``Dockerfile`` is parsed and the manifests in
``env/kubernetes/`` are loaded with PyYAML, and both are checked against the server itself: the
real argparse parser of ``upstreamproxy egress`` (flags and ``UPSTREAMPROXY_*`` variables), the
routes of a real ``EgressServer`` and the real policy loader. Then both container command lines
(the image's ENTRYPOINT + CMD + ENV, and the Deployment's args + env on top of it) are run as
local processes, with ``/etc/upstreamproxy`` remapped to temp files and the listeners moved to
loopback, and their health, readiness and metrics endpoints are fetched.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
import yaml
from containers import build_command
from fleet import HAPROXY_CFG, FleetConfig, ProjectedDir, container_run_args
from testpki import make_ca

from upstreamproxy.cli import build_parser
from upstreamproxy.commands.egress import build_server
from upstreamproxy.egress.policy import load_policy_file, parse_policy_document
from upstreamproxy.tokens import kid_from_path, load_public_keys

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "env" / "kubernetes"
ETC = "/etc/upstreamproxy"  # where the image and the manifests keep the config
ENV_RE = re.compile(r"\benv (UPSTREAMPROXY_[A-Z0-9_]+)\b")
MUST_NOT_REACH = (
    "169.254.169.254",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.0.1",
    "100.64.0.1",
    "127.0.0.1",
    "fd00:ec2::254",
    "fe80::1",
    "::1",
)


# -- the real CLI ---------------------------------------------------------------------------


@contextlib.contextmanager
def container_environ(env: dict[str, str]) -> Iterator[None]:
    """os.environ as the container sees it: no UPSTREAMPROXY_* from the host, plus ``env``.

    The egress parser reads its defaults from the environment when it is built, so it has to be
    built inside this context to see what the container would see.
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UPSTREAMPROXY_")}
    with mock.patch.dict(os.environ, clean | env, clear=True):
        yield


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError(f"no subcommand {name!r}")


@dataclass(frozen=True)
class EgressCli:
    flags: frozenset[str]  # option strings the egress subcommand accepts
    env: frozenset[str]  # UPSTREAMPROXY_* variables it (or the top-level CLI) reads
    repeatable: dict[str, str]  # repeatable flag -> its variable (flags append to its value)


def egress_cli() -> EgressCli:
    with container_environ({}):
        root = build_parser()
    egress = subparser(root, "egress")
    flags = {s for a in egress._actions for s in a.option_strings if s.startswith("--")}
    env = {
        name for p in (root, egress) for a in p._actions for name in ENV_RE.findall(a.help or "")
    }
    repeatable = {
        s: name
        for a in egress._actions
        if isinstance(a, argparse._AppendAction)
        for s in a.option_strings
        for name in ENV_RE.findall(a.help or "")
    }
    return EgressCli(frozenset(flags), frozenset(env), repeatable)


def effective_config(args: list[str], env: dict[str, str]) -> argparse.Namespace:
    """The egress settings a container with this command line and environment runs with."""
    with container_environ(env):
        parser = build_parser()
        try:
            return parser.parse_args(["egress", *args])
        except SystemExit:
            pytest.fail(f"the egress CLI refuses {args!r} with env {env!r}")


def flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


# -- the Dockerfile -------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [rest for instr, rest in self.instructions if instr == instruction]

    def last(self, instruction: str) -> str | None:
        found = self.all(instruction)
        return found[-1] if found else None


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs, line continuations joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, rest = (pending + line).partition(" ")
        result.append((instruction.upper(), " ".join(rest.split())))
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    return result


def dockerfile_stages() -> list[Stage]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction, rest in dockerfile_instructions((ROOT / "Dockerfile").read_text()):
        if instruction == "FROM":
            words = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], rest).split()
            stages.append(Stage(words[0], words[2] if len(words) == 3 else None))
        elif not stages:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append((instruction, rest))
    return stages


def exec_form(rest: str) -> list[str]:
    assert rest.startswith("["), f"use the exec (JSON) form: {rest}"
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def key_values(rest: str) -> dict[str, str]:
    pairs = [word.partition("=") for word in shlex.split(rest)]
    assert all(sep for _, sep, _ in pairs), f"use KEY=VALUE: {rest}"
    return {k: v for k, _, v in pairs}


@dataclass(frozen=True)
class Image:
    stages: list[Stage]
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    user: str
    exposed: set[int]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def image() -> Image:
    stages = dockerfile_stages()
    final = stages[-1]
    entrypoint = final.last("ENTRYPOINT")
    cmd = final.last("CMD")
    user = final.last("USER")
    assert entrypoint is not None and user is not None
    env: dict[str, str] = {}
    for rest in final.all("ENV"):
        env |= key_values(rest)
    exposed = {int(p.split("/")[0]) for rest in final.all("EXPOSE") for p in rest.split()}
    return Image(stages, exec_form(entrypoint), exec_form(cmd) if cmd else [], env, user, exposed)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path (or a parent directory) decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        if any(
            fnmatch(c, body) or (body.startswith("**/") and fnmatch(c, body[3:]))
            for c in candidates
        ):
            ignored = not negated
    return ignored


# -- the manifests --------------------------------------------------------------------------


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of every YAML file in env/kubernetes, by (kind, name)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc | {"__file__": path.name}
    return objects


def only(objects: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [obj for (k, _), obj in objects.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@dataclass(frozen=True)
class Deployed:
    """The Deployment's egress container, seen through the real CLI."""

    objects: dict[tuple[str, str], dict[str, Any]]
    deployment: dict[str, Any]
    pod: dict[str, Any]
    container: dict[str, Any]
    args: list[str]
    env: dict[str, str]  # the image's ENV overlaid with the container's env
    config: argparse.Namespace

    def container_port(self, port: int | str) -> int:
        for entry in self.container["ports"]:
            if port in (entry["containerPort"], entry.get("name")):
                return int(entry["containerPort"])
        raise AssertionError(f"{port!r} is not a port of the egress container")

    def volume_for(self, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(volumeMount, volume) of the mount that holds ``path``."""
        mounts = [
            m for m in self.container["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])
        ]
        assert mounts, f"nothing is mounted at {path}"
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        volumes = [v for v in self.pod["volumes"] if v["name"] == mount["name"]]
        assert len(volumes) == 1, f"volume {mount['name']} is not defined once"
        return mount, volumes[0]


def deployed() -> Deployed:
    objects = manifests()
    deployment = only(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "egress"]
    env = image().env | {e["name"]: str(e["value"]) for e in container.get("env", [])}
    args = [str(a) for a in container.get("args", [])]
    return Deployed(objects, deployment, pod, container, args, env, effective_config(args, env))


def config_data(obj: dict[str, Any]) -> dict[str, str]:
    """A ConfigMap's or Secret's entries as text (``data`` base64-decoded for a Secret)."""
    data = dict(obj.get("data") or {})
    if obj["kind"] == "Secret":
        data = {k: base64.b64decode(v).decode() for k, v in data.items()}
        data |= obj.get("stringData") or {}
    return data


def prestop_seconds(container: dict[str, Any]) -> int:
    hook = container.get("lifecycle", {}).get("preStop")
    assert hook, "no preStop hook: endpoints would still route to a draining pod"
    if "sleep" in hook:
        return int(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep", f"preStop should sleep, not {command}"
    return int(command[1])


# -- running a container's command line on loopback ------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class ConfigDir:
    """A stand-in for /etc/upstreamproxy: the ConfigMap's policy, real keys, a real CA."""

    etc: Path
    private_key: Path

    def remap(self, value: str) -> str:
        return value.replace(ETC, str(self.etc))


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> ConfigDir:
    base = tmp_path_factory.mktemp("deploy")
    issuer = base / "issuer"
    result = subprocess.run(
        [sys.executable, "-m", "upstreamproxy", "token", "keygen", "--out-dir", str(issuer)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("UPSTREAMPROXY_")},
    )
    assert result.returncode == 0, result.stderr
    kid = result.stdout.strip()
    etc = base / "etc-upstreamproxy"
    for sub in ("policy", "keys", "ca"):
        (etc / sub).mkdir(parents=True)
    # Only the public half goes where the Secret is mounted, as in production.
    (etc / "keys" / f"{kid}.public.pem").write_bytes((issuer / f"{kid}.public.pem").read_bytes())
    policy = config_data(manifests()[("ConfigMap", "upstreamproxy-policy")])["policy.yaml"]
    (etc / "policy" / "policy.yaml").write_text(policy)
    (etc / "ca" / "ca.pem").write_bytes(make_ca("deploy test CA").cert_pem())
    return ConfigDir(etc, issuer / f"{kid}.private.pem")


@dataclass(frozen=True)
class Running:
    proc: asyncio.subprocess.Process
    port: int
    metrics_port: int
    env: dict[str, str]


async def start_container_command(
    argv: list[str], env: dict[str, str], config: ConfigDir
) -> Running:
    """Run ``argv`` (ENTRYPOINT + args) locally: config paths remapped, listeners on loopback."""
    assert argv[:2] == ["upstreamproxy", "egress"]
    port, metrics_port = free_port(), free_port()
    # Appended flags win over earlier ones and over the environment: only the bind changes.
    loopback = [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        str(metrics_port),
    ]
    command = [
        sys.executable,
        "-m",
        "upstreamproxy",
        *(config.remap(a) for a in argv[1:]),
        *loopback,
    ]
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("UPSTREAMPROXY_")}
    run_env |= {k: config.remap(v) for k, v in env.items()}
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        env=run_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    if b"egress listening on" not in line:
        proc.kill()
        _, err = await proc.communicate()
        pytest.fail(f"the container command did not start: {line!r}\n{err.decode()[-2000:]}")
    return Running(proc, port, metrics_port, run_env)


async def stop_gracefully(running: Running, stop_signal: signal.Signals) -> bytes:
    running.proc.send_signal(stop_signal)
    _, err = await asyncio.wait_for(running.proc.communicate(), 20)
    assert running.proc.returncode == 0, err.decode()[-2000:]
    return err


async def get(url: str) -> tuple[int, str]:
    assert url.startswith("http://127.0.0.1:"), url  # loopback only
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url) as response:
        return response.status, await response.text()


# -- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_and_needs_no_buildkit() -> None:
    img = image()
    assert len(img.stages) >= 2
    build, final = img.stages[0], img.final
    # The base is a build argument defaulting to the official image (offline: any Debian-like
    # base with python3 and python3-venv, see tests/test_egress_image.py).
    for stage in img.stages:
        assert re.fullmatch(r"python:3\.1[12]-slim(-\w+)?", stage.base), stage.base
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax=", text, re.M), "a syntax frontend needs a registry"
    for instruction, rest in dockerfile_instructions(text):
        assert "--mount" not in rest and "<<" not in rest, f"BuildKit-only: {instruction} {rest}"
    assert build.name, "the build stage needs a name to copy from"
    # Wheels from wheels/ with no index at all when present, else from the package index.
    installs = [run for run in build.all("RUN") if "pip install" in run]
    assert installs and "--no-index --find-links=. upstreamproxy" in installs[0]
    assert any("wheel[s]" in copy for copy in build.all("COPY"))
    # The final stage gets the virtualenv only: no pip, no sources, no compilers.
    assert not final.all("ADD")
    copies = final.all("COPY")
    assert copies and all(c.startswith(f"--from={build.name} ") for c in copies)
    assert not [run for run in final.all("RUN") if "pip" in run]
    compilers = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|cc|libc6?-dev)\b")
    assert not any(compilers.search(run) for run in final.all("RUN"))


def test_dockerfile_runs_as_fixed_non_root_user() -> None:
    img = image()
    assert [instr for instr, _ in img.final.instructions].count("USER") == 1
    uid, _, gid = img.user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000, f"USER must be a numeric non-root uid: {img.user}"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    # Nothing runs as root after USER, and the process starts after it.
    order = [instr for instr, _ in img.final.instructions]
    assert "RUN" not in order[order.index("USER") :]
    assert order.index("USER") < order.index("ENTRYPOINT")


def test_dockerfile_entrypoint_env_and_cmd_are_real_egress_flags() -> None:
    img, cli = image(), egress_cli()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert img.entrypoint == ["upstreamproxy", "egress"]
    assert scripts["upstreamproxy"] == "upstreamproxy.cli:main"
    assert {flag_name(a) for a in img.cmd if a.startswith("--")} <= cli.flags
    ours = {name for name in img.env if name.startswith("UPSTREAMPROXY_")}
    assert ours, "the image should configure the egress through UPSTREAMPROXY_* defaults"
    assert ours <= cli.env, f"not read by the egress: {sorted(ours - cli.env)}"
    config = effective_config(img.cmd, img.env)
    assert (config.host, config.port) == ("0.0.0.0", 8080)
    assert (config.metrics_host, config.metrics_port) == ("0.0.0.0", 9090)
    assert config.policy == f"{ETC}/policy/policy.yaml"
    assert config.public_keys == [f"{ETC}/keys"]
    assert img.exposed == {config.port, config.metrics_port}


def test_dockerfile_stop_signal_healthcheck_and_labels() -> None:
    img = image()
    assert img.final.last("STOPSIGNAL") == "SIGTERM"  # the egress drains on SIGTERM
    healthcheck = img.final.last("HEALTHCHECK")
    assert healthcheck is not None
    match = re.fullmatch(r"((?:--\S+\s+)*)CMD\s+(.*)", healthcheck)
    assert match, healthcheck
    command = exec_form(match[2])
    # The image's own interpreter by absolute path: not every base has a `python` on PATH.
    assert command[0] == "/opt/upstreamproxy/bin/python3" and "/healthz" in command[-1]
    venv = [c for c in img.final.all("COPY") if "/opt/upstreamproxy" in c]
    assert venv, "the HEALTHCHECK interpreter comes from the build stage's virtualenv"
    labels: dict[str, str] = {}
    for rest in img.final.all("LABEL"):
        labels |= key_values(rest)
    for key in ("title", "description", "version", "licenses", "source"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]["text"]


def test_dockerignore_sends_only_what_the_build_needs() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    build = image().stages[0]
    sources = [
        src for copy in build.all("COPY") for src in copy.split()[:-1] if not src.startswith("--")
    ]
    assert sources
    optional = {"wheel[s]"}  # a glob: wheels/ only for offline builds
    assert not dockerignored("wheels/aiohttp-3.whl", patterns)
    for source in sources:
        if source in optional:
            continue
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignored(source, patterns), f"COPY {source} is excluded by .dockerignore"
    assert not dockerignored("upstreamproxy/egress/server.py", patterns)
    for path in (
        ".git/config",
        ".venv/bin/python",
        "tests/test_codec.py",
        "benchmarks/x.py",
        "upstreamproxy/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v",
        "keys/k.private.pem",
        "upstreamproxy/k.pem",
        ".mypy_cache/x",
    ):
        assert dockerignored(path, patterns), f"{path} would be sent to the build"


async def test_dockerfile_command_starts_and_answers_health(config_dir: ConfigDir) -> None:
    img = image()
    running = await start_container_command(img.entrypoint + img.cmd, img.env, config_dir)
    try:
        base = f"http://127.0.0.1:{running.port}"
        assert (await get(f"{base}/healthz"))[0] == 200
        assert (await get(f"{base}/readyz"))[0] == 200
        status, body = await get(f"http://127.0.0.1:{running.metrics_port}/metrics")
        assert status == 200 and "upstreamproxy_active_tunnels" in body
        # The image's HEALTHCHECK command, as Docker would run it inside the container.
        match = re.fullmatch(r"((?:--\S+\s+)*)CMD\s+(.*)", img.final.last("HEALTHCHECK") or "")
        assert match
        check = exec_form(match[2])
        env = running.env | {"UPSTREAMPROXY_EGRESS_PORT": str(running.port)}
        probe = await asyncio.create_subprocess_exec(
            sys.executable, *check[1:], env=env, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(probe.communicate(), 20)
        assert probe.returncode == 0, err.decode()
    finally:
        stop = signal.Signals[img.final.last("STOPSIGNAL") or "SIGTERM"]
        await stop_gracefully(running, stop)


# -- Kubernetes manifests --------------------------------------------------------------------


def test_every_manifest_parses_and_kustomization_lists_them() -> None:
    objects = manifests()
    for (kind, name), obj in objects.items():
        assert obj.get("apiVersion"), (kind, name)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    kinds = {kind for kind, _ in objects}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    } <= kinds
    namespace = only(objects, "Namespace")
    assert kustomization["namespace"] == namespace["metadata"]["name"]
    # The Namespace enforces the "restricted" Pod Security level the Deployment is built for.
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    image_name = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image_name.split(":")[0] in {entry["name"] for entry in kustomization["images"]}


def test_deployment_args_and_env_are_real_egress_flags() -> None:
    d, cli = deployed(), egress_cli()
    assert d.container["name"] == "egress"
    assert "command" not in d.container, "keep the image's ENTRYPOINT (upstreamproxy egress)"
    flags = [a for a in d.args if a.startswith("-")]
    assert len(flags) == len(d.args), f"use --flag=value: {d.args}"
    unknown = {flag_name(a) for a in flags} - cli.flags
    assert not unknown, f"not flags of `upstreamproxy egress`: {sorted(unknown)}"
    names = {e["name"] for e in d.container.get("env", [])}
    ours = {n for n in names if n.startswith("UPSTREAMPROXY_")}
    assert ours <= cli.env, f"not read by the egress: {sorted(ours - cli.env)}"
    assert names == ours, f"unexpected variables: {sorted(names - ours)}"
    # A repeatable flag is appended to its variable's value (argparse appends to the default),
    # so giving both (the variable possibly from the image's ENV) doubles the setting.
    for arg in flags:
        variable = cli.repeatable.get(flag_name(arg))
        assert variable not in d.env, f"{flag_name(arg)} and {variable} are both set"
    # The values parse (types, limits): build the server's config the way `egress` does.
    assert d.config.max_tunnels >= 1 and d.config.drain_grace > 0
    assert d.config.audience


def test_ports_agree_everywhere() -> None:
    d, img = deployed(), image()
    tunnel, metrics = d.config.port, d.config.metrics_port
    assert (d.config.host, d.config.metrics_host) == ("0.0.0.0", "0.0.0.0")
    assert {p["containerPort"] for p in d.container["ports"]} == {tunnel, metrics}
    assert d.container_port("tunnel") == tunnel and d.container_port("metrics") == metrics
    assert img.exposed == {tunnel, metrics}
    for probe in ("livenessProbe", "readinessProbe"):
        assert d.container_port(d.container[probe]["httpGet"]["port"]) == tunnel, probe
        assert d.container[probe]["httpGet"].get("scheme", "HTTP") == "HTTP"
    annotations = d.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics
    assert annotations["prometheus.io/path"] == "/metrics"
    service = only(d.objects, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    targets = {p["name"]: d.container_port(p["targetPort"]) for p in service["spec"]["ports"]}
    assert targets == {"tunnel": tunnel, "metrics": metrics}
    netpol = only(d.objects, "NetworkPolicy")
    ingress_ports = {p["port"] for rule in netpol["spec"]["ingress"] for p in rule["ports"]}
    assert ingress_ports == {tunnel, metrics}


def test_probe_and_scrape_paths_are_real_routes(config_dir: ConfigDir) -> None:
    d = deployed()
    args = [config_dir.remap(a) for a in d.args]
    env = {k: config_dir.remap(v) for k, v in d.env.items()}
    server = build_server(effective_config(args, env))  # what `upstreamproxy egress` builds
    routes = {
        r.resource.canonical
        for r in server.app.router.routes()
        if r.method == "GET" and r.resource is not None
    }
    assert d.container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert d.container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"/healthz", "/readyz", d.config.ws_path, "/v1/code/upstreamproxy/ca-cert"} <= routes


def test_policy_configmap_loads_with_the_servers_loader(tmp_path: Path) -> None:
    d = deployed()
    configmap = d.objects[("ConfigMap", "upstreamproxy-policy")]
    text = config_data(configmap)["policy.yaml"]
    policies = parse_policy_document(yaml.safe_load(text), "configmap")
    file = tmp_path / "policy.yaml"
    file.write_text(text)
    assert load_policy_file(file).policies.keys() == policies.policies.keys()
    assert {"default", "ci"} <= set(policies.policies)
    assert any(p.monitor for p in policies.policies.values()), "no monitor-mode example"
    assert any(p.block_cidrs.networks for p in policies.policies.values())
    hosts = {h.pattern for r in policies.policies["default"].rules for h in r.hosts}
    assert {"pypi.org", "files.pythonhosted.org", "registry.npmjs.org", "github.com"} <= hosts
    # The NetworkPolicy must let the egress reach every port a policy allows.
    netpol = only(d.objects, "NetworkPolicy")
    allowed = {
        p["port"]
        for rule in netpol["spec"]["egress"]
        for p in rule["ports"]
        if p["protocol"] == "TCP" and any("ipBlock" in t for t in rule["to"])
    }
    for policy in policies.policies.values():
        for rule in policy.rules:
            assert rule.ports is not None and rule.ports <= allowed, (policy.name, rule.rule_id)
        assert not policy.allow_cidrs.networks, "allow_cidrs needs a NetworkPolicy rule too"


def test_mounts_match_the_flag_paths() -> None:
    d = deployed()
    objects = d.objects
    expected = {
        d.config.policy: ("configMap", "upstreamproxy-policy"),
        d.config.public_keys[0]: ("secret", "upstreamproxy-public-keys"),
        d.config.ca_cert: ("configMap", "upstreamproxy-ca"),
    }
    assert len(d.config.public_keys) == 1
    for path, (source, name) in expected.items():
        mount, volume = d.volume_for(path)
        assert mount.get("readOnly") is True, mount
        assert "subPath" not in mount, "subPath mounts never see ConfigMap/Secret updates"
        assert source in volume, volume
        ref = volume[source].get("name") or volume[source].get("secretName")
        assert ref == name
        kind = "Secret" if source == "secret" else "ConfigMap"
        data = config_data(objects[(kind, name)])
        relative = Path(path).relative_to(mount["mountPath"]).as_posix()
        if relative == ".":  # a directory: every entry is a file in it
            assert data and not volume[source].get("items")
            continue
        items = {i["path"]: i["key"] for i in volume[source].get("items", [])}
        assert items.get(relative, relative) in data, f"{path}: no such key in {name}"
    # Read-only root: the only writable places are explicit emptyDirs.
    writable = [m for m in d.container["volumeMounts"] if not m.get("readOnly")]
    for mount in writable:
        _, volume = d.volume_for(mount["mountPath"])
        assert "emptyDir" in volume


def test_termination_grace_covers_prestop_and_drain() -> None:
    d = deployed()
    grace = d.pod["terminationGracePeriodSeconds"]
    needed = prestop_seconds(d.container) + d.config.drain_delay + d.config.drain_grace
    assert grace > needed, (
        f"terminationGracePeriodSeconds {grace} <= preStop {prestop_seconds(d.container)}"
        f" + --drain-delay {d.config.drain_delay} + --drain-grace {d.config.drain_grace}:"
        " tunnels would be killed mid-drain"
    )


def test_selectors_match_the_pods() -> None:
    d = deployed()
    labels = d.deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and selector.items() <= labels.items()

    spec = d.deployment["spec"]
    assert selects(spec["selector"]["matchLabels"])
    assert spec["replicas"] >= 2
    assert selects(only(d.objects, "Service")["spec"]["selector"])
    assert selects(only(d.objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"])
    pdb = only(d.objects, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"])
    if "minAvailable" in pdb["spec"]:
        assert 1 <= pdb["spec"]["minAvailable"] < spec["replicas"]
    else:
        assert pdb["spec"]["maxUnavailable"] == 1
    hpa = only(d.objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        d.deployment["apiVersion"],
        "Deployment",
        d.deployment["metadata"]["name"],
    )
    assert 2 <= hpa["spec"]["minReplicas"] <= spec["replicas"] <= hpa["spec"]["maxReplicas"]
    resources = {m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"}
    assert "cpu" in resources
    for resource in resources:  # Utilization targets are relative to the requests
        assert resource in d.container["resources"]["requests"], resource
    spread = d.pod.get("topologySpreadConstraints") or []
    anti = d.pod.get("affinity", {}).get("podAntiAffinity")
    assert spread or anti, "replicas should spread across nodes/zones"
    for constraint in spread:
        assert selects(constraint["labelSelector"]["matchLabels"])


def test_security_context_is_non_root_and_locked_down() -> None:
    d = deployed()
    pod_ctx, ctx = d.pod["securityContext"], d.container["securityContext"]
    uid = int(image().user.partition(":")[0])
    assert pod_ctx["runAsNonRoot"] is True and ctx.get("runAsNonRoot", True) is True
    assert pod_ctx["runAsUser"] == uid and ctx.get("runAsUser", uid) == uid
    assert pod_ctx["seccompProfile"]["type"] == "RuntimeDefault"
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx.get("privileged", False) is False
    assert ctx["capabilities"]["drop"] == ["ALL"] and not ctx["capabilities"].get("add")
    assert d.pod["automountServiceAccountToken"] is False
    assert not d.pod.get("hostNetwork") and not d.pod.get("hostPID")


def test_networkpolicy_admits_sandboxes_and_reaches_only_public_addresses() -> None:
    d = deployed()
    spec = only(d.objects, "NetworkPolicy")["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    by_port = {p["port"]: rule["from"] for rule in spec["ingress"] for p in rule["ports"]}
    assert all(
        "namespaceSelector" in peer and "ipBlock" not in peer
        for peers in by_port.values()
        for peer in peers
    )
    monitoring = by_port[d.config.metrics_port][0]["namespaceSelector"]["matchLabels"]
    sandboxes = by_port[d.config.port][0]["namespaceSelector"]["matchLabels"]
    assert monitoring != sandboxes
    dns = [rule for rule in spec["egress"] if not any("ipBlock" in t for t in rule["to"])]
    assert len(dns) == 1
    assert {(p["protocol"], p["port"]) for p in dns[0]["ports"]} == {("UDP", 53), ("TCP", 53)}
    assert dns[0]["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    blocks = [t["ipBlock"] for rule in spec["egress"] for t in rule["to"] if "ipBlock" in t]
    assert {b["cidr"] for b in blocks} == {"0.0.0.0/0", "::/0"}
    for address in MUST_NOT_REACH:
        ip = ipaddress.ip_address(address)
        for block in blocks:
            if ip in ipaddress.ip_network(block["cidr"]):
                assert any(ip in ipaddress.ip_network(e) for e in block["except"]), address
    ip_rules = [rule for rule in spec["egress"] if any("ipBlock" in t for t in rule["to"])]
    assert {(p["protocol"], p["port"]) for r in ip_rules for p in r["ports"]} == {
        ("TCP", 443),
        ("TCP", 80),
    }


def test_secret_and_ca_hold_only_public_material(tmp_path: Path) -> None:
    d = deployed()
    keys = config_data(d.objects[("Secret", "upstreamproxy-public-keys")])
    assert keys
    for name, text in keys.items():
        assert name.endswith(".public.pem"), f"{name}: the egress only takes *.public.pem"
        kid_from_path(name)  # a valid key id
        assert "PRIVATE KEY" not in text, f"{name} holds a private key"
        if "BEGIN PUBLIC KEY" in text:  # real keys (the placeholder is refused at start-up)
            (tmp_path / name).write_text(text)
    if any(tmp_path.iterdir()):
        assert len(load_public_keys(tmp_path)) == len(keys)
    ca = config_data(d.objects[("ConfigMap", "upstreamproxy-ca")])
    assert set(ca) == {"ca.pem"} and "PRIVATE KEY" not in ca["ca.pem"]


async def test_deployment_command_runs_and_its_probes_pass(config_dir: ConfigDir) -> None:
    d, img = deployed(), image()
    running = await start_container_command(img.entrypoint + d.args, d.env, config_dir)
    try:
        base = f"http://127.0.0.1:{running.port}"
        for probe in ("livenessProbe", "readinessProbe"):
            status, _ = await get(base + d.container[probe]["httpGet"]["path"])
            assert status == 200, probe
        annotations = d.deployment["spec"]["template"]["metadata"]["annotations"]
        status, body = await get(
            f"http://127.0.0.1:{running.metrics_port}{annotations['prometheus.io/path']}"
        )
        assert status == 200 and "upstreamproxy_policy_reloads_total" in body
        status, pem = await get(f"{base}/v1/code/upstreamproxy/ca-cert")
        assert status == 200
        assert pem.encode() == (config_dir.etc / "ca" / "ca.pem").read_bytes()
        # A ConfigMap update + SIGHUP reloads the policy in place.
        running.proc.send_signal(signal.SIGHUP)
        for _ in range(50):
            _, body = await get(f"http://127.0.0.1:{running.metrics_port}/metrics")
            if 'upstreamproxy_policy_reloads_total{result="ok"} 1.0' in body:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("SIGHUP did not reload the policy")
    finally:
        await stop_gracefully(running, signal.SIGTERM)


def test_kubectl_kustomize_renders_every_manifest() -> None:
    """The real ``kubectl kustomize`` (what ``kubectl apply -k`` sends) accepts the directory."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        message = "no kubectl (Debian package kubernetes-client; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == set(manifests())
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization["namespace"], doc["kind"]
    (deployment,) = [d for d in rendered if d["kind"] == "Deployment"]
    (wanted,) = kustomization["images"]
    image_ref = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image_ref == f"{wanted['newName']}:{wanted['newTag']}"


def test_session_limit_table_matches_the_manifests() -> None:
    """env/kubernetes/README.md says what a session can reach with N replicas; keep it true."""
    d = deployed()
    hpa = only(d.objects, "HorizontalPodAutoscaler")["spec"]
    per = (d.config.max_session_tunnels, d.config.session_rate, d.config.session_burst)
    readme = (K8S / "README.md").read_text()
    for replicas, label in (
        (1, "1"),
        (hpa["minReplicas"], f"{hpa['minReplicas']} (minReplicas)"),
        (hpa["maxReplicas"], f"{hpa['maxReplicas']} (maxReplicas)"),
    ):
        tunnels, rate, burst = (round(replicas * v) for v in per)
        row = f"| {label} | {tunnels} | {rate} | {burst} |"
        assert row in readme, f"env/kubernetes/README.md lacks: {row}"
    assert d.deployment["spec"]["replicas"] == hpa["minReplicas"]
    # A session at minReplicas gets no more than one egress alone would give it by default.
    defaults = effective_config([], {})
    assert hpa["minReplicas"] * per[0] <= defaults.max_session_tunnels
    assert hpa["minReplicas"] * per[1] <= defaults.session_rate


def test_token_audience_agrees_everywhere() -> None:
    """Tokens issued for another audience fail every session (401 wrong-audience)."""
    d, img = deployed(), image()
    assert img.env["UPSTREAMPROXY_AUDIENCE"] == effective_config([], img.env).audience
    assert d.config.audience == img.env["UPSTREAMPROXY_AUDIENCE"]
    k8s_readme = (K8S / "README.md").read_text()
    assert f"--audience {d.config.audience}" in k8s_readme
    assert (
        f"UPSTREAMPROXY_AUDIENCE={img.env['UPSTREAMPROXY_AUDIENCE']}"
        in (ROOT / "README.md").read_text()
    )


def test_readme_gives_the_build_and_run_commands_the_tests_use(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    # tests/test_egress_image.py builds with exactly this line (offline: base + wheels/).
    command = build_command(Path("."), "upstreamproxy:0.1.0", "my-debian-python:bookworm")
    assert " ".join(command) in readme
    assert "python3 -m pip wheel --wheel-dir wheels ." in readme
    assert "docker build -t upstreamproxy:0.1.0 ." in readme
    # ... and runs it with these options and mounts, as the README's `docker run` shows.
    config = FleetConfig(tmp_path, *(ProjectedDir(tmp_path / d) for d in ("p", "k", "c")), [])
    args = container_run_args("IMAGE", "NAME", config, 1, 2, [])
    joined = " ".join(args)
    for option in (
        "--read-only",
        "--user 10001:10001",
        "--cap-drop ALL",
        "--security-opt no-new-privileges",
        "--network host",
    ):
        assert option in joined and option in readme, option
    for sub in ("policy", "keys", "ca"):
        assert f"{tmp_path}/{sub}:{ETC}/{sub}:ro" in joined
        assert f'-v "$PWD/{"ca-public" if sub == "ca" else sub}:{ETC}/{sub}:ro"' in readme
    assert f"--ca-cert {ETC}/ca/ca.pem" in readme


def test_readme_haproxy_backend_is_the_one_the_fleet_test_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("backend egress\n", 1)[1].split("```", 1)[0]
    rendered = HAPROXY_CFG.format(sock="S", port=1, inter=300, servers="")
    lines = {" ".join(line.split()) for line in rendered.splitlines()}
    for line in block.splitlines():
        line = " ".join(line.split("#", 1)[0].split())
        if line and not line.startswith("server "):
            assert line in lines, f"README's HAProxy line is not what the test runs: {line}"
