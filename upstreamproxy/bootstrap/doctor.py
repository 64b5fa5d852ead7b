"""``upstreamproxy doctor``: probe real tools through the running relay and say what is wrong.

Public API::

    TOOLS                                   # curl wget git pip npm node python java mvn apt
    class Verdict(StrEnum)                  # reached, tls-trust-failure, proxy-not-honoured,
                                            # blocked-by-policy, not-installed, failed
    class ProbeResult                       # tool, verdict, detail, fix, tunnels
    async diagnose(loaded, url, tools, base_env, timeout) -> list[ProbeResult]
    class ObservingProxy                    # the CONNECT pass-through each probe runs behind

How a probe knows whether the tool used the proxy: each probe runs behind its own
:class:`ObservingProxy`, a loopback pass-through in front of the relay. The probe's
environment is exactly what ``upstreamproxy exec`` would give it, except that every variable
holding the relay's URL holds the pass-through's URL instead. The pass-through records each
CONNECT (target, the status the relay/egress answered, ``X-Upstreamproxy-Reason``) and
forwards bytes unchanged, so TLS is end to end between the tool and the origin as usual.
No CONNECT seen means the tool did not honour the proxy variables; a 403 with a reason means
the egress policy refused the target; a 200 followed by a tool error that mentions
certificates means the tool does not trust the CA super bundle.

An ``http://`` URL probes plain-HTTP forwarding: the tool sends an absolute-form request
instead of a CONNECT, which the pass-through records the same way; the relay's own refusals
carry ``X-Upstreamproxy-Reason``, and any other answer is the origin's (the path works).

Probes run concurrently (each has its own pass-through, so nothing is misattributed) and are
bounded by ``timeout``. Each verdict carries a concrete fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Final

from ..connect_head import REASON_HEADER
from ..tasks import TaskSet
from .state import LoadedSession, session_env

TOOLS: Final = ("curl", "wget", "git", "pip", "npm", "node", "python", "java", "mvn", "apt")
MAX_PROXY_HEAD: Final = 16 * 1024
PROBE_PACKAGE: Final = "upstreamproxy-doctor-probe"
_REASON: Final = REASON_HEADER.lower().encode()
RULE_HEADER: Final = b"x-upstreamproxy-rule"

# Messages by which curl/OpenSSL, git (OpenSSL or GnuTLS), pip/urllib3, Python and Node
# report that the server's certificate chain is not trusted (or does not match).
TLS_TRUST_PATTERNS: Final = re.compile(
    r"certificate verify failed|CERTIFICATE_VERIFY_FAILED|SSL certificate problem"
    r"|unable to get local issuer certificate|self[- ]signed certificate"
    r"|UNABLE_TO_VERIFY_LEAF_SIGNATURE|SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_GET_ISSUER_CERT"
    r"|DEPTH_ZERO_SELF_SIGNED_CERT|unable to verify the first certificate"
    r"|server certificate verification failed|CERT_HAS_EXPIRED|certificate has expired"
    r"|ERR_TLS_CERT_ALTNAME_INVALID|does not match certificate's altnames"
    r"|no alternative certificate subject name matches|SSLCertVerificationError"
    r"|SSL: CERTIFICATE|is not trusted|PKIX path building failed|Certificate verification failed"
    r"|unable to find valid certification path",
    re.IGNORECASE,
)


class Verdict(StrEnum):
    REACHED = "reached"
    TLS_TRUST_FAILURE = "tls-trust-failure"
    PROXY_NOT_HONOURED = "proxy-not-honoured"
    BLOCKED_BY_POLICY = "blocked-by-policy"
    NOT_INSTALLED = "not-installed"
    NOT_APPLICABLE = "not-applicable"
    FAILED = "failed"


@dataclass
class TunnelSeen:
    """One CONNECT (or plain-HTTP request) the pass-through forwarded, and the answer.

    For a plain-HTTP request ``status`` is 200 whenever the relay forwarded it (the
    origin's own status is ``origin_status``); a refusal by the relay or the egress keeps
    its status, recognised by its ``X-Upstreamproxy-Reason``.
    """

    target: str
    status: int | None = None
    reason: str | None = None
    rule: str | None = None
    plain: bool = False
    origin_status: int | None = None


@dataclass(frozen=True)
class ProbeResult:
    tool: str
    verdict: Verdict
    detail: str
    fix: str = ""
    version: str = ""
    tunnels: tuple[TunnelSeen, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.verdict in (Verdict.REACHED, Verdict.NOT_INSTALLED, Verdict.NOT_APPLICABLE)


# -- the observing pass-through -----------------------------------------------------------------


class ObservingProxy:
    """A loopback CONNECT pass-through to the relay that records every tunnel request."""

    def __init__(self, relay_host: str, relay_port: int) -> None:
        self.relay_host = relay_host
        self.relay_port = relay_port
        self.tunnels: list[TunnelSeen] = []
        self._server: asyncio.Server | None = None
        self._tasks = TaskSet()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", 0, limit=MAX_PROXY_HEAD
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._tasks.cancel_all(grace=2)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def __aenter__(self) -> ObservingProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.spawn(self._handle(reader, writer))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                async with asyncio.timeout(10):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (
                TimeoutError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ConnectionError,
            ):
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            plain = len(parts) >= 2 and parts[0] != "CONNECT"
            if plain:
                url = urllib.parse.urlsplit(parts[1])
                target = f"{url.hostname}:{url.port or 80}" if url.hostname else parts[1]
            else:
                target = parts[1] if len(parts) >= 2 else request_line
            seen = TunnelSeen(target, plain=plain)
            self.tunnels.append(seen)
            try:
                up_reader, upstream = await asyncio.open_connection(
                    self.relay_host, self.relay_port
                )
                upstream.write(head)
                await upstream.drain()
                async with asyncio.timeout(60):
                    answer = await up_reader.readuntil(b"\r\n\r\n")
            except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                seen.reason = "the relay did not answer"
                return
            _parse_answer(answer, seen)
            writer.write(answer)
            await writer.drain()
            if seen.status == 200 or seen.plain:
                await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (ConnectionError, OSError):
            pass
        finally:
            for stream in (writer, upstream):
                if stream is not None:
                    stream.close()


def _parse_answer(answer: bytes, seen: TunnelSeen) -> None:
    lines = answer.split(b"\r\n")
    fields = lines[0].split(None, 2)
    if len(fields) >= 2 and fields[1].isdigit():
        seen.status = int(fields[1])
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == _REASON:
            seen.reason = value.strip().decode("latin-1")
        elif name.strip().lower() == RULE_HEADER:
            seen.rule = value.strip().decode("latin-1")
    if seen.plain and seen.reason is None and seen.status is not None:
        # Not a refusal by the relay or the egress: the origin answered through the tunnel.
        seen.origin_status, seen.status = seen.status, 200


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(64 * 1024):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except (ConnectionError, OSError):
        pass


# -- probes -------------------------------------------------------------------------------------

NODE_PROBE: Final = """
const client = require(process.argv[1].startsWith('https:') ? 'https' : 'http');
const req = client.get(process.argv[1], (res) => {
  console.log('HTTP ' + res.statusCode);
  res.resume();
  res.on('end', () => process.exit(0));
});
req.setTimeout(%d, () => req.destroy(new Error('timed out')));
req.on('error', (e) => { console.error((e.code || 'error') + ': ' + e.message); process.exit(1); });
"""

PYTHON_PROBE: Final = """
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:
        print("HTTP", r.status)
except urllib.error.HTTPError as e:
    print("HTTP", e.code)
except Exception as e:
    print(type(e).__name__ + ":", getattr(e, "reason", e), file=sys.stderr)
    sys.exit(1)
"""


JAVA_PROBE: Final = """
import java.net.HttpURLConnection;
import java.net.URL;

public class UpstreamproxyProbe {
    public static void main(String[] args) throws Exception {
        HttpURLConnection c = (HttpURLConnection) new URL(args[0]).openConnection();
        int ms = Integer.parseInt(args[1]) * 1000;
        c.setConnectTimeout(ms);
        c.setReadTimeout(ms);
        System.out.println("HTTP " + c.getResponseCode());
    }
}
"""

MAVEN_PROBE_POM: Final = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <parent>
    <groupId>upstreamproxy.doctor</groupId><artifactId>probe</artifactId><version>0</version>
    <relativePath/>
  </parent>
  <!-- "central" overridden: Maven asks the probed URL only -->
  <artifactId>probe-child</artifactId>
  <packaging>pom</packaging>
  <repositories><repository><id>central</id><url>{url}</url></repository></repositories>
</project>
"""


@dataclass(frozen=True)
class Probe:
    tool: str
    executable: str
    argv: list[str]
    extra_env: dict[str, str]
    #: Given (returncode, stdout, stderr): a short "reached" detail, or None.
    reached: Callable[[int, str, str], str | None]


def _http_code(rc: int, out: str, err: str) -> str | None:
    code = out.strip()[-3:]
    return f"HTTP {code}" if rc == 0 and code.isdigit() and code != "000" else None


def _git_reached(rc: int, out: str, err: str) -> str | None:
    if rc == 0:
        return "git ls-remote succeeded"
    match = re.search(
        r"returned error: (\d{3})|repository '[^']*' not found|not valid: is this a "
        r"git repository|Authentication failed|could not read Username",
        err,
    )
    if match:
        return f"the server answered ({match.group(0)}): the proxy path works"
    return None


def _pip_reached(rc: int, out: str, err: str) -> str | None:
    if TLS_TRUST_PATTERNS.search(err) or "ProxyError" in err or "Could not fetch URL" in err:
        return None
    if rc == 0 or "No matching distribution found" in err or "Could not find a version" in err:
        return "the index answered"
    return None


def _npm_reached(rc: int, out: str, err: str) -> str | None:
    if rc == 0:
        return "the registry answered"
    match = re.search(r"E404|404 Not Found|EJSONPARSE|E40[0-9]|E5\d\d", err)
    return f"the registry answered ({match.group(0)})" if match else None


def _status_line(rc: int, out: str, err: str) -> str | None:
    match = re.search(r"HTTP (\d{3})", out)
    return f"HTTP {match.group(1)}" if rc == 0 and match else None


def _wget_reached(rc: int, out: str, err: str) -> str | None:
    if rc == 0:
        return "wget fetched the URL"
    match = re.search(r"ERROR (\d{3})", err)
    return f"the origin answered HTTP {match.group(1)}" if rc == 8 and match else None


def _mvn_reached(rc: int, out: str, err: str) -> str | None:
    text = out + err
    if rc == 0 or re.search(r"Could not find artifact|was not found in|status code: 404", text):
        return "the repository answered"
    return None


def _apt_reached(rc: int, out: str, err: str) -> str | None:
    text = out + err
    if TLS_TRUST_PATTERNS.search(text):
        return None
    match = re.search(r"\b(404\s+Not Found|Hit:|Get:|Ign:)", text)
    return f"the repository answered ({match.group(1).strip()})" if match else None


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _apt_scratch(base: Path, url: str, seconds: str) -> list[str]:
    """apt-get options that keep every file it reads or writes under ``base``."""
    for sub in ("state/lists/partial", "cache/archives/partial", "etc/preferences.d", "log"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "state" / "status").write_text("")
    (base / "etc" / "sources.list").write_text(f"deb [trusted=yes] {url} ./\n")
    settings = {
        "Dir::State": base / "state",
        "Dir::State::status": base / "state" / "status",
        "Dir::Cache": base / "cache",
        "Dir::Etc::SourceList": base / "etc" / "sources.list",
        "Dir::Etc::SourceParts": base / "etc" / "sources.list.d",
        "Dir::Etc::PreferencesParts": base / "etc" / "preferences.d",
        "Dir::Log": base / "log",
        "Debug::NoLocking": "1",
        "APT::Sandbox::User": "root" if os.geteuid() == 0 else "",
        "Acquire::Retries": "0",
        "Acquire::http::Timeout": seconds,
        "Acquire::https::Timeout": seconds,
    }
    options: list[str] = ["-q"]
    for key, value in settings.items():
        if value != "":
            options += ["-o", f"{key}={value}"]
    return options


def _which(name: str, env: Mapping[str, str]) -> str | None:
    return shutil.which(name, path=env.get("PATH"))


def build_probe(
    tool: str, url: str, env: Mapping[str, str], workdir: Path, timeout: float
) -> Probe | None:
    """The probe for ``tool``, or None when it is not installed (on the session's PATH)."""
    seconds = f"{max(1, int(timeout))}"
    if tool == "curl":
        exe = _which("curl", env)
        argv = ["-sS", "-o", os.devnull, "-w", "%{http_code}", "--max-time", seconds, url]
        return Probe(tool, exe, argv, {}, _http_code) if exe else None
    if tool == "git":
        exe = _which("git", env)
        argv = ["-c", "http.sslVerify=true", "ls-remote", url]
        return (
            Probe(
                tool, exe, argv, {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}, _git_reached
            )
            if exe
            else None
        )
    if tool == "wget":
        exe = _which("wget", env)
        argv = ["-nv", "-O", os.devnull, "--tries=1", f"--timeout={seconds}", url]
        return Probe(tool, exe, argv, {}, _wget_reached) if exe else None
    if tool == "java":
        exe = _which("java", env)
        if exe is None or _which("javac", env) is None:
            return None  # the probe is a source file: it needs a JDK, not only a JRE
        source = workdir / "UpstreamproxyProbe.java"
        source.write_text(JAVA_PROBE)
        return Probe(tool, exe, [str(source), url, seconds], {}, _status_line)
    if tool == "mvn":
        exe = _which("mvn", env)
        if exe is None:
            return None
        project = workdir / "mvn"
        project.mkdir(exist_ok=True)
        (project / "pom.xml").write_text(MAVEN_PROBE_POM.format(url=_xml(url)))
        argv = [
            "-B",
            "-ntp",
            "-f",
            str(project / "pom.xml"),
            f"-Dmaven.repo.local={workdir / 'm2'}",
            "validate",
        ]
        return Probe(tool, exe, argv, {}, _mvn_reached)
    if tool == "apt":
        exe = _which("apt-get", env)
        if exe is None:
            return None
        argv = [*_apt_scratch(workdir / "apt", url, seconds), "update"]
        return Probe(tool, exe, argv, {}, _apt_reached)
    if tool == "pip":
        exe = _which("pip", env) or _which("pip3", env)
        trusted = (
            ["--trusted-host", urllib.parse.urlsplit(url).netloc] if url.startswith("http:") else []
        )
        argv = [
            "download",
            *trusted,
            "--no-deps",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--retries",
            "0",
            "--timeout",
            seconds,
            "--index-url",
            url,
            "--dest",
            str(workdir / "pip"),
            PROBE_PACKAGE,
        ]
        return Probe(tool, exe, argv, {}, _pip_reached) if exe else None
    if tool == "npm":
        exe = _which("npm", env)
        argv = [
            "view",
            "--registry",
            url,
            "--fetch-retries=0",
            f"--fetch-timeout={int(timeout * 1000)}",
            "--cache",
            str(workdir / "npm-cache"),
            "--no-update-notifier",
            PROBE_PACKAGE,
            "version",
        ]
        return Probe(tool, exe, argv, {}, _npm_reached) if exe else None
    if tool == "node":
        exe = _which("node", env)
        argv = ["-e", NODE_PROBE % int(timeout * 1000), url]
        return Probe(tool, exe, argv, {}, _status_line) if exe else None
    if tool == "python":
        exe = _which("python3", env) or _which("python", env)
        return (
            Probe(tool, exe, ["-c", PYTHON_PROBE, url, seconds], {}, _status_line) if exe else None
        )
    raise ValueError(f"unknown tool {tool!r}; choose from {', '.join(TOOLS)}")


async def _version(executable: str, env: Mapping[str, str]) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            executable,
            "--version",
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError:
        return ""
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
    except TimeoutError:
        await _end_group(proc)
        return ""
    # JVMs announce JAVA_TOOL_OPTIONS (which holds the relay's address) before the version.
    first = [
        line
        for line in out.decode(errors="replace").strip().splitlines()
        if "Picked up" not in line
    ]
    match = re.search(r"v?\d+\.\d+(?:\.\d+)?", first[0]) if first else None
    return match.group(0) if match else ""


def parse_node_version(text: str) -> tuple[int, int, int] | None:
    match = re.search(r"v?(\d+)\.(\d+)\.(\d+)", text)
    if not match:
        return None
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def node_honours_env_proxy(version: tuple[int, int, int]) -> bool:
    """Node's http/https modules use HTTPS_PROXY with NODE_USE_ENV_PROXY=1 from 22.21 / 24.5."""
    major, minor, _ = version
    return (major == 22 and minor >= 21) or (major == 24 and minor >= 5) or major >= 25


# -- classification -----------------------------------------------------------------------------

NOT_HONOURED_FIX: Final = {
    "wget": "wget reads https_proxy/http_proxy; check `use_proxy`/`no_proxy` lines in "
    "/etc/wgetrc and the file WGETRC names",
    "java": "JVMs read the -Dhttps.proxyHost/-Dhttp.proxyHost options of JAVA_TOOL_OPTIONS; "
    "keep it as exported (a launcher that clears it, or a client built with "
    "Proxy.NO_PROXY, goes direct)",
    "mvn": "Maven takes the JVM proxy properties from JAVA_TOOL_OPTIONS unless settings.xml "
    "has an active <proxy>: check ~/.m2/settings.xml and ${maven.home}/conf/settings.xml",
    "apt": "apt reads http_proxy/https_proxy; an Acquire::http::Proxy line in "
    "/etc/apt/apt.conf.d overrides them (`apt-config dump | grep -i proxy`); with sudo, "
    "keep the variables: `sudo --preserve-env=http_proxy,https_proxy,no_proxy,APT_CONFIG`",
    "curl": "curl reads https_proxy/HTTPS_PROXY; look for `proxy`/`noproxy` lines in ~/.curlrc "
    "and check that the URL's host is not in NO_PROXY",
    "git": "a git http.proxy setting overrides the environment: check "
    "`git config --show-origin --get-regexp 'http.*proxy'`",
    "pip": "check `pip config list` for proxy= and that the URL's host is not in NO_PROXY",
    "npm": "an .npmrc proxy/https-proxy/noproxy setting may override the environment: check "
    "`npm config get https-proxy noproxy`",
    "python": "urllib and requests honour HTTPS_PROXY by default; a client built with "
    "trust_env=False (requests, httpx, aiohttp) ignores it",
}
TLS_FIX: Final = {
    "wget": "GNU wget built with GnuTLS ignores SSL_CERT_FILE: it must read "
    "`ca_certificate = {bundle}` from the wgetrc WGETRC names; keep WGETRC as exported",
    "java": "the JVM must use the PKCS#12 trust store made from {bundle}: keep the "
    "-Djavax.net.ssl.trustStore options of JAVA_TOOL_OPTIONS as exported",
    "mvn": "Maven's JVM must use the trust store from JAVA_TOOL_OPTIONS (made from "
    "{bundle}); a -Djavax.net.ssl.trustStore in MAVEN_OPTS or .mvn/jvm.config overrides it",
    "apt": 'apt\'s https method must read `Acquire::https::CAInfo "{bundle}"` from the file '
    "APT_CONFIG names; keep APT_CONFIG (with sudo: --preserve-env=APT_CONFIG)",
    "curl": "curl must trust the super bundle {bundle}: keep CURL_CA_BUNDLE/SSL_CERT_FILE "
    "as exported and remove `cacert`/`capath`/`insecure` from ~/.curlrc",
    "git": "git must trust {bundle}: `git config --get http.sslCAInfo` overrides "
    "GIT_SSL_CAINFO; unset it or point it at the bundle",
    "pip": "pip must trust {bundle}: a `cert` in `pip config list` overrides PIP_CERT; unset "
    "it or point it at the bundle",
    "npm": "npm must trust {bundle}: a `cafile`/`ca` in .npmrc overrides npm_config_cafile; "
    "check `npm config get cafile ca`",
    "node": "Node reads NODE_EXTRA_CA_CERTS={bundle} only at start-up; a client passing its "
    "own `ca` option replaces the default roots",
    "python": "Python must trust {bundle}: keep SSL_CERT_FILE/REQUESTS_CA_BUNDLE as exported; "
    "certifi-only clients (httpx, aiohttp) need ssl.create_default_context()",
}
NOT_INSTALLED_FIX: Final = {
    "wget": "install wget (apt-get install wget) if you need it",
    "java": "install a JDK (apt-get install default-jdk-headless) to probe the JVM; a JRE "
    "alone cannot compile the probe",
    "mvn": "install Maven (apt-get install maven) if you need it",
    "apt": "apt-get is only on Debian and Ubuntu",
    "curl": "install curl (apt-get install curl) if you need it",
    "git": "install git (apt-get install git) if you need it",
    "pip": "install pip (python3 -m ensurepip, or apt-get install python3-pip) if you need it",
    "npm": "install npm (apt-get install npm) if you need it",
    "node": "install Node.js (apt-get install nodejs) if you need it",
    "python": "install Python 3 if you need it",
}


def _tail(text: str, limit: int = 200) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


def classify(
    tool: str,
    rc: int | None,
    out: str,
    err: str,
    tunnels: Sequence[TunnelSeen],
    *,
    bundle: str,
    version: str = "",
    env: Mapping[str, str] | None = None,
    timeout: float = 0.0,
) -> tuple[Verdict, str, str]:
    """(verdict, detail, fix) for a finished probe; ``rc`` None means it timed out."""
    if not tunnels:
        detail = "no request reached the relay: the tool did not use the proxy variables"
        if rc is None:
            detail += f" (and timed out after {timeout:g}s)"
        elif rc != 0 and _tail(err):
            detail += f" ({_tail(err)})"
        if tool == "node":
            return Verdict.PROXY_NOT_HONOURED, detail, _node_fix(version, env or {})
        return Verdict.PROXY_NOT_HONOURED, detail, NOT_HONOURED_FIX[tool]
    refused = next((t for t in tunnels if t.status != 200), None)
    if refused is not None:
        if refused.status == 403 and refused.reason:
            rule = f", rule {refused.rule}" if refused.rule and refused.rule != "-" else ""
            return (
                Verdict.BLOCKED_BY_POLICY,
                f"the egress refused {refused.target}: {refused.reason}{rule}",
                f"ask the platform to allow {refused.target} in the session's policy, "
                "or use a host it allows",
            )
        if refused.status == 407:
            return (
                Verdict.FAILED,
                f"the egress refused the session's credentials for "
                f"{refused.target} ({refused.reason or 'HTTP 407'})",
                "the session token was refused (expired?): restart the session with a "
                "fresh token file",
            )
        if not refused.status:  # a frozen egress: the relay waits for its 200 (or pong)
            return (
                Verdict.FAILED,
                f"no answer to the CONNECT for {refused.target}"
                + (f" within {timeout:g}s" if rc is None else ""),
                "the egress (or the relay) does not answer: frozen, overloaded, or a path "
                "that drops packets; check that both are alive (the relay answers 504 once "
                "the egress missed --ping-interval + --ping-timeout, 40 s)",
            )
        status = f"HTTP {refused.status}"
        return (
            Verdict.FAILED,
            f"the relay answered {status} for {refused.target}"
            + (f": {refused.reason}" if refused.reason else ""),
            "502/504 mean the relay could not reach the egress or the egress could not "
            "dial the target: check the egress URL, `upstreamproxy start` logs and the "
            "egress audit log",
        )
    if rc is not None:
        reached = _reached(tool, rc, out, err)
        if reached:
            return Verdict.REACHED, reached, ""
    if TLS_TRUST_PATTERNS.search(err) or TLS_TRUST_PATTERNS.search(out):
        return (
            Verdict.TLS_TRUST_FAILURE,
            f"the tunnel opened but TLS verification failed: {_tail(_tls_line(err + out))}",
            TLS_FIX[tool].format(bundle=bundle) + "; if the origin's certificate is "
            "signed neither by a public root nor by the egress CA, no client trusts it",
        )
    if rc is None:
        return (
            Verdict.FAILED,
            f"timed out after {timeout:g}s with the tunnel open",
            "the origin did not answer in time: try a longer --timeout or another URL",
        )
    return (
        Verdict.FAILED,
        f"exit status {rc}: {_tail(err) or _tail(out) or 'no output'}",
        "run the tool by hand with `upstreamproxy exec -- ...` to see its full output",
    )


def _tls_line(text: str) -> str:
    for line in text.splitlines():
        if TLS_TRUST_PATTERNS.search(line):
            return line
    return text


def _reached(tool: str, rc: int, out: str, err: str) -> str | None:
    check = {
        "wget": _wget_reached,
        "java": _status_line,
        "mvn": _mvn_reached,
        "apt": _apt_reached,
        "curl": _http_code,
        "git": _git_reached,
        "pip": _pip_reached,
        "npm": _npm_reached,
        "node": _status_line,
        "python": _status_line,
    }[tool]
    return check(rc, out, err)


def _node_fix(version: str, env: Mapping[str, str]) -> str:
    parsed = parse_node_version(version)
    if parsed is not None and not node_honours_env_proxy(parsed):
        return (
            f"Node {version} ignores HTTPS_PROXY in its http/https modules and fetch: use "
            "Node >= 22.21 or >= 24.5 (NODE_USE_ENV_PROXY=1 is already exported), or a "
            "proxy-aware agent (undici EnvHttpProxyAgent, https-proxy-agent)"
        )
    if env.get("NODE_USE_ENV_PROXY") != "1":
        return "set NODE_USE_ENV_PROXY=1 (you set it to something else), or use a proxy agent"
    return "a library that brings its own agent ignores HTTPS_PROXY: give it a proxy agent"


# -- running ------------------------------------------------------------------------------------

#: After a timeout: how long what the killed tool wrote may take to drain.
DRAIN_AFTER_KILL: Final = 2.0


async def _end_group(proc: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    """Kill ``proc`` and its process group (it was started in a session of its own) and
    collect what it wrote, within DRAIN_AFTER_KILL.

    Killing the tool alone is not enough: its helpers (git's ``git-remote-https``, npm's
    workers, apt's methods) inherit its stdout and stderr, and a helper waiting on a silent
    tunnel kept them open, so ``communicate()`` waited with it, well past ``--timeout``.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()  # should the group be out of reach, the tool at least
    try:
        async with asyncio.timeout(DRAIN_AFTER_KILL):
            out, err = await proc.communicate()
    except TimeoutError:  # a helper that left the group holds the pipes: give up on them
        await proc.wait()
        return b"", b""
    return out or b"", err or b""


async def _run_probe(
    probe: Probe,
    env: dict[str, str],
    relay_url: str,
    relay_host: str,
    relay_port: int,
    workdir: Path,
    seconds: float,
    bundle: str,
) -> ProbeResult:
    version = await _version(probe.executable, env)
    async with ObservingProxy(relay_host, relay_port) as observer:
        probe_env = {k: (observer.url if v == relay_url else v) for k, v in env.items()}
        if "JAVA_TOOL_OPTIONS" in probe_env:  # the JVM takes host and port separately
            observer_port = urllib.parse.urlsplit(observer.url).port
            probe_env["JAVA_TOOL_OPTIONS"] = re.sub(
                rf"(-Dhttps?\.proxyPort=){relay_port}\b",
                rf"\g<1>{observer_port}",
                probe_env["JAVA_TOOL_OPTIONS"],
            )
        probe_env.update(probe.extra_env)
        rc: int | None
        try:
            proc = await asyncio.create_subprocess_exec(
                probe.executable,
                *probe.argv,
                env=probe_env,
                cwd=workdir,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its helpers too are ended at the timeout
            )
        except OSError as exc:
            return ProbeResult(
                probe.tool,
                Verdict.FAILED,
                f"cannot run {probe.executable}: {exc.strerror}",
                "check the installation",
                version,
            )
        try:
            out_b, err_b = await asyncio.wait_for(proc.communicate(), seconds)
            rc = proc.returncode
        except TimeoutError:
            # The tool may end just as the timer fires (curl's own --max-time is the same).
            out_b, err_b = await _end_group(proc)
            rc = None
        tunnels = tuple(observer.tunnels)
    out, err = out_b.decode(errors="replace"), err_b.decode(errors="replace")
    verdict, detail, fix = classify(
        probe.tool,
        rc,
        out,
        err,
        tunnels,
        bundle=bundle,
        version=version,
        env=probe_env,
        timeout=seconds,
    )
    return ProbeResult(probe.tool, verdict, detail, fix, version, tunnels)


def not_applicable(tool: str, url: str) -> str | None:
    """Why ``tool`` is not probed against ``url`` (None: it is)."""
    if tool == "mvn" and url.startswith("http:"):
        return "Maven >= 3.8.1 refuses http:// repositories by design (https only)"
    return None


def no_proxy_match(url: str, env: Mapping[str, str]) -> bool:
    """True when tools would go around the proxy for ``url`` because of NO_PROXY."""
    host = urllib.parse.urlsplit(url).hostname or ""
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    return bool(urllib.request.proxy_bypass_environment(host, {"no": no_proxy}))  # type: ignore[attr-defined]


async def diagnose(
    loaded: LoadedSession,
    url: str,
    tools: Sequence[str],
    base_env: Mapping[str, str],
    per_tool_timeout: float = 20.0,
) -> list[ProbeResult]:
    """Probe each tool against ``url`` through the session's relay; results in ``tools`` order."""
    _, env = session_env(loaded, base_env)
    info = loaded.info
    with tempfile.TemporaryDirectory(prefix="upstreamproxy-doctor-") as tmp:
        workdir = Path(tmp)
        skipped = {tool: why for tool in tools if (why := not_applicable(tool, url))}
        probes: dict[str, Probe | None] = {
            tool: build_probe(tool, url, env, workdir, per_tool_timeout)
            for tool in tools
            if tool not in skipped
        }
        results: dict[str, ProbeResult] = {}
        async with asyncio.TaskGroup() as group:
            tasks = {
                tool: group.create_task(
                    _run_probe(
                        probe,
                        env,
                        info.proxy_url,
                        info.proxy_host,
                        info.proxy_port,
                        workdir,
                        per_tool_timeout,
                        info.ca_bundle,
                    )
                )
                for tool, probe in probes.items()
                if probe is not None
            }
        for tool, why in skipped.items():
            results[tool] = ProbeResult(tool, Verdict.NOT_APPLICABLE, why)
        for tool, probe in probes.items():
            if probe is None:
                results[tool] = ProbeResult(
                    tool,
                    Verdict.NOT_INSTALLED,
                    "not found on the session's PATH",
                    NOT_INSTALLED_FIX[tool],
                )
            else:
                results[tool] = tasks[tool].result()
    return [results[tool] for tool in tools]
