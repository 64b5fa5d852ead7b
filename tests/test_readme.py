"""The README's examples are real: its policy example loads, its commands exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from upstreamproxy.cli import COMMANDS, build_parser
from upstreamproxy.egress.policy import parse_policy_document

README = (Path(__file__).parent.parent / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_policy_example_is_valid() -> None:
    documents = [yaml.safe_load(b) for b in blocks("yaml")]
    policies = [d for d in documents if isinstance(d, dict) and "policies" in d]
    assert policies, "README lost its policy example"
    for document in policies:
        parsed = parse_policy_document(document)
        assert parsed.policies


def test_top_has_exactly_two_command_lines() -> None:
    top = README.split("## ", 1)[0]
    lines = [b.strip() for b in re.findall(r"```sh\n(.*?)```", top, flags=re.S)]
    assert len(lines) == 2
    assert all("\n" not in line for line in lines)
    assert lines[0].endswith("upstreamproxy demo")
    assert lines[1].endswith("python -m pytest")
    assert lines[1] in Path(__file__).parent.parent.joinpath(".ci/run").read_text()


def test_every_upstreamproxy_command_in_readme_parses() -> None:
    parser = build_parser()
    seen = 0
    for block in blocks("sh"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            match = re.search(r"(?:^|&& |\.venv/bin/)upstreamproxy (\S.*)$", line)
            if not match:
                continue
            argv = shlex.split(match.group(1).split(" > ")[0].split(" | ")[0])
            assert argv[0] in COMMANDS, line
            if argv[0] in ("exec",):
                continue
            parser.parse_args(argv)  # exits (SystemExit) on an unknown flag
            seen += 1
    assert seen >= 5
