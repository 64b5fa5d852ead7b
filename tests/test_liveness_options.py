"""The liveness, write-deadline and pool options: flags, UPSTREAMPROXY_* variables, checks."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from upstreamproxy.cli import build_parser
from upstreamproxy.commands.egress import build_server
from upstreamproxy.commands.relay import config_from_args
from upstreamproxy.egress.tunnel import TunnelTimeouts
from upstreamproxy.errors import ConfigError
from upstreamproxy.relay import RelayConfig, tuning_from_env
from upstreamproxy.secret import Secret


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_relay_flags_reach_the_config() -> None:
    args = parse(
        [
            "relay",
            "--egress-url",
            "ws://127.0.0.1:1/ws",
            "--session-id",
            "s",
            "--pool-size",
            "0",
            "--ping-interval",
            "5",
            "--ping-timeout",
            "7",
            "--write-stall-timeout",
            "9",
        ]
    )
    config = config_from_args(args, Secret("t"))
    assert (config.pool_size, config.ping_interval, config.ping_timeout) == (0, 5.0, 7.0)
    assert config.write_stall_timeout == 9.0
    timeouts = config.timeouts()
    assert (timeouts.ping_interval, timeouts.ping_timeout, timeouts.write_stall) == (5, 7, 9)


def test_relay_flags_default_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAMPROXY_POOL_SIZE", "3")
    monkeypatch.setenv("UPSTREAMPROXY_PING_TIMEOUT", "11")
    args = parse(["relay", "--egress-url", "ws://x/ws", "--session-id", "s"])
    config = config_from_args(args, Secret("t"))
    assert config.pool_size == 3 and config.ping_timeout == 11.0


def test_start_reads_the_same_variables() -> None:
    env = {"UPSTREAMPROXY_POOL_SIZE": "0", "UPSTREAMPROXY_WRITE_STALL_TIMEOUT": "12.5"}
    assert tuning_from_env(env) == {"pool_size": 0, "write_stall_timeout": 12.5}
    with pytest.raises(ConfigError) as info:
        tuning_from_env({"UPSTREAMPROXY_PING_INTERVAL": "soon"})
    assert info.value.field == "ping_interval"


def test_no_reuse_is_read_from_the_given_environment_by_start_and_the_relay_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("UPSTREAMPROXY_NO_REUSE", raising=False)
    assert tuning_from_env({"UPSTREAMPROXY_NO_REUSE": "1"}) == {"reuse": False}
    assert tuning_from_env({"UPSTREAMPROXY_NO_REUSE": "0"}) == {}
    args = parse(["relay", "--egress-url", "ws://x/ws", "--session-id", "s"])
    assert config_from_args(args, Secret("t")).reuse is True
    monkeypatch.setenv("UPSTREAMPROXY_NO_REUSE", "yes")
    args = parse(["relay", "--egress-url", "ws://x/ws", "--session-id", "s"])
    assert config_from_args(args, Secret("t")).reuse is False


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pool_size", -1),
        ("pool_size", 65),  # each a live WebSocket the egress counts: at most 64
        ("ping_interval", 0),
        ("ping_timeout", -1),
        ("write_stall_timeout", 0),
    ],
)
def test_relay_refuses_bad_values(field: str, value: float) -> None:
    config = RelayConfig(
        egress_url="ws://x/ws", session_id="s", token=Secret("t"), **{field: value}
    )
    with pytest.raises(ConfigError) as info:
        config.validate()
    assert info.value.field == field


def test_egress_flags_reach_the_timeouts(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s t\n")
    args = parse(
        [
            "egress",
            "--static-tokens",
            str(tokens),
            "--allow",
            "example.com:443",
            "--ping-interval",
            "3",
            "--ping-timeout",
            "4",
            "--write-stall-timeout",
            "5",
            "--preopened-wait",
            "6",
        ]
    )
    timeouts = build_server(args).config.timeouts
    assert (timeouts.ping_interval, timeouts.ping_timeout) == (3.0, 4.0)
    assert (timeouts.write_stall, timeouts.pooled_wait) == (5.0, 6.0)


def test_egress_refuses_bad_values() -> None:
    with pytest.raises(ConfigError) as info:
        TunnelTimeouts(pooled_wait=0).validate()
    assert info.value.field == "preopened_wait"


def test_start_reads_handshake_timeout_and_keepalive_too() -> None:
    """README: `start` reads the relay table's variables; these two were ignored."""
    env = {"UPSTREAMPROXY_HANDSHAKE_TIMEOUT": "3", "UPSTREAMPROXY_KEEPALIVE": "7.5"}
    assert tuning_from_env(env) == {"handshake_timeout": 3.0, "keepalive_interval": 7.5}


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_relay_timeout_from_starts_environment_must_be_finite(value: str) -> None:
    fields = tuning_from_env({"UPSTREAMPROXY_PING_TIMEOUT": value})
    with pytest.raises(ConfigError) as info:
        RelayConfig(egress_url="ws://x/ws", session_id="s", token=Secret("t"), **fields).validate()
    assert info.value.field == "ping_timeout"
