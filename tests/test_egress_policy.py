"""The policy file: a complete example, every invalid field refused by name, lookup semantics.

Loading is tested on real files (``load_policy_file``) and through the real CLI, which must
refuse to start (exit 2) naming the field; lookups are tested on the loaded policies and,
where it matters, through the real egress server.
"""

# Fixtures shared from test_egress_admission are imported by name; pytest injects them.
# ruff: noqa: F811

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import run
from test_egress_admission import (  # noqa: F401 (echo_origin is a fixture)
    EchoOrigin,
    ask,
    assert_deny,
    echo_origin,
    static_tokens,
)

from upstreamproxy.egress.addresses import CidrSet
from upstreamproxy.egress.hostnames import normalise_host
from upstreamproxy.egress.policy import (
    MAX_POLICY_FILE_BYTES,
    Policy,
    PolicySet,
    PolicyStore,
    load_policy_file,
    policy_from_allow_list,
)
from upstreamproxy.egress.resolver import StaticResolver
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.errors import ConfigError

COMPLETE_EXAMPLE = """\
# A complete policy file: every field, several named policies.
version: 1
policies:
  default:
    mode: enforce
    rules:
      - id: github
        hosts: [github.com, "*.github.com", "*.githubusercontent.com"]
        # ports omitted: 443 only
      - id: registries
        hosts: [registry.npmjs.org, pypi.org, files.pythonhosted.org]
        ports: [443, 8443]
      - id: internal-any-port
        hosts: ["build.internal.example"]
        ports: "*"
      - id: idn
        hosts: ["Bücher.Example.", "*.xn--caf-dma.example"]
    allow_cidrs: [10.20.0.0/16, "fd00:1234::/32"]
    block_cidrs: [10.20.99.0/24]
  ci:
    mode: monitor
    rules:
      - id: everything-github
        hosts: ["*.github.com", github.com]
        ports: [22, 443]
    block_cidrs: ["203.0.113.0/24"]
  locked-down:
    rules: []
"""


def clean_env() -> dict[str, str]:
    """The environment without UPSTREAMPROXY_* settings that could change the CLI's defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("UPSTREAMPROXY_")}


def write(tmp_path: Path, text: str | bytes, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def lookup(policies: PolicySet, name: str, target: str, port: int = 443) -> tuple[bool, str, str]:
    policy = policies.get(name)
    assert isinstance(policy, Policy)
    decision = policy.decide_host(normalise_host(target), port)
    return decision.allowed, decision.reason, decision.rule


# -- a complete, valid file --------------------------------------------------------------------


def test_complete_example_loads(tmp_path: Path) -> None:
    policies = load_policy_file(write(tmp_path, COMPLETE_EXAMPLE))
    assert set(policies.policies) == {"default", "ci", "locked-down"}
    default, ci, locked = (policies.policies[n] for n in ("default", "ci", "locked-down"))
    assert (default.mode, ci.mode, locked.mode) == ("enforce", "monitor", "enforce")
    assert not default.monitor and ci.monitor
    assert [r.rule_id for r in default.rules] == [
        "github",
        "registries",
        "internal-any-port",
        "idn",
    ]
    github, registries, any_port, idn = default.rules
    assert [str(h) for h in github.hosts] == [
        "github.com",
        "*.github.com",
        "*.githubusercontent.com",
    ]
    assert github.ports == frozenset({443})
    assert registries.ports == frozenset({443, 8443})
    assert any_port.ports is None  # "*"
    # Hosts are stored normalised: lower-case, no trailing dot, IDNA A-labels.
    assert [str(h) for h in idn.hosts] == ["xn--bcher-kva.example", "*.xn--caf-dma.example"]
    assert default.allow_cidrs == CidrSet.parse(["10.20.0.0/16", "fd00:1234::/32"], "x")
    assert default.block_cidrs == CidrSet.parse(["10.20.99.0/24"], "x")
    assert locked.rules == ()
    assert policies.source.endswith("policy.yaml")


def test_complete_example_decides(tmp_path: Path) -> None:
    policies = load_policy_file(write(tmp_path, COMPLETE_EXAMPLE))
    assert lookup(policies, "default", "github.com") == (True, "rule-match", "github")
    assert lookup(policies, "default", "api.github.com") == (True, "rule-match", "github")
    assert lookup(policies, "default", "raw.githubusercontent.com")[0]
    assert lookup(policies, "default", "github.com", 22) == (False, "port-not-allowed", "github")
    assert lookup(policies, "default", "pypi.org", 8443) == (True, "rule-match", "registries")
    assert lookup(policies, "default", "build.internal.example", 1) == (
        True,
        "rule-match",
        "internal-any-port",
    )
    assert lookup(policies, "default", "build.internal.example", 65535)[0]
    assert lookup(policies, "default", "gitlab.com") == (False, "no-matching-rule", "-")
    assert lookup(policies, "ci", "github.com", 22) == (True, "rule-match", "everything-github")
    assert lookup(policies, "locked-down", "github.com") == (False, "no-matching-rule", "-")
    assert policies.get("missing") is None


async def test_server_runs_the_loaded_file(tmp_path: Path, echo_origin: EchoOrigin) -> None:
    path = write(
        tmp_path,
        f"""\
