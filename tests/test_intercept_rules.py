"""parse_intercept_rule and templates: every bad policy refused at load, naming the field."""

from __future__ import annotations

import pytest

from upstreamproxy.egress.intercept import HeaderRewrite, MissingSecretError, parse_intercept_rule
from upstreamproxy.egress.intercept.rules import SecretRef, SecretUnusableError, parse_template
from upstreamproxy.errors import ConfigError
from upstreamproxy.secret import Secret

FIELD = "rules[2].intercept"


def parse(raw: object):  # type: ignore[no-untyped-def]
    return parse_intercept_rule(raw, "r1", FIELD)


def test_valid_rule_and_secret_names() -> None:
    rule = parse(
        {
            "inject": [
                {"header": "Authorization", "value": "Bearer {secret:github-token}"},
                {
                    "header": "X-Pair",
                    "value": "{secret:user}:{secret:pass} {{literal}} {secret:user}",
                },
            ]
        }
    )
    assert rule.rule_id == "r1"
    assert [r.header for r in rule.rewrites] == ["Authorization", "X-Pair"]
    assert rule.secret_names() == {"github-token", "user", "pass"}
    assert rule.rewrites[1].secret_names() == ("user", "pass")


@pytest.mark.parametrize("raw", [None, {}, {"inject": []}, {"inject": None}])
def test_interception_without_injection(raw: object) -> None:
    assert parse(raw).rewrites == ()


def test_render_fills_placeholders() -> None:
    rewrite = HeaderRewrite("X-Pair", "{secret:a}:{secret:b} {{x}}")
    values = {"a": Secret("u"), "b": Secret("p")}
    rendered = rewrite.render(values.__getitem__)
    assert isinstance(rendered, Secret) and rendered.reveal() == "u:p {x}"
    assert "u:p" not in repr(rendered) and "u:p" not in f"{rendered}"


def test_template_parts() -> None:
    assert parse_template("Bearer {secret:t}") == ("Bearer ", SecretRef("t"))
    assert parse_template("{{}}") == ("{}",)


@pytest.mark.parametrize("value", ["", "x\n", "\x00", "é", " lead", "trail\t"])
def test_unusable_secret_values_are_refused_at_render(value: str) -> None:
    rewrite = HeaderRewrite("X-Key", "k={secret:s}")
    with pytest.raises(SecretUnusableError) as info:
        rewrite.render(lambda name: Secret(value))
    assert info.value.name == "s"
    if value:
        assert value not in str(info.value)


def test_missing_secret_propagates() -> None:
    def lookup(name: str) -> Secret:
        raise MissingSecretError(name)

    with pytest.raises(MissingSecretError, match="'gone'"):
        HeaderRewrite("X-Key", "{secret:gone}").render(lookup)


@pytest.mark.parametrize(
    "header",
    [
        "Host",
        "host",
        "Connection",
        "Content-Length",
        "Transfer-Encoding",
        "Keep-Alive",
        "Upgrade",
        "TE",
        "Trailer",
        "Expect",
        "Proxy-Authorization",
        "proxy-connection",
        "Proxy-Anything",
    ],
)
def test_reserved_headers_are_refused(header: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse({"inject": [{"header": "X-Ok", "value": "1"}, {"header": header, "value": "v"}]})
    assert info.value.field == f"{FIELD}.inject[1].header"
    assert "reserved" in info.value.problem


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        ([], FIELD, "mapping"),
        ("inject", FIELD, "mapping"),
        ({"inject": [], "extra": 1}, FIELD, "unknown key(s) extra"),
        ({"inject": {"header": "a"}}, f"{FIELD}.inject", "list"),
        ({"inject": ["x"]}, f"{FIELD}.inject[0]", "mapping"),
        ({"inject": [{"header": "A", "value": "v", "x": 1}]}, f"{FIELD}.inject[0]", "unknown"),
        ({"inject": [{"value": "v"}]}, f"{FIELD}.inject[0].header", "required"),
        ({"inject": [{"header": "A"}]}, f"{FIELD}.inject[0].value", "required"),
        ({"inject": [{"header": "A", "value": 3}]}, f"{FIELD}.inject[0].value", "string"),
        ({"inject": [{"header": "Bad Name", "value": "v"}]}, f"{FIELD}.inject[0].header", "valid"),
        ({"inject": [{"header": "X:Y", "value": "v"}]}, f"{FIELD}.inject[0].header", "valid"),
        ({"inject": [{"header": "A\r\nB", "value": "v"}]}, f"{FIELD}.inject[0].header", "valid"),
        (
            {"inject": [{"header": "A", "value": "x"}, {"header": "a", "value": "y"}]},
            f"{FIELD}.inject[1].header",
            "already rewritten",
        ),
        (
            {"inject": [{"header": "A", "value": "{secret:}"}]},
            f"{FIELD}.inject[0].value",
            "invalid secret",
        ),
        (
            {"inject": [{"header": "A", "value": "{secret:.hidden}"}]},
            f"{FIELD}.inject[0].value",
            "invalid secret",
        ),
        (
            {"inject": [{"header": "A", "value": "{secret:a/b}"}]},
            f"{FIELD}.inject[0].value",
            "invalid secret",
        ),
        ({"inject": [{"header": "A", "value": "{env:HOME}"}]}, f"{FIELD}.inject[0].value", "stray"),
        (
            {"inject": [{"header": "A", "value": "Bearer {secret:x"}]},
            f"{FIELD}.inject[0].value",
            "stray",
        ),
        ({"inject": [{"header": "A", "value": "a}b"}]}, f"{FIELD}.inject[0].value", "stray"),
        (
            {"inject": [{"header": "A", "value": "x\r\nEvil: 1"}]},
            f"{FIELD}.inject[0].value",
            "not allowed",
        ),
        ({"inject": [{"header": "A", "value": ""}]}, f"{FIELD}.inject[0].value", "empty"),
        ({"inject": [{"header": "A", "value": " x"}]}, f"{FIELD}.inject[0].value", "whitespace"),
        ({"inject": [{"header": "A", "value": "x" * 9000}]}, f"{FIELD}.inject[0].value", "longer"),
        (
            {"inject": [{"header": f"X-{i}", "value": "v"} for i in range(33)]},
            f"{FIELD}.inject",
            "at most",
        ),
    ],
)
def test_bad_rules_name_the_field(raw: object, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(raw)
    assert info.value.field == field
    assert words in info.value.problem


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ValueError, match="reserved"):
        HeaderRewrite("Content-Length", "1")
    with pytest.raises(ValueError, match="template"):
        HeaderRewrite("X-A", "{secret:}")
