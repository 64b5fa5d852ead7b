"""Interception through the whole chain: real curl/python -> relay -> egress -> HTTPS origin.

The sandbox trusts only the egress CA (plus system roots); the origin has its own CA that only
the egress trusts. The credential lives in the egress's secrets directory and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

import aiohttp
import certifi
import pytest
from aiohttp import web
from conftest import SESSION, TOKEN, _serve, connect_via, run
from testpki import make_ca

from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.intercept_wiring import Interception, InterceptionConfig
from upstreamproxy.egress.policy import PolicyStore, parse_policy_document
from upstreamproxy.egress.resolver import StaticResolver
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.relay import Relay, RelayConfig
from upstreamproxy.secret import Secret

SECRET_VALUE = "s3cr3t-injected-credential-value"


@dataclass
class Chain:
    relay: Relay
    egress: EgressServer
    origin_port: int
    seen: list[dict[str, object]]
    sandbox_bundle: Path
    secrets_dir: Path
    base: Path
    resolver: StaticResolver


def echo_origin(seen: list[dict[str, object]]) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        record = {
            "path": request.path_qs,
            "method": request.method,
            "headers": [[k, v] for k, v in request.headers.items()],
            "size": len(body),
        }
        seen.append(record)
        response = web.json_response(record)
        if request.path.startswith("/close"):
            response.force_close()  # the next request needs a new upstream connection
        return response

    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@pytest.fixture
async def chain(tmp_path: Path) -> AsyncIterator[Chain]:
    # The egress CA (sandboxes trust it) and an unrelated origin CA (only the egress trusts it).
    egress_ca = make_ca("egress interception CA")
    egress_ca.write(tmp_path / "ca.pem", tmp_path / "ca-key.pem")
    origin_ca = make_ca("origin CA")
    (tmp_path / "origin-ca.pem").write_bytes(origin_ca.cert_pem())
    leaf = origin_ca.issue(["api.test", "plain.test"])
    (tmp_path / "origin.pem").write_bytes(leaf.chain_pem())
    (tmp_path / "origin.key").write_bytes(leaf.key_pem())
    origin_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    origin_ctx.load_cert_chain(tmp_path / "origin.pem", tmp_path / "origin.key")
    seen: list[dict[str, object]] = []
    runner, port = await _serve(echo_origin(seen), origin_ctx)

    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "api-token").write_text(SECRET_VALUE + "\n")
    policy = parse_policy_document(
        {
            "policies": {
                "default": {
                    "rules": [
                        {
                            "id": "api",
                            "hosts": ["api.test"],
                            "ports": [port],
                            "intercept": {
                                "inject": [
                                    {
                                        "header": "Authorization",
                                        "value": "Bearer {secret:api-token}",
                                    }
                                ]
                            },
                        },
                        {
                            "id": "needs-missing",
                            "hosts": ["missing.test"],
                            "ports": [port],
                            "intercept": {
                                "inject": [{"header": "X-Key", "value": "{secret:absent}"}]
                            },
                        },
                        {"id": "plain", "hosts": ["plain.test"], "ports": [port]},
                    ],
                    "allow_cidrs": ["127.0.0.0/8"],
                }
            }
        }
    )
    resolver = StaticResolver(
        {"api.test": ["127.0.0.1"], "plain.test": ["127.0.0.1"], "missing.test": ["127.0.0.1"]}
    )
    config = InterceptionConfig(
        tmp_path / "ca.pem",
        tmp_path / "ca-key.pem",
        secrets,
        upstream_ca=tmp_path / "origin-ca.pem",
    )
    egress = EgressServer(
        EgressConfig(ca_cert_pem=egress_ca.cert_pem(), metrics_port=0),
        StaticTokens({TOKEN: Session(SESSION)}),
        PolicyStore(policy),
        resolver=resolver,
        interception=lambda metrics: Interception(config, metrics.registry),
    )
    await egress.start()
    relay = Relay(RelayConfig(egress_url=egress.url, session_id=SESSION, token=Secret(TOKEN)))
    await relay.start()
    bundle = tmp_path / "sandbox-bundle.pem"  # what `upstreamproxy start` builds: roots + CA
    bundle.write_bytes(Path(certifi.where()).read_bytes() + egress_ca.cert_pem())
    yield Chain(relay, egress, port, seen, bundle, secrets, tmp_path, resolver)
    await relay.stop()
    await egress.stop()
    await runner.cleanup()


def sandbox_env(chain: Chain, bundle: Path | None = None) -> dict[str, str]:
    ca = str(bundle or chain.sandbox_bundle)
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(chain.base),
        "HTTPS_PROXY": chain.relay.proxy_url,
        "https_proxy": chain.relay.proxy_url,
        "SSL_CERT_FILE": ca,
        "CURL_CA_BUNDLE": ca,
    }


def header_values(record: dict[str, object], name: str) -> list[str]:
    headers = record["headers"]
    assert isinstance(headers, list)
    return [v for k, v in headers if k.lower() == name.lower()]


async def test_curl_gets_credential_injected(
    chain: Chain, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"https://api.test:{chain.origin_port}/v1/things?x=1"
    result = await run(
        "curl",
        "-sS",
        "-H",
        "Authorization: Bearer sandbox-own-value",
        "-H",
        "Connection: X-Drop-Me",
        "-H",
        "X-Drop-Me: 1",
        url,
        env=sandbox_env(chain),
    )
    assert result.returncode == 0, result.stderr
    assert len(chain.seen) == 1
    record = chain.seen[0]
    assert header_values(record, "Authorization") == [f"Bearer {SECRET_VALUE}"]
    assert header_values(record, "X-Drop-Me") == []
    assert record["path"] == "/v1/things?x=1"
    # The sandbox saw a certificate for the real name, from the egress CA, and verified it.
    assert SECRET_VALUE not in caplog.text
    assert '"event":"request"' in caplog.text and '"api-token"' in caplog.text  # request audit


async def test_python_client_keepalive_and_large_bodies(chain: Chain) -> None:
    script = f"""