policies:
  default:
    rules:
      - id: echo
        hosts: [echo.test]
        ports: [{echo_origin.port}]
    allow_cidrs: [127.0.0.1/32]
""",
    )
    server = EgressServer(
        EgressConfig(),
        static_tokens("default"),
        PolicyStore.from_file(path),
        resolver=StaticResolver({"echo.test": ["127.0.0.1"]}),
    )
    async with server:
        assert (await ask(server, f"echo.test:{echo_origin.port}")).status == 200
        assert_deny(await ask(server, "echo.test:443"), 403, "port-not-allowed", "echo")
        assert_deny(
            await ask(server, f"other.test:{echo_origin.port}"), 403, "no-matching-rule", "-"
        )


# -- invalid files, each refused naming the field ---------------------------------------------


def one_rule(rule: str, extra: str = "") -> str:
    return f"policies:\n  default:\n    rules:\n      - {rule}\n{extra}"


INVALID = [
    # (case id, file text, field named)
    ("unknown-top-key", "version: 1\npolicies: {p: {}}\ncolour: red\n", "colour"),
    ("unknown-policy-key", "policies:\n  p:\n    rulez: []\n", "policies.p.rulez"),
    ("unknown-rule-key", one_rule("{id: a, host: [a.com]}"), "policies.default.rules[0].host"),
    ("bad-mode", "policies:\n  p:\n    mode: enforcing\n", "policies.p.mode"),
    ("mode-case", "policies:\n  p:\n    mode: Monitor\n", "policies.p.mode"),
    (
        "port-zero",
        one_rule("{id: a, hosts: [a.com], ports: [0]}"),
        "policies.default.rules[0].ports[0]",
    ),
    (
        "port-too-big",
        one_rule("{id: a, hosts: [a.com], ports: [443, 65536]}"),
        "policies.default.rules[0].ports[1]",
    ),
    (
        "port-string",
        one_rule("{id: a, hosts: [a.com], ports: ['443']}"),
        "policies.default.rules[0].ports[0]",
    ),
    (
        "port-bool",
        one_rule("{id: a, hosts: [a.com], ports: [true]}"),
        "policies.default.rules[0].ports[0]",
    ),
    (
        "port-float",
        one_rule("{id: a, hosts: [a.com], ports: [443.0]}"),
        "policies.default.rules[0].ports[0]",
    ),
    (
        "ports-empty",
        one_rule("{id: a, hosts: [a.com], ports: []}"),
        "policies.default.rules[0].ports",
    ),
    (
        "ports-word",
        one_rule("{id: a, hosts: [a.com], ports: any}"),
        "policies.default.rules[0].ports",
    ),
    ("hosts-empty", one_rule("{id: a, hosts: []}"), "policies.default.rules[0].hosts"),
    ("hosts-missing", one_rule("{id: a}"), "policies.default.rules[0].hosts"),
    ("hosts-string", one_rule("{id: a, hosts: a.com}"), "policies.default.rules[0].hosts"),
    ("host-number", one_rule("{id: a, hosts: [443]}"), "policies.default.rules[0].hosts[0]"),
    ("host-empty", one_rule("{id: a, hosts: ['']}"), "policies.default.rules[0].hosts[0]"),
    (
        "dup-host-normalised",
        "policies:\n  default:\n    rules:\n      - {id: a, hosts: [Example.COM.]}\n"
        "      - {id: b, hosts: [x.org, example.com]}\n",
        "policies.default.rules[1].hosts[1]",
    ),
    (
        "dup-host-same-rule",
        one_rule("{id: a, hosts: [a.com, ' A.com ']}"),
        "policies.default.rules[0].hosts[1]",
    ),
    (
        "dup-host-idna",
        one_rule("{id: a, hosts: [bücher.example, xn--bcher-kva.example]}"),
        "policies.default.rules[0].hosts[1]",
    ),
    (
        "dup-host-wildcard",
        one_rule("{id: a, hosts: ['*.a.com', '*.A.COM.']}"),
        "policies.default.rules[0].hosts[1]",
    ),
    (
        "dup-host-ipv6",
        one_rule("{id: a, hosts: ['::1', '[0:0:0:0:0:0:0:1]']}"),
        "policies.default.rules[0].hosts[1]",
    ),
    (
        "dup-rule-id",
        "policies:\n  default:\n    rules:\n      - {id: a, hosts: [a.com]}\n"
        "      - {id: a, hosts: [b.com]}\n",
        "policies.default.rules[1].id",
    ),
    ("rule-id-missing", one_rule("{hosts: [a.com]}"), "policies.default.rules[0].id"),
    ("rule-id-spaces", one_rule("{id: 'my rule', hosts: [a.com]}"), "policies.default.rules[0].id"),
    ("rule-not-mapping", one_rule("a.com"), "policies.default.rules[0]"),
    ("rules-not-list", "policies:\n  p:\n    rules: {a: 1}\n", "policies.p.rules"),
    ("bad-cidr", "policies:\n  p:\n    allow_cidrs: [10.0.0.0/33]\n", "policies.p.allow_cidrs"),
    (
        "cidr-host-bits",
        "policies:\n  p:\n    block_cidrs: [10.0.0.1/8]\n",
        "policies.p.block_cidrs",
    ),
    ("cidr-word", "policies:\n  p:\n    block_cidrs: [internal]\n", "policies.p.block_cidrs"),
    ("cidr-not-list", "policies:\n  p:\n    allow_cidrs: 10.0.0.0/8\n", "policies.p.allow_cidrs"),
    (
        "cidr-zone",
        "policies:\n  p:\n    allow_cidrs: ['fe80::/64%eth0']\n",
        "policies.p.allow_cidrs",
    ),
    (
        "non-canonical-octal",
        one_rule("{id: a, hosts: [0177.0.0.1]}"),
        "policies.default.rules[0].hosts[0]",
    ),
    (
        "non-canonical-short",
        one_rule("{id: a, hosts: ['127.1']}"),
        "policies.default.rules[0].hosts[0]",
    ),
    (
        "non-canonical-decimal",
        one_rule("{id: a, hosts: ['2130706433']}"),
        "policies.default.rules[0].hosts[0]",
    ),
    (
        "non-canonical-hex",
        one_rule("{id: a, hosts: [0x7f.0.0.1]}"),
        "policies.default.rules[0].hosts[0]",
    ),
    ("bare-star", one_rule("{id: a, hosts: ['*']}"), "policies.default.rules[0].hosts[0]"),
    ("star-dot", one_rule("{id: a, hosts: ['*.']}"), "policies.default.rules[0].hosts[0]"),
    ("inner-star", one_rule("{id: a, hosts: ['a.*.com']}"), "policies.default.rules[0].hosts[0]"),
    ("partial-star", one_rule("{id: a, hosts: ['*a.com']}"), "policies.default.rules[0].hosts[0]"),
    (
        "wildcard-ip",
        one_rule("{id: a, hosts: ['*.10.0.0.1']}"),
        "policies.default.rules[0].hosts[0]",
    ),
    (
        "host-with-port",
        one_rule("{id: a, hosts: ['a.com:443']}"),
        "policies.default.rules[0].hosts[0]",
    ),
    (
        "host-url",
        one_rule("{id: a, hosts: ['https://a.com/']}"),
        "policies.default.rules[0].hosts[0]",
    ),
    (
        "host-zone",
        one_rule("{id: a, hosts: ['fe80::1%eth0']}"),
        "policies.default.rules[0].hosts[0]",
    ),
    ("version-2", "version: 2\npolicies: {p: {}}\n", "version"),
    ("no-policies", "version: 1\n", "policies"),
    ("policies-empty", "policies: {}\n", "policies"),
    ("policies-list", "policies: [default]\n", "policies"),
    ("policy-not-mapping", "policies:\n  p: [1]\n", "policies.p"),
    ("policy-name-number", "policies:\n  7: {}\n", "policies"),
    ("not-yaml", "policies: [unclosed\n  - {", "policy"),
    ("not-a-mapping", "- default\n- ci\n", "policy file"),
    ("scalar", "just a string\n", "policy file"),
    ("empty-file", "", "policy file"),
    ("binary", b"\xff\xfe\x00garbage", "policy file"),
    ("bad-utf8", b"policies:\n  p: {rules: [{id: a, hosts: [\xff\xfe]}]}\n", "policy"),
]


@pytest.mark.parametrize(("text", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_file_is_refused_naming_the_field(
    tmp_path: Path, text: str | bytes, field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_policy_file(write(tmp_path, text))
    assert info.value.field == field, str(info.value)
    assert info.value.problem  # says what is wrong, not only where


def test_duplicate_host_error_says_where_it_was_first(tmp_path: Path) -> None:
    text = (
        "policies:\n  default:\n    rules:\n      - {id: a, hosts: [Example.COM.]}\n"
        "      - {id: b, hosts: [example.com]}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_policy_file(write(tmp_path, text))
    assert "'example.com'" in info.value.problem
    assert "policies.default.rules[0].hosts[0]" in info.value.problem


def test_same_host_in_two_policies_is_fine(tmp_path: Path) -> None:
    text = (
        "policies:\n  a:\n    rules: [{id: r, hosts: [x.com]}]\n"
        "  b:\n    rules: [{id: r, hosts: [X.COM.]}]\n"
    )
    policies = load_policy_file(write(tmp_path, text))
    assert lookup(policies, "a", "x.com")[0] and lookup(policies, "b", "x.com")[0]


@pytest.mark.parametrize(
    "text",
    [
        # A policy defined twice: YAML would silently keep the second and drop the first's rules.
        "policies:\n  default:\n    rules: [{id: a, hosts: [a.com]}]\n"
        "  default:\n    rules: [{id: b, hosts: [b.com]}]\n",
        # A key repeated inside a policy: which mode is in force?
        "policies:\n  default:\n    mode: enforce\n    mode: monitor\n",
    ],
    ids=["policy-twice", "mode-twice"],
)
def test_duplicate_yaml_keys_are_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_policy_file(write(tmp_path, text))
    assert info.value.field == "policy"
    assert "duplicate" in info.value.problem


def test_oversize_file_is_refused(tmp_path: Path) -> None:
    filler = b"# padding padding padding padding padding padding padding padding\n"
    body = b"policies: {p: {}}\n" + filler * (MAX_POLICY_FILE_BYTES // len(filler) + 1)
    assert len(body) > MAX_POLICY_FILE_BYTES
    with pytest.raises(ConfigError) as info:
        load_policy_file(write(tmp_path, body))
    assert info.value.field == "policy"
    assert "larger than" in info.value.problem


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_policy_file(tmp_path / "absent.yaml")
    assert info.value.field == "policy"


def test_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    text = "policies: !!python/object/apply:os.system ['echo pwned']\n"
    with pytest.raises(ConfigError) as info:
        load_policy_file(write(tmp_path, text))
    assert info.value.field == "policy"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("policies:\n  default:\n    mode: sometimes\n", "policies.default.mode"),
        (
            "policies:\n  default:\n    rules:\n      - {id: a, hosts: ['*']}\n",
            "policies.default.rules[0].hosts[0]",
        ),
        ("policies: [unclosed\n", "policy"),
    ],
    ids=["mode", "bare-star", "not-yaml"],
)
async def test_cli_refuses_to_start_on_an_invalid_file(
    tmp_path: Path, text: str, field: str
) -> None:
    tokens = write(tmp_path, "sess tok-secret-value default\n", "tokens")
    result = await run(
        sys.executable,
        "-m",
        "upstreamproxy",
        "egress",
        "--port",
        "0",
        "--static-tokens",
        str(tokens),
        "--policy",
        str(write(tmp_path, text)),
        env=clean_env(),
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert b"invalid configuration" in result.stderr
    assert f"{field}:".encode() in result.stderr
    assert b"egress listening" not in result.stdout


async def test_cli_refuses_policy_and_allow_together(tmp_path: Path) -> None:
    tokens = write(tmp_path, "sess tok-secret-value\n", "tokens")
    policy = write(tmp_path, "policies: {default: {}}\n")
    result = await run(
        sys.executable,
        "-m",
        "upstreamproxy",
        "egress",
        "--port",
        "0",
        "--static-tokens",
        str(tokens),
        "--policy",
        str(policy),
        "--allow",
        "a.com:443",
        env=clean_env(),
        timeout=30,
    )
    assert result.returncode == 2
    assert b"policy:" in result.stderr


# -- lookups: normalisation, ports, first match, wildcards -------------------------------------

NORMALISATION = """\
policies:
  default:
    rules:
      - id: plain
        hosts: ["Example.COM."]
      - id: idn
        hosts: ["bücher.example", "*.Café.Example"]
      - id: punycode
        hosts: ["xn--mnchen-3ya.example"]
      - id: v6
        hosts: ["[2001:DB8:0:0::1]"]
