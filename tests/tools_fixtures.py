"""A loopback "world" for the bootstrap tests: origins, the real egress, and real ``start``.

:class:`World` runs, on its own event loop in a background thread (so tests can drive real
tools with plain blocking ``subprocess.run``):

* one HTTPS origin on 127.0.0.1 serving every name in NAMES with a certificate signed by the
  *egress* CA, so tools trust it only through the CA super bundle; its routes are a hello
  page, a git repository over git's dumb HTTP protocol, a PEP 503 simple index with a wheel,
  and an npm registry with a tarball (see the builders below);
* a second origin, UNTRUSTED, whose certificate another CA signed;
* the real egress server with a static token, a policy allowing exactly those origins, and
  every name pinned to 127.0.0.1 by a StaticResolver (no DNS, ever), serving the egress CA at
  its ca-cert endpoint.

:func:`start_session` runs the real ``python -m upstreamproxy start`` against it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import signal
import ssl
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from testpki import TestCA, make_ca

from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.policy import PolicyStore, policy_from_allow_list
from upstreamproxy.egress.resolver import StaticResolver
from upstreamproxy.egress.server import EgressConfig, EgressServer

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "tok-bootstrap-7f3a9c1e5b2d-SECRET"
SESSION_ID = "sess-bootstrap"
NAMES = ("hello.test", "git.test", "pkgs.test", "npm.test")
UNTRUSTED = "untrusted.test"
#: Served by the plain-HTTP origin (``http://NAME:plain_port``); ``svc`` is single-label,
#: like a compose service.
PLAIN_NAMES = ("plain.test", "deb.test", "svc")
BLOCKED = "blocked.test"
HELLO = "hello through the relay\n"
READY_PREFIX = "upstreamproxy ready: source "

T = TypeVar("T")


# -- artefacts the origin serves ------------------------------------------------------------------


def build_wheel() -> tuple[str, bytes]:
    """A minimal, valid pure-Python wheel for ``demo-pkg`` 0.1.0."""
    name = "demo_pkg-0.1.0-py3-none-any.whl"
    files = {
        "demo_pkg/__init__.py": b"GREETING = 'installed through the relay'\n",
        "demo_pkg-0.1.0.dist-info/METADATA": (
            b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 0.1.0\nSummary: test package\n"
        ),
        "demo_pkg-0.1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: upstreamproxy-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append("demo_pkg-0.1.0.dist-info/RECORD,,")
    files["demo_pkg-0.1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return name, buffer.getvalue()


def build_npm_tarball() -> bytes:
    """``demo-pkg`` 1.0.0 as npm packs it: a gzipped tar with everything under ``package/``."""
    files = {
        "package/package.json": json.dumps(
            {"name": "demo-pkg", "version": "1.0.0", "main": "index.js"}
        ).encode(),
        "package/index.js": b"module.exports = 'installed through the relay';\n",
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_bare_repo(base: Path) -> Path:
    """A bare repository with one commit, prepared for git's dumb HTTP protocol."""
    work, bare = base / "work", base / "repo.git"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(base),
        "GIT_CONFIG_NOSYSTEM": "1",
    }

    def git(*args: str, cwd: Path) -> None:
        subprocess.run(
            [
                "git",
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@example.invalid",
                "-c",
                "init.defaultBranch=main",
                *args,
            ],
            cwd=cwd,
            env=env,
            check=True,
            capture_output=True,
            timeout=30,
        )

    work.mkdir(parents=True)
    git("init", "-q", ".", cwd=work)
    (work / "README").write_text("cloned through the relay\n")
    git("add", "README", cwd=work)
    git("commit", "-q", "-m", "first", cwd=work)
    git("clone", "-q", "--bare", str(work), str(bare), cwd=base)
    git("update-server-info", cwd=bare)  # info/refs and objects/info/packs for dumb HTTP
    return bare


MAVEN_PARENT = ("com.example.upstreamproxy", "demo-parent", "1.0")


def make_maven_repo(root: Path) -> Path:
    """A Maven repository layout holding one artefact: a parent POM (with its checksums)."""
    group, artifact, version = MAVEN_PARENT
    folder = root.joinpath(*group.split("."), artifact, version)
    folder.mkdir(parents=True, exist_ok=True)
    pom = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        "  <modelVersion>4.0.0</modelVersion>\n"
        f"  <groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
        f"<version>{version}</version>\n"
        "  <packaging>pom</packaging>\n"
        "  <properties><greeting>resolved through the relay</greeting></properties>\n"
        "</project>\n"
    ).encode()
    name = f"{artifact}-{version}.pom"
    (folder / name).write_bytes(pom)
    (folder / f"{name}.sha1").write_text(hashlib.sha1(pom).hexdigest())
    (folder / f"{name}.md5").write_text(hashlib.md5(pom).hexdigest())
    return root


