"""Red team: the known ways around an egress policy, each tried against the real relay and egress.

Every attack is sent twice: through the real relay as a sandboxed client would send it, and
straight into the egress's tunnel as a compromised relay could. Each one must be refused
(400/403) with a reason the client can read, or be harmless (it reaches only the host the
policy allows). "Public" names resolve through a StaticResolver to loopback addresses or to
special-purpose addresses that are refused before any dial; nothing leaves the machine.
"""

# Fixtures shared from test_egress_admission are imported by name; pytest injects them.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import raw_request
from test_egress_admission import (  # noqa: F401 (fixtures)
    Answer,
    AuditLines,
    EchoOrigin,
    ask,
    assert_deny,
    audit_lines,
    connect_head,
    echo_origin,
    make_server,
    open_ws,
    parse_answer,
    session_for,
    static_tokens,
    token_for,
    tunnel,
    ws_read,
    ws_send,
)
from websockets.exceptions import InvalidStatus

from upstreamproxy.connect_head import MAX_HEAD_BYTES
from upstreamproxy.egress.auth import SignedTokens
from upstreamproxy.egress.resolver import IPAddress, ResolveError, StaticResolver
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.relay import Relay, RelayConfig
from upstreamproxy.secret import Secret
from upstreamproxy.tokens import TokenVerifier, generate_key, issue_token


def redteam_document(port: int) -> dict[str, Any]:
    return {
        "policies": {
            # allowed.test (and its subdomains) on 443 and the echo origin's port; 127.0.0.1 only.
            "default": {
                "rules": [
                    {
                        "id": "allowed",
                        "hosts": ["allowed.test", "*.allowed.test"],
                        "ports": [443, port],
                    }
                ],
                "allow_cidrs": ["127.0.0.1/32"],
            },
            # Loopback fully open (a development policy): the egress must still not reach itself.
            "open-loopback": {
                "rules": [
                    {
                        "id": "loopback",
                        "hosts": [
                            "127.0.0.1",
                            "127.0.0.2",
                            "localhost",
                            "::1",
                            "::ffff:127.0.0.1",
                            "0.0.0.0",
                            "self.test",
                        ],
                        "ports": "*",
                    }
                ],
                "allow_cidrs": ["127.0.0.0/8", "::1/128", "0.0.0.0/32"],
            },
            # A careless policy that names the metadata service: the address checks still refuse it.
            "careless": {
                "rules": [
                    {
                        "id": "metadata",
                        "hosts": [
                            "169.254.169.254",
                            "fd00:ec2::254",
                            "metadata.test",
                            "metadata6.test",
                            "localhost",
                            "::1",
                            "::ffff:127.0.0.1",
                            "64:ff9b::7f00:1",
                            "2002:7f00:1::",
                            "::ffff:10.0.0.1",
                        ],
                        "ports": "*",
                    }
                ]
            },
            "careless-monitor": {"mode": "monitor", "rules": []},
        }
    }


TABLE = {
    "allowed.test": ["127.0.0.1"],
    "www.allowed.test": ["127.0.0.1"],
    "evil.test": ["10.6.6.6"],
    "metadata.test": ["169.254.169.254"],
    "metadata6.test": ["fd00:ec2::254"],
    "localhost": ["127.0.0.1"],
    "self.test": ["127.0.0.1"],
    "mixed.allowed.test": ["127.0.0.1", "10.0.0.1"],
}


@dataclass
class Rig:
    server: EgressServer
    relay: Relay
    port: int  # the echo origin: the one destination "default" lets through


@pytest.fixture
async def rig(echo_origin: EchoOrigin) -> AsyncIterator[Rig]:
    server = make_server(
        redteam_document(echo_origin.port), TABLE, config=EgressConfig(metrics_port=0)
    )
    async with server:
        relay = Relay(
            RelayConfig(
                egress_url=server.url,
                session_id=session_for("default"),
                token=Secret(token_for("default")),
            )
        )
        async with relay:
            yield Rig(server, relay, echo_origin.port)


