"""The pure header policy: hop-by-hop stripping, Host/target checks, rewrites, framing."""

from __future__ import annotations

import h11
import pytest

from upstreamproxy.egress.intercept import MissingSecretError, Refusal, parse_intercept_rule
from upstreamproxy.egress.intercept.headers import (
    audit_path,
    check_request_head,
    parse_host_header,
    prepare_request,
    prepare_response_headers,
    strip_hop_by_hop,
)
from upstreamproxy.secret import Secret

HOST = "api.example.test"
RULE = parse_intercept_rule(
    {"inject": [{"header": "Authorization", "value": "Bearer {secret:tok}"}]}, "r", "f"
)
SECRETS = {"tok": Secret("VALUE")}


def lookup(name: str) -> Secret:
    try:
        return SECRETS[name]
    except KeyError:
        raise MissingSecretError(name) from None


def request(
    method: str = "GET",
    target: str = "/",
    headers: list[tuple[str, str]] | None = None,
    host: str | None = HOST,
) -> h11.Request:
    base = [("Host", host)] if host is not None else []
    return h11.Request(
        method=method,
        target=target,
        headers=base + (headers or []),
        http_version="1.1" if host is not None else "1.0",
    )


def test_strip_hop_by_hop_and_connection_listed() -> None:
    headers = [
        (b"connection", b"close, X-A ,x-b"),
        (b"x-a", b"1"),
        (b"x-b", b"2"),
        (b"keep-alive", b"5"),
        (b"te", b"trailers"),
        (b"x-c", b"3"),
        (b"host", b"h"),
        (b"proxy-authorization", b"Basic x"),
        (b"upgrade", b"h2c"),
    ]
    assert strip_hop_by_hop(headers) == [(b"x-c", b"3"), (b"host", b"h")]
    # Host survives even when listed in Connection
    assert strip_hop_by_hop([(b"connection", b"host"), (b"host", b"h")]) == [(b"host", b"h")]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"Example.com", ("example.com", None)),
        (b"example.com:8443", ("example.com", 8443)),
        (b"[::1]:443", ("::1", 443)),
        (b"[::1]", ("::1", None)),
        (b"10.0.0.1:1", ("10.0.0.1", 1)),
    ],
)
def test_parse_host_header(value: bytes, expected: tuple[str, int | None]) -> None:
    assert parse_host_header(value) == expected


@pytest.mark.parametrize("value", [b"", b"a:b", b"a:99999", b"a:1:2", b"::1", b"a b", b"[x]:1"])
def test_parse_host_header_rejects(value: bytes) -> None:
    with pytest.raises(ValueError):
        parse_host_header(value)


@pytest.mark.parametrize(
    ("req", "status", "reason"),
    [
        (request(host="other.test"), 400, "host-mismatch"),
        (request(host=f"{HOST}:444"), 400, "host-mismatch"),
        (request(host=None), 400, "host-missing"),
        (request(host="bad host"), 400, "host-invalid"),
        (request(target=f"https://{HOST}/"), 400, "absolute-form-refused"),
        (request(target="*"), 400, "bad-request-target"),
        (request(target="example.com:443"), 400, "absolute-form-refused"),
        (request(method="CONNECT", target=f"{HOST}:443"), 501, "connect-not-supported"),
        (request(headers=[("Upgrade", "websocket")]), 501, "upgrade-not-supported"),
        (request(headers=[("Connection", "Upgrade")]), 501, "upgrade-not-supported"),
        (
            request(
                method="POST", headers=[("Content-Length", "3"), ("Transfer-Encoding", "chunked")]
            ),
            400,
            "conflicting-framing",
        ),
    ],
)
def test_check_request_head_refusals(req: h11.Request, status: int, reason: str) -> None:
    with pytest.raises(Refusal) as info:
        check_request_head(req, HOST, 443)
    assert (info.value.status, info.value.reason) == (status, reason)


@pytest.mark.parametrize(
    "req",
    [
        request(),
        request(host=f"{HOST.upper()}:443"),
        request(host=f"{HOST}."),
        request(method="OPTIONS", target="*"),
        request(target="/a?b=c#d"),
    ],
)
def test_check_request_head_accepts(req: h11.Request) -> None:
    check_request_head(req, HOST, 443)


def test_prepare_request_rewrites_and_reframes() -> None:
    req = request(
        method="POST",
        headers=[
            ("Authorization", "client"),
            ("AUTHORIZATION", "client2"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "x-hop"),
            ("X-Hop", "1"),
            ("X-Keep", "2"),
        ],
    )
    prepared = prepare_request(req, RULE, lookup)
    assert prepared.headers == [
        (b"host", HOST.encode()),
        (b"x-keep", b"2"),
        (b"transfer-encoding", b"chunked"),
        (b"Authorization", b"Bearer VALUE"),
    ]
    assert prepared.has_body and prepared.injected == ("tok",)
    assert prepared.rewritten == ("Authorization",)
    assert "VALUE" not in repr(prepared)


def test_prepare_request_content_length_framing() -> None:
    prepared = prepare_request(
        request(method="PUT", headers=[("Content-Length", "5")]), RULE, lookup
    )
    assert (b"content-length", b"5") in prepared.headers and prepared.has_body
    prepared = prepare_request(request(method="POST"), RULE, lookup)
    assert (b"content-length", b"0") in prepared.headers and not prepared.has_body
    prepared = prepare_request(request(), RULE, lookup)
    assert not any(n == b"content-length" for n, _ in prepared.headers)


def test_prepare_request_missing_and_unusable_secrets() -> None:
    rule = parse_intercept_rule({"inject": [{"header": "X", "value": "{secret:gone}"}]}, "r", "f")
    with pytest.raises(Refusal) as info:
        prepare_request(request(), rule, lookup)
    assert (info.value.status, info.value.reason) == (502, "secret-missing")
    assert "gone" in info.value.detail
    SECRETS["bad"] = Secret("line\r\nInjected: yes")
    rule = parse_intercept_rule({"inject": [{"header": "X", "value": "{secret:bad}"}]}, "r", "f")
    with pytest.raises(Refusal) as info:
        prepare_request(request(), rule, lookup)
    assert info.value.reason == "secret-unusable" and "Injected" not in str(info.value)


def test_prepare_response_headers() -> None:
    headers = [
        (b"content-length", b"3"),
        (b"transfer-encoding", b"chunked"),
        (b"connection", b"x-a"),
        (b"x-a", b"1"),
        (b"proxy-authenticate", b"Basic"),
        (b"x-b", b"2"),
    ]
    assert prepare_response_headers(headers) == [(b"x-b", b"2")]
    assert prepare_response_headers([(b"content-length", b"3")]) == [(b"content-length", b"3")]


def test_audit_path_drops_the_query() -> None:
    assert audit_path(b"/a/b?token=xyz") == "/a/b"
    assert audit_path(b"*") == "*"
