"""Edge rules of the egress found in review: idle vs keepalive, metadata, self, versions."""

from __future__ import annotations

import asyncio
from ipaddress import ip_address

import pytest
from conftest import SESSION, TOKEN, connect_via, loopback_policy

from upstreamproxy.egress.addresses import CidrSet, check_address
from upstreamproxy.egress.admission import Admission, AdmissionRecord, Refusal
from upstreamproxy.egress.auth import Session, StaticTokens
from upstreamproxy.egress.policy import Policy, parse_policy_document
from upstreamproxy.egress.resolver import StaticResolver
from upstreamproxy.egress.server import EgressConfig, EgressServer, _listen_addresses
from upstreamproxy.egress.tunnel import TunnelTimeouts
from upstreamproxy.errors import ConfigError
from upstreamproxy.relay import Relay, RelayConfig
from upstreamproxy.secret import Secret


async def test_keepalives_do_not_keep_an_idle_tunnel_open() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    origin = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = origin.sockets[0].getsockname()[1]
    server = EgressServer(
        EgressConfig(timeouts=TunnelTimeouts(idle=0.6)),
        StaticTokens({TOKEN: Session(SESSION)}),
        loopback_policy(),
    )
    async with server:
        relay = Relay(
            RelayConfig(
                egress_url=server.url,
                session_id=SESSION,
                token=Secret(TOKEN),
                keepalive_interval=0.1,
            )
        )
        async with relay:
            reader, writer, head = await connect_via(relay.port, f"127.0.0.1:{port}")
            assert head.startswith(b"HTTP/1.1 200")
            # Keepalives flow every 0.1 s, yet the idle tunnel is closed after 0.6 s.
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
    origin.close()


@pytest.mark.parametrize("address", ["169.254.169.254", "fd00:ec2::254"])
def test_metadata_needs_an_exact_allow_entry(address: str) -> None:
    ip = ip_address(address)
    wide = CidrSet.parse(["169.254.0.0/16", "fd00::/8"], "allow_cidrs")
    assert not check_address(ip, wide).allowed
    exact = CidrSet.parse([f"{address}/{ip.max_prefixlen}"], "allow_cidrs")
    assert check_address(ip, exact).allowed
    # Other link-local addresses are opened by the range as before.
    assert check_address(ip_address("169.254.1.1"), wide).allowed


def test_specific_listen_address_counts_as_self() -> None:
    assert _listen_addresses("10.1.2.3") == [ip_address("10.1.2.3")]
    assert _listen_addresses("0.0.0.0") == []
    assert _listen_addresses("localhost") == []


@pytest.mark.parametrize("version", [True, "1", 1.0, 2])
def test_policy_version_must_be_the_integer_1(version: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy_document({"version": version, "policies": {"p": {"rules": []}}})
    assert info.value.field == "version"


@pytest.mark.parametrize("target", ["10.1.2.3", "::ffff:10.1.2.3"])
@pytest.mark.parametrize("listen", ["10.1.2.3", "::ffff:10.1.2.3"])
def test_own_listen_address_is_self_in_either_spelling(listen: str, target: str) -> None:
    # Regression: the egress on 10.1.2.3 with allow_cidrs covering it refused a CONNECT to
    # 10.1.2.3:<its port> as egress-self, but not to [::ffff:10.1.2.3]:<its port>, which a
    # dual-stack socket dials to the very same listener.
    admission = Admission(
        lambda: parse_policy_document({"version": 1, "policies": {}}),
        StaticResolver({}),
        1.0,
        own_ports=lambda: {8443},
        own_addresses=_listen_addresses(listen),
    )
    policy = Policy("p", allow_cidrs=CidrSet.parse(["10.0.0.0/8"], "allow_cidrs"))
    with pytest.raises(Refusal) as info:
        admission._check_addresses(policy, [ip_address(target)], 8443, "r", AdmissionRecord())
    assert (info.value.status, info.value.reason) == (403, "egress-self")
    # Another port of that address is not the egress.
    admission._check_addresses(policy, [ip_address(target)], 443, "r", AdmissionRecord())