async def via_relay(rig: Rig, target: str, head: bytes | None = None) -> Answer:
    """What a sandboxed client gets for ``CONNECT target`` sent to the relay."""
    data = head if head is not None else (f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    return parse_answer(await raw_request(rig.relay.port, data, read_timeout=5))


async def via_egress(rig: Rig, target: str, policy: str = "default") -> Answer:
    """What a (compromised) relay gets for the same CONNECT sent straight into the tunnel."""
    return await ask(rig.server, target, policy)


def assert_refused(answer: Answer, status: int, reason: str) -> None:
    assert answer.status == status, answer.raw
    assert answer.reason is not None and reason in answer.reason, answer.raw


def resolver_calls(rig: Rig) -> list[str]:
    resolver = rig.server.admission._resolver
    assert isinstance(resolver, StaticResolver)
    return resolver.calls


PATHS = ["relay", "egress"]


async def attempt(rig: Rig, path: str, target: str) -> Answer:
    return await (via_relay(rig, target) if path == "relay" else via_egress(rig, target))


# -- case and trailing-dot variants --------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "target",
    [
        "EVIL.TEST:443",  # upper case of a denied host
        "evil.test.:443",  # fully qualified spelling of a denied host
        "EvIl.TeSt.:443",  # both
        "evil.test.allowed.test.evil.test:443",  # the allowed name inside a denied one
        "allowed.test.evil.test:443",  # the allowed name as a prefix
        "\u0430llowed.test:443",  # Cyrillic small a (U+0430): a look-alike, another host
    ],
)
async def test_variants_of_a_denied_host_stay_denied(rig: Rig, path: str, target: str) -> None:
    answer = await attempt(rig, path, target)
    assert_refused(answer, 403, "no-matching-rule")
    assert resolver_calls(rig) == []  # refused before any lookup


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "host",
    [
        "ALLOWED.TEST",  # case
        "allowed.test.",  # trailing dot
        "AlLoWeD.TeSt.",  # both
        "\uff41llowed.test",  # full-width a (U+FF41): UTS 46 maps it to plain "a", the same host
        "allowed\u3002test",  # ideographic full stop: a label separator, the same host
    ],
)
async def test_variants_of_an_allowed_host_reach_only_that_host(
    rig: Rig, audit_lines: AuditLines, path: str, host: str
) -> None:
    # Harmless: the variant is the allowed host, and it is looked up and dialled as such.
    target = f"{host}:{rig.port}"
    if path == "relay":
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.relay.port)
        writer.write(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
    else:
        async with tunnel(rig.server, target) as (answer, ws):
            assert answer.status == 200
            await ws_send(ws, b"ping")
            assert await ws_read(ws, 4) == b"ping"
    line = await audit_lines.next()
    assert (line["host"], line["dialled"]) == ("allowed.test", f"127.0.0.1:{rig.port}")
    assert resolver_calls(rig) == ["allowed.test"]


@pytest.mark.parametrize("path", PATHS)
async def test_double_trailing_dot_is_invalid(rig: Rig, path: str) -> None:
    # "allowed.test.." is not a spelling of allowed.test: an empty label.
    assert_refused(await attempt(rig, path, "allowed.test..:443"), 400, "invalid-host")


# -- ports ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("target", "status", "reason"),
    [
        ("allowed.test:22", 403, "port-not-allowed"),  # an allowed host, unlisted port
        ("allowed.test:8443", 403, "port-not-allowed"),
        ("allowed.test:+443", 400, "invalid port"),  # sign
        ("allowed.test:-443", 400, "invalid port"),
        ("allowed.test:0x1bb", 400, "invalid port"),  # 443 in hex
        ("allowed.test:443 ", 400, "malformed request line"),  # trailing space in the target
        ("allowed.test:4 43", 400, "malformed request line"),
        ("allowed.test:65979", 400, "out of range"),  # 443 + 65536 (16-bit wrap)
        ("allowed.test:0", 400, "out of range"),
        ("allowed.test:", 400, "invalid port"),
        ("allowed.test", 400, "explicit port"),
        ("allowed.test:443:22", 400, "bracketed"),  # two ports
        ("allowed.test:\u0664\u0664\u0663", 400, "invalid port"),  # Arabic-Indic digits "443"
    ],
)
async def test_port_tricks_are_refused(
    rig: Rig, path: str, target: str, status: int, reason: str
) -> None:
    assert_refused(await attempt(rig, path, target), status, reason)