"""


@pytest.mark.parametrize(
    ("target", "rule"),
    [
        ("example.com", "plain"),
        ("EXAMPLE.COM", "plain"),
        ("Example.Com.", "plain"),
        ("  example.com  ", "plain"),
        ("example.com:443", "plain"),
        ("bücher.example", "idn"),
        ("BÜCHER.EXAMPLE.", "idn"),
        ("xn--bcher-kva.example", "idn"),
        ("XN--BCHER-KVA.EXAMPLE", "idn"),
        ("a.café.example", "idn"),
        ("a.b.xn--caf-dma.example", "idn"),
        ("münchen.example", "punycode"),
        ("MÜNCHEN.example.", "punycode"),
        ("2001:db8::1", "v6"),
        ("[2001:0db8:0000:0000:0000:0000:0000:0001]", "v6"),
    ],
)
def test_normalisation_is_the_same_at_load_and_lookup(
    tmp_path: Path, target: str, rule: str
) -> None:
    policies = load_policy_file(write(tmp_path, NORMALISATION))
    assert lookup(policies, "default", target) == (True, "rule-match", rule)


@pytest.mark.parametrize(
    "target",
    [
        "example.com.evil.test",
        "example.co",
        "xexample.com",
        "buecher.example",
        "bucher.example",
        "café.example",  # the apex of *.café.example
    ],
)
def test_lookalikes_do_not_match(tmp_path: Path, target: str) -> None:
    policies = load_policy_file(write(tmp_path, NORMALISATION))
    assert lookup(policies, "default", target) == (False, "no-matching-rule", "-")


async def test_normalised_targets_through_the_server(
    tmp_path: Path, echo_origin: EchoOrigin
) -> None:
    port = echo_origin.port
    path = write(
        tmp_path,
        f"""\
