"""The "outside" host of test_netlock.py, run inside its own network namespace (not collected).

Usage: ``python netns_outside.py V4 V6``. Serves, on both addresses:

* an HTTP origin on port 8080 (``GET /`` -> HELLO);
* a UDP echo on port 5300 and a UDP "resolver" on port 53 (echo too);
* the real egress on port 9000 of both addresses, holding TOKEN for SESSION, allowing only
  the origin.

Prints ``ready`` once everything listens, and runs until stdin closes.
"""

from __future__ import annotations

import asyncio
import socket
import sys

from aiohttp import web
from testpki import make_ca

from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.policy import PolicyStore, policy_from_allow_list
from upstreamproxy.egress.server import EgressConfig, EgressServer

TOKEN = "tok-netlock-5d1e9a-SECRET"
SESSION = "sess-netlock"
HELLO = "hello from outside\n"
ORIGIN_PORT = 8080
UDP_PORTS = (5300, 53)
EGRESS_PORT = 9000


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


async def main(v4: str, v6: str) -> None:
    loop = asyncio.get_running_loop()
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=HELLO)

    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    for host in (v4, v6):
        await web.TCPSite(runner, host, ORIGIN_PORT).start()
        for port in UDP_PORTS:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            await loop.create_datagram_endpoint(Echo, local_addr=(host, port), family=family)
    allowed = [f"{v4}:{ORIGIN_PORT}", f"[{v6}]:{ORIGIN_PORT}"]
    ca = make_ca("netlock CA").cert_pem()
    egresses = [
        EgressServer(
            EgressConfig(host=host, port=EGRESS_PORT, ca_cert_pem=ca),
            StaticTokens({TOKEN: Session(SESSION)}),
            PolicyStore(policy_from_allow_list(allowed, [f"{v4}/32", f"{v6}/128"])),
        )
        for host in (v4, v6)
    ]
    for egress in egresses:
        await egress.start()
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    for egress in egresses:
        await egress.stop()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
