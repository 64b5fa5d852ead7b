"""The relay process imports its own subcommand only (its RSS, see benchmarks/README.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from upstreamproxy.cli import COMMANDS, build_parser, chosen_command


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["relay", "--port", "0"], "relay"),
        (["--log-level", "INFO", "relay"], "relay"),
        (["--log-level=DEBUG", "egress", "--port", "0"], "egress"),
        (["--help"], None),
        (["--version"], None),
        (["--log-level"], None),
        (["rely"], None),
        ([], None),
    ],
)
def test_chosen_command(argv: list[str], expected: str | None) -> None:
    assert chosen_command(argv) == expected


def test_the_relay_does_not_import_the_egress_stack() -> None:
    code = (
        "import sys\n"
        "from upstreamproxy.cli import build_parser, chosen_command\n"
        "argv = ['--log-level', 'INFO', 'relay', '--egress-url', 'ws://127.0.0.1:9/t']\n"
        "parser = build_parser(chosen_command(argv))\n"
        "assert parser.parse_known_args(argv)[0].command == 'relay'\n"
        "print(sorted(m for m in ('aiohttp', 'cryptography', 'prometheus_client')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_full_parser_still_lists_every_command() -> None:
    helptext = build_parser().format_help()
    for name in COMMANDS:
        assert name in helptext