import http.client, json, os, ssl, urllib.parse
proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
ctx = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
conn = http.client.HTTPSConnection(proxy.hostname, proxy.port, context=ctx)
conn.set_tunnel("api.test", {chain.origin_port})
sizes = []
for size in (0, 1000, 8 * 1024 * 1024):
    conn.request("POST", "/upload", body=b"z" * size, headers={{"Authorization": "mine"}})
    answer = json.loads(conn.getresponse().read())
    sizes.append(answer["size"])
def chunks():
    for _ in range(64):
        yield b"c" * 65536
conn.request("PUT", "/chunked", body=chunks(), encode_chunked=True)
sizes.append(json.loads(conn.getresponse().read())["size"])
print(json.dumps(sizes))
"""
    result = await run(sys.executable, "-c", script, env=sandbox_env(chain), timeout=60)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert json.loads(result.stdout) == [0, 1000, 8 * 1024 * 1024, 64 * 65536]
    assert all(header_values(r, "Authorization") == [f"Bearer {SECRET_VALUE}"] for r in chain.seen)
    assert len(chain.seen) == 4


async def test_untrusted_bundle_fails_verification(chain: Chain) -> None:
    only_roots = Path(certifi.where())
    result = await run(
        "curl", "-sS", f"https://api.test:{chain.origin_port}/", env=sandbox_env(chain, only_roots)
    )
    assert result.returncode == 60, result.stderr  # SSL certificate problem
    assert chain.seen == []


async def test_host_header_must_match_sni(chain: Chain) -> None:
    result = await run(
        "curl",
        "-sS",
        "-H",
        "Host: plain.test",
        f"https://api.test:{chain.origin_port}/",
        "-w",
        "%{http_code}",
        env=sandbox_env(chain),
    )
    assert result.stdout.endswith(b"400")
    assert chain.seen == []


async def test_sni_must_match_connect_host(chain: Chain) -> None:
    _, writer, head = await connect_via(chain.relay.port, f"api.test:{chain.origin_port}")
    assert head.startswith(b"HTTP/1.1 200")
    ctx = ssl.create_default_context(cafile=str(chain.sandbox_bundle))
    ctx.check_hostname = False
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await writer.start_tls(ctx, server_hostname="plain.test")
    writer.close()
    assert chain.seen == []


async def test_interception_redials_only_the_checked_addresses(chain: Chain) -> None:
    # DNS rebinding against re-origination: the engine dials the upstream afresh whenever the
    # origin closed the last connection. The name now answers an address where nothing
    # listens; every dial must still go to the address admission checked, with no new lookup.
    port = chain.origin_port
    reader, writer, head = await connect_via(chain.relay.port, f"api.test:{port}")
    assert head.startswith(b"HTTP/1.1 200")
    lookups = chain.resolver.lookups
    chain.resolver.table["api.test"] = [ip_address("127.0.0.2")]
    ctx = ssl.create_default_context(cafile=str(chain.sandbox_bundle))
    await asyncio.wait_for(writer.start_tls(ctx, server_hostname="api.test"), 10)
    try:
        for n in range(3):
            writer.write(f"GET /close/{n} HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n".encode())
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            length = int(answer.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()
    assert [r["path"] for r in chain.seen] == ["/close/0", "/close/1", "/close/2"]
    assert chain.resolver.lookups == lookups


async def readyz(port: int) -> tuple[int, object, str]:
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{port}/readyz") as resp,
    ):
        text = await resp.text()
        return resp.status, json.loads(text), text


async def test_missing_secret_fails_closed(chain: Chain) -> None:
    result = await run(
        "curl",
        "-sS",
        "-D",
        "-",
        f"https://missing.test:{chain.origin_port}/",
        env=sandbox_env(chain),
    )
    # -D shows the proxy's "200 Connection established", then the intercepted answer.
    assert b"\r\nHTTP/1.1 502 " in result.stdout, result.stdout
    assert chain.seen == []  # never sent without its credential
    status, body, _ = await readyz(chain.egress.port)
    assert (status, body) == (503, {"status": "not-ready", "reasons": ["missing-secrets"]})
    (chain.secrets_dir / "absent").write_text("now-here")
    chain.egress.reload()
    assert (await readyz(chain.egress.port))[0] == 200


async def test_readiness_names_missing_secrets_only_to_the_operator(
    chain: Chain, caplog: pytest.LogCaptureFixture
) -> None:
    """The main listener's /readyz, which sandboxes and any peer reach without a token, answered
    `missing-secrets:absent`: the names of the credentials the policy injects. It gives the
    category alone; the metrics listener (the operator's) and the log name them, the log once
    per change of the reasons, not per request."""
    caplog.set_level(logging.INFO, "upstreamproxy.egress")
    for _ in range(3):
        status, body, text = await readyz(chain.egress.port)
        assert (status, body) == (503, {"status": "not-ready", "reasons": ["missing-secrets"]})
        assert "absent" not in text
    for _ in range(2):
        status, body, _ = await readyz(chain.egress.metrics_port)
        assert (status, body) == (
            503,
            {"status": "not-ready", "reasons": ["missing-secrets:absent"]},
        )

    def lines() -> list[str]:
        records = caplog.get_records("setup") + caplog.get_records("call")
        return [r.getMessage() for r in records if r.name == "upstreamproxy.egress"]

    not_ready = [line for line in lines() if "not ready" in line]
    assert not_ready == ["not ready: missing-secrets:absent"]  # at start, then no more
    (chain.secrets_dir / "absent").write_text("now-here")
    chain.egress.reload()
    for port in (chain.egress.port, chain.egress.metrics_port, chain.egress.port):
        assert await readyz(port) == (200, {"status": "ready"}, '{"status": "ready"}')
    assert [line for line in lines() if "not ready" in line or "ready:" in line] == [
        "not ready: missing-secrets:absent",
        "ready: every readiness check passes",
    ]
    assert "now-here" not in caplog.text and SECRET_VALUE not in caplog.text


async def test_hosts_without_interception_stay_opaque(chain: Chain) -> None:
    # The client must trust the origin's own CA: the egress does not terminate this TLS.
    bundle = chain.base / "origin-only.pem"
    bundle.write_bytes((chain.base / "origin-ca.pem").read_bytes())
    ok = await run(
        "curl",
        "-sS",
        "-H",
        "Authorization: mine",
        f"https://plain.test:{chain.origin_port}/",
        env=sandbox_env(chain, bundle),
    )
    assert ok.returncode == 0, ok.stderr
    assert header_values(chain.seen[-1], "Authorization") == ["mine"]
    refused = await run(
        "curl", "-sS", f"https://plain.test:{chain.origin_port}/", env=sandbox_env(chain)
    )  # egress CA alone does not vouch for it
    assert refused.returncode == 60


async def test_interception_metrics(chain: Chain) -> None:
    for _ in range(2):
        result = await run(
            "curl", "-sS", f"https://api.test:{chain.origin_port}/", env=sandbox_env(chain)
        )
        assert result.returncode == 0
    text = chain.egress.metrics.render().decode()
    assert "upstreamproxy_intercept_certs_issued_total 1.0" in text
    assert "upstreamproxy_intercept_cert_cache_hits_total 1.0" in text
    assert 'upstreamproxy_intercept_rewrites_total{header="authorization",rule="api"} 2.0' in text
    assert SECRET_VALUE not in text
    await asyncio.sleep(0)


async def test_dial_time_is_observed_for_intercepted_tunnels(chain: Chain) -> None:
    # Regression: the dial histogram only saw opaque tunnels.
    def dials() -> float:
        value = chain.egress.metrics.registry.get_sample_value("upstreamproxy_dial_seconds_count")
        return value or 0.0

    before = dials()
    url = f"https://api.test:{chain.origin_port}/dial"
    result = await run("curl", "-sS", url, env=sandbox_env(chain))
    assert result.returncode == 0, result.stderr
    assert dials() == before + 1
    result = await run(
        "curl", "-sSk", f"https://plain.test:{chain.origin_port}/", env=sandbox_env(chain)
    )
    assert result.returncode == 0, result.stderr
    assert dials() == before + 2  # an opaque tunnel is counted once, not twice
