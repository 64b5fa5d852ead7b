"""Regression tests for the findings of the security/correctness review."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from ipaddress import ip_address
from pathlib import Path

import pytest
from aiohttp import web
from conftest import SESSION, TOKEN, _serve, connect_via, loopback_policy, raw_request, run

from upstreamproxy.codec import encode_chunk
from upstreamproxy.connect_head import build_status_head
from upstreamproxy.egress.admission import is_local_address
from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.limits import LimitConfig
from upstreamproxy.egress.policy import PolicyStore
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.relay import Relay, RelayConfig
from upstreamproxy.secret import Secret


def relay_for(url: str) -> Relay:
    return Relay(RelayConfig(egress_url=url, session_id=SESSION, token=Secret(TOKEN)))


def write_policy(path: Path, hosts: list[str]) -> None:
    rules = "".join(
        f'      - id: r{i}\n        hosts: [{h}]\n        ports: "*"\n' for i, h in enumerate(hosts)
    )
    path.write_text(f"policies:\n  default:\n    rules:\n{rules}    allow_cidrs: [127.0.0.0/8]\n")


async def test_policy_file_change_applies_without_sighup(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    write_policy(policy, ["127.0.0.1"])
    server = EgressServer(
        EgressConfig(reload_interval=0.05),
        StaticTokens({TOKEN: Session(SESSION)}),
        PolicyStore.from_file(policy),
    )
    async with server, relay_for(server.url) as relay:
        first = await raw_request(relay.port, b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n\r\n")
        assert b"403" not in first.split(b"\r\n")[0]  # allowed (then the dial fails: 502)
        write_policy(policy, ["localhost"])  # revoke 127.0.0.1
        await asyncio.sleep(0.5)
        second = await raw_request(relay.port, b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n\r\n")
        assert second.startswith(b"HTTP/1.1 403"), second


async def test_limits_count_websockets_and_relay_passes_the_reason_on() -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    origin = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = origin.sockets[0].getsockname()[1]
    server = EgressServer(
        EgressConfig(limits=LimitConfig(max_session_tunnels=2)),
        StaticTokens({TOKEN: Session(SESSION)}),
        _loopback(),
    )
    async with server, relay_for(server.url) as relay:
        held = [await connect_via(relay.port, f"127.0.0.1:{port}") for _ in range(2)]
        assert all(head.startswith(b"HTTP/1.1 200") for _, _, head in held)
        answer = await raw_request(
            relay.port, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode()
        )
        # The egress refused the upgrade; the relay passes status and reason on to the client.
        assert answer.startswith(b"HTTP/1.1 429"), answer
        assert b"X-Upstreamproxy-Reason: session-concurrency-limit" in answer
        for _, writer, _ in held:
            writer.close()
    origin.close()


def _loopback() -> PolicyStore:
    from conftest import loopback_policy

    return loopback_policy()


async def _stand_in_egress(handler: object) -> tuple[web.AppRunner, str]:
    """A stand-in egress (named so): just enough WebSocket server to misbehave on purpose."""
    app = web.Application()
    app.router.add_get("/ws", handler)  # type: ignore[arg-type]
    runner, port = await _serve(app, None)
    return runner, f"ws://127.0.0.1:{port}/ws"


async def test_relay_502_when_egress_closes_right_after_upgrade(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def close_at_once(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close(code=1011)
        return ws

    runner, url = await _stand_in_egress(close_at_once)
    try:
        async with relay_for(url) as relay:
            for _ in range(5):
                answer = await raw_request(relay.port, b"CONNECT a.test:443 HTTP/1.1\r\n\r\n")
                assert answer.startswith(b"HTTP/1.1 502"), answer
    finally:
        await runner.cleanup()
    assert "failed unexpectedly" not in caplog.text


async def test_relay_closes_with_1002_on_a_malformed_chunk_from_egress() -> None:
    codes: list[int | None] = []

    async def bad_chunk(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        await ws.send_bytes(encode_chunk(build_status_head(200)))
        await ws.send_bytes(b"\x0a\x09short")
        await ws.receive()  # the relay's close frame
        codes.append(ws.close_code)
        return ws

    runner, url = await _stand_in_egress(bad_chunk)
    try:
        async with relay_for(url) as relay:
            reader, writer, head = await connect_via(relay.port, "a.test:443")
            assert head.startswith(b"HTTP/1.1 200")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await asyncio.sleep(0.2)
    finally:
        await runner.cleanup()
    assert codes == [1002]


async def test_non_ascii_bearer_is_a_401_not_a_500(egress: EgressServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", egress.port)
    writer.write(
        b"GET /v1/code/upstreamproxy/ws HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer tok-\xff\xfe\r\nConnection: close\r\n\r\n"
    )
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer


async def test_bad_env_value_fails_open_or_closed(tmp_path: Path) -> None:
    env = {**os.environ, "UPSTREAMPROXY_PORT": "not-a-port", "HOME": str(tmp_path)}
    token = tmp_path / "token"
    token.write_text("t")
    args = [
        sys.executable,
        "-m",
        "upstreamproxy",
        "start",
        "--token-file",
        str(token),
        "--state-dir",
        str(tmp_path / "state"),
    ]
    open_ = await run(*args, env=env)
    assert open_.returncode == 0
    assert b"UPSTREAMPROXY_PORT" in open_.stderr and b"Traceback" not in open_.stderr
    closed = await run(*args, "--fail-closed", env=env)
    assert closed.returncode != 0
    assert token.exists()  # nothing was started, the token is kept for a retry


def test_token_claims_refuse_a_trailing_newline() -> None:
    from upstreamproxy.errors import ConfigError
    from upstreamproxy.tokens import generate_key, issue_token

    with pytest.raises((ConfigError, ValueError)):
        issue_token(generate_key(), "k1", "S1\n", "default", "aud", 60, 1_000_000)


def test_is_local_address() -> None:
    assert is_local_address(ip_address("127.0.0.1"))
    assert is_local_address(ip_address("::1"))
    assert not is_local_address(ip_address("203.0.113.9"))


async def test_no_log_line_carries_frames_or_the_token_even_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The WebSocket frames (the first carries the token) are never logged, at any level:
    the data path has no library logging frames any more, and our own lines name no bytes."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    caplog.set_level(logging.DEBUG)
    origin = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = origin.sockets[0].getsockname()[1]
    egress = EgressServer(
        EgressConfig(), StaticTokens({TOKEN: Session(SESSION)}), loopback_policy()
    )
    await egress.start()
    relay = relay_for(egress.url)
    await relay.start()
    try:
        reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{port}")
        assert head.startswith(b"HTTP/1.1 200")
        writer.write(b"secret-payload-bytes")
        assert await asyncio.wait_for(reader.readexactly(20), 10) == b"secret-payload-bytes"
        writer.close()
    finally:
        await relay.stop()
        await egress.stop()
        origin.close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert caplog.records  # DEBUG really was on
    assert TOKEN not in text and "secret-payload-bytes" not in text
