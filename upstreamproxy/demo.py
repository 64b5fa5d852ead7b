"""``upstreamproxy demo``: the whole path on loopback, offline, in a few seconds.

In one temporary directory: a throwaway egress CA; an HTTPS origin for ``hello.demo.test``
on 127.0.0.1 whose certificate that CA signed; the egress server (in this process) with a
static token, a policy that allows only the origin, and ``hello.demo.test`` pinned to
127.0.0.1 (no DNS anywhere); then the real ``upstreamproxy start`` as a child process
(token file, CA fetched from the egress's ca-cert endpoint, relay, env files), and real
``curl`` run by ``upstreamproxy exec`` with nothing but the exported environment: one
request that goes through, one the policy refuses. Without curl, Python's urllib makes the
allowed request instead. ``--serve`` keeps everything running until Ctrl-C so the commands
it prints can be tried from another shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from aiohttp import web

from .bootstrap.hardening import HardeningError, is_dumpable
from .bootstrap.start import READY_PREFIX
from .certs import CertificateAuthority, create_ca, issue_leaf, write_private_file
from .egress.auth import Session, StaticTokens
from .egress.policy import PolicyStore, policy_from_allow_list
from .egress.resolver import StaticResolver
from .egress.server import EgressConfig, EgressServer

DEMO_HOST: Final = "hello.demo.test"
BLOCKED_HOST: Final = "blocked.demo.test"
SESSION_ID: Final = "demo-session"
START_TIMEOUT: Final = 20.0
REQUEST_TIMEOUT: Final = 15.0
GREETING: Final = "hello from the demo origin: you came through the relay and the egress\n"

PYTHON_GET: Final = (
    "import sys, urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1], timeout=10) as r:\n"
    "    sys.stdout.write(r.read().decode())\n"
)

_audit_log = logging.getLogger("upstreamproxy.audit")


class _Audit(logging.Handler):
    """Collects the egress's audit records so the summary can show its decisions."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, object]] = []
        self.changed = asyncio.Event()  # the egress logs from the demo's own event loop

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(ValueError):
            self.records.append(json.loads(record.getMessage()))
            self.changed.set()

    async def wait_for(self, count: int, seconds: float) -> None:
        """Audit records are written when a tunnel closes, a moment after the client exits."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while len(self.records) < count:
                    self.changed.clear()
                    await self.changed.wait()


@dataclass
class _Completed:
    returncode: int
    stdout: str
    stderr: str


async def _run(argv: list[str], env: dict[str, str], seconds: float) -> _Completed:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return _Completed(124, "", f"timed out after {seconds:g}s")
    assert proc.returncode is not None
    return _Completed(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def _child_env() -> dict[str, str]:
    """Our environment minus UPSTREAMPROXY_* settings, with this package importable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("UPSTREAMPROXY_") or k == "UPSTREAMPROXY_LOG_LEVEL"
    }
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _cli_name() -> str:
    """How to invoke us from a shell, for the commands we print."""
    if Path(sys.argv[0]).name == "upstreamproxy" or shutil.which("upstreamproxy"):
        return "upstreamproxy"
    for python in ("python3", "python"):
        found = shutil.which(python)
        if found and os.path.realpath(found) == os.path.realpath(sys.executable):
            return f"{python} -m upstreamproxy"
    return f"{shlex.quote(sys.executable)} -m upstreamproxy"


async def _start_origin(ca: CertificateAuthority, base: Path) -> tuple[web.AppRunner, int]:
    leaf = issue_leaf(ca, [DEMO_HOST])
    write_private_file(base / "origin.pem", leaf.chain_pem(), 0o600)
    write_private_file(base / "origin.key", leaf.key_pem(), 0o600)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(base / "origin.pem", base / "origin.key")

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=GREETING)

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port: int = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


