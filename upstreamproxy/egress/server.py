"""The egress HTTP server (aiohttp): the tunnel WebSocket, the CA endpoint and health."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from ..codec import MAX_MESSAGE_BYTES
from ..connect_head import Target
from ..errors import AuthError
from ..logredact import redacting_logger
from .allowlist import AllowList, Decision
from .auth import Authenticator, Session, bearer_token
from .dialer import Upstream, dial
from .tunnel import Tunnel, TunnelRecord, TunnelTimeouts

log = logging.getLogger("upstreamproxy.egress")
audit_log = logging.getLogger("upstreamproxy.audit")
# aiohttp quotes offending header lines in its errors; they may hold a token.
for _name in ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.websocket"):
    redacting_logger(_name)

DEFAULT_WS_PATH: Final = "/v1/code/upstreamproxy/ws"
CA_CERT_PATH: Final = "/v1/code/upstreamproxy/ca-cert"


@dataclass
class EgressConfig:
    host: str = "127.0.0.1"
    port: int = 0
    ws_path: str = DEFAULT_WS_PATH
    ca_cert_pem: bytes | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    timeouts: TunnelTimeouts = field(default_factory=TunnelTimeouts)


class EgressServer:
    def __init__(self, config: EgressConfig, authenticator: Authenticator, policy: AllowList,
                 dialer: Callable[[Target, float], Awaitable[Upstream]] = dial) -> None:
        self.config = config
        self.authenticator = authenticator
        self.policy = policy
        self._dial = dialer
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.active: set[asyncio.Task[None]] = set()
        self.app = self._build_app()

    def _build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(self.config.ws_path, self._tunnel)
        app.router.add_get(CA_CERT_PATH, self._ca_cert)
        app.router.add_get("/healthz", self._healthz)
        return app

    @property
    def port(self) -> int:
        assert self._site is not None and self._site._server is not None
        sockets = self._site._server.sockets  # type: ignore[union-attr]
        port: int = sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        scheme = "wss" if self.config.tls_cert_file else "ws"
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{scheme}://{host}:{self.port}{self.config.ws_path}"

    async def start(self) -> None:
        ssl_context = None
        if self.config.tls_cert_file:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(self.config.tls_cert_file, self.config.tls_key_file)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.config.host, self.config.port,
                                 ssl_context=ssl_context)
        await self._site.start()
        log.info("egress listening on %s", self.url)

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting, give tunnels ``grace`` seconds to finish, then close them."""
        if self._site is not None:
            await self._site.stop()
        if grace > 0 and self.active:
            await asyncio.wait(list(self.active), timeout=grace)
        for task in list(self.active):
            task.cancel()
        if self.active:
            await asyncio.wait(list(self.active), timeout=5)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> EgressServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- handlers ------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "active_tunnels": len(self.active)})

    async def _ca_cert(self, request: web.Request) -> web.Response:
        if self.config.ca_cert_pem is None:
            return web.Response(status=404, text="no CA certificate configured\n")
        return web.Response(body=self.config.ca_cert_pem, content_type="application/x-pem-file")

    async def _tunnel(self, request: web.Request) -> web.StreamResponse:
        try:
            token = bearer_token(request.headers.get("Authorization"))
            session = self.authenticator.authenticate(token)
        except AuthError as exc:
            log.warning("upgrade refused from %s: %s", request.remote, exc.reason)
            return web.json_response({"error": "unauthorized", "reason": exc.reason},
                                     status=401)
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, compress=False,
                                   autoping=True)
        if not ws.can_prepare(request).ok:
            return web.json_response({"error": "websocket upgrade required"}, status=400)
        await ws.prepare(request)
        task = asyncio.current_task()
        assert task is not None
        self.active.add(task)
        tunnel = Tunnel(ws, session, token, self._decide, self._dial, self.config.timeouts)
        try:
            await tunnel.run()
        except asyncio.CancelledError:
            tunnel.record.close_cause = "server-shutdown"
            with contextlib.suppress(Exception):
                await asyncio.shield(ws.close(code=1001, message=b"egress shutting down"))
            raise
        finally:
            self.active.discard(task)
            self._audit(tunnel.record)
        return ws

    def _decide(self, session: Session, target: Target) -> Decision:
        return self.policy.decide(target)

    def _audit(self, record: TunnelRecord) -> None:
        audit_log.info(json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "session": record.session,
            "target": record.target,
            "address": record.address,
            "decision": record.decision,
            "reason": record.reason,
            "rule": record.rule,
            "status": record.status,
            "bytes_up": record.bytes_up,
            "bytes_down": record.bytes_down,
            "duration_ms": round((time.monotonic() - record.started) * 1000, 1),
            "close_cause": record.close_cause,
        }, separators=(",", ":")))
