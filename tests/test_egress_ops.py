"""Operating the egress: audit lines, metrics, health, limits, timeouts, reload, drain, tokens.

In-process servers on port 0 for what needs precise control, and real ``python -m
upstreamproxy egress`` processes for signals (SIGHUP reload, SIGTERM drain) and signed tokens
with ``--public-keys``. Every origin is on loopback.
"""

# Fixtures shared from test_egress_admission are imported by name; pytest injects them.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import TLSFiles, connect_via, curl_via, raw_request, run
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families
from test_egress_admission import (  # noqa: F401 (fixtures)
    AuditLines,
    EchoOrigin,
    NamedOrigin,
    ask,
    assert_deny,
    audit_lines,
    connect_head,
    echo_origin,
    make_server,
    named_origin,
    open_ws,
    parse_answer,
    read_answer,
    session_for,
    static_tokens,
    token_for,
    tunnel,
    ws_read,
    ws_send,
)
from websockets.exceptions import ConnectionClosed, InvalidStatus

from upstreamproxy.codec import encode_chunk
from upstreamproxy.egress.auth import Session
from upstreamproxy.egress.limits import LimitConfig
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.egress.tunnel import TunnelTimeouts
from upstreamproxy.relay import Relay, RelayConfig
from upstreamproxy.secret import Secret
from upstreamproxy.tokens import generate_key, issue_token, load_private_key, public_key_pem

UP_BYTES = 3000
DOWN_BYTES = 70_000  # more than one upstream read, so several chunks


def ops_document(*ports: int) -> dict[str, Any]:
    return {
        "policies": {
            "default": {
                "rules": [
                    {
                        "id": "origins",
                        "hosts": ["allowed.test", "127.0.0.1"],
                        "ports": [443, *ports],
                    }
                ],
                "allow_cidrs": ["127.0.0.1/32"],
            }
        }
    }


TABLE = {"allowed.test": ["127.0.0.1"]}


def second_session(policy: str = "default") -> dict[str, Session]:
    """Another session on the same policy: token ``token_for(policy, "b")``."""
    return {token_for(policy, "b"): Session("sess-b", policy)}


