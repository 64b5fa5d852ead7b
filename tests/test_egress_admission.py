"""Admission with the real egress server: resolve once, check every address, dial only those.

Every "public" name here is resolved by a :class:`StaticResolver` the test controls, to
127.0.0.x addresses a policy allows through ``allow_cidrs`` (so nothing leaves the machine) or
to special-purpose addresses that must be refused before any dial. No test sends traffic to a
non-loopback address: blocked addresses are refused before a socket is opened.

The helpers at the top (servers with several named policies, a direct WebSocket client that
reads the in-tunnel answer, an audit-line collector) are shared with ``test_egress_ops.py``
and ``test_redteam.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

import pytest
from conftest import TLSFiles, _serve, curl_via, origin_app
from websockets.asyncio.client import ClientConnection, connect

from upstreamproxy.codec import decode_chunk, encode_chunk
from upstreamproxy.connect_head import basic_credentials, parse_status_head, split_head
from upstreamproxy.egress.admission import DialFn
from upstreamproxy.egress.auth import Authenticator, Session, StaticTokens
from upstreamproxy.egress.dialer import dial_addresses
from upstreamproxy.egress.policy import PolicySet, PolicyStore, parse_policy_document
from upstreamproxy.egress.resolver import Resolver, StaticResolver
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.egress.tunnel import TunnelTimeouts

# -- shared helpers ---------------------------------------------------------------------

#: Names the test leaf certificate covers, so curl can verify origins reached by these names.
TEST_NAMES = ["allowed.test", "*.allowed.test", "example.com", "localhost", "127.0.0.1"]


def token_for(policy: str, session: str | None = None) -> str:
    return f"tok-{session or policy}-0123456789abcdef-SECRET"


def session_for(policy: str) -> str:
    return f"sess-{policy}"


def static_tokens(*policies: str, extra: Mapping[str, Session] | None = None) -> StaticTokens:
    """One token per policy name: ``token_for(p)`` opens session ``session_for(p)`` on ``p``."""
    table = {token_for(p): Session(session_for(p), p) for p in policies}
    return StaticTokens(table | dict(extra or {}))


def policy_set(document: Mapping[str, Any]) -> PolicySet:
    return parse_policy_document(document)


def make_server(
    document: Mapping[str, Any],
    table: Mapping[str, Sequence[str]] | None = None,
    *,
    authenticator: Authenticator | None = None,
    resolver: Resolver | None = None,
    config: EgressConfig | None = None,
    dial: DialFn = dial_addresses,
) -> EgressServer:
    """A real egress (not started) with the policies of ``document`` and a static resolver."""
    policies = policy_set(document)
    return EgressServer(
        config or EgressConfig(),
        authenticator or static_tokens(*policies.policies),
        PolicyStore(policies),
        resolver=resolver if resolver is not None else StaticResolver(table or {}),
        dial=dial,
    )


@dataclass
class Answer:
    """A status head (and short body) answered inside the tunnel or by the relay."""

    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes = b""

    @property
    def reason(self) -> str | None:
        return self.headers.get("x-upstreamproxy-reason")

    @property
    def rule(self) -> str | None:
        return self.headers.get("x-upstreamproxy-rule")

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


def parse_answer(data: bytes) -> Answer:
    parts = split_head(data)
    assert parts is not None, f"no complete status head in {data[:200]!r}"
    head, rest = parts
    status = parse_status_head(head)
    headers = {name.lower(): value for name, value in status.headers}
    return Answer(status.status, headers, rest, data)


def connect_head(target: str, session: str, token: str, extra_headers: str = "") -> bytes:
    return (
        f"CONNECT {target} HTTP/1.1\r\n"
        f"Proxy-Authorization: {basic_credentials(session, token)}\r\n"
        f"{extra_headers}\r\n"
    ).encode()


async def open_ws(server: EgressServer | str, token: str) -> ClientConnection:
    """A WebSocket to ``server`` (an in-process server or the URL of an egress process)."""
    return await connect(
        server if isinstance(server, str) else server.url,
        additional_headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/proto",
        },
        proxy=None,
        compression=None,
        open_timeout=5,
        # The test client's own handshake log shows the token; keep it apart from the egress's.
        logger=logging.getLogger("tests.ws-client"),
    )


async def read_answer(ws: ClientConnection, timeout: float = 10) -> tuple[Answer, bytes]:
    """The in-tunnel status head (plus its Content-Length body) and any bytes after it."""
    buffer = bytearray()
    async with asyncio.timeout(timeout):
        while (parts := split_head(buffer)) is None:
            message = await ws.recv()
            assert isinstance(message, bytes)
            buffer += decode_chunk(message)
        head, rest = parts
        status = parse_status_head(head)
        length = int(status.header("Content-Length") or 0) if status.status != 200 else 0
        while len(rest) < length:
            message = await ws.recv()
            assert isinstance(message, bytes)
            rest += decode_chunk(message)
    answer = parse_answer(head + rest[:length])
    return answer, rest[length:]


@contextlib.asynccontextmanager
async def tunnel(
    server: EgressServer | str,
    target: str,
    policy: str = "default",
    *,
    raw_head: bytes | None = None,
    session: str | None = None,
    token: str | None = None,
    upgrade_token: str | None = None,
) -> AsyncIterator[tuple[Answer, ClientConnection]]:
    """Open a tunnel straight on the egress WebSocket, as a relay would; yield its answer."""
    token = token or token_for(policy)
    ws = await open_ws(server, upgrade_token or token)
    try:
        head = (
            raw_head
            if raw_head is not None
            else connect_head(target, session or session_for(policy), token)
        )
        await ws.send(encode_chunk(head))
        answer, _ = await read_answer(ws)
        yield answer, ws
    finally:
        await ws.close()


async def ask(
    server: EgressServer | str, target: str, policy: str = "default", **kwargs: Any
) -> Answer:
    """The egress's in-tunnel answer to one CONNECT (the tunnel is closed again)."""
    async with tunnel(server, target, policy, **kwargs) as (answer, _):
        return answer


