#!/usr/bin/env python3
"""Client-side CPU per WebSocket handshake: the relay's native opener vs websockets.

Starts the real egress as its own process (``python -m upstreamproxy egress``, on 127.0.0.1,
``ws://`` and, with ``--tls``, ``wss://`` with a throwaway trustme CA), then opens
``--count`` WebSockets with each opener in this process, interleaved in rounds so both see
the same machine load, and prints this process's CPU time (user + system) and wall time per
handshake. Each socket is aborted right after its upgrade (no close handshake for either),
so what is measured is opening. Bounded: a count, a per-handshake timeout, ``--max-seconds``.

    python benchmarks/bench_handshake.py                 # 2000 handshakes per opener
    python benchmarks/bench_handshake.py --tls --count 500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from upstreamproxy.relay_handshake import open_upgraded  # noqa: E402
from upstreamproxy.relay_link import LinkConfig  # noqa: E402
from upstreamproxy.secret import Secret  # noqa: E402
from upstreamproxy.tunnel.driver import reset  # noqa: E402

SESSION: Final = "bench"
TOKEN: Final = "bench-token-0123456789"
EGRESS_ARGS: Final = [
    "--allow",
    "127.0.0.1:1",
    "--max-tunnels",
    "100000",
    "--max-session-tunnels",
    "100000",
    "--session-rate",
    "1000000",
    "--session-burst",
    "1000000",
]


def start_egress(workdir: Path, tls: bool) -> tuple[subprocess.Popen[bytes], str]:
    (workdir / "tokens").write_text(f"{SESSION} {TOKEN}\n")
    argv = [
        sys.executable,
        "-m",
        "upstreamproxy",
        "--log-level",
        "WARNING",
        "egress",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--static-tokens",
        str(workdir / "tokens"),
        *EGRESS_ARGS,
    ]
    if tls:
        argv += ["--tls-cert", str(workdir / "leaf.pem"), "--tls-key", str(workdir / "leaf.key")]
    log = (workdir / "egress.log").open("wb")
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    pattern = re.compile(rb"egress listening on (wss?://\S+)")
    while time.monotonic() < deadline:
        match = pattern.search((workdir / "egress.log").read_bytes())
        if match:
            return proc, match[1].decode()
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"egress did not start: {(workdir / 'egress.log').read_text()[-2000:]}")


def make_tls(workdir: Path) -> ssl.SSLContext:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(workdir / "leaf.pem"))
    leaf.private_key_pem.write_to_path(str(workdir / "leaf.key"))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return client


async def native(cfg: LinkConfig) -> None:
    up = await open_upgraded(cfg)
    up.transport.abort()


async def with_websockets(cfg: LinkConfig) -> None:
    """The websockets client handshake the relay used before (same headers and options)."""
    from websockets.asyncio.client import connect

    ws = await connect(
        cfg.egress_url,
        additional_headers={
            "Authorization": f"Bearer {cfg.token.reveal()}",
            "Content-Type": "application/proto",
        },
        user_agent_header="upstreamproxy-relay/bench",
        open_timeout=cfg.handshake_timeout,
        ssl=cfg.ssl,
        compression=None,
        ping_interval=None,
        max_queue=1,
        write_limit=64 * 1024,
    )
    reset(ws.transport)


async def measure(
    openers: dict[str, Callable[[LinkConfig], Awaitable[None]]],
    cfg: LinkConfig,
    count: int,
    rounds: int,
    deadline: float,
) -> dict[str, dict[str, float]]:
    cpu = dict.fromkeys(openers, 0.0)
    user = dict.fromkeys(openers, 0.0)
    wall = dict.fromkeys(openers, 0.0)
    done = dict.fromkeys(openers, 0)
    for opener in openers.values():  # warm up: imports, TLS session setup, egress caches
        for _ in range(20):
            await opener(cfg)
    per_round = max(1, count // rounds)
    for _ in range(rounds):
        for name, opener in openers.items():
            if time.monotonic() > deadline:
                raise SystemExit("--max-seconds reached")
            c0, u0, w0 = time.process_time(), os.times().user, time.perf_counter()
            for _ in range(per_round):
                await opener(cfg)
            cpu[name] += time.process_time() - c0
            user[name] += os.times().user - u0
            wall[name] += time.perf_counter() - w0
            done[name] += per_round
            await asyncio.sleep(0.05)  # let the egress finish its aborted tunnels
    return {
        name: {
            "handshakes": done[name],
            "cpu_ms_per_handshake": 1000 * cpu[name] / done[name],
            "user_ms_per_handshake": 1000 * user[name] / done[name],
            "wall_ms_per_handshake": 1000 * wall[name] / done[name],
        }
        for name in openers
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="handshakes per opener")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    parser.add_argument("--tls", action="store_true", help="wss:// (trustme CA)")
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    deadline = time.monotonic() + args.max_seconds
    with tempfile.TemporaryDirectory(prefix="bench-handshake-") as tmp:
        workdir = Path(tmp)
        client_tls = make_tls(workdir) if args.tls else None
        proc, url = start_egress(workdir, args.tls)
        try:
            cfg = LinkConfig(url, Secret(TOKEN), 10.0, None, client_tls)
            openers: dict[str, Callable[[LinkConfig], Awaitable[None]]] = {
                "native": native,
                "websockets": with_websockets,
            }
            results: dict[str, Any] = asyncio.run(
                measure(openers, cfg, args.count, args.rounds, deadline)
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    results["environment"] = {
        "url_scheme": url.split(":", 1)[0],
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "load": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    print(
        f"{'opener':<12} {'handshakes':>10} {'CPU ms/handshake':>17} {'of it user':>10}"
        f" {'wall ms':>8}"
    )
    for name in ("native", "websockets"):
        row = results[name]
        print(
            f"{name:<12} {row['handshakes']:>10} {row['cpu_ms_per_handshake']:>17.3f}"
            f" {row['user_ms_per_handshake']:>10.3f}"
            f" {row['wall_ms_per_handshake']:>8.3f}"
        )
    ratio = (
        results["websockets"]["cpu_ms_per_handshake"] / results["native"]["cpu_ms_per_handshake"]
    )
    print(f"websockets / native CPU: {ratio:.2f}x  ({results['environment']})")
    if args.json:
        with contextlib.suppress(OSError):
            Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