policies:
  default:
    rules:
      - id: idn
        hosts: ["Bücher.Example."]
        ports: [{port}]
    allow_cidrs: [127.0.0.1/32]
""",
    )
    server = EgressServer(
        EgressConfig(),
        static_tokens("default"),
        PolicyStore.from_file(path),
        resolver=StaticResolver({"xn--bcher-kva.example": ["127.0.0.1"]}),
    )
    async with server:
        for target in (
            "bücher.example",
            "BÜCHER.example.",
            "xn--bcher-kva.example",
            "XN--BCHER-KVA.EXAMPLE.",
        ):
            answer = await ask(server, f"{target}:{port}")
            assert answer.status == 200, (target, answer.raw)
    # The resolver only ever saw the normal form.
    assert server.admission._resolver.calls == ["xn--bcher-kva.example"] * 4  # type: ignore[attr-defined]


def test_default_port_is_443_only(tmp_path: Path) -> None:
    policies = load_policy_file(write(tmp_path, one_rule("{id: a, hosts: [a.com]}")))
    assert lookup(policies, "default", "a.com", 443) == (True, "rule-match", "a")
    for port in (80, 444, 8443, 22, 1, 65535):
        assert lookup(policies, "default", "a.com", port) == (False, "port-not-allowed", "a")


def test_star_ports_allow_any_port(tmp_path: Path) -> None:
    policies = load_policy_file(write(tmp_path, one_rule("{id: a, hosts: [a.com], ports: '*'}")))
    for port in (1, 22, 443, 65535):
        assert lookup(policies, "default", "a.com", port)[0]


def test_first_matching_rule_wins(tmp_path: Path) -> None:
    text = """\
