"""The egress sends each tunnel message as one write (header and payload together)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from conftest import _serve

from upstreamproxy.egress.tunnel import AiohttpPort, binary_frame_header


@pytest.mark.parametrize(
    ("size", "header"),
    [(0, "8200"), (125, "827d"), (126, "827e007e"), (65536, "827f0000000000010000")],
)
def test_binary_frame_header(size: int, header: str) -> None:
    assert binary_frame_header(size).hex() == header


@pytest.mark.parametrize("size", [100, 16 * 1024 + 1, 128 * 1024 + 6, 512 * 1024 + 6])
async def test_each_message_is_one_write_and_arrives_intact(size: int) -> None:
    writes: list[int] = []
    message = bytes(range(256)) * (size // 256) + b"x" * (size % 256)

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        transport = request.transport
        assert transport is not None
        real_write = transport.write

        def counting_write(data: bytes) -> None:  # observe the real transport, not a mock
            writes.append(len(data))
            real_write(data)

        transport.write = counting_write  # type: ignore[method-assign]
        port = AiohttpPort(ws, transport)
        await port.send(message)
        await port.send(message)
        transport.write = real_write  # type: ignore[method-assign]
        await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner, port_number = await _serve(app, None)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"http://127.0.0.1:{port_number}/ws", max_msg_size=0) as ws,
        ):
            for _ in range(2):
                received = await asyncio.wait_for(ws.receive_bytes(), 10)
                assert received == message
    finally:
        await runner.cleanup()
    assert len(writes) == 2  # one write per message, header included
