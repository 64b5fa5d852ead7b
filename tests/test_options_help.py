"""``--help`` shows each option's built-in default next to its environment variable, so the
README's defaults tables can be checked against the program itself."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from upstreamproxy.options import add_option, port


def help_text(**kwargs: object) -> str:
    parser = argparse.ArgumentParser()
    add_option(parser, "--x", "X_TEST", "what x is", **kwargs)
    return " ".join(parser.format_help().split())


@pytest.mark.parametrize(
    ("default", "shown"),
    [
        (10.0, "(default: 10; env UPSTREAMPROXY_X_TEST)"),
        (0.5, "(default: 0.5; env"),
        ("/v1/ws", "(default: /v1/ws; env"),
        (["a", "b"], "(default: a,b; env"),
        ("100%", "(default: 100%; env"),
    ],
)
def test_a_default_is_shown(default: object, shown: str) -> None:
    assert shown in help_text(default=default)


@pytest.mark.parametrize("default", [None, False])
def test_no_default_shows_none(default: object) -> None:
    assert "what x is (env UPSTREAMPROXY_X_TEST)" in help_text(default=default)


def test_a_help_that_names_its_default_is_left_alone() -> None:
    parser = argparse.ArgumentParser()
    add_option(parser, "--x", "X_TEST", "what x is (default: any free one)", default=0)
    text = " ".join(parser.format_help().split())
    assert "(default: any free one) (env UPSTREAMPROXY_X_TEST)" in text
    assert "default: 0" not in text


def test_the_environment_does_not_change_the_shown_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("UPSTREAMPROXY_X_TEST", "7")
    assert "(default: 3; env" in help_text(default=3)


def test_egress_help_shows_its_defaults() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "upstreamproxy", "egress", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    text = " ".join(out.split()).split(" options: ", 1)[1]  # (past the usage lines)
    for flag, default in [
        ("reload-interval", "10"),
        ("ping-interval", None),
        ("max-preauth-per-peer", None),
        ("upgrade-timeout", None),
    ]:
        match = re.search(rf"--{flag} [A-Z_]+ (.*?)env UPSTREAMPROXY_", text)
        assert match is not None, flag
        shown = re.search(r"default: ([^;]+);", match.group(1))
        assert shown is not None, f"--{flag} shows no default: {match.group(0)}"
        if default is not None:
            assert shown.group(1) == default


def parse_x(text: str, **kwargs: object) -> object:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_option(parser, "--x", "X_TEST", "what x is", **kwargs)
    return parser.parse_args(["--x", text]).x


@pytest.mark.parametrize("text", ["-1", "65536", "70000"])
def test_a_port_out_of_range_is_refused(text: str) -> None:
    """70000 used to be bound as 70000 % 65536 = 4464, -1 failed as "Servname not supported"."""
    with pytest.raises(argparse.ArgumentError, match=r"a port must be 0\.\.65535"):
        parse_x(text, type=port)
    assert parse_x("65535", type=port) == 65535


@pytest.mark.parametrize("text", ["nan", "inf", "Infinity"])
def test_a_float_option_must_be_finite(text: str) -> None:
    """nan passed every `<= 0` check (relay --handshake-timeout nan ran)."""
    with pytest.raises(argparse.ArgumentError, match="not a finite number"):
        parse_x(text, type=float)


@pytest.mark.parametrize(
    "args",
    [["relay", "--port", "70000"], ["egress", "--metrics-port", "-1"], ["egress", "--port", "1e9"]],
)
def test_commands_refuse_bad_ports_as_usage_errors(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "upstreamproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "invalid value" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["relay", "--pool-size", "100"], "--pool-size: must be 0..64"),
        (["relay", "--ping-timeout", "-1"], "--ping-timeout: must be a positive"),
        (["relay", "--keepalive", "0"], "--keepalive: must be a positive"),  # keepalive_interval
        (["egress", "--dial-timeout", "0"], "--dial-timeout: must be positive"),
    ],
)
def test_a_bad_setting_is_named_by_its_flag(tmp_path: Path, args: list[str], said: str) -> None:
    """Not by the setting's name in the code (``pool_size``): the user typed ``--pool-size``."""
    (tmp_path / "token").write_text("a-token\n")
    (tmp_path / "tokens").write_text("s a-token\n")
    relay = ["--egress-url", "ws://127.0.0.1:9/ws", "--session-id", "s", "--keep-token-file"]
    common = {
        "relay": [*relay, "--token-file", str(tmp_path / "token")],
        "egress": ["--allow", "x.test:443", "--static-tokens", str(tmp_path / "tokens")],
    }[args[0]]
    done = subprocess.run(
        [sys.executable, "-m", "upstreamproxy", args[0], *common, *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert f"upstreamproxy: invalid configuration: {said}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
