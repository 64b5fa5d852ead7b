"""The exported environment: decisions, merges, renderers parsed back, and real tools reading it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from testpki import make_ca

from upstreamproxy.bootstrap.proxy_env import (
    CA_VARIABLES,
    DEFAULT_NO_PROXY,
    HTTP_PROXY_VARIABLES,
    PROXY_VARIABLES,
    Action,
    EnvPlan,
    EnvVar,
    ToolFiles,
    apply,
    java_non_proxy_hosts,
    proxy_environment,
    render_dotenv,
    render_json,
    render_sh,
    user_ca_files,
)
from upstreamproxy.errors import ConfigError

URL = "http://127.0.0.1:41234"
BUNDLE = Path("/run/upstreamproxy/ca-bundle.pem")
DEFAULT_NO_PROXY_VALUE = ",".join(DEFAULT_NO_PROXY)

HOSTILE = [
    "with space",
    "single'quote",
    'double"quote',
    "$(touch {marker})",
    "`touch {marker}`",
    "${HOME}",
    "back\\slash",
    "new\nline",
    "trailing newline\n",
    "semi;colon && touch {marker}",
    "ünïcødé ✓",
    "",
    "-n",
    "#hash",
    "a=b",
]


def plan_for(base_env: dict[str, str] | None = None, **kwargs: object) -> EnvPlan:
    return proxy_environment(URL, BUNDLE, base_env=base_env or {}, **kwargs)  # type: ignore[arg-type]


# -- decisions ----------------------------------------------------------------------------------


def test_clean_environment() -> None:
    plan = plan_for()
    env = plan.exports()
    for name in (*PROXY_VARIABLES, *HTTP_PROXY_VARIABLES):
        assert env[name] == URL
    for name in CA_VARIABLES:
        assert env[name] == str(BUNDLE)
    assert env["NO_PROXY"] == env["no_proxy"] == DEFAULT_NO_PROXY_VALUE
    assert env["NODE_USE_ENV_PROXY"] == "1"
    for name in ("ALL_PROXY", "all_proxy", "WGETRC", "APT_CONFIG", "JAVA_TOOL_OPTIONS"):
        assert name not in env  # the tool files only exist when start wrote them
    assert {var.action for var in plan.variables} == {Action.SET}
    assert plan.notes == ()
    assert all(var.reason for var in plan.variables)
    # the minimum DESIGN.md asks for
    for name in (
        "HTTPS_PROXY",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
        "SSL_CERT_FILE",
        "NODE_EXTRA_CA_CERTS",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "GIT_SSL_CAINFO",
        "PIP_CERT",
        "npm_config_https_proxy",
        "npm_config_cafile",
    ):
        assert name in env


def test_default_no_proxy_has_literal_loopback_and_cidrs() -> None:
    entries = DEFAULT_NO_PROXY
    for literal in ("localhost", "127.0.0.1", "::1", ".localhost"):
        assert literal in entries
    for cidr in (
        "169.254.0.0/16",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
        "fe80::/10",
    ):
        assert cidr in entries


def test_no_proxy_merge_keeps_user_order_and_dedupes() -> None:
    plan = plan_for(
        {"NO_PROXY": "example.com, .corp.internal,,localhost", "no_proxy": "EXAMPLE.com,git.local"},
        no_proxy_extra=["egress.svc", "git.local", " 10.0.0.0/8 "],
    )
    value = plan.exports()["NO_PROXY"]
    assert plan.exports()["no_proxy"] == value
    entries = value.split(",")
    assert entries[:4] == ["example.com", ".corp.internal", "localhost", "git.local"]
    assert entries[-1] == "egress.svc"
    assert len(entries) == len({e.lower() for e in entries})
    assert set(DEFAULT_NO_PROXY) <= set(entries)
    assert plan.get("NO_PROXY").action is Action.MERGED  # type: ignore[union-attr]
    assert plan.get("no_proxy").action is Action.MERGED  # type: ignore[union-attr]


def test_no_proxy_user_garbage_dropped_with_note() -> None:
    plan = plan_for({"NO_PROXY": "good.example,bad\x1bentry,in side"})
    assert plan.exports()["NO_PROXY"].split(",")[0] == "good.example"
    assert "bad" not in plan.exports()["NO_PROXY"]
    assert "side" not in plan.exports()["NO_PROXY"]
    assert len([n for n in plan.notes if "dropped" in n]) == 2


@pytest.mark.parametrize("extra", ["", "a b", "a,b", "x\ny"])
def test_no_proxy_extra_must_be_clean(extra: str) -> None:
    with pytest.raises(ConfigError) as info:
        plan_for(no_proxy_extra=[extra])
    assert info.value.field == "no_proxy"


def test_no_proxy_star_is_kept_but_noted() -> None:
    plan = plan_for({"no_proxy": "*"})
    assert plan.exports()["NO_PROXY"].startswith("*,")
    assert any("bypass the relay entirely" in n for n in plan.notes)


def test_existing_proxy_is_replaced_with_redacted_reason() -> None:
    plan = plan_for({"HTTPS_PROXY": "http://bob:hunter2@corp-proxy:3128", "https_proxy": URL})
    upper, lower = plan.get("HTTPS_PROXY"), plan.get("https_proxy")
    assert upper is not None and lower is not None
    assert upper.action is Action.REPLACED and upper.value == URL
    assert "hunter2" not in upper.reason and "corp-proxy:3128" in upper.reason
    assert lower.action is Action.SET


def test_ca_variables_set_merged_or_replaced() -> None:
    base = {
        "SSL_CERT_FILE": str(BUNDLE),  # from an earlier run
        "NODE_EXTRA_CA_CERTS": "/usr/local/share/ca-certificates/corp.crt",
        "REQUESTS_CA_BUNDLE": "/opt/venv/custom.pem",
    }
    plan = plan_for(base, merged_ca_files=["/usr/local/share/ca-certificates/corp.crt"])
    ssl_file = plan.get("SSL_CERT_FILE")
    node = plan.get("NODE_EXTRA_CA_CERTS")
    requests = plan.get("REQUESTS_CA_BUNDLE")
    assert ssl_file is not None and ssl_file.action is Action.SET
    assert node is not None and node.action is Action.MERGED and "corp.crt" in node.reason
    assert requests is not None and requests.action is Action.REPLACED
    assert "no longer trusted" in requests.reason
    assert {node.value, requests.value, ssl_file.value} == {str(BUNDLE)}


def test_node_use_env_proxy_user_choice_is_kept() -> None:
    plan = plan_for({"NODE_USE_ENV_PROXY": "0"})
    var = plan.get("NODE_USE_ENV_PROXY")
    assert var is not None and var.action is Action.KEPT and var.value == "0"
    assert "NODE_USE_ENV_PROXY" not in plan.exports()
    assert apply(plan, {"NODE_USE_ENV_PROXY": "0"})["NODE_USE_ENV_PROXY"] == "0"


def test_unmanaged_proxy_variables_are_left_alone_and_noted() -> None:
    base = {"HTTP_PROXY": "http://corp:3128", "ALL_PROXY": "socks5://x:1080"}
    plan = plan_for(base)
    assert plan.exports()["HTTP_PROXY"] == URL  # the relay forwards plain HTTP
    assert plan.get("HTTP_PROXY").action is Action.REPLACED  # type: ignore[union-attr]
    assert any(n.startswith("ALL_PROXY") for n in plan.notes)


def test_ccr_mode_leaves_plain_http_alone() -> None:
    base = {"HTTP_PROXY": "http://corp:3128"}
    plan = plan_for(base, plain_http=False)
    for name in HTTP_PROXY_VARIABLES:
        assert name not in plan.exports()
    assert apply(plan, base)["HTTP_PROXY"] == "http://corp:3128"
    assert any(n.startswith("HTTP_PROXY") for n in plan.notes)
    assert (
        "-Dhttp.proxyHost"
        not in plan_for(
            plain_http=False, tool_files=ToolFiles(java_truststore=Path("/s/t.p12"))
        ).exports()["JAVA_TOOL_OPTIONS"]
    )


def test_tool_files_are_exported() -> None:
    files = ToolFiles(Path("/s/wgetrc"), Path("/s/apt.conf"), Path("/s/java.p12"))
    env = plan_for(tool_files=files).exports()
    assert env["WGETRC"] == "/s/wgetrc"
    assert env["APT_CONFIG"] == "/s/apt.conf"
    options = env["JAVA_TOOL_OPTIONS"].split(" ")
    assert "-Dhttps.proxyHost=127.0.0.1" in options
    assert "-Dhttps.proxyPort=41234" in options
    assert "-Dhttp.proxyPort=41234" in options
    assert "-Djavax.net.ssl.trustStore=/s/java.p12" in options
    assert "-Djavax.net.ssl.trustStoreType=PKCS12" in options
    non_proxy = next(o for o in options if o.startswith("-Dhttp.nonProxyHosts="))
    globs = non_proxy.split("=", 1)[1].split("|")
    assert {
        "localhost",
        "127.*",
        "10.*",
        "192.168.*",
        "172.16.*",
        "172.31.*",
        "*.localhost",
    } <= set(globs)


def test_user_java_options_follow_ours_and_are_not_doubled() -> None:
    files = ToolFiles(java_truststore=Path("/s/java.p12"))
    first = plan_for({"JAVA_TOOL_OPTIONS": "-Xmx1g"}, tool_files=files).exports()
    assert first["JAVA_TOOL_OPTIONS"].endswith(" -Xmx1g")
    again = plan_for({"JAVA_TOOL_OPTIONS": first["JAVA_TOOL_OPTIONS"]}, tool_files=files)
    assert again.exports()["JAVA_TOOL_OPTIONS"] == first["JAVA_TOOL_OPTIONS"]


@pytest.mark.parametrize(
    ("no_proxy", "expected"),
    [
        ("api,.corp.example", "api|*.corp.example|corp.example"),
        ("10.1.2.0/23", "10.1.2.*|10.1.3.*"),
        ("192.168.1.7/32", "192.168.1.7"),
        ("0.0.0.0/0", "*"),
        ("fc00::/7,::1", "::1|[::1]"),
        ("host:8080,[::1]:80", "host|[::1]"),
        ("not-a-cidr/99", ""),
    ],
)
def test_java_non_proxy_hosts(no_proxy: str, expected: str) -> None:
    assert java_non_proxy_hosts(no_proxy) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://127.0.0.1:1", "use http://"),
        ("socks5://127.0.0.1:1", "use http://"),
        ("http://127.0.0.1", "needs a host and a port"),
        ("http://:8080", "needs a host and a port"),
        ("127.0.0.1:8080", "use http://"),
        ("http://127.0.0.1:8080\n", "control"),
        ("http://127.0.0.1:99999", "not a URL"),
    ],
)
def test_bad_proxy_url(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        proxy_environment(url, BUNDLE, base_env={})
    assert info.value.field == "proxy_url"


def test_ipv6_proxy_url_is_fine() -> None:
    plan = proxy_environment("http://[::1]:3128", BUNDLE, base_env={})
    assert plan.exports()["HTTPS_PROXY"] == "http://[::1]:3128"


@pytest.mark.parametrize("bundle", [Path("relative/bundle.pem"), Path("/tmp/a\nb.pem")])
def test_bad_bundle_path(bundle: Path) -> None:
    with pytest.raises(ConfigError) as info:
        proxy_environment(URL, bundle, base_env={})
    assert info.value.field == "ca_bundle"


def test_user_ca_files() -> None:
    base = {
        "SSL_CERT_FILE": "/a.pem",
        "CURL_CA_BUNDLE": "/a.pem",
        "PIP_CERT": "/b.pem",
        "GIT_SSL_CAINFO": str(BUNDLE),
        "AWS_CA_BUNDLE": "",
        "UNRELATED": "/c.pem",
    }
    assert user_ca_files(base, exclude=BUNDLE) == ["/a.pem", "/b.pem"]
    assert user_ca_files(base) == ["/a.pem", str(BUNDLE), "/b.pem"]


def test_apply_returns_a_copy() -> None:
    base = {"PATH": "/usr/bin", "HTTPS_PROXY": "http://old:1"}
    env = apply(plan_for(base), base)
    assert env["PATH"] == "/usr/bin" and env["HTTPS_PROXY"] == URL
    assert base["HTTPS_PROXY"] == "http://old:1"


# -- renderers, parsed back ---------------------------------------------------------------------


def hostile_plan(marker: Path) -> EnvPlan:
    variables = [
        EnvVar(f"HOSTILE_{i}", value.replace("{marker}", str(marker)), Action.SET, "test")
        for i, value in enumerate(HOSTILE)
    ]
    variables.append(EnvVar("KEPT_ONE", "user", Action.KEPT, "test"))
    return EnvPlan(tuple(variables), ("a note",))


def source_in_shell(shell: str, script: Path, cwd: Path) -> dict[str, str]:
    # `env -0` so that values with newlines survive the trip back.
    done = subprocess.run(
        [shell, "-c", 'set -a; . "$1"; env -0', "sh", str(script)],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        cwd=cwd,
        capture_output=True,
        check=True,
        timeout=30,
    )
    result = {}
    for item in done.stdout.split(b"\0"):
        if item:
            name, _, value = item.decode().partition("=")
            result[name] = value
    return result


@pytest.mark.parametrize("shell", ["sh", "bash", "dash", "zsh"])
def test_render_sh_round_trips_through_a_real_shell(tmp_path: Path, shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} not installed")
    marker = tmp_path / "pwned"
    for plan in (plan_for({"NO_PROXY": "x.example"}), hostile_plan(marker)):
        script = tmp_path / "env.sh"
        script.write_text(render_sh(plan))
        env = source_in_shell(shell, script, tmp_path)
        for name, value in plan.exports().items():
            assert env[name] == value, name
        assert "KEPT_ONE" not in env
    assert not marker.exists(), "a value was executed"


def test_render_sh_refuses_nul_and_bad_names() -> None:
    with pytest.raises(ValueError, match="NUL"):
        render_sh(EnvPlan((EnvVar("A", "x\0y", Action.SET, ""),)))
    with pytest.raises(ValueError, match="name"):
        render_sh(EnvPlan((EnvVar("A B", "x", Action.SET, ""),)))
    with pytest.raises(ValueError, match="name"):
        render_sh(EnvPlan((EnvVar("A=$(id)", "x", Action.SET, ""),)))


def parse_dotenv(text: str) -> dict[str, str]:
    """The dialect render_dotenv documents: bare values, or single-quoted literal values."""
    result = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        if value.startswith("'"):
            assert value.endswith("'") and len(value) >= 2
            value = value[1:-1]
        result[name] = value
    return result


def test_render_dotenv_round_trips_the_real_plan() -> None:
    plan = plan_for({"NO_PROXY": "x.example"})
    text = render_dotenv(plan)
    assert parse_dotenv(text) == plan.exports()
    # realistic values are bare, so even docker --env-file reads them right
    assert "'" not in text


def test_render_dotenv_quotes_what_it_can_and_refuses_the_rest(tmp_path: Path) -> None:
    for i, value in enumerate(HOSTILE):
        value = value.replace("{marker}", str(tmp_path))
        plan = EnvPlan((EnvVar(f"V{i}", value, Action.SET, ""),))
        if "'" in value or "\\" in value or "\n" in value:
            with pytest.raises(ValueError, match="cannot be written"):
                render_dotenv(plan)
        else:
            assert parse_dotenv(render_dotenv(plan)) == {f"V{i}": value}


def test_render_dotenv_with_a_spaced_bundle_path() -> None:
    plan = proxy_environment(URL, Path("/srv/my certs/bundle.pem"), base_env={})
    parsed = parse_dotenv(render_dotenv(plan))
    assert parsed["SSL_CERT_FILE"] == "/srv/my certs/bundle.pem"
    assert "SSL_CERT_FILE='/srv/my certs/bundle.pem'" in render_dotenv(plan)


def test_render_json_round_trips(tmp_path: Path) -> None:
    for plan in (plan_for({"NODE_USE_ENV_PROXY": "0", "HTTP_PROXY": "x"}), hostile_plan(tmp_path)):
        document = json.loads(render_json(plan))
        assert document["env"] == plan.exports()
        assert [v["name"] for v in document["variables"]] == [v.name for v in plan.variables]
        assert {v["action"] for v in document["variables"]} <= {a.value for a in Action}
        assert document["notes"] == list(plan.notes)


# -- real tools read what we export -------------------------------------------------------------


@pytest.fixture
def connect_recorder() -> Iterator[tuple[str, list[bytes]]]:
    """A fake proxy on 127.0.0.1 that records request heads and answers 403."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    heads: list[bytes] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data and len(data) < 65536:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    heads.append(data)
                    conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", heads
    finally:
        stop.set()
        thread.join()
        listener.close()


