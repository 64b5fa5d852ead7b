"""The relay and egress as real processes started from the console script, driven by curl."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import SESSION, TOKEN, Origin, TLSFiles, run


async def start_process(
    *argv: str, ready: bytes, env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "upstreamproxy",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=(os.environ | (env or {})),
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    if ready not in line:
        proc.kill()
        _, err = await proc.communicate()
        raise AssertionError(f"{argv[0]} did not start: {line!r} {err.decode()[-2000:]}")
    return proc, line.decode().strip().rsplit(" ", 1)[-1]


async def stop_process(proc: asyncio.subprocess.Process) -> bytes:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    return err


async def start_egress(
    tmp_path: Path, ca_cert: Path, *extra: str
) -> tuple[asyncio.subprocess.Process, str]:
    """A real egress with the session's static token, ``--ca-cert``, and localhost allowed."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# static tokens\n{SESSION} {TOKEN}\n")
    return await start_process(
        "egress",
        "--port",
        "0",
        "--static-tokens",
        str(tokens),
        "--ca-cert",
        str(ca_cert),
        "--allow",
        "localhost:*",
        *extra,
        ready=b"egress listening on",
    )


@pytest.fixture
async def processes(tmp_path: Path, tls: TLSFiles) -> AsyncIterator[dict[str, object]]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    egress, egress_url = await start_egress(
        tmp_path, tls.ca_file, "--allow", "127.0.0.1:*", "--allow-cidr", "127.0.0.0/8"
    )
    relay, proxy_url = await start_process(
        "--log-level",
        "DEBUG",
        "relay",
        "--egress-url",
        egress_url,
        "--session-id",
        SESSION,
        "--token-file",
        str(token_file),
        "--port",
        "0",
        ready=b"relay listening on",
    )
    state: dict[str, object] = {"egress": egress, "relay": relay, "proxy_url": proxy_url}
    yield state
    state["relay_log"] = await stop_process(relay)
    state["egress_log"] = await stop_process(egress)


async def test_curl_through_real_processes(
    processes: dict[str, object], https_origin: Origin, tls: TLSFiles
) -> None:
    env = {"PATH": os.environ["PATH"], "HTTPS_PROXY": str(processes["proxy_url"])}
    result = await run("curl", "-sS", "--cacert", str(tls.ca_file), https_origin.url + "/", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello from origin\n"


async def test_processes_stop_on_sigterm_without_leaking_token(
    tmp_path: Path, tls: TLSFiles, https_origin: Origin
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{SESSION} {TOKEN}\n")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    egress, url = await start_process(
        "--log-level",
        "DEBUG",
        "egress",
        "--port",
        "0",
        "--static-tokens",
        str(tokens),
        "--allow",
        "localhost:*",
        "--allow-cidr",
        "127.0.0.0/8",
        ready=b"egress listening on",
    )
    relay, proxy = await start_process(
        "--log-level",
        "DEBUG",
        "relay",
        "--egress-url",
        url,
        "--session-id",
        SESSION,
        "--token-file",
        str(token_file),
        "--port",
        "0",
        ready=b"relay listening on",
    )
    env = {"PATH": os.environ["PATH"], "HTTPS_PROXY": proxy}
    ok = await run("curl", "-sS", "--cacert", str(tls.ca_file), https_origin.url + "/", env=env)
    assert ok.returncode == 0
    logs = await stop_process(relay) + await stop_process(egress)
    assert relay.returncode == 0 and egress.returncode == 0
    assert b"relay stopped" in logs
    assert TOKEN.encode() not in logs
    assert b'"decision":"allow"' in logs  # the audit line


async def test_invalid_config_names_the_flag(tmp_path: Path) -> None:
    result = await run(
        sys.executable,
        "-m",
        "upstreamproxy",
        "relay",
        "--egress-url",
        "http://nope",
        "--session-id",
        "s",
        "--token-file",
        str(tmp_path / "no"),
    )
    assert result.returncode == 2
    assert b"--token-file" in result.stderr
    token = tmp_path / "t"
    token.write_text("x")
    result = await run(
        sys.executable,
        "-m",
        "upstreamproxy",
        "relay",
        "--egress-url",
        "http://nope",
        "--session-id",
        "s",
        "--token-file",
        str(token),
    )
    assert result.returncode == 2
    assert b"--egress-url" in result.stderr


async def test_ca_cert_endpoint_never_serves_a_key_pasted_into_the_file(
    tmp_path: Path, tls: TLSFiles
) -> None:
    # A combined "key + certificate" PEM given as --ca-cert (an easy mistake when the CA was
    # made elsewhere): the unauthenticated endpoint re-encodes the certificate, nothing else.
    combined = tmp_path / "ca-with-key.pem"
    combined.write_bytes(tls.ca.key_pem() + tls.ca.cert_pem())
    egress, url = await start_egress(tmp_path, combined)
    try:
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /v1/code/upstreamproxy/ca-cert HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        await stop_process(egress)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    body = answer.split(b"\r\n\r\n", 1)[1]
    assert b"PRIVATE KEY" not in body
    assert body.strip() == tls.ca.cert_pem().strip()