@pytest.mark.parametrize("path", PATHS)
async def test_leading_zero_port_is_the_same_port(
    rig: Rig, audit_lines: AuditLines, path: str
) -> None:
    # ":0443" means 443: harmless, it is the listed port of the allowed host, audited as 443
    # (nothing listens on 127.0.0.1:443 here, so the dial itself fails).
    answer = await attempt(rig, path, "allowed.test:0443")
    assert answer.status in (200, 502), answer.raw
    line = await audit_lines.next()
    assert (line["host"], line["port"], line["decision"]) == ("allowed.test", 443, "allow")
    assert line["dialled"] in ("-", "127.0.0.1:443")


# -- userinfo, percent-encoding, URL pieces --------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("allowed.test@evil.test:443", "userinfo"),  # which host? neither: refused
        ("evil.test#@allowed.test:443", "userinfo"),  # URL-parser confusion (fragment)
        ("user:pass@allowed.test:443", "userinfo"),
        ("evil.test:443@allowed.test:443", "userinfo"),
        ("%65vil.test:443", "percent-encoding"),  # "%65" is "e"
        ("allowed.test%2F@evil.test:443", "userinfo"),
        ("%61llowed.test:443", "percent-encoding"),  # even when it decodes to the allowed host
        ("evil.test/allowed.test:443", "not a URL"),
        ("https://allowed.test:443", "not a URL"),
        ("allowed.test\\evil.test:443", "forbidden character"),
        ("allowed.test?.evil.test:443", "forbidden character"),
        ("allowed.test#.evil.test:443", "forbidden character"),
        ("allowed.test\t:443", "forbidden character"),
    ],
)
async def test_userinfo_and_encoding_tricks_are_refused(
    rig: Rig, path: str, target: str, reason: str
) -> None:
    assert_refused(await attempt(rig, path, target), 400, reason)
    assert resolver_calls(rig) == []


# -- IPv6 literal forms ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("target", "status", "reason"),
    [
        ("[::1]:443", 403, "no-matching-rule"),  # loopback, compressed
        ("[0:0:0:0:0:0:0:1]:443", 403, "no-matching-rule"),  # loopback, full
        ("[0000:0000:0000:0000:0000:0000:0000:0001]:443", 403, "no-matching-rule"),
        ("[::ffff:127.0.0.1]:443", 403, "no-matching-rule"),  # IPv4-mapped loopback
        ("[::ffff:7f00:1]:443", 403, "no-matching-rule"),  # ... in hex
        ("[64:ff9b::7f00:1]:443", 403, "no-matching-rule"),  # NAT64 of 127.0.0.1
        ("[fe80::1%25eth0]:443", 400, "zone"),  # zone id, URL-encoded
        ("[fe80::1%eth0]:443", 400, "zone"),  # zone id
        ("::1:443", 400, "bracketed"),  # unbracketed
        ("[::1]443", 400, "malformed bracketed"),
        ("[::1:443", 400, "malformed bracketed"),
        ("[127.0.0.1]:443", 400, "invalid IPv6"),  # IPv4 in brackets
        ("[allowed.test]:443", 400, "invalid IPv6"),  # a name in brackets
    ],
)
async def test_ipv6_literal_forms(
    rig: Rig, path: str, target: str, status: int, reason: str
) -> None:
    assert_refused(await attempt(rig, path, target), status, reason)
    assert resolver_calls(rig) == []


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("[::1]:443", "loopback"),
        ("[0:0:0:0:0:0:0:1]:443", "loopback"),
        ("[::ffff:127.0.0.1]:443", "ipv4-mapped:loopback"),
        ("[::ffff:7f00:1]:443", "ipv4-mapped:loopback"),
        ("[64:ff9b::7f00:1]:443", "nat64:loopback"),
        ("[2002:7f00:1::]:443", "6to4:loopback"),
        ("[::ffff:10.0.0.1]:443", "ipv4-mapped:private"),
    ],
)
async def test_ipv6_literals_named_by_a_rule_are_still_judged_by_address(
    rig: Rig, target: str, reason: str
) -> None:
    # "careless" names these literals in a rule but allows no special-purpose range: each is
    # judged by the (embedded IPv4) address it really is, and refused.
    assert_deny(
        await via_egress(rig, target, "careless"), 403, f"blocked-address:{reason}", "metadata"
    )