# -- the world ------------------------------------------------------------------------------------


@dataclass
class World:
    base: Path
    ca: TestCA = field(init=False)
    #: Signs the UNTRUSTED origin; a user's own CA in the merge tests.
    other_ca: TestCA = field(init=False)
    port: int = field(init=False, default=0)
    untrusted_port: int = field(init=False, default=0)
    plain_port: int = field(init=False, default=0)
    egress: EgressServer = field(init=False)
    wheel: tuple[str, bytes] = field(init=False)
    tarball: bytes = field(init=False)
    _loop: asyncio.AbstractEventLoop = field(init=False)
    _thread: threading.Thread = field(init=False)
    _runners: list[web.AppRunner] = field(init=False, default_factory=list)

    def url(self, name: str = "hello.test", path: str = "/") -> str:
        port = self.untrusted_port if name == UNTRUSTED else self.port
        return f"https://{name}:{port}{path}"

    def plain_url(self, name: str = "plain.test", path: str = "/") -> str:
        return f"http://{name}:{self.plain_port}{path}"

    @property
    def www(self) -> Path:
        """The plain origin's static files (``/files/...``); tests put their own here."""
        return self.base / "www"

    @property
    def egress_url(self) -> str:
        return self.egress.url

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> World:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    async def _serve_plain(self) -> int:
        self.www.mkdir(exist_ok=True)
        app = web.Application()
        app.router.add_get("/", self._hello)
        app.router.add_static("/files/", self.www)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runners.append(runner)
        port: int = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return port

    async def _serve(self, app: web.Application, names: list[str], ca: TestCA, tag: str) -> int:
        leaf = ca.issue(names)
        (self.base / f"{tag}.pem").write_bytes(leaf.chain_pem())
        (self.base / f"{tag}.key").write_bytes(leaf.key_pem())
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.base / f"{tag}.pem", self.base / f"{tag}.key")
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self._runners.append(runner)
        port: int = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return port

    async def _start(self) -> None:
        self.ca = make_ca("bootstrap tests egress CA")
        self.wheel = build_wheel()
        self.tarball = build_npm_tarball()
        repo = make_bare_repo(self.base / "git")
        self.www.mkdir(exist_ok=True)
        self.port = await self._serve(self._origin_app(repo), list(NAMES), self.ca, "origin")
        other = web.Application()
        other.router.add_get("/", self._hello)
        self.other_ca = make_ca("another CA")
        self.untrusted_port = await self._serve(other, [UNTRUSTED], self.other_ca, "untrusted")
        self.plain_port = await self._serve_plain()
        allowed = [f"{name}:{self.port}" for name in NAMES] + [f"{UNTRUSTED}:{self.untrusted_port}"]
        allowed += [f"{name}:{self.plain_port}" for name in PLAIN_NAMES]
        self.egress = EgressServer(
            EgressConfig(ca_cert_pem=self.ca.cert_pem()),
            StaticTokens({TOKEN: Session(SESSION_ID)}),
            PolicyStore(policy_from_allow_list(allowed, ["127.0.0.0/8"])),
            resolver=StaticResolver(
                {name: ["127.0.0.1"] for name in (*NAMES, *PLAIN_NAMES, UNTRUSTED, BLOCKED)}
            ),
        )
        await self.egress.start()

    async def _stop(self) -> None:
        await self.egress.stop()
        for runner in self._runners:
            await runner.cleanup()

    @staticmethod
    async def _hello(request: web.Request) -> web.Response:
        return web.Response(text=HELLO)

    def _origin_app(self, repo: Path) -> web.Application:
        wheel_name, wheel = self.wheel
        wheel_hash = hashlib.sha256(wheel).hexdigest()
        tarball = self.tarball
        integrity = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()

        async def simple_root(request: web.Request) -> web.Response:
            return web.Response(
                text='<html><body><a href="demo-pkg/">demo-pkg</a></body></html>',
                content_type="text/html",
            )

        async def simple_project(request: web.Request) -> web.Response:
            if request.match_info["project"] != "demo-pkg":
                raise web.HTTPNotFound()
            link = f'<a href="/files/{wheel_name}#sha256={wheel_hash}">{wheel_name}</a>'
            return web.Response(text=f"<html><body>{link}</body></html>", content_type="text/html")

        async def wheel_file(request: web.Request) -> web.Response:
            return web.Response(body=wheel, content_type="application/octet-stream")

        async def packument(request: web.Request) -> web.Response:
            host = request.host
            return web.json_response(
                {
                    "name": "demo-pkg",
                    "dist-tags": {"latest": "1.0.0"},
                    "versions": {
                        "1.0.0": {
                            "name": "demo-pkg",
                            "version": "1.0.0",
                            "main": "index.js",
                            "dist": {
                                "tarball": f"https://{host}/demo-pkg/-/demo-pkg-1.0.0.tgz",
                                "integrity": integrity,
                                "shasum": hashlib.sha1(tarball).hexdigest(),
                            },
                        }
                    },
                }
            )

        async def npm_tarball(request: web.Request) -> web.Response:
            return web.Response(body=tarball, content_type="application/octet-stream")

        app = web.Application()
        app.router.add_get("/", self._hello)
        app.router.add_get("/simple/", simple_root)
        app.router.add_get("/simple/{project}/", simple_project)
        app.router.add_get(f"/files/{wheel_name}", wheel_file)
        app.router.add_get("/demo-pkg", packument)
        app.router.add_get("/demo-pkg/-/demo-pkg-1.0.0.tgz", npm_tarball)
        app.router.add_static("/repo.git/", repo)  # git's dumb HTTP protocol: static files
        app.router.add_static("/maven2/", make_maven_repo(self.base / "maven2"))
        app.router.add_static("/files/", self.www)  # the same files as the plain origin
        return app


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with World(tmp_path_factory.mktemp("world")) as w:
        yield w