def tool_env(proxy: str, bundle: Path, home: Path) -> dict[str, str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    return apply(proxy_environment(proxy, bundle, base_env=base), base)


@pytest.mark.tools
@pytest.mark.parametrize(
    "command",
    [
        ["curl", "-sS", "--max-time", "5", "https://upstream.example/"],
        ["git", "ls-remote", "https://upstream.example/repo.git"],
        ["npm", "view", "--registry", "https://upstream.example/", "left-pad", "version"],
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--retries",
            "0",
            "--index-url",
            "https://upstream.example/simple",
            "--dest",
            "downloads",
            "left-pad",
        ],
    ],
    ids=["curl", "git", "npm", "pip"],
)
def test_tools_send_connect_to_the_proxy(
    tmp_path: Path, connect_recorder: tuple[str, list[bytes]], command: list[str]
) -> None:
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} not installed")
    if command[0] == sys.executable and importlib.util.find_spec("pip") is None:
        pytest.skip("pip not installed")
    proxy, heads = connect_recorder
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(make_ca().cert_pem())
    env = tool_env(proxy, bundle, tmp_path)
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["npm_config_fetch_retries"] = "0"
    env["npm_config_cache"] = str(tmp_path / "npm-cache")
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_CACHE_DIR"] = str(tmp_path / "pip-cache")
    done = subprocess.run(command, env=env, capture_output=True, timeout=30, cwd=tmp_path)
    assert done.returncode != 0  # the fake proxy refuses
    assert heads and heads[0].startswith(b"CONNECT upstream.example:443 HTTP/1.")  # pip sends 1.0


