"""Per-rule interception settings: which headers to rewrite, with which secret-templated values.

Pure: no I/O. The policy loader calls :func:`parse_intercept_rule` on the ``intercept:`` mapping of
a rule; everything that can be wrong with it is reported there, as a :class:`ConfigError` naming
the field, so a bad policy refuses to load instead of failing on the first request.

A template is text with ``{secret:NAME}`` placeholders; ``{{`` and ``}}`` stand for literal
braces, and any other brace is an error. ``NAME`` is a key of the secrets directory
(Kubernetes Secret key characters, not starting with a dot: dotfiles are never loaded).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from ...errors import ConfigError
from ...secret import Secret

# Header names we never let a rule set: framing, connection management and proxy headers.
# Rewriting any of them would let a policy (or a secret's content) change how the message is
# framed or routed, which is exactly what request smuggling needs.
RESERVED_HEADERS: Final = frozenset(
    {
        "host",
        "connection",
        "content-length",
        "transfer-encoding",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "expect",
        "http2-settings",
    }
)
RESERVED_PREFIXES: Final = ("proxy-",)

MAX_TEMPLATE_LENGTH: Final = 8192
MAX_SECRET_NAME_LENGTH: Final = 253
MAX_REWRITES: Final = 32

_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
SECRET_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\Z")
_TEMPLATE_PIECE_RE: Final = re.compile(r"\{\{|\}\}|\{secret:([^{}]*)\}|[{}]")
# Field content allowed in a header value (RFC 9110 field-vchar, SP, HTAB; no obs-text).
_FIELD_CHARS_RE: Final = re.compile(r"[\t\x20-\x7e]*\Z")


@dataclass(frozen=True)
class SecretRef:
    """A ``{secret:NAME}`` placeholder inside a template."""

    name: str


TemplatePart = str | SecretRef


class SecretUnusableError(Exception):
    """A secret's value cannot go into a header. Carries the secret's name, never its value."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"secret {name!r} {problem}")
        self.name = name
        self.problem = problem


def is_header_token(name: str) -> bool:
    return bool(_TOKEN_RE.match(name))


def is_reserved_header(name: str) -> bool:
    lowered = name.lower()
    return lowered in RESERVED_HEADERS or lowered.startswith(RESERVED_PREFIXES)


def is_secret_name(name: str) -> bool:
    return len(name) <= MAX_SECRET_NAME_LENGTH and bool(SECRET_NAME_RE.match(name))


def parse_template(template: str) -> tuple[TemplatePart, ...]:
    """Split ``template`` into literal text and secret references, or raise ValueError."""
    if len(template) > MAX_TEMPLATE_LENGTH:
        raise ValueError(f"is longer than {MAX_TEMPLATE_LENGTH} characters")
    if not template:
        raise ValueError("is empty")
    if template != template.strip(" \t"):
        raise ValueError("starts or ends with whitespace")
    parts: list[TemplatePart] = []
    literal: list[str] = []
    position = 0
    for match in _TEMPLATE_PIECE_RE.finditer(template):
        literal.append(template[position : match.start()])
        position = match.end()
        piece = match.group(0)
        if piece == "{{":
            literal.append("{")
        elif piece == "}}":
            literal.append("}")
        elif match.group(1) is not None:
            name = match.group(1)
            if not is_secret_name(name):
                raise ValueError(
                    f"placeholder at offset {match.start()} names an invalid secret {name!r} "
                    "(letters, digits, '-', '_', '.'; not starting with '.')"
                )
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(SecretRef(name))
        else:
            raise ValueError(
                f"stray {piece!r} at offset {match.start()}: placeholders are {{secret:NAME}}, "
                "and a literal brace is written {{ or }}"
            )
    literal.append(template[position:])
    text = "".join(literal)
    if text:
        parts.append(text)
    for part in parts:
        if isinstance(part, str) and not _FIELD_CHARS_RE.match(part):
            raise ValueError("contains characters not allowed in a header value")
    return tuple(parts)


def check_secret_value(name: str, value: str) -> None:
    """Raise SecretUnusableError unless ``value`` can be spliced into a header value."""
    if not value:
        raise SecretUnusableError(name, "is empty")
    if not _FIELD_CHARS_RE.match(value):
        raise SecretUnusableError(name, "contains characters not allowed in a header value")
    if value != value.strip(" \t"):
        raise SecretUnusableError(name, "starts or ends with whitespace")


