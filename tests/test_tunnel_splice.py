"""The download direction through ``splice(2)`` (upstreamproxy/tunnel/pipe.py).

Where both sockets of a tunnel are plain TCP, bulk download bytes go egress upstream -> pipe
-> WebSocket and relay WebSocket -> pipe -> client without entering user space. Each test runs
the real relay and egress in-process (ws://, so both hops are plain) against a local origin
and checks the bytes with sha256 - and, through :class:`pipe.Counters`, that the pipe really
carried them (or really did not: splicing off, wss://). A hand-written egress then sends
the relay's splicing reader odd but legal frames, and a bad one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import SESSION, TOKEN, TLSFiles, connect_via, loopback_policy, pattern_bytes
from test_relay_handshake import answer_101
from test_tunnel import make_relay
from test_tunnel_faults_tls import fds_back_to, settled_fds, tls_egress, wss_relay

from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.egress.tunnel import TunnelTimeouts
from upstreamproxy.relay import Relay
from upstreamproxy.tunnel import pipe
from upstreamproxy.tunnel.links import LocalLink, WsLink
from upstreamproxy.tunnel.wsframes import (
    OP_PING,
    Close,
    Event,
    FrameReader,
    Ping,
    Pong,
    chunk_header,
    chunk_prefix,
    frame,
)

KiB = 1024
MiB = 1024 * KiB
BLOCK = 64 * 1024

pytestmark = pytest.mark.skipif(not hasattr(os, "splice"), reason="no os.splice here")


@pytest.fixture(autouse=True)
def splicing() -> Iterator[None]:
    """Splicing on for the test (whatever ``UPSTREAMPROXY_NO_SPLICE`` says), as it was after."""
    was = pipe.prepare()
    pipe.set_enabled(True)
    try:
        yield
    finally:
        pipe.set_enabled(was)


@dataclass(frozen=True)
class Moved:
    spliced_in: int
    spliced_out: int
    taken: int


def counters() -> Moved:
    c = pipe.Counters
    return Moved(c.spliced_in, c.spliced_out, c.taken)


def moved_since(before: Moved) -> Moved:
    now = counters()
    return Moved(
        now.spliced_in - before.spliced_in,
        now.spliced_out - before.spliced_out,
        now.taken - before.taken,
    )


@pytest.fixture
def switched(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Which links switched to splicing (``WsLink``: the relay's; ``LocalLink``: the
    egress's upstream), how many times."""
    seen: Counter[str] = Counter()
    for cls in (WsLink, LocalLink):
        original: Callable[[Any, int], None] = cls._bulk_read

        def bulk_read(
            self: WsLink | LocalLink, nbytes: int, original: Callable[[Any, int], None] = original
        ) -> None:
            was = self.splicing
            original(self, nbytes)
            if self.splicing and not was:
                seen[type(self).__name__] += 1

        monkeypatch.setattr(cls, "_bulk_read", bulk_read)
    return seen


# -- a local pattern origin and a raw CONNECT client -------------------------------------------


@dataclass
class Origin:
    port: int
    #: Bytes handed to the socket so far (all connections).
    sent: list[int] = field(default_factory=lambda: [0])
    #: The sha256 of each upload it read, in full.
    uploads: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def pattern_origin(size: int | None, *, upload: int = 0) -> AsyncIterator[Origin]:
    """A TCP origin that writes ``size`` pattern bytes as fast as it is let, then closes
    (``None``: until the peer is gone). With ``upload``, it reads that many bytes meanwhile
    (their sha256 is kept) and closes once both are done."""
    total = size if size is not None else 1 << 40
    data = memoryview(pattern_bytes(size if size is not None else 16 * MiB))
    state = Origin(0)

    async def send(writer: asyncio.StreamWriter) -> None:
        at = 0
        while at < total:
            piece = data[at % len(data) :][: min(BLOCK, total - at)]
            writer.write(piece)
            await writer.drain()
            at += len(piece)
            state.sent[0] += len(piece)

    async def receive(reader: asyncio.StreamReader) -> None:
        digest, got = hashlib.sha256(), 0
        while got < upload:
            piece = await reader.read(min(1 << 20, upload - got))
            if not piece:
                return
            digest.update(piece)
            got += len(piece)
        state.uploads.append(digest.hexdigest())

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.gather(send(writer), receive(reader))
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