# -- decimal, octal, hex and short IPv4 ------------------------------------------------------------


IPV4_SPELLINGS = [
    "2130706433",  # decimal 127.0.0.1
    "0177.0.0.1",  # octal first part
    "0x7f.0.0.1",  # hex first part
    "0x7F.0.0.1",
    "127.1",  # short form
    "127.0.1",
    "0x7f000001",  # one hex number
    "017700000001",  # one octal number
    "127.0.0.01",  # leading zero
    "127.000.000.001",
    "0x7f.1",
    "2852039166",  # decimal 169.254.169.254
    "0xa9fea9fe",  # hex 169.254.169.254
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spelling", IPV4_SPELLINGS)
async def test_non_canonical_ipv4_is_refused(rig: Rig, path: str, spelling: str) -> None:
    assert_refused(await attempt(rig, path, f"{spelling}:443"), 403, "non-canonical-ip-literal")


@pytest.mark.parametrize("spelling", IPV4_SPELLINGS[:7])
async def test_non_canonical_ipv4_refused_even_where_127_0_0_1_is_allowed(
    rig: Rig, spelling: str
) -> None:
    # "open-loopback" allows 127.0.0.1 on every port; its other spellings are still refused,
    # in enforce and in monitor mode, and nothing is resolved.
    for policy in ("open-loopback", "careless-monitor"):
        answer = await via_egress(rig, f"{spelling}:{rig.port}", policy)
        assert_deny(answer, 403, "non-canonical-ip-literal")
    assert resolver_calls(rig) == []


# -- rebinding -----------------------------------------------------------------------------------


class RebindingResolver:
    """Answers a public address first and a private one on every later lookup."""

    def __init__(self, first: str, later: str) -> None:
        self.first, self.later = StaticResolver({"x": [first]}), StaticResolver({"x": [later]})
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        self.calls.append(host)
        table = self.first if len(self.calls) == 1 else self.later
        try:
            return await table.resolve("x", port)
        except ResolveError:  # pragma: no cover - the table always has "x"
            raise


async def test_rebinding_gets_no_second_lookup(
    echo_origin: EchoOrigin, audit_lines: AuditLines
) -> None:
    # The attacker's DNS says 127.0.0.1 ("public" here) once, then 10.0.0.1. The egress asks
    # once per tunnel, dials what it checked, and never asks again while the tunnel lives.
    resolver = RebindingResolver("127.0.0.1", "10.0.0.1")
    server = make_server(redteam_document(echo_origin.port), {}, resolver=resolver)  # type: ignore[arg-type]
    async with server:
        async with tunnel(server, f"rebind.allowed.test:{echo_origin.port}") as (answer, ws):
            assert answer.status == 200
            for _ in range(5):
                await ws_send(ws, b"data")
                assert await ws_read(ws, 4) == b"data"
                await asyncio.sleep(0.02)
            assert resolver.calls == ["rebind.allowed.test"]
        line = await audit_lines.next()
        assert (line["resolved"], line["dialled"]) == (
            ["127.0.0.1"],
            f"127.0.0.1:{echo_origin.port}",
        )
        # The next tunnel looks up again (once) and is refused for the private answer.
        answer = await ask(server, f"rebind.allowed.test:{echo_origin.port}")
        assert_deny(answer, 403, "blocked-address:private", "allowed")
        assert resolver.calls == ["rebind.allowed.test"] * 2
    assert echo_origin.peers == ["127.0.0.1"]


@pytest.mark.parametrize("path", PATHS)
async def test_name_with_public_and_private_answers_is_refused(rig: Rig, path: str) -> None:
    # A rebinding name may return both at once, hoping the dialler picks the private one.
    answer = await attempt(rig, path, f"mixed.allowed.test:{rig.port}")
    assert_refused(answer, 403, "blocked-address:private")
    assert resolver_calls(rig) == ["mixed.allowed.test"]


# -- oversized and smuggled heads ------------------------------------------------------------------


async def test_oversized_head_at_the_relay(rig: Rig) -> None:
    head = b"CONNECT allowed.test:443 HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"
    assert_refused(await via_relay(rig, "", head), 400, "exceeds")
    # A never-ending request line is cut off at the limit too.
    assert_refused(
        await via_relay(rig, "", b"CONNECT " + b"a" * (2 * MAX_HEAD_BYTES)), 400, "exceeds"
    )


async def test_oversized_head_inside_the_tunnel(rig: Rig) -> None:
    head = connect_head(
        "allowed.test:443",
        session_for("default"),
        token_for("default"),
        "X-Pad: " + "a" * MAX_HEAD_BYTES + "\r\n",
    )
    answer = await ask(rig.server, "", raw_head=head)
    assert_refused(answer, 400, "exceeds")


async def test_too_many_header_fields(rig: Rig) -> None:
    extra = "".join(f"X-{i}: y\r\n" for i in range(150))
    head = connect_head("allowed.test:443", session_for("default"), token_for("default"), extra)
    assert_refused(await ask(rig.server, "", raw_head=head), 400, "header fields")
    answer = await via_relay(rig, "", f"CONNECT allowed.test:443 HTTP/1.1\r\n{extra}\r\n".encode())
    assert_refused(answer, 400, "header fields")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("a" * 254 + ":443", "too long"),  # over 253 characters
        ("a" * 64 + ".allowed.test:443", "invalid-host"),  # a label over 63, under *.allowed
        (".".join(["a" * 63] * 4) + ".allowed.test:443", "too long"),
        ("a" * 5000 + ":443", "too long"),
    ],
    ids=["254-chars", "64-char-label", "4x63-labels", "5000-chars"],
)
async def test_very_long_host_names(rig: Rig, path: str, target: str, reason: str) -> None:
    assert_refused(await attempt(rig, path, target), 400, reason)
    assert resolver_calls(rig) == []