@dataclass(frozen=True)
class HeaderRewrite:
    """Delete every value of ``header``, then add ``template`` rendered from the secret store.

    Construction validates both; a bad name or template raises ValueError.
    """

    header: str
    template: str
    parts: tuple[TemplatePart, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not is_header_token(self.header):
            raise ValueError(f"header name {self.header!r} is not a valid HTTP token")
        if is_reserved_header(self.header):
            raise ValueError(f"header {self.header!r} is reserved and cannot be rewritten")
        try:
            parts = parse_template(self.template)
        except ValueError as exc:
            raise ValueError(f"value template {exc}") from None
        object.__setattr__(self, "parts", parts)

    @property
    def name(self) -> bytes:
        """The header name as h11 reports it: lower-case bytes."""
        return self.header.lower().encode("ascii")

    def secret_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.name for p in self.parts if isinstance(p, SecretRef)))

    def render(self, lookup: Callable[[str], Secret]) -> Secret:
        """The header value, still wrapped. ``lookup`` raises for a missing secret."""
        pieces: list[str] = []
        for part in self.parts:
            if isinstance(part, SecretRef):
                value = lookup(part.name).reveal()
                check_secret_value(part.name, value)
                pieces.append(value)
            else:
                pieces.append(part)
        return Secret("".join(pieces))


@dataclass(frozen=True)
class InterceptRule:
    """What interception does for the hosts of one policy rule."""

    rule_id: str
    rewrites: tuple[HeaderRewrite, ...] = ()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for rewrite in self.rewrites:
            lowered = rewrite.header.lower()
            if lowered in seen:
                raise ValueError(f"header {rewrite.header!r} is rewritten twice")
            seen.add(lowered)

    def secret_names(self) -> frozenset[str]:
        """Every secret the rule's templates reference (what readiness waits for)."""
        return frozenset(name for r in self.rewrites for name in r.secret_names())


_RULE_KEYS: Final = frozenset({"inject"})
_INJECT_KEYS: Final = frozenset({"header", "value"})


def _check_keys(raw: Mapping[object, object], allowed: frozenset[str], field_name: str) -> None:
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise ConfigError(
            field_name,
            f"unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}",
        )


def parse_intercept_rule(raw: object, rule_id: str, field: str) -> InterceptRule:
    """Validate a rule's ``intercept:`` mapping, e.g.
    ``{"inject": [{"header": "Authorization", "value": "Bearer {secret:github-token}"}]}``.

    ``field`` is the path of that mapping in the policy (``rules[3].intercept``); errors name
    the exact sub-field.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(field, "must be a mapping, e.g. {inject: [{header: ..., value: ...}]}")
    _check_keys(raw, _RULE_KEYS, field)
    inject = raw.get("inject", [])
    if inject is None:
        inject = []
    if not isinstance(inject, list | tuple):
        raise ConfigError(f"{field}.inject", "must be a list of {header, value} mappings")
    if len(inject) > MAX_REWRITES:
        raise ConfigError(f"{field}.inject", f"at most {MAX_REWRITES} rewrites per rule")
    rewrites: list[HeaderRewrite] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(inject):
        where = f"{field}.inject[{index}]"
        if not isinstance(item, Mapping):
            raise ConfigError(where, "must be a mapping with 'header' and 'value'")
        _check_keys(item, _INJECT_KEYS, where)
        header, value = item.get("header"), item.get("value")
        if not isinstance(header, str) or not header:
            raise ConfigError(f"{where}.header", "is required and must be a string")
        if not isinstance(value, str):
            raise ConfigError(f"{where}.value", "is required and must be a string")
        if not is_header_token(header):
            raise ConfigError(f"{where}.header", f"{header!r} is not a valid HTTP header name")
        if is_reserved_header(header):
            raise ConfigError(
                f"{where}.header",
                f"{header!r} is reserved (framing, connection or proxy header) "
                "and cannot be rewritten",
            )
        if header.lower() in seen:
            raise ConfigError(
                f"{where}.header",
                f"{header!r} is already rewritten by {field}.inject[{seen[header.lower()]}]",
            )
        seen[header.lower()] = index
        try:
            parse_template(value)
        except ValueError as exc:
            raise ConfigError(f"{where}.value", f"template {exc}") from None
        rewrites.append(HeaderRewrite(header, value))
    return InterceptRule(rule_id=rule_id, rewrites=tuple(rewrites))