@pytest.fixture
async def sized_origin() -> AsyncIterator[int]:
    """Reads exactly UP_BYTES, answers DOWN_BYTES, closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readexactly(UP_BYTES)
            writer.write(b"d" * DOWN_BYTES)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


def make_relay(url: str, policy: str = "default", token: str | None = None) -> Relay:
    return Relay(
        RelayConfig(
            egress_url=url, session_id=session_for(policy), token=Secret(token or token_for(policy))
        )
    )


# -- audit ---------------------------------------------------------------------------------------

AUDIT_FIELDS = {
    "time",
    "event",
    "session",
    "policy",
    "host",
    "port",
    "target",
    "resolved",
    "dialled",
    "decision",
    "reason",
    "rule",
    "status",
    "bytes_up",
    "bytes_down",
    "duration_ms",
    "close_cause",
}


async def test_audit_line_for_an_allowed_tunnel(sized_origin: int, audit_lines: AuditLines) -> None:
    server = make_server(ops_document(sized_origin), TABLE)
    async with server, make_relay(server.url) as relay:
        started = time.monotonic()
        reader, writer, head = await connect_via(relay.port, f"Allowed.Test.:{sized_origin}")
        assert head.startswith(b"HTTP/1.1 200")
        writer.write(b"u" * UP_BYTES)
        await writer.drain()
        received = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        elapsed_ms = (time.monotonic() - started) * 1000
    assert len(received) == DOWN_BYTES
    line = await audit_lines.next()
    assert set(line) == AUDIT_FIELDS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    assert line["event"] == "tunnel"
    assert line["session"] == session_for("default")
    assert line["policy"] == "default"
    assert line["host"] == "allowed.test"  # normalised
    assert line["port"] == sized_origin
    assert line["target"] == f"Allowed.Test.:{sized_origin}"  # as requested
    assert line["resolved"] == ["127.0.0.1"]
    assert line["dialled"] == f"127.0.0.1:{sized_origin}"
    assert (line["decision"], line["reason"], line["rule"]) == ("allow", "rule-match", "origins")
    assert line["status"] == 200
    assert (line["bytes_up"], line["bytes_down"]) == (UP_BYTES, DOWN_BYTES)
    assert 0 < line["duration_ms"] <= elapsed_ms + 50
    assert line["close_cause"] == "upstream-closed"


async def test_audit_line_for_a_denied_tunnel(audit_lines: AuditLines) -> None:
    server = make_server(ops_document(), TABLE)
    async with server, make_relay(server.url) as relay:
        answer = parse_answer(
            await raw_request(
                relay.port, b"CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test\r\n\r\n"
            )
        )
    assert_deny(answer, 403, "no-matching-rule", "-")
    line = await audit_lines.next()
    assert set(line) == AUDIT_FIELDS
    assert (line["decision"], line["reason"], line["rule"]) == ("deny", "no-matching-rule", "-")
    assert (line["host"], line["port"], line["status"]) == ("denied.test", 443, 403)
    assert (line["resolved"], line["dialled"]) == ([], "-")
    assert (line["bytes_up"], line["bytes_down"]) == (0, 0)
    assert line["close_cause"] == "refused-403"
    assert line["session"] == session_for("default")


async def test_audit_bytes_of_a_curl_download(
    named_origin: NamedOrigin, tls: TLSFiles, audit_lines: AuditLines
) -> None:
    server = make_server(ops_document(named_origin.port), TABLE)
    size = 300_000
    async with server, make_relay(server.url) as relay:
        result = await run(
            "curl",
            "-sS",
            "--cacert",
            str(tls.ca_file),
            "-x",
            relay.proxy_url,
            "-p",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            f"https://allowed.test:{named_origin.port}/bytes/{size}",
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == str(size).encode()
    line = await audit_lines.next()
    # TLS adds records and the handshake: more than the body down, the request and more up.
    assert size < line["bytes_down"] < size + 20_000
    assert 200 < line["bytes_up"] < 20_000


async def test_no_token_in_audit_or_logs(
    echo_origin: EchoOrigin, audit_lines: AuditLines, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = token_for("default")
    server = make_server(ops_document(echo_origin.port), TABLE, config=EgressConfig(metrics_port=0))
    async with server:
        async with make_relay(server.url) as relay:
            reader, writer, _ = await connect_via(relay.port, f"allowed.test:{echo_origin.port}")
            writer.write(b"x")
            await reader.readexactly(1)
            writer.close()
            await raw_request(relay.port, b"CONNECT denied.test:443 HTTP/1.1\r\n\r\n")
        async with make_relay(server.url, token=secret + "-tampered") as bad:
            await raw_request(bad.port, b"CONNECT allowed.test:443 HTTP/1.1\r\n\r\n")
        # In-tunnel credentials that do not match the upgrade's token.
        answer = await ask(
            server, "allowed.test:443", token=secret + "-other", upgrade_token=secret
        )
        assert answer.status == 407
        ws = await open_ws(server, secret)
        await ws.send(b"\x0a\x05ab")  # a malformed chunk: protocol error, logged
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        metrics = await http_get(server.metrics_port, "/metrics")
        await audit_lines.next()
    logged = "\n".join(
        caplog.handler.format(r) for r in caplog.records if not r.name.startswith("tests.")
    )
    everything = logged + json.dumps(audit_lines.lines) + metrics
    assert "protocol error" in logged and "upgrade refused" in logged
    assert "0123456789abcdef" not in everything
    assert secret not in everything


@pytest.mark.parametrize(
    "logger", ["aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.websocket"]
)
def test_library_log_lines_and_tracebacks_are_redacted(
    logger: str, caplog: pytest.LogCaptureFixture
) -> None:
    # aiohttp may quote a header in a message or an exception; the filter the egress puts on
    # its loggers redacts both, whatever the handler does with the record.
    import upstreamproxy.egress.server  # noqa: F401 (installs the filters)

    secret = token_for("default")
    basic = base64.b64encode(f"s:{secret}".encode()).decode()
    caplog.set_level(logging.DEBUG, logger)
    log = logging.getLogger(logger)
    log.debug("headers: Authorization: Bearer %s, Proxy-Authorization: Basic %s", secret, basic)
    log.debug("headers: {'Authorization': 'Token %s'}", secret)  # another scheme: all of it
    try:
        raise ValueError(f"bad header line b'authorization: bearer {secret}'")
    except ValueError:
        log.exception("Error handling request")
    text = "\n".join(caplog.handler.format(r) for r in caplog.records)
    assert "Bearer ***" in text and "Basic ***" in text and "bearer ***" in text
    assert "{'Authorization': '***'}" in text
    assert "Error handling request" in text and "ValueError" in text
    assert secret not in text and basic not in text


async def test_malformed_requests_log_one_line_without_their_bytes(
    tmp_path: Path, egress_processes: list[EgressProcess]
) -> None:
    """Any peer, before authentication, could have aiohttp log a traceback per malformed
    request, quoting its bytes (a credential in a header or query it did not expect)."""
    egress = await start_egress(
        "--static-tokens", str(write_tokens(tmp_path)), "--allow", "allowed.test:443"
    )
    egress_processes.append(egress)
    secret = "sk-live-0123456789abcdef"
    for request in (
        f"GET /healthz HTTP/1.1\r\nHost: e\r\nX-Api-Key: {secret}{'a' * 9000}\r\n\r\n",
        f"GET /healthz?key={secret}\x01 HTTP/1.1\r\nHost: e\r\n\r\n",
        f"GET /readyz HTTP/1.1\r\nHost: e\r\nX-Key: {secret}\r\nBad Header: \x01\r\n\r\n",
    ):
        answer = await raw_request(egress.port, request.encode(), read_timeout=5)
        assert answer.startswith(b"HTTP/1.0 400"), answer
    await egress.wait_log(b"malformed request from 127.0.0.1", count=3)
    assert await egress.stop() == 0
    log = egress.stderr.decode()
    assert "Traceback" not in log
    assert secret not in log
    assert log.count("malformed request from 127.0.0.1: ") == 3, log


# -- metrics, health, readiness -----------------------------------------------------------------


async def http_get(port: int, path: str, expect: int = 200) -> str:
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        assert response.status == expect, (path, response.status)
        return await response.text()


async def scrape(port: int) -> dict[str, float]:
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(await http_get(port, "/metrics")):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


class Delta:
    """Metric changes between two scrapes."""

    def __init__(self, before: dict[str, float], after: dict[str, float]) -> None:
        self.before, self.after = before, after

    def __getitem__(self, key: str) -> float:
        return self.after.get(key, 0.0) - self.before.get(key, 0.0)


async def test_metrics_on_a_separate_listener(echo_origin: EchoOrigin) -> None:
    config = EgressConfig(metrics_port=0, limits=LimitConfig(max_session_tunnels=1))
    server = make_server(ops_document(echo_origin.port), TABLE, config=config)
    async with server:
        assert server.metrics_port != server.port
        await http_get(server.port, "/metrics", expect=404)  # never on the sandbox-facing port
        await http_get(server.metrics_port, "/healthz", expect=404)
        before = await scrape(server.metrics_port)
        async with tunnel(server, f"allowed.test:{echo_origin.port}") as (answer, ws):
            assert answer.status == 200
            await ws_send(ws, b"m" * 100)
            assert await ws_read(ws, 100) == b"m" * 100
            during = await scrape(server.metrics_port)
            assert during["upstreamproxy_active_tunnels"] == 1
            # A second tunnel of the same session hits the per-session limit.
            assert (await refused_upgrade(server))[0] == 429
        assert_deny(await ask(server, "denied.test:443"), 403, "no-matching-rule", "-")
        with pytest.raises(InvalidStatus):
            await open_ws(server, "not-a-token")
        ws = await open_ws(server, token_for("default"))
        await ws.send(b"\x0b\x00")  # wrong field tag
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        await asyncio.sleep(0.1)  # the handlers finish and count
        after = await scrape(server.metrics_port)
    delta = Delta(before, after)
    assert after["upstreamproxy_active_tunnels"] == 0
    assert delta['upstreamproxy_tunnels_total{decision="allow"}'] == 1
    assert delta['upstreamproxy_tunnels_total{decision="deny"}'] == 1
    assert delta['upstreamproxy_tunnels_total{decision="error"}'] == 1  # the protocol error
    assert delta['upstreamproxy_denies_total{reason="no-matching-rule",rule="-"}'] == 1
    assert delta['upstreamproxy_bytes_total{direction="up"}'] == 100
    assert delta['upstreamproxy_bytes_total{direction="down"}'] == 100
    assert delta["upstreamproxy_dial_seconds_count"] == 1
    assert delta['upstreamproxy_dial_seconds_bucket{le="+Inf"}'] == 1
    assert delta['upstreamproxy_auth_failures_total{reason="unknown-token"}'] == 1
    assert delta["upstreamproxy_protocol_errors_total"] == 1
    assert delta['upstreamproxy_limit_rejections_total{limit="session-concurrency-limit"}'] == 1


async def http_status(port: int, path: str) -> int:
    """The status of ``GET path`` on a new connection."""
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status


async def keepalive_http(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A persistent HTTP/1.1 connection."""
    return await asyncio.open_connection("127.0.0.1", port)