def sha256_of_pattern(size: int) -> str:
    return hashlib.sha256(pattern_bytes(size)).hexdigest()


async def read_to_eof(
    reader: asyncio.StreamReader, pauses: tuple[int, ...] = (), pause: float = 1.0
) -> tuple[int, str]:
    """Read until EOF; stop reading for ``pause`` seconds once each of ``pauses`` bytes came."""
    digest, got = hashlib.sha256(), 0
    waits = list(pauses)
    while piece := await reader.read(1 << 20):
        digest.update(piece)
        got += len(piece)
        if waits and got >= waits[0]:
            waits.pop(0)
            await asyncio.sleep(pause)
    return got, digest.hexdigest()


async def download(relay: Relay, origin: Origin, pauses: tuple[int, ...] = ()) -> tuple[int, str]:
    """Fetch the origin's bytes through the relay: how many, and their sha256."""
    reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{origin.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    try:
        return await read_to_eof(reader, pauses)
    finally:
        writer.close()


async def fetched_intact(
    relay: Relay, origin: Origin, size: int, pauses: tuple[int, ...] = (), timeout: float = 60
) -> Moved:
    """Download the origin's ``size`` bytes through the relay and check every one; what went
    through the pipe meanwhile."""
    before = counters()
    async with asyncio.timeout(timeout):
        got, digest = await download(relay, origin, pauses)
    moved = moved_since(before)
    assert got == size
    assert digest == sha256_of_pattern(size)
    return moved


# -- bulk downloads ----------------------------------------------------------------------------


@pytest.mark.parametrize("pool_size", [0, 2], ids=["fresh", "pooled"])
async def test_a_bulk_download_is_spliced_and_intact(
    egress: EgressServer, pool_size: int, switched: Counter[str]
) -> None:
    size = 64 * MiB + 5
    async with make_relay(egress.url, pool_size=pool_size) as relay, pattern_origin(size) as origin:
        moved = await fetched_intact(relay, origin, size)
    # Both processes' halves (here, one process) switched to the pipe ...
    assert switched == {"WsLink": 1, "LocalLink": 1}
    # ... and carried most of the bytes through it (twice: the egress's and the relay's).
    assert moved.spliced_in >= size // 2, moved
    assert moved.spliced_out >= size // 2, moved


async def test_many_concurrent_spliced_downloads_share_the_pipe_intact(
    egress: EgressServer, switched: Counter[str]
) -> None:
    """One pipe per process (here relay and egress share it): 24 bulk downloads at once,
    some clients pausing, each checked byte for byte - and nothing left in the pipe."""
    size = 6 * MiB + 7
    async with make_relay(egress.url, pool_size=4) as relay, pattern_origin(size) as origin:
        before = counters()
        async with asyncio.timeout(90):
            results = await asyncio.gather(
                *(download(relay, origin, pauses=(MiB,) if i % 3 == 0 else ()) for i in range(24))
            )
        moved = moved_since(before)
    assert all(got == size for got, _ in results), [got for got, _ in results]
    assert {digest for _, digest in results} == {sha256_of_pattern(size)}
    assert switched["WsLink"] >= 12 and switched["LocalLink"] >= 12, switched
    assert moved.spliced_in > 0
    assert pipe._pipe is not None and pipe._pipe.held == 0


async def test_with_splicing_off_nothing_goes_through_the_pipe(
    egress: EgressServer, switched: Counter[str]
) -> None:
    size = 64 * MiB + 5
    pipe.set_enabled(False)  # (the fixture restores it)
    async with make_relay(egress.url) as relay, pattern_origin(size) as origin:
        moved = await fetched_intact(relay, origin, size)
    assert moved == Moved(0, 0, 0)
    assert not switched


async def test_a_client_that_pauses_twice_gets_it_all(
    egress: EgressServer, switched: Counter[str]
) -> None:
    """While the client reads nothing the spliced bytes cannot leave: they are read back
    (``taken``) into the transport's buffer and backpressure holds the rest."""
    size = 48 * MiB + 3
    async with make_relay(egress.url) as relay, pattern_origin(size) as origin:
        moved = await fetched_intact(relay, origin, size, pauses=(4 * MiB, 20 * MiB))
    assert switched["WsLink"] == 1
    assert moved.spliced_in >= size // 2, moved


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_client_that_leaves_mid_download_frees_everything(
    egress: EgressServer, how: str, switched: Counter[str]
) -> None:
    async with make_relay(egress.url, pool_size=0) as relay, pattern_origin(None) as origin:
        baseline = await settled_fds()
        reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{origin.port}")
        assert head.startswith(b"HTTP/1.1 200"), head
        async with asyncio.timeout(30):
            got = 0
            while got < 16 * MiB:  # well into splicing
                piece = await reader.read(1 << 20)
                assert piece, got
                got += len(piece)
        assert switched == {"WsLink": 1, "LocalLink": 1}
        assert relay.active_tunnels == 1
        if how == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
            writer.transport.abort()
        else:
            writer.close()
        took = await fds_back_to(baseline, 20)
        assert took < 2, took  # at once, not a deadline later
        assert relay.active_tunnels == 0
        sent = origin.sent[0]
        await asyncio.sleep(0.3)
        assert origin.sent[0] == sent  # the origin was let go too


@pytest.mark.parametrize("size", [20 * MiB, 20 * MiB + 1])
async def test_an_origin_that_closes_after_sending_gives_all_then_eof(
    egress: EgressServer, size: int, switched: Counter[str]
) -> None:
    async with make_relay(egress.url) as relay, pattern_origin(size) as origin:
        reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{origin.port}")
        assert head.startswith(b"HTTP/1.1 200"), head
        async with asyncio.timeout(30):
            got = await reader.readexactly(size)
            assert await reader.read() == b""  # then EOF
        writer.close()
    assert got == pattern_bytes(size)
    assert switched == {"WsLink": 1, "LocalLink": 1}


async def test_an_upload_during_a_spliced_download_is_intact_both_ways(
    egress: EgressServer, switched: Counter[str]
) -> None:
    up_size, down_size = 16 * MiB + 7, 32 * MiB + 9
    upload = memoryview(pattern_bytes(up_size + 11)[11:])  # not the download's bytes
    async with (
        make_relay(egress.url) as relay,
        pattern_origin(down_size, upload=up_size) as origin,
    ):
        before = counters()
        reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{origin.port}")
        assert head.startswith(b"HTTP/1.1 200"), head

        async def send() -> None:
            for at in range(0, up_size, BLOCK):
                writer.write(upload[at : at + BLOCK])
                await writer.drain()

        async with asyncio.timeout(60):
            _, (got, digest) = await asyncio.gather(send(), read_to_eof(reader))
        writer.close()
        moved = moved_since(before)
    assert origin.uploads == [hashlib.sha256(upload).hexdigest()]
    assert got == down_size
    assert digest == sha256_of_pattern(down_size)
    assert switched == {"WsLink": 1, "LocalLink": 1}
    assert moved.spliced_in >= down_size // 2, moved


async def test_egress_pings_while_the_relay_splices(
    tls: TLSFiles, monkeypatch: pytest.MonkeyPatch, switched: Counter[str]
) -> None:
    """The egress pings whenever it heard nothing for 10 ms - all through the download, as
    the relay sends nothing but pongs: ping frames keep landing between spliced chunks."""
    seen: Counter[str] = Counter()
    handle = WsLink._handle

    def counting(self: WsLink, events: list[Event]) -> None:
        if self.client:
            seen["pings at the relay"] += sum(isinstance(e, Ping) for e in events)
        else:
            seen["pongs at the egress"] += sum(isinstance(e, Pong) for e in events)
        handle(self, events)

    monkeypatch.setattr(WsLink, "_handle", counting)
    size = 64 * MiB + 5
    config = EgressConfig(
        ca_cert_pem=tls.ca.cert_pem(), timeouts=TunnelTimeouts(ping_interval=0.01)
    )
    egress = EgressServer(config, StaticTokens({TOKEN: Session(SESSION)}), loopback_policy())
    async with (
        egress,
        make_relay(egress.url, pool_size=0) as relay,
        pattern_origin(size) as origin,
    ):
        moved = await fetched_intact(relay, origin, size)
    assert switched == {"WsLink": 1, "LocalLink": 1}
    assert moved.spliced_in >= size // 2, moved
    assert seen["pings at the relay"] >= 5, seen
    assert seen["pongs at the egress"] >= 5, seen


async def test_relay_keepalives_after_the_egress_closed_do_not_cut_the_tail(
    egress: EgressServer, switched: Counter[str]
) -> None:
    """Regression: the egress closed its WebSocket as soon as the origin was done, with
    megabytes it had spliced still in its socket's send queue (the relay was behind: its
    client paused). Anything the relay sent then - a keepalive, a pong - met a closed
    socket, and the kernel answered with a reset that threw the undelivered tail away (the
    relay saw ``egress-closed``, its client a truncated download). The egress now keeps
    the socket open, and read, until the relay answered its close or has all its bytes."""
    size = 32 * MiB + 5
    async with (
        make_relay(egress.url, pool_size=0, keepalive_interval=0.01) as relay,
        pattern_origin(size) as origin,
    ):
        reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{origin.port}")
        assert head.startswith(b"HTTP/1.1 200"), head
        await asyncio.sleep(1.0)  # the origin is done meanwhile; the tail waits in the queues
        async with asyncio.timeout(30):
            got, digest = await read_to_eof(reader)
        writer.close()
    assert got == size
    assert digest == sha256_of_pattern(size)
    assert switched == {"WsLink": 1, "LocalLink": 1}


async def test_a_client_still_sending_as_its_download_ends_gets_the_tail(
    egress: EgressServer,
) -> None:
    """The same reset one hop on: the client keeps writing (small pieces, as a protocol's
    acknowledgements would) while the download ends, and reads the tail late."""
    size = 8 * MiB + 1
    data = pattern_bytes(size)

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        writer.write_eof()  # done sending; it reads (and drops) what the client sends
        with contextlib.suppress(ConnectionError):
            while await reader.read(1 << 16):
                pass
        writer.close()

    server = await asyncio.start_server(origin, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    got = bytearray()
    try:
        async with make_relay(egress.url, pool_size=0) as relay:
            reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{port}")
            assert head.startswith(b"HTTP/1.1 200"), head

            async def chatter() -> None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    while True:
                        writer.write(b"ack" * 300)
                        await writer.drain()
                        await asyncio.sleep(0.005)

            chatting = asyncio.create_task(chatter())
            try:
                await asyncio.sleep(1.0)  # the download ends meanwhile, unread
                async with asyncio.timeout(20):
                    with contextlib.suppress(ConnectionResetError):
                        while piece := await reader.read(1 << 20):
                            got += piece
            finally:
                chatting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await chatting
                writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert len(got) == size
    assert got == data


async def test_nothing_is_spliced_over_wss(tls: TLSFiles, switched: Counter[str]) -> None:
    size = 32 * MiB + 5
    egress = tls_egress(tls)
    async with (
        egress,
        wss_relay(egress, tls) as relay,
        pattern_origin(size) as origin,
    ):
        moved = await fetched_intact(relay, origin, size)
    assert moved == Moved(0, 0, 0)
    assert not switched


# -- a hand-written egress: odd but legal frames, then a bad one -------------------------------


STATUS = b"HTTP/1.1 200 Connection established\r\n\r\n"


@pytest.mark.parametrize("paced", [True, False], ids=["paced", "burst"])
async def test_the_relays_splicing_reader_takes_odd_frames_and_stops_at_a_bad_one(
    paced: bool, switched: Counter[str]
) -> None:
    """A stand-in egress sends: the 200, a 300 KiB chunk, a ping, a fragmented chunk
    message (its chunk prefix split across fragments, a ping between them), a keepalive,
    300 KiB more, then a frame with RSV bits set. The client gets exactly the payload before
    the bad frame, then the end; the relay answered the pings and closed with 1002."""
    first, middle, last = (
        pattern_bytes(size + n)[n:]
        for size, n in ((300 * KiB, 0), (100 * KiB, 3), (300 * KiB + 1, 5))
    )
    message = chunk_prefix(len(middle)) + middle
    cut = [0, 2, 40_000, len(message)]  # the chunk's prefix split across fragments, too
    fragments = (
        bytes((0x02, cut[1] - cut[0])) + message[: cut[1]],  # binary, not final
        frame(OP_PING, b"two", masked=False),  # a control frame may come between
        bytes((0x00, 126)) + (cut[2] - cut[1]).to_bytes(2, "big") + message[cut[1] : cut[2]],
        bytes((0x80, 127)) + (cut[3] - cut[2]).to_bytes(8, "big") + message[cut[2] :],
    )
    heard: list[object] = []
    done = asyncio.Event()

    async def egress(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = FrameReader(masked=True)

        async def read_until(test: Callable[[object], bool]) -> None:
            while not any(test(e) for e in heard):
                data = await reader.read(65536)
                if not data:
                    return
                heard.extend(
                    bytes(e) if isinstance(e, memoryview) else e for e in frames.feed(data)
                )

        async def send(*parts: bytes) -> None:
            writer.write(b"".join(parts))
            await writer.drain()
            if paced:
                await asyncio.sleep(0.05)

        try:
            writer.write(answer_101()(await reader.readuntil(b"\r\n\r\n")))
            await read_until(lambda e: isinstance(e, bytes) and b"\r\n\r\n" in e)  # CONNECT
            await send(chunk_header(len(STATUS)), STATUS)
            await send(chunk_header(len(first)), first)
            await send(frame(OP_PING, b"one", masked=False))
            await send(*fragments)
            await send(chunk_header(0))  # a keepalive
            await send(chunk_header(len(last)), last)
            await send(bytes((0xC2, 5)) + b"\x0a\x03bad")  # RSV1: no extension was agreed
            await read_until(lambda e: isinstance(e, Close))
        finally:
            done.set()
            writer.close()

    server = await asyncio.start_server(egress, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with make_relay(f"ws://127.0.0.1:{port}/ws", pool_size=0) as relay:
            before = counters()
            reader, writer, head = await connect_via(relay.port, "example.test:443")
            assert head == STATUS
            got = bytearray()
            async with asyncio.timeout(20):
                with contextlib.suppress(ConnectionResetError):
                    while piece := await reader.read(1 << 20):
                        got += piece
                await done.wait()
            writer.close()
            moved = moved_since(before)
    finally:
        server.close()
        await server.wait_closed()
    assert bytes(got) == first + middle + last  # not a byte of the bad frame, nor after it
    assert switched == {"WsLink": 1}
    assert moved.spliced_in >= len(last), moved  # the last chunk came through the pipe
    assert Pong(b"one") in heard and Pong(b"two") in heard
    closes = [e for e in heard if isinstance(e, Close)]
    assert closes and closes[0].code == 1002, heard


# -- --no-splice in real processes ------------------------------------------------------------


def _pipe_fds(pid: int) -> int:
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("pipe:"):
                count += 1
    return count


async def _pipes_of(argv: list[str], ready: bytes, env: dict[str, str]) -> int:
    """Start ``python -m upstreamproxy *argv``; how many pipe fds it holds once listening
    (its stdin/stdout/stderr are files or /dev/null, so every pipe is its own)."""
    out = open(os.devnull, "wb")  # noqa: SIM115 - closed below
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "upstreamproxy", *argv,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=out, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            while ready not in (line := await proc.stdout.readline()):
                assert line, f"{argv[0]} exited before listening"
        # The stdout pipe is ours to read: its write end is the child's only pipe besides
        # the splice pipe.
        return _pipe_fds(proc.pid) - 1
    finally:
        proc.terminate()
        async with asyncio.timeout(10):
            await proc.wait()
        out.close()


@pytest.mark.parametrize("how", ["flag", "env"])
async def test_no_splice_leaves_the_relay_and_the_egress_without_a_pipe(
    tmp_path: Path, how: str
) -> None:
    (tmp_path / "tokens").write_text(f"{SESSION} {TOKEN}\n")
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "token").chmod(0o600)
    base = {k: v for k, v in os.environ.items() if not k.startswith("UPSTREAMPROXY_")}
    egress = [
        "egress", "--port", "0", "--static-tokens", str(tmp_path / "tokens"),
        "--allow", "127.0.0.1:1",
    ]  # fmt: skip
    relay = [
        "relay", "--egress-url", "ws://127.0.0.1:9/ws", "--session-id", SESSION,
        "--token-file", str(tmp_path / "token"), "--keep-token-file", "--port", "0",
        "--pool-size", "0",
    ]  # fmt: skip
    for argv, ready in ((egress, b"egress listening on"), (relay, b"relay listening on")):
        assert await _pipes_of(argv, ready, base) == 2  # splicing: the read and write ends
        off = [*argv, "--no-splice"] if how == "flag" else argv
        env = base if how == "flag" else {**base, "UPSTREAMPROXY_NO_SPLICE": "1"}
        assert await _pipes_of(off, ready, env) == 0