@pytest.mark.parametrize("path", PATHS)
async def test_second_request_after_the_head_is_only_tunnel_data(
    rig: Rig, audit_lines: AuditLines, path: str
) -> None:
    # A second CONNECT right behind the first head: it must not open a second destination.
    # It travels as tunnel bytes to the allowed host (the echo origin sends it back).
    smuggled = b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test\r\n\r\n"
    target = f"allowed.test:{rig.port}"
    if path == "relay":
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.relay.port)
        writer.write(
            f"CONNECT {target} HTTP/1.1\r\nHost: evil.test:443\r\n\r\n".encode() + smuggled
        )
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.readexactly(len(smuggled)), 5) == smuggled
        writer.close()
    else:
        head = (
            connect_head(
                target, session_for("default"), token_for("default"), "Host: evil.test:443\r\n"
            )
            + smuggled
        )
        async with tunnel(rig.server, "", raw_head=head) as (answer, ws):
            assert answer.status == 200
            assert await ws_read(ws, len(smuggled)) == smuggled
    line = await audit_lines.next()
    assert (line["host"], line["dialled"]) == ("allowed.test", f"127.0.0.1:{rig.port}")
    assert resolver_calls(rig) == ["allowed.test"]  # evil.test never looked up


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("head", "reason"),
    [
        # A bare CR hides a second request line from a CRLF-only parser.
        (
            b"CONNECT allowed.test:443 HTTP/1.1\r\nX: y\rCONNECT evil.test:443 HTTP/1.1\r\n\r\n",
            "bare carriage return",
        ),
        # A bare LF ends the request line; the second "request line" is a malformed header.
        (
            b"CONNECT allowed.test:443 HTTP/1.1\nCONNECT evil.test:443 HTTP/1.1\n\n",
            "malformed header",
        ),
        # Two targets on one request line.
        (b"CONNECT allowed.test:443 evil.test:443 HTTP/1.1\r\n\r\n", "malformed request line"),
        # Obsolete line folding carrying a request line.
        (
            b"CONNECT allowed.test:443 HTTP/1.1\r\nX: y\r\n CONNECT evil.test:443 HTTP/1.1\r\n\r\n",
            "folding",
        ),
        # NUL in the target and in a header.
        (b"CONNECT allowed.test\x00.evil.test:443 HTTP/1.1\r\n\r\n", "forbidden character"),
        (b"CONNECT evil.test\x00:443 HTTP/1.1\r\n\r\n", "forbidden character"),
        (b"CONNECT allowed.test:443 HTTP/1.1\r\nX: a\x00b\r\n\r\n", "control character"),
        # Not a CONNECT at all.
        (b"GET http://evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n", "only tunnels CONNECT"),
        (b"connect allowed.test:443 HTTP/1.1\r\n\r\n", "only tunnels CONNECT"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "unsupported HTTP version"),
        (b"CONNECT allowed.test:443 HTTP/1.2\r\n\r\n", "unsupported HTTP version"),
    ],
)
async def test_smuggling_and_nul_bytes_in_the_head(
    rig: Rig, path: str, head: bytes, reason: str
) -> None:
    if path == "relay":
        answer = await via_relay(rig, "", head)
    else:
        # A compromised relay sends the same head, with the credentials the egress needs.
        first, _, rest = head.partition(b"\r\n" if b"\r\n" in head else b"\n")
        credentials = connect_head("x:1", session_for("default"), token_for("default"))
        auth_line = credentials.split(b"\r\n")[1]
        raw = (
            first + b"\r\n" + auth_line + b"\r\n" + rest
            if rest.strip()
            else (first + b"\r\n" + auth_line + b"\r\n\r\n")
        )
        answer = await ask(rig.server, "", raw_head=raw)
    if path == "relay" and head.startswith(b"GET http://"):
        # The relay forwards plain HTTP (http_forward.py) as CONNECT evil.test:80, which the
        # egress policy refuses like any other target, before resolving anything.
        assert answer.status == 403 and answer.reason == "no-matching-rule", answer.raw
        assert resolver_calls(rig) == []
        return
    assert answer.status in (400, 405), answer.raw
    assert answer.reason is not None and reason in answer.reason, answer.raw
    assert resolver_calls(rig) == []


