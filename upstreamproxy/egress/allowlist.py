"""A simple ``host:port`` allowlist (the spine's policy; signed-session policies replace it).

Rules are ``host:port`` where host is exact or ``*.suffix`` and port is a number or ``*``.
Default deny: anything no rule names is refused with a machine-readable reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..connect_head import Target
from ..errors import ConfigError


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule: str = "-"


@dataclass(frozen=True)
class AllowRule:
    host: str
    port: int | None  # None: any port

    @classmethod
    def parse(cls, text: str) -> AllowRule:
        raw = text.strip()
        host, sep, port = raw.rpartition(":")
        if not sep or not host:
            raise ConfigError("allow", f"{text!r}: expected HOST:PORT (PORT may be *)")
        host = host.strip("[]").lower().rstrip(".")
        if port == "*":
            return cls(host, None)
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError("allow", f"{text!r}: invalid port")
        return cls(host, int(port))

    def matches(self, target: Target) -> bool:
        host = target.host.lower().rstrip(".")
        if self.port is not None and self.port != target.port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host

    def __str__(self) -> str:
        return f"{self.host}:{'*' if self.port is None else self.port}"


class AllowList:
    def __init__(self, rules: Iterable[str]) -> None:
        self.rules = [AllowRule.parse(rule) for rule in rules]

    def decide(self, target: Target) -> Decision:
        for rule in self.rules:
            if rule.matches(target):
                return Decision(True, "allowed", str(rule))
        return Decision(False, "no-matching-rule")