@pytest.mark.tools
def test_curl_bypasses_the_proxy_for_loopback(
    tmp_path: Path, connect_recorder: tuple[str, list[bytes]]
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    proxy, heads = connect_recorder
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    env = tool_env(proxy, tmp_path / "bundle.pem", tmp_path)
    subprocess.run(
        ["curl", "-sS", "--max-time", "5", f"https://localhost:{port}/"],
        env=env,
        capture_output=True,
        timeout=30,
    )
    subprocess.run(
        ["curl", "-sS", "--max-time", "5", f"https://127.0.0.1:{port}/"],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert heads == []


def test_python_reads_proxy_no_proxy_and_ca_file(tmp_path: Path) -> None:
    ca = make_ca("upstreamproxy env test CA")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.cert_pem())
    env = tool_env(URL, bundle, tmp_path)
    probe = (
        "import json, ssl, urllib.request as u\n"
        "ctx = ssl.create_default_context()\n"
        "print(json.dumps({'proxy': u.getproxies().get('https'),\n"
        "  'http': u.getproxies().get('http'),\n"
        "  'bypass': [bool(u.proxy_bypass(h)) for h in\n"
        "             ('localhost', '127.0.0.1', 'a.localhost', 'pypi.org')],\n"
        "  'cas': [dict(x[0] for x in c['subject'])['organizationName']\n"
        "          for c in ctx.get_ca_certs()]}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", probe],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    seen = json.loads(done.stdout)
    assert seen["proxy"] == URL
    assert seen["http"] == URL  # plain HTTP is forwarded by the relay
    assert seen["bypass"] == [True, True, True, False]
    assert seen["cas"] == ["upstreamproxy env test CA"]
