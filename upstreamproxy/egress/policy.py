"""The policy file: named policies of host rules, ports and CIDR lists. Default deny.

::

    version: 1
    policies:
      default:                 # a token's ``policy`` claim picks one of these
        mode: enforce          # or "monitor": log what would be denied, allow it
        rules:
          - id: github         # rule ids appear in denies, audit lines and metrics
            hosts: [github.com, "*.github.com"]
            ports: [443]       # optional; 443 when omitted; "*" for any port
        allow_cidrs: []        # special-purpose ranges this policy may reach anyway
        block_cidrs: []        # always refused, whatever the hosts say

Loading validates everything and names the offending field (``policies.default.rules[1].hosts[0]``);
a file with an error is refused whole. Hosts are normalised exactly as targets are at lookup
(:func:`~upstreamproxy.egress.hostnames.normalise_host`), and a host listed twice in one policy
after normalisation is an error, so two rules can never disagree about one host.

Monitor mode lifts host and port rules only: the address checks (special-purpose ranges,
block lists) stay enforced, because a policy being trialled must not open the metadata service.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import yaml

from ..errors import ConfigError
from .addresses import CidrSet
from .hostnames import HostPattern, is_ambiguous_ipv4

if TYPE_CHECKING:
    from .intercept import InterceptRule

DEFAULT_PORTS: Final = frozenset({443})
MAX_POLICY_FILE_BYTES: Final = 4 * 1024 * 1024
ENFORCE: Final = "enforce"
MONITOR: Final = "monitor"


@dataclass(frozen=True)
class HostDecision:
    """The host/port part of a decision; address checks come after resolution."""

    allowed: bool
    reason: str
    rule: str = "-"
    intercept: InterceptRule | None = None


@dataclass(frozen=True)
class Rule:
    rule_id: str
    hosts: tuple[HostPattern, ...]
    ports: frozenset[int] | None  # None: any port
    intercept: InterceptRule | None = None

    def matches_host(self, host: str) -> bool:
        return any(pattern.matches(host) for pattern in self.hosts)

    def allows_port(self, port: int) -> bool:
        return self.ports is None or port in self.ports


@dataclass(frozen=True)
class Policy:
    name: str
    mode: str = ENFORCE
    rules: tuple[Rule, ...] = ()
    allow_cidrs: CidrSet = field(default_factory=CidrSet)
    block_cidrs: CidrSet = field(default_factory=CidrSet)

    @property
    def monitor(self) -> bool:
        return self.mode == MONITOR

    def decide_host(self, host: str, port: int) -> HostDecision:
        """Match a *normalised* host and port against the rules (first match wins)."""
        if is_ambiguous_ipv4(host):
            return HostDecision(False, "non-canonical-ip-literal")
        port_miss: Rule | None = None
        for rule in self.rules:
            if rule.matches_host(host):
                if rule.allows_port(port):
                    return HostDecision(True, "rule-match", rule.rule_id, rule.intercept)
                port_miss = port_miss or rule
        if port_miss is not None:
            return HostDecision(False, "port-not-allowed", port_miss.rule_id)
        return HostDecision(False, "no-matching-rule")


@dataclass(frozen=True)
class PolicySet:
    policies: Mapping[str, Policy]
    source: str = "<memory>"

    def get(self, name: str) -> Policy | None:
        return self.policies.get(name)

    def intercept_rules(self) -> list[InterceptRule]:
        return [
            rule.intercept
            for policy in self.policies.values()
            for rule in policy.rules
            if rule.intercept is not None
        ]


# -- loading -------------------------------------------------------------------------------


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: object, line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key repeated in one mapping.

    Plain YAML keeps the last of two equal keys, so a policy defined twice would silently
    lose the first definition's rules.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor" may legitimately be overridden
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable key: the base class reports it
            if duplicate:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


def _expect(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(where, f"must be {what}")
    return value


def _check_keys(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(map(str, raw)) - allowed)
    if unknown:
        field = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(field, f"unknown field (allowed: {sorted(allowed)})")


def _parse_ports(raw: Any, where: str) -> frozenset[int] | None:
    if raw is None:
        return DEFAULT_PORTS
    if raw == "*":
        return None
    _expect(raw, list, where, 'a list of port numbers, or "*"')
    if not raw:
        raise ConfigError(where, "must not be empty")
    ports: set[int] = set()
    for index, port in enumerate(raw):
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ConfigError(f"{where}[{index}]", "must be a port number 1..65535")
        ports.add(port)
    return frozenset(ports)


def _parse_rule(raw: Any, where: str, seen_hosts: dict[str, str], seen_ids: set[str]) -> Rule:
    _expect(raw, dict, where, "a mapping")
    _check_keys(raw, {"id", "hosts", "ports", "intercept"}, where)
    rule_id = _expect(raw.get("id"), str, f"{where}.id", "a string")
    if (
        not rule_id
        or len(rule_id) > 64
        or not rule_id.replace("-", "").replace("_", "").replace(".", "").isalnum()
    ):
        raise ConfigError(f"{where}.id", "must be 1..64 characters of letters, digits, -_.")
    if rule_id in seen_ids:
        raise ConfigError(f"{where}.id", f"duplicate rule id {rule_id!r}")
    seen_ids.add(rule_id)
    hosts_raw = _expect(raw.get("hosts"), list, f"{where}.hosts", "a list of host patterns")
    if not hosts_raw:
        raise ConfigError(f"{where}.hosts", "must not be empty")
    hosts: list[HostPattern] = []
    for index, host in enumerate(hosts_raw):
        spot = f"{where}.hosts[{index}]"
        _expect(host, str, spot, "a string")
        try:
            pattern = HostPattern.parse(host)
        except ValueError as exc:
            raise ConfigError(spot, str(exc)) from None
        if pattern.pattern in seen_hosts:
            raise ConfigError(
                spot, f"{pattern.pattern!r} is already listed at {seen_hosts[pattern.pattern]}"
            )
        seen_hosts[pattern.pattern] = spot
        hosts.append(pattern)
    intercept = None
    if raw.get("intercept") is not None:
        from .intercept import parse_intercept_rule  # only policies that intercept need it

        intercept = parse_intercept_rule(raw["intercept"], rule_id, f"{where}.intercept")
    return Rule(rule_id, tuple(hosts), _parse_ports(raw.get("ports"), f"{where}.ports"), intercept)


def _parse_cidrs(raw: Any, where: str) -> CidrSet:
    if raw is None:
        return CidrSet()
    _expect(raw, list, where, "a list of CIDR strings")
    return CidrSet.parse(raw, where)


def parse_policy(name: str, raw: Any, where: str) -> Policy:
    _expect(raw, dict, where, "a mapping")
    _check_keys(raw, {"mode", "rules", "allow_cidrs", "block_cidrs"}, where)
    mode = raw.get("mode", ENFORCE)
    if mode not in (ENFORCE, MONITOR):
        raise ConfigError(f"{where}.mode", f'must be "{ENFORCE}" or "{MONITOR}"')
    rules_raw = raw.get("rules") or []
    _expect(rules_raw, list, f"{where}.rules", "a list of rules")
    seen_hosts: dict[str, str] = {}
    seen_ids: set[str] = set()
    rules = tuple(
        _parse_rule(rule, f"{where}.rules[{i}]", seen_hosts, seen_ids)
        for i, rule in enumerate(rules_raw)
    )
    return Policy(
        name,
        mode,
        rules,
        _parse_cidrs(raw.get("allow_cidrs"), f"{where}.allow_cidrs"),
        _parse_cidrs(raw.get("block_cidrs"), f"{where}.block_cidrs"),
    )


def parse_policy_document(raw: Any, source: str = "<memory>") -> PolicySet:
    _expect(raw, dict, "policy file", "a YAML mapping")
    _check_keys(raw, {"version", "policies"}, "")
    version = raw.get("version", 1)
    if type(version) is not int or version != 1:
        raise ConfigError("version", "only version 1 is supported")
    policies_raw = _expect(raw.get("policies"), dict, "policies", "a mapping of named policies")
    if not policies_raw:
        raise ConfigError("policies", "must define at least one policy")
    policies: dict[str, Policy] = {}
    for name, body in policies_raw.items():
        if not isinstance(name, str) or not name:
            raise ConfigError("policies", f"policy names must be strings, got {name!r}")
        policies[name] = parse_policy(name, body, f"policies.{name}")
    return PolicySet(policies, source)


def load_policy_file(path: Path) -> PolicySet:
    """Read and validate a policy file; ConfigError (naming the field) on any problem."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError("policy", f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_POLICY_FILE_BYTES:
        raise ConfigError("policy", f"{path} is larger than {MAX_POLICY_FILE_BYTES} bytes")
    try:
        raw = yaml.load(data, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKey as exc:
        raise ConfigError(
            "policy", f"{path}: duplicate key {exc.key!r} at line {exc.line}"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError("policy", f"{path} is not valid YAML{where}") from None
    return parse_policy_document(raw, str(path))


def policy_from_allow_list(
    entries: Sequence[str], allow_cidrs: Sequence[str] = (), name: str = "default"
) -> PolicySet:
    """A one-policy set from ``HOST:PORT`` shorthands (``--allow``); port may be ``*``.

    Entries for the same host merge into one rule listing every port given (``*`` wins), so
    ``--allow 127.0.0.1:18080 --allow 127.0.0.1:18443`` allows both ports.
    """
    rules: dict[str, dict[str, Any]] = {}
    for index, entry in enumerate(entries):
        host, sep, port = entry.strip().rpartition(":")
        if not sep or not host:
            raise ConfigError(f"allow[{index}]", f"{entry!r}: expected HOST:PORT (PORT may be *)")
        ports: Any = "*" if port == "*" else [int(port)] if port.isdigit() else None
        if ports is None:
            raise ConfigError(f"allow[{index}]", f"{entry!r}: invalid port")
        host = host.strip("[]")
        key = host.strip().lower().rstrip(".")
        rule = rules.get(key)
        if rule is None:
            rules[key] = {"id": f"allow-{index}", "hosts": [host], "ports": ports}
        elif rule["ports"] == "*" or ports == "*":
            rule["ports"] = "*"
        else:
            rule["ports"] = sorted({*rule["ports"], *ports})
    return parse_policy_document(
        {"policies": {name: {"rules": list(rules.values()), "allow_cidrs": list(allow_cidrs)}}},
        "--allow",
    )


class PolicyStore:
    """The policy in force, reloadable from its file; a bad file never replaces a good one."""

    def __init__(self, policies: PolicySet, path: Path | None = None) -> None:
        self._current = policies
        self.path = path
        self._seen = file_fingerprint(path) if path is not None else ""

    @classmethod
    def from_file(cls, path: Path) -> PolicyStore:
        return cls(load_policy_file(path), path)

    @property
    def current(self) -> PolicySet:
        return self._current

    def reload(self, check: Callable[[PolicySet], None] | None = None) -> ConfigError | None:
        """Re-read the file; on error (the file's, or a ConfigError of ``check``: what the
        server could not start with) keep the last good policy and return the error."""
        if self.path is None:
            return None
        self._seen = file_fingerprint(self.path)
        try:
            policies = load_policy_file(self.path)
            if check is not None:
                check(policies)
        except ConfigError as exc:
            return exc
        self._current = policies
        return None

    def changed(self) -> bool:
        """Whether the file's content differs from what was last loaded (or tried)."""
        return self.path is not None and file_fingerprint(self.path) != self._seen


def file_fingerprint(path: Path) -> str:
    """A digest of the file's content ("" if unreadable); follows Kubernetes' symlink swaps."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""