policies:
  default:
    rules:
      - id: wide
        hosts: ["*.example.com"]
      - id: api-alt-port
        hosts: [api.example.com]
        ports: [8443]
      - id: catch-all
        hosts: ["*.com"]
        ports: "*"
"""
    policies = load_policy_file(write(tmp_path, text))
    # Host and port both match "wide" first.
    assert lookup(policies, "default", "api.example.com", 443) == (True, "rule-match", "wide")
    # "wide" matches the host but not the port: the next rule allowing both wins.
    assert lookup(policies, "default", "api.example.com", 8443) == (
        True,
        "rule-match",
        "api-alt-port",
    )
    assert lookup(policies, "default", "x.example.com", 22) == (True, "rule-match", "catch-all")
    assert lookup(policies, "default", "x.example.org", 22) == (False, "no-matching-rule", "-")


def test_port_miss_names_the_first_rule_that_matched_the_host(tmp_path: Path) -> None:
    text = """\
policies:
  default:
    rules:
      - {id: first, hosts: ["*.example.com"]}
      - {id: second, hosts: [api.example.com], ports: [8443]}
"""
    policies = load_policy_file(write(tmp_path, text))
    assert lookup(policies, "default", "api.example.com", 22) == (
        False,
        "port-not-allowed",
        "first",
    )


@pytest.mark.parametrize(
    ("target", "allowed"),
    [
        ("example.com", False),  # the apex is not covered by *.example.com
        ("example.com.", False),
        ("a.example.com", True),
        ("a.b.c.example.com", True),
        ("A.EXAMPLE.COM.", True),
        ("badexample.com", False),  # a suffix match is label-aligned
        ("a.example.com.evil.test", False),
    ],
)
def test_wildcard_does_not_match_the_apex(tmp_path: Path, target: str, allowed: bool) -> None:
    policies = load_policy_file(write(tmp_path, one_rule("{id: w, hosts: ['*.example.com']}")))
    assert lookup(policies, "default", target)[0] is allowed


def test_ip_literal_rules_match_canonical_forms_only(tmp_path: Path) -> None:
    text = one_rule("{id: ip, hosts: ['127.0.0.1', '::1'], ports: '*'}")
    policies = load_policy_file(write(tmp_path, text))
    assert lookup(policies, "default", "127.0.0.1")[0]
    assert lookup(policies, "default", "[0:0:0:0:0:0:0:1]")[0]
    for spelling in ("2130706433", "0177.0.0.1", "0x7f.0.0.1", "127.1", "127.000.000.001"):
        assert lookup(policies, "default", spelling) == (False, "non-canonical-ip-literal", "-")
    # Mapped and NAT64 spellings of 127.0.0.1 are other hosts to the rules (then address checks).
    assert not lookup(policies, "default", "::ffff:127.0.0.1")[0]


def test_allow_list_shorthand_builds_the_same_policy() -> None:
    policies = policy_from_allow_list(
        ["Example.COM.:443", "*.svc.test:*", "[::1]:8080"], ["127.0.0.0/8"]
    )
    assert lookup(policies, "default", "example.com") == (True, "rule-match", "allow-0")
    assert lookup(policies, "default", "a.svc.test", 1)[0]
    assert lookup(policies, "default", "::1", 8080)[0]
    with pytest.raises(ConfigError) as info:
        policy_from_allow_list(["example.com"])
    assert info.value.field == "allow[0]"
    with pytest.raises(ConfigError) as info:
        policy_from_allow_list(["a.com:443", "*:443"])
    assert "allow-1" in str(info.value) or "rules[1]" in info.value.field


def test_allow_list_merges_ports_of_the_same_host() -> None:
    # Regression: two ports of one host were refused as a duplicate host.
    policies = policy_from_allow_list(
        ["127.0.0.1:18080", "127.0.0.1:18443", "Example.com:443", "example.com.:8443"],
        ["127.0.0.0/8"],
    )
    assert lookup(policies, "default", "127.0.0.1", 18080) == (True, "rule-match", "allow-0")
    assert lookup(policies, "default", "127.0.0.1", 18443) == (True, "rule-match", "allow-0")
    assert not lookup(policies, "default", "127.0.0.1", 443)[0]
    assert lookup(policies, "default", "example.com", 8443)[0]
    assert lookup(policies, "default", "example.com", 443)[0]
    star = policy_from_allow_list(["a.test:443", "a.test:*", "a.test:80"])
    assert lookup(star, "default", "a.test", 9999)[0]