# -- the egress itself -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:{port}",
        "localhost:{port}",
        "LOCALHOST.:{port}",
        "self.test:{port}",  # a name that resolves to loopback
        "127.0.0.2:{port}",  # another loopback address
        "[::1]:{port}",
        "[::ffff:127.0.0.1]:{port}",  # IPv4-mapped loopback
        "127.0.0.1:{metrics}",  # the metrics listener
        "localhost:{metrics}",
    ],
)
async def test_connect_to_the_egress_itself_is_refused(rig: Rig, target: str) -> None:
    # "open-loopback" allows every loopback address on every port; the egress's own
    # listeners stay out of reach anyway (a tunnel into itself, or its metrics).
    target = target.format(port=rig.server.port, metrics=rig.server.metrics_port)
    answer = await via_egress(rig, target, "open-loopback")
    assert_deny(answer, 403, "egress-self", "loopback")


async def test_loopback_really_is_open_in_that_policy(rig: Rig) -> None:
    # The control for the test above: the same policy reaches another loopback port.
    assert (await via_egress(rig, f"127.0.0.1:{rig.port}", "open-loopback")).status == 200
    assert (await via_egress(rig, f"localhost:{rig.port}", "open-loopback")).status == 200


async def test_unspecified_address_is_refused(rig: Rig) -> None:
    # 0.0.0.0 reaches this host on Linux; even with a rule and an allow entry for it, it is
    # refused as the egress itself.
    answer = await via_egress(rig, f"0.0.0.0:{rig.server.port}", "open-loopback")
    assert_deny(answer, 403, "egress-self", "loopback")


async def test_relay_cannot_reach_the_egress_through_itself(rig: Rig) -> None:
    # The relay's own session ("default") does not allow loopback at all.
    answer = await via_relay(rig, f"127.0.0.1:{rig.server.port}")
    assert_refused(answer, 403, "no-matching-rule")


# -- cloud metadata and localhost ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("169.254.169.254:80", "blocked-address:cloud-metadata"),
        ("metadata.test:80", "blocked-address:cloud-metadata"),
        ("[fd00:ec2::254]:80", "blocked-address:cloud-metadata"),
        ("metadata6.test:80", "blocked-address:cloud-metadata"),
        ("[::ffff:169.254.169.254]:80", "no-matching-rule"),  # not a listed host ...
        ("[::ffff:a9fe:a9fe]:80", "no-matching-rule"),
        ("2852039166:80", "non-canonical-ip-literal"),
    ],
)
async def test_cloud_metadata_is_refused(rig: Rig, target: str, reason: str) -> None:
    # "careless" names the metadata service in a rule; the address check refuses it anyway.
    assert_deny(await via_egress(rig, target, "careless"), 403, reason)