class Demo:
    def __init__(self, out: TextIO, serve: bool) -> None:
        self.out = out
        self.serve = serve
        self.cli = _cli_name()
        self.env = _child_env()
        self.audit = _Audit()

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def run(self) -> int:
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="upstreamproxy-demo-") as tmp:
            base = Path(tmp)
            quiet = logging.getLogger("upstreamproxy")
            saved = quiet.level, _audit_log.level, _audit_log.propagate
            _audit_log.addHandler(self.audit)
            _audit_log.setLevel(logging.INFO)
            if not os.environ.get("UPSTREAMPROXY_LOG_LEVEL"):
                # The egress's own INFO lines and raw audit JSON would drown the summary.
                quiet.setLevel(logging.WARNING)
                _audit_log.propagate = False
            try:
                return await self._scenario(base, started)
            finally:
                _audit_log.removeHandler(self.audit)
                quiet.setLevel(saved[0])
                _audit_log.setLevel(saved[1])
                _audit_log.propagate = saved[2]

    async def _scenario(self, base: Path, started: float) -> int:
        ca = create_ca("upstreamproxy demo egress CA")
        origin, port = await _start_origin(ca, base)
        target = f"https://{DEMO_HOST}:{port}/"
        token = secrets.token_urlsafe(24)
        egress = EgressServer(
            EgressConfig(ca_cert_pem=ca.cert_pem()),
            StaticTokens({token: Session(SESSION_ID)}),
            PolicyStore(policy_from_allow_list([f"{DEMO_HOST}:{port}"], ["127.0.0.0/8"])),
            resolver=StaticResolver({DEMO_HOST: ["127.0.0.1"]}),
        )
        start: asyncio.subprocess.Process | None = None
        try:
            await egress.start()
            self.say(f"upstreamproxy demo: everything on loopback and offline, in {base}")
            self.say(
                f"  origin  {target} -> 127.0.0.1:{port}, certificate signed by a "
                "throwaway egress CA"
            )
            self.say(
                f"  egress  {egress.url} (in this process): allows only "
                f"{DEMO_HOST}:{port}, resolves it to 127.0.0.1 itself"
            )
            start, state = await self._start_session(base, egress.url, token)
            if start is None:
                return 1
            return await self._requests(base, state, target, port, start, started)
        finally:
            if start is not None and start.returncode is None:
                start.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(start.wait(), 10)
                except TimeoutError:
                    start.kill()
                    await start.wait()
            await egress.stop()
            await origin.cleanup()

    async def _start_session(
        self, base: Path, egress_url: str, token: str
    ) -> tuple[asyncio.subprocess.Process | None, Path]:
        token_file = base / "token"
        write_private_file(token_file, token.encode(), 0o600)
        state = base / "state"
        log_path = base / "start.log"
        argv = [
            sys.executable,
            "-m",
            "upstreamproxy",
            "start",
            "--token-file",
            str(token_file),
            "--session-id",
            SESSION_ID,
            "--egress-url",
            egress_url,
            "--state-dir",
            str(state),
            "--fail-closed",
        ]
        if os.geteuid() == 0:
            # A first look must work wherever this Python lives (often under a private /root,
            # which a separate relay user cannot run); "Hardened deployment" shows that setup.
            argv += ["--relay-user", "root"]
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
            )
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            line = b""
        if not line.decode().startswith(READY_PREFIX):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            self.say("demo FAILED: `upstreamproxy start` did not become ready; its log:")
            self.say(log_path.read_text(errors="replace")[-3000:])
            return None, state
        session = json.loads((state / "env.json").read_text())["session"]
        try:
            hardened = "non-dumpable" if not is_dumpable(proc.pid) else "DUMPABLE"
        except HardeningError:
            hardened = "dumpability unknown"
        left = "kept (unexpected)" if token_file.exists() else "deleted"
        self.say(
            f"  start   {self.cli} start (pid {proc.pid}, {hardened}, core dumps off): "
            f"CA fetched from the egress, relay {session['proxy_url']}, token file {left}"
        )
        self.say(
            f"  env     {state / 'env.sh'} (exec below finds it through "
            f"UPSTREAMPROXY_STATE_DIR={state})"
        )
        return proc, state

    async def _requests(
        self,
        base: Path,
        state: Path,
        target: str,
        port: int,
        start: asyncio.subprocess.Process,
        started: float,
    ) -> int:
        exec_argv = [sys.executable, "-m", "upstreamproxy", "exec", "--"]
        shown = f"{self.cli} exec --"
        self.env["UPSTREAMPROXY_STATE_DIR"] = str(state)
        curl = shutil.which("curl", path=self.env.get("PATH"))
        self.say()
        if curl:
            self.say(f"$ {shown} curl -sS {target}")
            allowed = await _run(
                [*exec_argv, "curl", "-sS", "--max-time", "10", target], self.env, REQUEST_TIMEOUT
            )
        else:
            self.say("(curl is not installed: using Python's urllib with the same environment)")
            self.say(f"$ {shown} python3 -c '<urllib GET>' {target}")
            allowed = await _run(
                [*exec_argv, sys.executable, "-c", PYTHON_GET, target], self.env, REQUEST_TIMEOUT
            )
        self.say((allowed.stdout or allowed.stderr).rstrip())
        ok = allowed.returncode == 0 and allowed.stdout == GREETING

        blocked = f"https://{BLOCKED_HOST}/"
        denied_ok = False
        if curl:
            self.say(f"$ {shown} curl -sS -o /dev/null -D - {blocked}")
            denied = await _run(
                [
                    *exec_argv,
                    "curl",
                    "-sS",
                    "--max-time",
                    "10",
                    "-o",
                    os.devnull,
                    "-D",
                    "-",
                    blocked,
                ],
                self.env,
                REQUEST_TIMEOUT,
            )
            head = [
                line
                for line in denied.stdout.splitlines()
                if line.startswith("HTTP/") or line.lower().startswith("x-upstreamproxy")
            ]
            self.say("\n".join(head) or denied.stderr.rstrip())
            self.say(denied.stderr.rstrip())
            denied_ok = any(" 403 " in line for line in head)
        else:
            session = json.loads((state / "env.json").read_text())["session"]
            self.say(f"$ raw CONNECT {BLOCKED_HOST}:443 to the relay {session['proxy_url']}")
            answer = await _raw_connect(session["proxy_url"], f"{BLOCKED_HOST}:443")
            self.say(answer.strip())
            denied_ok = " 403 " in answer.split("\r\n", 1)[0]

        await self._show_audit()
        self.say()
        if self.serve:
            self._print_try_it(state, target, port)
            self.say("serving until Ctrl-C ...")
            await _wait_for_signal(start)
        else:
            self.say(
                f"To keep all of this running and try it from another shell: "
                f"{self.cli} demo --serve"
            )
            self.say(
                "In a real sandbox: upstreamproxy start --token-file FILE --session-id ID "
                "--egress-url wss://EGRESS/v1/code/upstreamproxy/ws"
            )
        elapsed = time.monotonic() - started
        if ok and denied_ok:
            self.say(
                f"demo OK in {elapsed:.1f}s: the allowed request went through, the other "
                "was refused by policy"
            )
            return 0
        self.say(
            "demo FAILED: "
            + ("" if ok else "the allowed request did not get the greeting; ")
            + ("" if denied_ok else "the blocked request was not refused with 403")
        )
        self.say((base / "start.log").read_text(errors="replace")[-3000:])
        return 1

    async def _show_audit(self) -> None:
        await self.audit.wait_for(2, 1.0)
        if not self.audit.records:
            return
        self.say("egress audit log:")
        for record in self.audit.records:
            self.say(
                f"  {record.get('decision')!s:<5} {record.get('target')} "
                f"reason={record.get('reason')} resolved={record.get('resolved')} "
                f"bytes={record.get('bytes_up')}/{record.get('bytes_down')}"
            )

    def _print_try_it(self, state: Path, target: str, port: int) -> None:
        env_sh = state / "env.sh"
        self.say("Try it from another shell while this runs:")
        self.say(f"  . {env_sh} && curl {target}")
        self.say(
            f"  {self.cli} exec --state-dir {state} -- python3 -c "
            f"\"import urllib.request as u; print(u.urlopen('{target}').read().decode())\""
        )
        self.say(f"  {self.cli} env --state-dir {state} --format json")
        self.say(f"  {self.cli} doctor --state-dir {state} --url {target}")


async def _raw_connect(proxy_url: str, target: str) -> str:
    host, _, port = proxy_url.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        return head.decode("latin-1")
    finally:
        writer.close()


async def _wait_for_signal(start: asyncio.subprocess.Process) -> None:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def _stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _stop)
    try:
        ended: asyncio.Future[int] = asyncio.ensure_future(start.wait())
        waiting: list[asyncio.Future[Any]] = [stop, ended]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if ended.done():
            print("upstreamproxy start exited; stopping the demo", file=sys.stderr)
        ended.cancel()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def run_demo(serve: bool = False, out: TextIO | None = None) -> int:
    return asyncio.run(Demo(out or sys.stdout, serve).run())