# -- running the CLI ------------------------------------------------------------------------------


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: no proxy, CA or UPSTREAMPROXY_* variables from the test runner."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(ROOT),
    }
    env.update(extra)
    return env


def cli(
    *args: str, env: Mapping[str, str], timeout: float = 30, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "upstreamproxy", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
    )


def write_token(path: Path, token: str = TOKEN) -> Path:
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


@dataclass
class Started:
    proc: subprocess.Popen[str]
    state_dir: Path
    token_file: Path
    log_file: Path
    ready_line: str
    env: dict[str, str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def document(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.state_dir / "env.json").read_text())
        return loaded

    def exports(self) -> dict[str, str]:
        exported: dict[str, str] = self.document()["env"]
        return exported

    def tool_env(self, home: Path, **extra: str) -> dict[str, str]:
        """ONLY the injected environment, on top of PATH/HOME/LANG."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "LANG": "C.UTF-8",
        }
        env.update(self.exports())
        env.update(extra)
        return env

    def stop(self) -> str:
        """SIGTERM, wait, and return the process's whole log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.log_file.read_text(errors="replace")


def start_session(
    world: World,
    base: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    log_level: str = "INFO",
    token: str | None = TOKEN,
    via: Sequence[str] = (),
) -> Started:
    """Run ``upstreamproxy start`` in the foreground until its readiness line (or its exit).

    ``via`` runs it through another command, given the start command line as its last
    arguments (``bash -c 'exec "$@" --ca-file <(...)' bash``).
    """
    base.mkdir(parents=True, exist_ok=True)
    token_file = base / "token"
    if token is not None:
        write_token(token_file, token)
    state = base / "state"
    log_file = base / "start.log"
    run_env = dict(env) if env is not None else clean_env(base)
    argv = [
        *via,
        sys.executable,
        "-m",
        "upstreamproxy",
        "--log-level",
        log_level,
        "start",
        "--token-file",
        str(token_file),
        "--session-id",
        SESSION_ID,
        "--egress-url",
        world.egress_url,
        "--state-dir",
        str(state),
        *args,
    ]
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            argv, env=run_env, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT
        )
    assert proc.stdout is not None
    line = _readline(proc, 30)
    return Started(proc, state, token_file, log_file, line, run_env)


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(
        target=lambda: result.append(proc.stdout.readline()),  # type: ignore[union-attr]
        daemon=True,
    )
    reader.start()
    reader.join(timeout)
    if not result:
        proc.kill()
        proc.wait()
        raise AssertionError("upstreamproxy start printed nothing within the timeout")
    return result[0]


@pytest.fixture
def started(world: World, tmp_path: Path) -> Iterator[Started]:
    """A running session (foreground ``start``) for one test."""
    session = start_session(world, tmp_path / "session")
    assert session.ready_line.startswith(READY_PREFIX), session.stop()
    yield session
    session.stop()