@pytest.mark.parametrize(
    "target",
    ["169.254.169.254:80", "[::ffff:169.254.169.254]:80", "metadata.test:80", "[fd00:ec2::254]:80"],
)
async def test_cloud_metadata_is_refused_in_monitor_mode(rig: Rig, target: str) -> None:
    # ... and in monitor mode, where host rules are not enforced (judged by the IPv4 address).
    answer = await via_egress(rig, target, "careless-monitor")
    assert_refused(answer, 403, "cloud-metadata")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("host", ["localhost", "localhost.", "LOCALHOST", "LocalHost."])
async def test_localhost_when_not_allowed(rig: Rig, path: str, host: str) -> None:
    assert_refused(await attempt(rig, path, f"{host}:443"), 403, "no-matching-rule")


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST."])
async def test_localhost_named_but_loopback_not_allowed(rig: Rig, host: str) -> None:
    # "careless" lists localhost but allows no loopback range: the address check refuses it.
    answer = await via_egress(rig, f"{host}:443", "careless")
    assert_deny(answer, 403, "blocked-address:loopback", "metadata")


# -- token replay after expiry ---------------------------------------------------------------------


async def test_token_replay_after_expiry(echo_origin: EchoOrigin) -> None:
    # A token that worked is refused once it has expired: the egress's clock is the test's.
    key = generate_key()
    now = [1_900_000_000.0]
    authenticator = SignedTokens(
        TokenVerifier({"k1": key.public_key()}, "rt", leeway_seconds=5), clock=lambda: now[0]
    )
    token = issue_token(key, "k1", "sess-rt", "default", "rt", 60, now[0])
    server = make_server(redteam_document(echo_origin.port), TABLE, authenticator=authenticator)
    target = f"allowed.test:{echo_origin.port}"
    await server.start()
    relay = Relay(RelayConfig(egress_url=server.url, session_id="sess-rt", token=Secret(token)))
    async with server, relay:
        answer = await ask(server, target, token=token, session="sess-rt")
        assert answer.status == 200
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.close()
        await writer.wait_closed()

        now[0] += 60 + 5  # expiry plus the verifier's leeway
        with pytest.raises(InvalidStatus) as info:
            await open_ws(server, token)
        assert info.value.response.status_code == 401
        assert b'"expired"' in (info.value.response.body or b"")
        answer = await via_relay(Rig(server, relay, echo_origin.port), target)
        assert answer.status == 502
        assert "HTTP 401" in (answer.reason or "")


async def test_token_not_yet_valid_is_refused(echo_origin: EchoOrigin) -> None:
    # A token minted for later (a stolen pre-issued token) does not work early.
    key = generate_key()
    now = time.time()
    authenticator = SignedTokens(TokenVerifier({"k1": key.public_key()}, "rt"))
    token = issue_token(key, "k1", "sess-rt", "default", "rt", 600, now + 3600)
    async with make_server(
        redteam_document(echo_origin.port), TABLE, authenticator=authenticator
    ) as server:
        with pytest.raises(InvalidStatus) as info:
            await open_ws(server, token)
    assert info.value.response.status_code == 401
    assert b'"not-yet-valid"' in (info.value.response.body or b"")


async def test_token_of_another_session_inside_the_tunnel(rig: Rig) -> None:
    # Upgrade as one session, then claim another in the in-tunnel Proxy-Authorization.
    server = make_server(
        redteam_document(rig.port), TABLE, authenticator=static_tokens("default", "open-loopback")
    )
    async with server:
        answer = await ask(
            server,
            f"allowed.test:{rig.port}",
            "default",
            session=session_for("open-loopback"),
            token=token_for("open-loopback"),
            upgrade_token=token_for("default"),
        )
    assert answer.status == 407
    assert answer.reason is not None and "does not match" in answer.reason