async def http_on(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], path: str, extra: str = ""
) -> tuple[int, bytes]:
    reader, writer = conn
    writer.write(f"GET {path} HTTP/1.1\r\nHost: egress\r\n{extra}\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    body = await reader.readexactly(length)
    return int(head.split()[1]), body


UPGRADE = (
    "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


async def test_health_readiness_and_drain(echo_origin: EchoOrigin) -> None:
    server = make_server(ops_document(echo_origin.port), TABLE)
    async with server:
        await http_get(server.port, "/readyz")
        assert json.loads(await http_get(server.port, "/healthz"))["status"] == "ok"
        conn = await keepalive_http(server.port)
        assert (await http_on(conn, "/readyz"))[0] == 200
        async with tunnel(server, f"allowed.test:{echo_origin.port}") as (answer, ws):
            assert answer.status == 200
            started = time.monotonic()
            stopping = asyncio.ensure_future(server.stop(grace=5))
            await asyncio.sleep(0.1)
            status, body = await http_on(conn, "/readyz")
            assert (status, json.loads(body)["reasons"]) == (503, ["draining"])
            assert (await http_on(conn, "/healthz"))[0] == 200  # alive while draining
            # New upgrades are refused: on a kept-alive connection with 503 ...
            status, body = await http_on(
                conn,
                "/v1/code/upstreamproxy/ws",
                f"Authorization: Bearer {token_for('default')}\r\n" + UPGRADE,
            )
            assert (status, json.loads(body)) == (503, {"error": "draining"})
            # ... and on new connections: the listener stays up so probes see the drain
            # (readiness 503, liveness 200) instead of "connection refused".
            assert (await http_status(server.port, "/readyz")) == 503
            assert (await http_status(server.port, "/healthz")) == 200
            # The tunnel in flight still works.
            await ws_send(ws, b"still here")
            assert await ws_read(ws, 10) == b"still here"
        await asyncio.wait_for(stopping, 5)
        assert time.monotonic() - started < 3  # it ended when its last tunnel did
        conn[1].close()


async def test_tunnel_upgraded_before_drain_is_still_answered(echo_origin: EchoOrigin) -> None:
    # Its WebSocket was accepted before the drain began; its CONNECT head arrives during it.
    server = make_server(ops_document(echo_origin.port), TABLE, config=EgressConfig(metrics_port=0))
    await server.start()
    ws = await open_ws(server, token_for("default"))
    stopping = asyncio.ensure_future(server.stop(grace=5))
    await asyncio.sleep(0.1)
    await ws.send(
        encode_chunk(
            connect_head(
                f"allowed.test:{echo_origin.port}", session_for("default"), token_for("default")
            )
        )
    )
    answer, _ = await read_answer(ws)
    assert answer.status == 200
    await ws_send(ws, b"late")
    assert await ws_read(ws, 4) == b"late"
    await ws.close()
    await asyncio.wait_for(stopping, 5)
    await server.stop()  # a second stop is harmless


async def test_short_grace_closes_long_tunnel_at_deadline(
    echo_origin: EchoOrigin, audit_lines: AuditLines
) -> None:
    server = make_server(ops_document(echo_origin.port), TABLE)
    await server.start()
    async with tunnel(server, f"allowed.test:{echo_origin.port}") as (answer, ws):
        assert answer.status == 200
        started = time.monotonic()
        await server.stop(grace=0.3)
        elapsed = time.monotonic() - started
        with pytest.raises(ConnectionClosed):
            await ws_read(ws, 1, timeout=5)
    assert 0.3 <= elapsed < 2
    assert ws.close_code == 1001
    line = await audit_lines.next()
    assert line["close_cause"] == "server-shutdown"


# -- limits --------------------------------------------------------------------------------------


async def test_total_concurrency_limit(echo_origin: EchoOrigin) -> None:
    server = make_server(
        ops_document(echo_origin.port),
        TABLE,
        authenticator=static_tokens("default", extra=second_session()),
        config=EgressConfig(limits=LimitConfig(max_tunnels=1)),
    )
    target = f"allowed.test:{echo_origin.port}"
    async with server:
        async with tunnel(server, target) as (answer, _):
            assert answer.status == 200
            status, reason, body = await refused_upgrade(server, token_for("default", "b"))
            assert (status, reason, body["reason"]) == (503, "egress-at-capacity", reason)
        # Released when the tunnel ends.
        await wait_until(lambda: server.limiter.total == 0)
        assert (
            await ask(server, target, token=token_for("default", "b"), session="sess-b")
        ).status == 200


async def test_per_session_concurrency_limit(echo_origin: EchoOrigin) -> None:
    server = make_server(
        ops_document(echo_origin.port),
        TABLE,
        authenticator=static_tokens("default", extra=second_session()),
        config=EgressConfig(limits=LimitConfig(max_session_tunnels=2)),
    )
    target = f"allowed.test:{echo_origin.port}"
    async with server, tunnel(server, target) as (first, _), tunnel(server, target) as (second, _):
        assert (first.status, second.status) == (200, 200)
        status, reason, _ = await refused_upgrade(server)
        assert (status, reason) == (429, "session-concurrency-limit")
        # Another session is not affected.
        assert (
            await ask(server, target, token=token_for("default", "b"), session="sess-b")
        ).status == 200


async def test_per_session_rate_limit(echo_origin: EchoOrigin) -> None:
    limits = LimitConfig(session_rate=0.01, session_burst=3)
    server = make_server(
        ops_document(echo_origin.port),
        TABLE,
        authenticator=static_tokens("default", extra=second_session()),
        config=EgressConfig(limits=limits),
    )
    target = f"allowed.test:{echo_origin.port}"
    async with server:
        for _ in range(3):
            assert (await ask(server, target)).status == 200
        status, reason, _ = await refused_upgrade(server)
        assert (status, reason) == (429, "session-rate-limit")
        assert (
            await ask(server, target, token=token_for("default", "b"), session="sess-b")
        ).status == 200


async def refused_upgrade(
    server: EgressServer, token: str | None = None
) -> tuple[int, str | None, dict[str, object]]:
    """Limits are enforced at the WebSocket upgrade: (status, reason header, JSON body)."""
    with pytest.raises(InvalidStatus) as refused:
        await open_ws(server, token or token_for("default"))
    response = refused.value.response
    return (
        response.status_code,
        response.headers.get("X-Upstreamproxy-Reason"),
        json.loads(response.body or b"{}"),
    )


async def wait_until(condition: Callable[[], bool], timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# -- timeouts ------------------------------------------------------------------------------------


async def test_idle_timeout_closes_an_idle_tunnel(
    echo_origin: EchoOrigin, audit_lines: AuditLines
) -> None:
    config = EgressConfig(timeouts=TunnelTimeouts(idle=0.4))
    server = make_server(ops_document(echo_origin.port), TABLE, config=config)
    async with server, tunnel(server, f"allowed.test:{echo_origin.port}") as (answer, ws):
        assert answer.status == 200
        # Traffic keeps it open past the idle timeout ...
        for _ in range(6):
            await ws_send(ws, b"k")
            assert await ws_read(ws, 1) == b"k"
            await asyncio.sleep(0.15)
        # ... silence closes it.
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            await ws_read(ws, 1, timeout=5)
        assert time.monotonic() - started < 2
        line = await audit_lines.next()
    assert line["close_cause"] == "idle-timeout"
    assert line["bytes_up"] == line["bytes_down"] == 6


@pytest.mark.parametrize("partial", [b"", b"CONNECT allowed.test:443 HTTP/1.1\r\n"])
async def test_head_timeout(partial: bytes) -> None:
    config = EgressConfig(timeouts=TunnelTimeouts(head=0.3))
    server = make_server(ops_document(), TABLE, config=config)
    async with server:
        started = time.monotonic()
        answer = await ask(server, "-", raw_head=partial)
        assert time.monotonic() - started < 2
    assert answer.status == 400
    assert answer.reason == "timed out waiting for the CONNECT head"


# -- real processes: SIGHUP reload, SIGTERM drain -------------------------------------------------


@dataclass
class EgressProcess:
    proc: asyncio.subprocess.Process
    url: str
    stderr: bytearray = field(default_factory=bytearray)
    drain: asyncio.Future[None] | None = None

    @property
    def port(self) -> int:
        return int(self.url.split(":")[2].split("/")[0])

    async def wait_log(self, text: bytes, count: int = 1, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while self.stderr.count(text) < count:
                await asyncio.sleep(0.02)

    async def stop(self, timeout: float = 20) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def wait(self, timeout: float = 20) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self.drain is not None:
            await asyncio.wait_for(self.drain, 5)
        return code


def process_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("UPSTREAMPROXY_")}


async def start_egress(*argv: str) -> EgressProcess:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "upstreamproxy",
        "--log-level",
        "INFO",
        "egress",
        "--port",
        "0",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=process_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    if b"egress listening on" not in line:
        proc.kill()
        _, err = await proc.communicate()
        raise AssertionError(f"egress did not start: {line!r} {err.decode()[-2000:]}")
    egress = EgressProcess(proc, line.decode().split()[-1])

    async def drain_stderr(stream: asyncio.StreamReader) -> None:
        while data := await stream.read(65536):
            egress.stderr += data

    egress.drain = asyncio.ensure_future(drain_stderr(proc.stderr))
    return egress


@pytest.fixture
async def egress_processes() -> AsyncIterator[list[EgressProcess]]:
    started: list[EgressProcess] = []
    yield started
    for egress in started:
        if egress.proc.returncode is None:
            egress.proc.kill()
            await egress.proc.wait()
        if egress.drain is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(egress.drain, 5)


def write_tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"{session_for('default')} {token_for('default')} default\n")
    return path


def policy_yaml(hosts: list[str], port: int, mode: str = "enforce") -> str:
    return (
        f"policies:\n  default:\n    mode: {mode}\n    rules:\n"
        f"      - id: hosts\n        hosts: {json.dumps(hosts)}\n        ports: [{port}]\n"
        "    allow_cidrs: [127.0.0.1/32]\n"
    )


def replace_file(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


async def policy_egress(
    tmp_path: Path, port: int, processes: list[EgressProcess]
) -> tuple[EgressProcess, Path]:
    """An egress whose policy file allows ``old.test`` (``new.test`` resolves too), reloaded
    on SIGHUP only: the file watcher must not be what reloads it in these tests."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_yaml(["old.test"], port))
    egress = await start_egress(
        "--static-tokens",
        str(write_tokens(tmp_path)),
        "--policy",
        str(policy),
        "--resolve",
        "old.test=127.0.0.1",
        "--resolve",
        "new.test=127.0.0.1",
        "--reload-interval",
        "0",
    )
    processes.append(egress)
    return egress, policy


async def test_sighup_reloads_policy_and_keeps_last_good(
    tmp_path: Path, echo_origin: EchoOrigin, egress_processes: list[EgressProcess]
) -> None:
    port = echo_origin.port
    egress, policy = await policy_egress(tmp_path, port, egress_processes)
    assert (await ask(egress.url, f"old.test:{port}")).status == 200
    assert_deny(await ask(egress.url, f"new.test:{port}"), 403, "no-matching-rule", "-")

    replace_file(policy, policy_yaml(["old.test", "new.test"], port))
    egress.proc.send_signal(signal.SIGHUP)
    await egress.wait_log(b"policy reloaded from")
    assert (await ask(egress.url, f"new.test:{port}")).status == 200

    replace_file(policy, policy_yaml(["new.test"], port, mode="bogus"))
    egress.proc.send_signal(signal.SIGHUP)
    await egress.wait_log(b"policy reload failed, keeping the last good policy")
    assert b"policies.default.mode" in egress.stderr
    # The last good policy is still in force: both hosts open.
    assert (await ask(egress.url, f"new.test:{port}")).status == 200
    assert (await ask(egress.url, f"old.test:{port}")).status == 200
    assert egress.proc.returncode is None
    assert await egress.stop() == 0


async def test_sighup_keeps_the_policy_when_the_new_one_needs_interception_it_lacks(
    tmp_path: Path, echo_origin: EchoOrigin, egress_processes: list[EgressProcess]
) -> None:
    """A policy the egress refuses to start with (it intercepts, no --ca-key) is refused on
    reload too: it once replaced the good one, and its hosts got 502."""
    port = echo_origin.port
    egress, policy = await policy_egress(tmp_path, port, egress_processes)
    assert (await ask(egress.url, f"old.test:{port}")).status == 200
    intercepting = policy_yaml(["old.test"], port).replace(
        "        ports:",
        "        intercept: {inject: [{header: x-key, value: '{secret:key}'}]}\n        ports:",
    )
    replace_file(policy, intercepting)
    egress.proc.send_signal(signal.SIGHUP)
    await egress.wait_log(b"policy reload failed, keeping the last good policy")
    assert b"no CA key is configured" in egress.stderr
    assert (await ask(egress.url, f"old.test:{port}")).status == 200
    assert await egress.stop() == 0


@pytest.fixture
async def trickle_origin() -> AsyncIterator[int]:
    """Sends 10 pieces of 1000 bytes, 0.1 s apart, then closes: a transfer in flight."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(10):
                writer.write(b"t" * 1000)
                await writer.drain()
                await asyncio.sleep(0.1)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def test_sigterm_drains_in_flight_transfer(
    tmp_path: Path, trickle_origin: int, egress_processes: list[EgressProcess]
) -> None:
    egress = await start_egress(
        "--static-tokens",
        str(write_tokens(tmp_path)),
        "--allow",
        f"trickle.test:{trickle_origin}",
        "--allow-cidr",
        "127.0.0.1/32",
        "--resolve",
        "trickle.test=127.0.0.1",
        "--drain-grace",
        "10",
    )
    egress_processes.append(egress)
    conn = await keepalive_http(egress.port)
    assert (await http_on(conn, "/readyz"))[0] == 200
    async with tunnel(egress.url, f"trickle.test:{trickle_origin}") as (answer, ws):
        assert answer.status == 200
        first = await ws_read(ws, 1000)
        started = time.monotonic()
        egress.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        status, body = await http_on(conn, "/readyz")
        assert status == 503 and "draining" in json.loads(body)["reasons"]
        with pytest.raises(InvalidStatus) as refused:  # no new tunnels while draining
            await open_ws(egress.url, token_for("default"))
        assert refused.value.response.status_code == 503
        rest = await ws_read(ws, 9000)
        with pytest.raises(ConnectionClosed):  # the origin ends the tunnel, not the client
            await ws_read(ws, 1)
    assert first + rest == b"t" * 10_000
    assert await egress.wait() == 0
    assert time.monotonic() - started < 5  # finished with its tunnel, well inside the grace
    audit = [
        json.loads(line[line.index(b"{") :])
        for line in egress.stderr.splitlines()
        if b'"event":"tunnel"' in line
    ]
    assert [a["close_cause"] for a in audit] == ["upstream-closed"]
    assert audit[0]["bytes_down"] == 10_000
    conn[1].close()


async def test_sigterm_closes_long_tunnel_at_grace_deadline(
    tmp_path: Path, echo_origin: EchoOrigin, egress_processes: list[EgressProcess]
) -> None:
    egress = await start_egress(
        "--static-tokens",
        str(write_tokens(tmp_path)),
        "--allow",
        f"127.0.0.1:{echo_origin.port}",
        "--allow-cidr",
        "127.0.0.1/32",
        "--drain-grace",
        "0.5",
    )
    egress_processes.append(egress)
    async with tunnel(egress.url, f"127.0.0.1:{echo_origin.port}") as (answer, ws):
        assert answer.status == 200
        started = time.monotonic()
        egress.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed):
            while True:  # keeps the tunnel busy: it is not idle, only too long
                await ws_send(ws, b"e")
                await ws_read(ws, 1)
                await asyncio.sleep(0.05)
        closed_after = time.monotonic() - started
    assert 0.4 < closed_after < 3
    assert ws.close_code == 1001
    assert await egress.wait() == 0
    assert b'"close_cause":"server-shutdown"' in egress.stderr


# -- signed tokens end to end ----------------------------------------------------------------------

AUDIENCE = "egress-test"


@dataclass
class Keys:
    directory: Path
    issue: Callable[..., str]
    private: dict[str, Ed25519PrivateKey]


@pytest.fixture
async def keys(tmp_path: Path) -> Keys:
    """Key A made by ``token keygen``, key B by ``generate_key`` (both trusted); key C is not."""
    directory = tmp_path / "keys"
    directory.mkdir()
    made = await run(
        sys.executable,
        "-m",
        "upstreamproxy",
        "token",
        "keygen",
        "--out-dir",
        str(directory),
        "--kid",
        "key-a",
        timeout=30,
    )
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == b"key-a"
    key_b = generate_key()
    (directory / "key-b.public.pem").write_bytes(public_key_pem(key_b.public_key()))
    private = {
        "key-a": load_private_key(directory / "key-a.private.pem"),
        "key-b": key_b,
        "key-c": generate_key(),
    }

    def issue(
        kid: str = "key-a",
        session: str = "sess-signed",
        policy: str = "default",
        audience: str = AUDIENCE,
        ttl: int = 300,
        now: float | None = None,
    ) -> str:
        return issue_token(
            private[kid], kid, session, policy, audience, ttl, time.time() if now is None else now
        )

    return Keys(directory, issue, private)


def tamper(token: str) -> str:
    """Same signature, claims changed to another policy."""
    version, segment, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    claims["policy"] = "wide-open"
    raw = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    return ".".join([version, base64.urlsafe_b64encode(raw).rstrip(b"=").decode(), signature])


async def upgrade_refusal(url: str, token: str) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as info:
        await open_ws(url, token)
    response = info.value.response
    return response.status_code, json.loads(response.body or b"{}")


async def test_signed_tokens_end_to_end(
    tmp_path: Path,
    keys: Keys,
    named_origin: NamedOrigin,
    tls: TLSFiles,
    egress_processes: list[EgressProcess],
) -> None:
    port = named_origin.port
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_yaml(["allowed.test"], port))
    egress = await start_egress(
        "--public-keys",
        str(keys.directory),
        "--audience",
        AUDIENCE,
        "--policy",
        str(policy),
        "--resolve",
        "allowed.test=127.0.0.1",
    )
    egress_processes.append(egress)
    # (keygen's directory, as used here, holds the private key too: said, once)
    await egress.wait_log(b"key-a.private.pem is a private signing key: skipped")
    good = keys.issue()

    # A valid token: curl through a real relay reaches the origin.
    relay = Relay(RelayConfig(egress_url=egress.url, session_id="sess-signed", token=Secret(good)))
    async with relay:
        result = await curl_via(relay.proxy_url, f"https://allowed.test:{port}/", tls.ca_file)
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"hello from origin\n"

    # Rotation: a token signed with the second trusted key works as well.
    rotated = keys.issue("key-b")
    answer = await ask(egress.url, f"allowed.test:{port}", token=rotated, session="sess-signed")
    assert answer.status == 200

    # Each bad token is refused at the upgrade with 401 and its reason.
    claims_segment = good.split(".")[1]
    refusals = {
        "expired": keys.issue(ttl=60, now=time.time() - 3600),
        "wrong-audience": keys.issue(audience="someone-else"),
        "bad-signature": tamper(good),
        "unsigned": f"v1.{claims_segment}",
        "unknown-key": keys.issue("key-c"),
        "malformed": "v1.not-base64!.x",
    }
    for reason, token in refusals.items():
        status, body = await upgrade_refusal(egress.url, token)
        assert (status, body.get("reason")) == (401, reason), (reason, body)

    # Through the relay, an expired token is a 502 that names the egress's 401.
    expired = Relay(
        RelayConfig(
            egress_url=egress.url, session_id="sess-signed", token=Secret(refusals["expired"])
        )
    )
    async with expired:
        answer = parse_answer(
            await raw_request(
                expired.port, f"CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n".encode()
            )
        )
    assert answer.status == 502
    assert "HTTP 401" in (answer.reason or "")

    # The in-tunnel Proxy-Authorization must carry the upgrade's own token and session.
    other_valid = keys.issue(ttl=301)  # valid too, but not the upgrade's token
    assert other_valid != good
    mismatch = await ask(
        egress.url,
        f"allowed.test:{port}",
        token=other_valid,
        session="sess-signed",
        upgrade_token=good,
    )
    assert mismatch.status == 407
    wrong_session = await ask(egress.url, f"allowed.test:{port}", token=good, session="sess-other")
    assert wrong_session.status == 407

    # Rotation without a restart: a new public key appears, SIGHUP, and its tokens work.
    newcomer = keys.issue("key-c")
    (keys.directory / "key-c.public.pem").write_bytes(
        public_key_pem(keys.private["key-c"].public_key())
    )
    assert (await upgrade_refusal(egress.url, newcomer))[1]["reason"] == "unknown-key"
    egress.proc.send_signal(signal.SIGHUP)
    async with asyncio.timeout(10):
        while True:
            try:
                await (await open_ws(egress.url, newcomer)).close()
                break
            except InvalidStatus:
                await asyncio.sleep(0.05)
    assert (
        await ask(egress.url, f"allowed.test:{port}", token=newcomer, session="sess-signed")
    ).status == 200
    assert (
        await ask(egress.url, f"allowed.test:{port}", token=good, session="sess-signed")
    ).status == 200  # the old key still works

    assert await egress.stop() == 0
    for token in [good, rotated, other_valid, newcomer, *refusals.values()]:
        assert token.encode() not in egress.stderr
        signature = token.split(".")[-1]
        assert len(signature) < 20 or signature.encode() not in egress.stderr
    assert b"upgrade refused" in egress.stderr and b"expired" in egress.stderr


async def test_cli_needs_keys_or_tokens(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("policies: {default: {}}\n")
    result = await run(
        sys.executable,
        "-m",
        "upstreamproxy",
        "egress",
        "--port",
        "0",
        "--policy",
        str(policy),
        env=process_env(),
        timeout=30,
    )
    assert result.returncode == 2
    assert b"--public-keys" in result.stderr
    empty = tmp_path / "empty-keys"
    empty.mkdir()
    result = await run(
        sys.executable,
        "-m",
        "upstreamproxy",
        "egress",
        "--port",
        "0",
        "--policy",
        str(policy),
        "--public-keys",
        str(empty),
        env=process_env(),
        timeout=30,
    )
    assert result.returncode == 2
    assert b"no public keys" in result.stderr