async def ws_send(ws: ClientConnection, data: bytes) -> None:
    await ws.send(encode_chunk(data))


async def ws_read(ws: ClientConnection, size: int, timeout: float = 10) -> bytes:
    """Exactly ``size`` tunnel bytes (keepalive chunks skipped)."""
    data = bytearray()
    async with asyncio.timeout(timeout):
        while len(data) < size:
            message = await ws.recv()
            assert isinstance(message, bytes)
            data += decode_chunk(message)
    return bytes(data)


class AuditLines(logging.Handler):
    """Collects the JSON audit lines of ``upstreamproxy.audit``."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[dict[str, Any]] = []
        self._taken = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))

    async def next(self, timeout: float = 5) -> dict[str, Any]:
        """The oldest line not yet taken, waiting for it (a tunnel audits when it ends)."""
        async with asyncio.timeout(timeout):
            while self._taken >= len(self.lines):
                await asyncio.sleep(0.01)
        self._taken += 1
        return self.lines[self._taken - 1]


@pytest.fixture
def audit_lines() -> Iterator[AuditLines]:
    logger = logging.getLogger("upstreamproxy.audit")
    handler = AuditLines()
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@dataclass
class EchoOrigin:
    """A plain TCP origin: echoes what it reads; remembers who connected."""

    port: int
    peers: list[str] = field(default_factory=list)


@pytest.fixture
async def echo_origin() -> AsyncIterator[EchoOrigin]:
    origin = EchoOrigin(0)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        origin.peers.append(writer.get_extra_info("sockname")[0])
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    origin.port = server.sockets[0].getsockname()[1]
    yield origin
    server.close()


@dataclass
class NamedOrigin:
    """An HTTPS origin on 127.0.0.1 whose certificate covers :data:`TEST_NAMES`."""

    port: int


@pytest.fixture
async def named_origin(
    tls: TLSFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[NamedOrigin]:
    leaf = tls.ca.issue(TEST_NAMES)
    base = tmp_path_factory.mktemp("named-leaf")
    (base / "leaf.pem").write_bytes(leaf.chain_pem())
    (base / "leaf.key").write_bytes(leaf.key_pem())
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(base / "leaf.pem", base / "leaf.key")
    runner, port = await _serve(origin_app(), ctx)
    yield NamedOrigin(port)
    await runner.cleanup()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
    return port


def assert_deny(answer: Answer, status: int, reason: str, rule: str | None = None) -> None:
    """A refusal names its reason (and rule) in headers and in a short JSON body."""
    assert answer.status == status, answer.raw
    assert answer.reason == reason, answer.raw
    assert answer.rule is not None, f"no {'X-Upstreamproxy-Rule'} header: {answer.raw!r}"
    if rule is not None:
        assert answer.rule == rule, answer.raw
    assert len(answer.body) < 512, answer.body
    body = answer.json()
    assert body["status"] == status
    assert body["reason"] == reason
    assert body["rule"] == answer.rule


# -- the policies of this file ------------------------------------------------------------

BLOCKED_CASES = [
    # (name, address, reason suffix)
    ("loop.blocked.test", "127.0.0.1", "loopback"),
    ("loop2.blocked.test", "127.0.0.2", "loopback"),
    ("v6loop.blocked.test", "::1", "loopback"),
    ("zero.blocked.test", "0.0.0.0", "unspecified"),
    ("ten.blocked.test", "10.1.2.3", "private"),
    ("rfc1918.blocked.test", "192.168.1.1", "private"),
    ("linklocal.blocked.test", "169.254.1.1", "link-local"),
    ("metadata.blocked.test", "169.254.169.254", "cloud-metadata"),
    ("metadata6.blocked.test", "fd00:ec2::254", "cloud-metadata"),
    ("cgnat.blocked.test", "100.64.0.1", "cgnat"),
    ("ula.blocked.test", "fd12:3456::1", "ula"),
    ("mcast.blocked.test", "224.0.0.1", "multicast"),
    ("mapped.blocked.test", "::ffff:127.0.0.1", "ipv4-mapped:loopback"),
    ("nat64.blocked.test", "64:ff9b::7f00:1", "nat64:loopback"),
    ("sixtofour.blocked.test", "2002:7f00:1::", "6to4:loopback"),
    ("teredo.blocked.test", "2001:0:4136:e378:8000:63bf:80ff:fffe", "teredo:loopback"),
    ("v6linklocal.blocked.test", "fe80::1", "link-local"),
]


def admission_document(port: int) -> dict[str, Any]:
    """``default`` allows 127.0.0.1 only; ``strict`` allows no special-purpose address."""
    rules = [
        {
            "id": "names",
            "hosts": [
                "allowed.test",
                "*.allowed.test",
                "mixed.test",
                "nxdomain.test",
                "empty.test",
            ],
            "ports": [443, port],
        },
        {"id": "blocked-names", "hosts": ["*.blocked.test"]},
        {
            "id": "literals",
            "hosts": ["127.0.0.1", "10.1.2.3", "::1", "169.254.169.254"],
            "ports": "*",
        },
    ]
    return {
        "version": 1,
        "policies": {
            "default": {"rules": rules, "allow_cidrs": ["127.0.0.1/32"]},
            "strict": {"rules": rules},
            "eyeballs": {
                "rules": [{"id": "eyeballs", "hosts": ["eyeballs.test"], "ports": [port]}],
                "allow_cidrs": ["127.0.0.0/8"],
            },
            "trial": {
                "mode": "monitor",
                "rules": [{"id": "listed", "hosts": ["listed.test"]}],
                "allow_cidrs": ["127.0.0.1/32"],
            },
        },
    }


def admission_table() -> dict[str, list[str]]:
    table = {name: [address] for name, address, _ in BLOCKED_CASES}
    return table | {
        "allowed.test": ["127.0.0.1"],
        "www.allowed.test": ["127.0.0.1"],
        "unlisted.test": ["127.0.0.1"],
        "listed.test": ["127.0.0.1"],
        "unlisted-private.test": ["10.1.2.3"],
        "empty.test": [],
        "mappedten.blocked.test": ["::ffff:10.1.2.3"],
    }


@pytest.fixture
async def admission(echo_origin: EchoOrigin) -> AsyncIterator[EgressServer]:
    server = make_server(admission_document(echo_origin.port), admission_table())
    async with server:
        yield server


def calls(server: EgressServer) -> list[str]:
    resolver = server.admission._resolver
    assert isinstance(resolver, StaticResolver)
    return resolver.calls


# -- blocked addresses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "address", "reason"), BLOCKED_CASES, ids=[c[0].split(".")[0] for c in BLOCKED_CASES]
)
async def test_name_resolving_to_blocked_address_is_refused(
    admission: EgressServer, audit_lines: AuditLines, name: str, address: str, reason: str
) -> None:
    # "strict" allows no special-purpose range, so every one of these is refused.
    answer = await ask(admission, f"{name}:443", "strict")
    assert_deny(answer, 403, f"blocked-address:{reason}", "blocked-names")
    assert calls(admission) == [name]
    line = await audit_lines.next()
    assert line["decision"] == "deny"
    assert [ip_address(a) for a in line["resolved"]] == [ip_address(address)]
    assert line["dialled"] == "-"
    assert line["reason"] == f"blocked-address:{reason}"
    assert line["rule"] == "blocked-names"


async def test_allow_cidr_exempts_only_what_it_names(
    admission: EgressServer, echo_origin: EchoOrigin
) -> None:
    # "default" allows 127.0.0.1/32: that address opens, its neighbour 127.0.0.2 does not.
    assert (await ask(admission, f"allowed.test:{echo_origin.port}")).status == 200
    answer = await ask(admission, "loop2.blocked.test:443")
    assert_deny(answer, 403, "blocked-address:loopback", "blocked-names")
    # An IPv4-mapped address is judged by the IPv4 address it carries.
    answer = await ask(admission, "mappedten.blocked.test:443")
    assert_deny(answer, 403, "blocked-address:ipv4-mapped:private", "blocked-names")


@pytest.mark.parametrize(
    "addresses",
    [
        ["127.0.0.1", "10.1.2.3"],
        ["10.1.2.3", "127.0.0.1"],
        ["127.0.0.1", "::ffff:169.254.169.254"],
        ["127.0.0.1", "127.0.0.1", "192.168.0.1"],
    ],
    ids=["allowed-first", "blocked-first", "mapped-metadata", "third"],
)
async def test_name_resolving_to_a_mix_is_refused(
    echo_origin: EchoOrigin, audit_lines: AuditLines, addresses: list[str]
) -> None:
    table = admission_table() | {"mixed.test": addresses}
    async with make_server(admission_document(echo_origin.port), table) as server:
        answer = await ask(server, f"mixed.test:{echo_origin.port}")
        assert answer.status == 403
        assert answer.reason is not None and answer.reason.startswith("blocked-address:")
        assert answer.rule == "names"
        assert calls(server) == ["mixed.test"]
    line = await audit_lines.next()
    assert line["decision"] == "deny"
    assert line["dialled"] == "-"
    assert echo_origin.peers == []  # nothing was dialled, not even the allowed address


# -- resolve once, dial only what was checked ------------------------------------------------


async def test_exactly_one_resolution_per_tunnel(
    admission: EgressServer, echo_origin: EchoOrigin, audit_lines: AuditLines
) -> None:
    async with tunnel(admission, f"allowed.test:{echo_origin.port}") as (answer, ws):
        assert answer.status == 200
        for round_trip in range(5):
            payload = f"ping {round_trip}\n".encode()
            await ws_send(ws, payload)
            assert await ws_read(ws, len(payload)) == payload
        assert calls(admission) == ["allowed.test"]
    line = await audit_lines.next()
    assert line["resolved"] == ["127.0.0.1"]
    assert line["dialled"] == f"127.0.0.1:{echo_origin.port}"
    assert line["dialled"].rsplit(":", 1)[0] in line["resolved"]
    # A second tunnel resolves again, once: one lookup per tunnel, never per connection attempt.
    assert (await ask(admission, f"www.allowed.test:{echo_origin.port}")).status == 200
    assert calls(admission) == ["allowed.test", "www.allowed.test"]


async def test_curl_through_relay_reaches_a_name_resolved_by_the_egress(
    named_origin: NamedOrigin, tls: TLSFiles, audit_lines: AuditLines
) -> None:

    from upstreamproxy.relay import Relay, RelayConfig
    from upstreamproxy.secret import Secret

    server = make_server(admission_document(named_origin.port), admission_table())
    async with (
        server,
        Relay(
            RelayConfig(
                egress_url=server.url,
                session_id=session_for("default"),
                token=Secret(token_for("default")),
            )
        ) as relay,
    ):
        result = await curl_via(
            relay.proxy_url, f"https://allowed.test:{named_origin.port}/", tls.ca_file
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"hello from origin\n"
        assert calls(server) == ["allowed.test"]
    line = await audit_lines.next()
    assert (line["decision"], line["dialled"]) == ("allow", f"127.0.0.1:{named_origin.port}")


@pytest.mark.parametrize(
    ("target", "status", "reason"),
    [
        ("127.0.0.1:{port}", 200, None),
        ("10.1.2.3:443", 403, "blocked-address:private"),
        ("[::1]:443", 403, "blocked-address:loopback"),
        ("169.254.169.254:80", 403, "blocked-address:cloud-metadata"),
    ],
)
async def test_ip_literal_skips_dns_but_is_checked(
    admission: EgressServer, echo_origin: EchoOrigin, target: str, status: int, reason: str | None
) -> None:
    answer = await ask(admission, target.format(port=echo_origin.port))
    assert answer.status == status, answer.raw
    if reason is not None:
        assert_deny(answer, 403, reason, "literals")
    assert calls(admission) == []


# -- policy selection and modes ---------------------------------------------------------------


async def test_unknown_policy_is_refused(echo_origin: EchoOrigin, audit_lines: AuditLines) -> None:
    server = make_server(
        admission_document(echo_origin.port),
        admission_table(),
        authenticator=static_tokens("default", "nope"),
    )
    async with server:
        answer = await ask(server, f"allowed.test:{echo_origin.port}", "nope")
        assert_deny(answer, 403, "unknown-policy")
        assert calls(server) == []
        line = await audit_lines.next()
    assert (line["decision"], line["policy"], line["reason"]) == ("deny", "nope", "unknown-policy")


async def test_port_not_listed_is_refused_with_the_rule(admission: EgressServer) -> None:
    answer = await ask(admission, "allowed.test:8443")
    assert_deny(answer, 403, "port-not-allowed", "names")
    assert calls(admission) == []


async def test_monitor_mode_allows_and_logs_what_enforce_would_deny(
    admission: EgressServer,
    echo_origin: EchoOrigin,
    audit_lines: AuditLines,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="upstreamproxy.egress.admission")
    target = f"unlisted.test:{echo_origin.port}"
    # Enforced, the same host is refused ...
    assert_deny(await ask(admission, target), 403, "no-matching-rule")
    assert (await audit_lines.next())["decision"] == "deny"
    # ... monitored, it opens, and the audit line says it would have been denied.
    async with tunnel(admission, target, "trial") as (answer, ws):
        assert answer.status == 200
        await ws_send(ws, b"hello")
        assert await ws_read(ws, 5) == b"hello"
    line = await audit_lines.next()
    assert line["decision"] == "monitor-allow"
    assert line["reason"] == "no-matching-rule"
    assert line["policy"] == "trial"
    assert "monitor mode: policy trial would deny unlisted.test" in caplog.text
    # A listed host on an unlisted port is monitored the same way.
    assert (await ask(admission, f"listed.test:{echo_origin.port}", "trial")).status == 200
    assert (await audit_lines.next())["reason"] == "port-not-allowed"


async def test_monitor_mode_still_refuses_blocked_addresses(
    admission: EgressServer, audit_lines: AuditLines
) -> None:
    answer = await ask(admission, "unlisted-private.test:443", "trial")
    assert_deny(answer, 403, "blocked-address:private")
    assert (await audit_lines.next())["decision"] == "deny"
    answer = await ask(admission, "169.254.169.254:80", "trial")
    assert_deny(answer, 403, "blocked-address:cloud-metadata")
    assert (await audit_lines.next())["decision"] == "deny"
    answer = await ask(admission, "2130706433:443", "trial")
    assert_deny(answer, 403, "non-canonical-ip-literal")


@pytest.mark.parametrize(
    ("target", "policy", "reason"),
    [
        ("example.com:443", "default", "no-matching-rule"),
        ("allowed.test:22", "default", "port-not-allowed"),
        ("ten.blocked.test:443", "default", "blocked-address:private"),
        ("0x7f.0.0.1:443", "default", "non-canonical-ip-literal"),
        ("allowed.test:443", "nope", "unknown-policy"),
    ],
)
async def test_every_deny_names_reason_and_rule(
    echo_origin: EchoOrigin, target: str, policy: str, reason: str
) -> None:
    server = make_server(
        admission_document(echo_origin.port),
        admission_table(),
        authenticator=static_tokens("default", "nope"),
    )
    async with server:
        answer = await ask(server, target, policy)
    assert_deny(answer, 403, reason)
    assert answer.headers["connection"] == "close"
    assert answer.headers["content-length"] == str(len(answer.body))


# -- dialling -----------------------------------------------------------------------------------


async def test_happy_eyeballs_skips_a_dead_address(
    echo_origin: EchoOrigin, audit_lines: AuditLines
) -> None:
    # 127.0.0.2 is loopback too, but nothing listens on it (the origin bound 127.0.0.1 only).
    table = {"eyeballs.test": ["127.0.0.2", "127.0.0.1"]}
    async with make_server(admission_document(echo_origin.port), table) as server:
        async with tunnel(server, f"eyeballs.test:{echo_origin.port}", "eyeballs") as (answer, ws):
            assert answer.status == 200
            await ws_send(ws, b"alive")
            assert await ws_read(ws, 5) == b"alive"
        assert calls(server) == ["eyeballs.test"]
    line = await audit_lines.next()
    assert line["resolved"] == ["127.0.0.2", "127.0.0.1"]
    assert line["dialled"] == f"127.0.0.1:{echo_origin.port}"


async def test_all_addresses_dead_is_502(audit_lines: AuditLines) -> None:
    port = free_port()
    table = {"eyeballs.test": ["127.0.0.2", "127.0.0.1"]}
    async with make_server(admission_document(port), table) as server:
        answer = await ask(server, f"eyeballs.test:{port}", "eyeballs")
    assert answer.status == 502
    assert answer.reason is not None and answer.reason.startswith("dial-failed")
    line = await audit_lines.next()
    assert line["decision"] == "allow"  # the policy allowed it; the dial failed
    assert line["status"] == 502


@pytest.mark.parametrize(
    ("name", "reason"), [("nxdomain.test", "dns-failed"), ("empty.test", "dns-empty")]
)
async def test_dns_failure_is_502(admission: EgressServer, name: str, reason: str) -> None:
    answer = await ask(admission, f"{name}:443")
    assert answer.status == 502
    assert answer.reason == reason
    assert answer.json()["reason"] == reason
    # The rule that let the name through is named, as for a failed dial.
    assert answer.rule == "names"
    assert answer.json()["rule"] == "names"
    assert calls(admission) == [name]


class HangingResolver:
    """A lookup that never answers; counts the lookups cancelled."""

    def __init__(self) -> None:
        self.cancelled = 0

    async def resolve(self, host: str, port: int) -> list[Any]:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return []


async def test_a_relay_that_leaves_mid_lookup_ends_the_lookup(
    echo_origin: EchoOrigin, audit_lines: AuditLines
) -> None:
    # Regression: the egress does not read the WebSocket while it admits, so a relay that
    # closed (close frame, then FIN) showed as unread bytes, not as gone: the lookup (and then
    # a dial for nobody) ran on to the open deadline, 3 x --dial-timeout + 5 s, holding the
    # session's slot, and the audit line said 504 instead of why the tunnel ended.
    resolver = HangingResolver()
    config = EgressConfig(timeouts=TunnelTimeouts(dial=5))
    server = make_server(admission_document(echo_origin.port), resolver=resolver, config=config)
    async with server:
        ws = await open_ws(server, token_for("default"))
        await ws.send(
            encode_chunk(
                connect_head("allowed.test:443", session_for("default"), token_for("default"))
            )
        )
        await asyncio.sleep(0.2)
        ws.close_timeout = 0.1  # a close frame, then the FIN, as a relay that leaves sends
        await ws.close()
        async with asyncio.timeout(5):
            while resolver.cancelled == 0:
                await asyncio.sleep(0.05)
        line = await audit_lines.next()
        assert line["close_cause"] == "relay-closed-while-opening"
        assert server.limiter.session_tunnels(session_for("default")) == 0


class FailingResolver:
    """A resolver that fails with something other than a ResolveError."""

    async def resolve(self, host: str, port: int) -> list[Any]:
        raise OSError(5, "resolver library failed")


@pytest.mark.parametrize(
    ("resolver", "status", "reason"),
    [(HangingResolver(), 504, "dns-timeout"), (FailingResolver(), 502, "dns-failed")],
    ids=["hangs", "raises"],
)
async def test_any_resolver_is_bounded_and_its_failure_named(
    echo_origin: EchoOrigin, audit_lines: AuditLines, resolver: Resolver, status: int, reason: str
) -> None:
    # Regression: only SystemResolver bounded its lookups, and only ResolveError was
    # understood. Another resolver (EgressServer(resolver=...)) that hung or raised left the
    # tunnel waiting, unlogged, for the open deadline (3 x --dial-timeout + 5 s), answered 504
    # "timed out admitting and dialling the target".
    config = EgressConfig(timeouts=TunnelTimeouts(dial=0.5))
    server = make_server(admission_document(echo_origin.port), resolver=resolver, config=config)
    async with server:
        started = asyncio.get_running_loop().time()
        answer = await ask(server, "allowed.test:443")
        assert asyncio.get_running_loop().time() - started < 3
    assert (answer.status, answer.reason, answer.rule) == (status, reason, "names")
    line = await audit_lines.next()
    assert (line["status"], line["reason"]) == (status, reason)


async def test_an_unforeseen_error_in_the_opening_step_fails_the_tunnel_at_once(
    echo_origin: EchoOrigin, audit_lines: AuditLines, caplog: pytest.LogCaptureFixture
) -> None:
    """Anything the opening step raises that nobody foresaw (here the dial itself) ends the
    tunnel at once with 502 internal-error, logged once with its traceback; it used to wait
    for the open deadline (3 x --dial-timeout + 5 s), its task's exception never retrieved."""

    async def broken_dial(*_: object, **__: object) -> Any:
        raise RuntimeError("a bug in the dialler")

    config = EgressConfig(timeouts=TunnelTimeouts(dial=2.0))
    server = make_server(
        admission_document(echo_origin.port),
        {"allowed.test": ["127.0.0.1"]},
        config=config,
        dial=broken_dial,
    )
    async with server:
        started = asyncio.get_running_loop().time()
        answer = await ask(server, f"allowed.test:{echo_origin.port}")
        assert asyncio.get_running_loop().time() - started < 1.5
    assert (answer.status, answer.reason) == (502, "internal-error")
    assert (await audit_lines.next())["status"] == 502
    assert caplog.text.count("opening the tunnel failed unexpectedly") == 1
    assert "a bug in the dialler" in caplog.text and "never retrieved" not in caplog.text
