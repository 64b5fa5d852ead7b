"""Hostile input sent straight to the egress WebSocket (no relay in between)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from conftest import SESSION, TOKEN, Origin
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from upstreamproxy.codec import encode_chunk
from upstreamproxy.connect_head import basic_credentials
from upstreamproxy.egress.server import EgressServer

AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/proto"}


def first_chunk(target: str, session: str = SESSION, token: str = TOKEN) -> bytes:
    return encode_chunk(
        f"CONNECT {target} HTTP/1.1\r\nProxy-Authorization: "
        f"{basic_credentials(session, token)}\r\n\r\n".encode()
    )


async def open_ws(egress: EgressServer, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return await connect(
        egress.url, additional_headers=headers or AUTH, proxy=None, compression=None, open_timeout=5
    )


async def status_of(ws) -> bytes:  # type: ignore[no-untyped-def]
    message = await asyncio.wait_for(ws.recv(), 5)
    from upstreamproxy.codec import decode_chunk

    return decode_chunk(message)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
    ],
)
async def test_upgrade_refused_without_valid_bearer(
    egress: EgressServer, headers: dict[str, str]
) -> None:
    with pytest.raises(InvalidStatus) as info:
        await connect(egress.url, additional_headers=headers, proxy=None, open_timeout=5)
    assert info.value.response.status_code == 401


@pytest.mark.parametrize("token", ["x" * 8100, "SECRET" * 2000])
async def test_oversized_authorization_refused_and_not_logged(
    egress: EgressServer, caplog: pytest.LogCaptureFixture, token: str
) -> None:
    # The whole upgrade head is limited to 8 KiB (aiohttp allowed 8190 bytes per line and
    # about 1 MiB per head): 431, and the value is never quoted or logged.
    with pytest.raises(InvalidStatus) as info:
        await connect(
            egress.url,
            additional_headers={"Authorization": "Bearer " + token},
            proxy=None,
            open_timeout=5,
        )
    assert info.value.response.status_code == 431
    assert token[:12] not in caplog.text
    assert token[:12].encode() not in info.value.response.body


@pytest.mark.parametrize(
    ("session", "token"),
    [
        ("other-session", TOKEN),
        (SESSION, "different-token"),
    ],
)
async def test_in_tunnel_credentials_must_match_upgrade(
    egress: EgressServer, https_origin: Origin, session: str, token: str
) -> None:
    async with await open_ws(egress) as ws:
        await ws.send(first_chunk(f"localhost:{https_origin.port}", session, token))
        answer = await status_of(ws)
    assert answer.startswith(b"HTTP/1.1 407")


async def test_in_tunnel_missing_proxy_authorization(egress: EgressServer) -> None:
    async with await open_ws(egress) as ws:
        await ws.send(encode_chunk(b"CONNECT localhost:443 HTTP/1.1\r\n\r\n"))
        assert (await status_of(ws)).startswith(b"HTTP/1.1 407")


@pytest.mark.parametrize(
    "message",
    [
        b"\x0b\x00",  # wrong tag
        b"\x12\x01a",  # field 2
        b"\x0a\x80",  # truncated varint
        b"\x0a\xff\xff\xff\xff\xff\x01",  # over-long varint
        b"\x0a\x05abc",  # length beyond buffer
        b"\x0a\x01ab",  # trailing bytes
    ],
)
async def test_malformed_chunk_closes_with_protocol_error(
    egress: EgressServer, message: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with await open_ws(egress) as ws:
        await ws.send(message)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1002
    await asyncio.sleep(0.05)
    assert "protocol error" in caplog.text


async def test_malformed_chunk_after_establishment(
    egress: EgressServer, https_origin: Origin
) -> None:
    async with await open_ws(egress) as ws:
        await ws.send(first_chunk(f"localhost:{https_origin.port}"))
        assert (await status_of(ws)).startswith(b"HTTP/1.1 200")
        await ws.send(b"\x0a\x09short")
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1002


async def test_text_frame_is_a_protocol_error(egress: EgressServer) -> None:
    async with await open_ws(egress) as ws:
        await ws.send("CONNECT localhost:443 HTTP/1.1\r\n\r\n")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1002


async def test_oversized_message_refused(egress: EgressServer) -> None:
    async with await open_ws(egress) as ws:
        await ws.send(b"\x0a" + b"\xff" * 4 + b"\x7f" + b"a" * (600 * 1024))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code in (1002, 1009)


async def test_oversized_connect_head_in_tunnel(egress: EgressServer) -> None:
    async with await open_ws(egress) as ws:
        for _ in range(3):
            await ws.send(encode_chunk(b"CONNECT localhost:443 HTTP/1.1\r\nX: " + b"a" * 4000))
        assert (await status_of(ws)).startswith(b"HTTP/1.1 400")


async def test_head_split_across_chunks_and_keepalives(
    egress: EgressServer, https_origin: Origin
) -> None:
    whole = first_chunk(f"localhost:{https_origin.port}")
    from upstreamproxy.codec import decode_chunk

    head = decode_chunk(whole)
    async with await open_ws(egress) as ws:
        for i in range(len(head)):
            await ws.send(b"\x0a\x00")  # keepalive in between
            await ws.send(encode_chunk(head[i : i + 1]))
        assert (await status_of(ws)).startswith(b"HTTP/1.1 200")


async def test_egress_survives_abuse_and_still_serves(
    egress: EgressServer, https_origin: Origin
) -> None:
    for garbage in (b"", b"\x00" * 100, b"\x0a", b"\xff" * 10):
        try:
            async with await open_ws(egress) as ws:
                await ws.send(garbage)
                await asyncio.wait_for(ws.recv(), 2)
        except (ConnectionClosed, TimeoutError):
            pass
    async with await open_ws(egress) as ws:
        await ws.send(first_chunk(f"localhost:{https_origin.port}"))
        assert (await status_of(ws)).startswith(b"HTTP/1.1 200")
    assert not egress.active or len(egress.active) <= 1
