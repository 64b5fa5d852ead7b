"""Signed session tokens: issue, verify, every refusal, key files and the ``token`` CLI."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from full_disk import needs_unshare, run_on_full_disk
from hypothesis import given, settings
from hypothesis import strategies as st

from upstreamproxy import tokens
from upstreamproxy.cli import main
from upstreamproxy.errors import AuthError, ConfigError
from upstreamproxy.secret import Secret
from upstreamproxy.tokens import (
    MAX_TOKEN_LENGTH,
    REFUSAL_REASONS,
    SessionClaims,
    TokenVerifier,
    issue_token,
    key_fingerprint,
    kid_from_path,
    load_private_key,
    load_public_keys,
)

NOW = 1_700_000_000
AUD = "egress.example"
KEY_A = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KEY_B = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make(key: Ed25519PrivateKey = KEY_A, kid: str = "a", **overrides: object) -> str:
    args: dict[str, object] = {
        "session_id": "sess-1",
        "policy": "default",
        "audience": AUD,
        "ttl_seconds": 300,
        "now": NOW,
    }
    args.update(overrides)
    return issue_token(key, kid, **args)  # type: ignore[arg-type]


def signed(claims: dict[str, object], key: Ed25519PrivateKey = KEY_A) -> str:
    """A token over arbitrary claims, correctly signed (to test claim validation)."""
    segment = b64(json.dumps(claims).encode())
    return f"v1.{segment}.{b64(key.sign(f'v1.{segment}'.encode()))}"


def good_claims(**overrides: object) -> dict[str, object]:
    claims: dict[str, object] = {
        "sid": "sess-1",
        "policy": "default",
        "aud": AUD,
        "kid": "a",
        "iat": NOW,
        "exp": NOW + 300,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier({"a": KEY_A.public_key(), "b": KEY_B.public_key()}, AUD)


def refusal(verifier: TokenVerifier, token: str, now: float = NOW) -> str:
    with pytest.raises(AuthError) as info:
        verifier.verify(token, now)
    assert info.value.reason in REFUSAL_REASONS
    return info.value.reason


# --- happy path ------------------------------------------------------------------------------


def test_issue_and_verify(verifier: TokenVerifier) -> None:
    token = make()
    assert token.startswith("v1.")
    assert token.count(".") == 2
    assert all(c.isalnum() or c in "._-" for c in token)
    claims = verifier.verify(token, NOW + 10)
    assert claims == SessionClaims(
        session_id="sess-1",
        policy="default",
        audience=AUD,
        key_id="a",
        issued_at=NOW,
        expires_at=NOW + 300,
        not_before=None,
    )
    assert claims.as_dict()["session_id"] == "sess-1"


def test_claims_wire_format() -> None:
    token = make(not_before=NOW + 5)
    body = json.loads(unb64(token.split(".")[1]))
    assert body == {
        "sid": "sess-1",
        "policy": "default",
        "aud": AUD,
        "kid": "a",
        "iat": NOW,
        "exp": NOW + 300,
        "nbf": NOW + 5,
    }


def test_verify_accepts_a_secret(verifier: TokenVerifier) -> None:
    assert verifier.verify(Secret(make()), NOW).session_id == "sess-1"


def test_issue_is_deterministic_for_the_same_inputs() -> None:
    assert make() == make()  # Ed25519 signatures are deterministic


def test_fractional_now_is_rounded_down(verifier: TokenVerifier) -> None:
    claims = verifier.verify(make(now=NOW + 0.9), NOW)
    assert claims.issued_at == NOW


# --- time ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "outcome"),
    [
        (NOW - 31, "not-yet-valid"),  # iat in the future beyond leeway
        (NOW - 30, None),
        (NOW, None),
        (NOW + 299, None),
        (NOW + 300, None),  # within leeway after exp
        (NOW + 329, None),
        (NOW + 330, "expired"),
        (NOW + 10_000, "expired"),
    ],
)
def test_time_window_with_default_leeway(
    verifier: TokenVerifier, now: int, outcome: str | None
) -> None:
    token = make()
    if outcome is None:
        verifier.verify(token, now)
    else:
        assert refusal(verifier, token, now) == outcome


def test_zero_leeway() -> None:
    strict = TokenVerifier({"a": KEY_A.public_key()}, AUD, leeway_seconds=0)
    token = make()
    strict.verify(token, NOW + 299)
    assert refusal(strict, token, NOW + 300) == "expired"
    assert refusal(strict, token, NOW - 1) == "not-yet-valid"


def test_not_before(verifier: TokenVerifier) -> None:
    token = make(not_before=NOW + 100)
    assert refusal(verifier, token, NOW) == "not-yet-valid"
    assert refusal(verifier, token, NOW + 69) == "not-yet-valid"
    assert verifier.verify(token, NOW + 70).not_before == NOW + 100


# --- refusals --------------------------------------------------------------------------------


def test_unknown_key(verifier: TokenVerifier) -> None:
    other = Ed25519PrivateKey.generate()
    assert refusal(verifier, make(other, kid="c")) == "unknown-key"


def test_signed_by_the_wrong_key(verifier: TokenVerifier) -> None:
    # claims name kid "a" but KEY_B signed them
    assert refusal(verifier, make(KEY_B, kid="a")) == "bad-signature"


def test_wrong_audience(verifier: TokenVerifier) -> None:
    assert refusal(verifier, make(audience="other.example")) == "wrong-audience"


def test_tampered_claims(verifier: TokenVerifier) -> None:
    version, segment, signature = make().split(".")
    body = json.loads(unb64(segment))
    for field, value in [("sid", "sess-2"), ("policy", "admin"), ("exp", NOW + 10**6)]:
        changed = dict(body, **{field: value})
        token = f"{version}.{b64(json.dumps(changed).encode())}.{signature}"
        assert refusal(verifier, token) == "bad-signature", field


def test_tampered_kid_selects_another_key(verifier: TokenVerifier) -> None:
    version, segment, signature = make().split(".")
    changed = dict(json.loads(unb64(segment)), kid="b")
    token = f"{version}.{b64(json.dumps(changed).encode())}.{signature}"
    assert refusal(verifier, token) == "bad-signature"


def test_tampered_signature(verifier: TokenVerifier) -> None:
    version, segment, signature = make().split(".")
    raw = bytearray(unb64(signature))
    for index in (0, 31, 63):
        flipped = bytearray(raw)
        flipped[index] ^= 0x01
        token = f"{version}.{segment}.{b64(bytes(flipped))}"
        assert refusal(verifier, token) == "bad-signature"


def test_signature_of_wrong_length(verifier: TokenVerifier) -> None:
    version, segment, signature = make().split(".")
    raw = unb64(signature)
    assert refusal(verifier, f"{version}.{segment}.{b64(raw[:-1])}") == "bad-signature"
    assert refusal(verifier, f"{version}.{segment}.{b64(raw + b'x')}") == "bad-signature"


def test_version_is_signed(verifier: TokenVerifier) -> None:
    _, segment, signature = make().split(".")
    assert refusal(verifier, f"v2.{segment}.{signature}") == "malformed"


def test_truncated_tokens(verifier: TokenVerifier) -> None:
    token = make()
    reasons = {refusal(verifier, token[:cut]) for cut in range(len(token))}
    assert reasons <= {"malformed", "unsigned", "bad-signature"}
    assert "bad-signature" in reasons


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "malformed"),
        ("v1", "malformed"),
        ("v1.", "unsigned"),
        ("v1..", "unsigned"),
        ("v1.e30", "unsigned"),
        ("v1.e30.", "unsigned"),
        # a JWT with alg "none"
        ("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ4In0.", "unsigned"),
        ("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0", "unsigned"),
        ("v1.e30.AAAA.AAAA", "malformed"),
        ("v1.!!!.AAAA", "malformed"),
        ("v1.e30=.AAAA", "malformed"),  # padding is not part of the format
        ("v1.e31.AAAA", "malformed"),  # non-canonical base64 (stray bits)
        ("v1.e30.A", "malformed"),  # impossible base64 length
        ("v1.e30.AAAA", "malformed"),  # "{}" has no claims
        ("v1.bnVsbA.AAAA", "malformed"),  # "null"
        ("v1.W10.AAAA", "malformed"),  # "[]"
        ("v1.__8.AAAA", "malformed"),  # invalid UTF-8
        ("v1.e30.AAAA\u00e9", "malformed"),  # non-ASCII
        ("v1 .e30.AAAA", "malformed"),
        ("garbage", "malformed"),
        ("Bearer v1.e30.AAAA", "malformed"),
    ],
)
def test_garbage(verifier: TokenVerifier, token: str, reason: str) -> None:
    assert refusal(verifier, token) == reason


def test_oversized(verifier: TokenVerifier) -> None:
    assert refusal(verifier, "v1." + "A" * MAX_TOKEN_LENGTH) == "too-large"
    assert refusal(verifier, "x" * 10_000_000) == "too-large"
    assert refusal(verifier, make() + "A" * MAX_TOKEN_LENGTH) == "too-large"


def test_oversized_is_checked_before_parsing(verifier: TokenVerifier) -> None:
    # deeply nested JSON would otherwise be parsed
    assert refusal(verifier, "v1." + b64(b"[" * 4000) + ".AAAA") == "too-large"


def test_deep_json_below_the_cap_is_malformed(verifier: TokenVerifier) -> None:
    assert refusal(verifier, "v1." + b64(b"[" * 2500) + ".AAAA") == "malformed"


@pytest.mark.parametrize(
    "claims",
    [
        good_claims(sid=None),
        good_claims(sid=""),
        good_claims(sid="a:b"),  # would break Basic auth
        good_claims(sid=123),
        good_claims(policy=None),
        good_claims(policy="has space"),
        good_claims(aud=None),
        good_claims(aud=["egress.example"]),
        good_claims(kid=None),
        good_claims(kid="../etc/passwd"),
        good_claims(iat=None),
        good_claims(iat="1700000000"),
        good_claims(iat=True),
        good_claims(iat=float(NOW)),
        good_claims(iat=-1),
        good_claims(exp=None),
        good_claims(exp=NOW),  # not after iat
        good_claims(exp=NOW - 1),
        good_claims(exp=10**30),
        good_claims(nbf="soon"),
    ],
)
def test_invalid_claims_are_malformed(verifier: TokenVerifier, claims: dict[str, object]) -> None:
    assert refusal(verifier, signed(claims)) == "malformed"


def test_duplicate_claims_are_malformed(verifier: TokenVerifier) -> None:
    raw = json.dumps(good_claims())[:-1] + ', "sid": "other"}'
    segment = b64(raw.encode())
    token = f"v1.{segment}.{b64(KEY_A.sign(f'v1.{segment}'.encode()))}"
    assert refusal(verifier, token) == "malformed"


def test_unknown_claims_are_ignored(verifier: TokenVerifier) -> None:
    claims = verifier.verify(signed(good_claims(extra="x", alg="none")), NOW)
    assert claims.session_id == "sess-1"


# --- rotation --------------------------------------------------------------------------------


def test_key_rotation() -> None:
    old_only = TokenVerifier({"old": KEY_A.public_key()}, AUD)
    both = TokenVerifier({"old": KEY_A.public_key(), "new": KEY_B.public_key()}, AUD)
    new_only = TokenVerifier({"new": KEY_B.public_key()}, AUD)
    old_token = make(KEY_A, kid="old")
    new_token = make(KEY_B, kid="new")
    assert old_only.verify(old_token, NOW).key_id == "old"
    assert refusal(old_only, new_token) == "unknown-key"
    assert both.verify(old_token, NOW).key_id == "old"
    assert both.verify(new_token, NOW).key_id == "new"
    assert refusal(new_only, old_token) == "unknown-key"
    assert new_only.verify(new_token, NOW).key_id == "new"


# --- secrecy ---------------------------------------------------------------------------------


def test_refusals_never_carry_the_token(verifier: TokenVerifier) -> None:
    secret_part = "SECRETSECRETSECRET"
    good = make()
    cases = [
        good[:-4] + "AAAA",
        good + "." + secret_part,
        "v1." + secret_part + "." + secret_part,
        secret_part,
        good.replace("v1.", "v1." + secret_part),
        "v1." + b64(secret_part.encode()) + "." + b64(b"x" * 64),
    ]
    for token in cases:
        with pytest.raises(AuthError) as info:
            verifier.verify(token, NOW)
        text = "".join(traceback.format_exception(info.value))
        for needle in (token, secret_part, token.split(".")[-1]):
            assert needle not in text
            assert needle not in repr(info.value)
        assert info.value.__cause__ is None
        assert info.value.__context__ is None


def test_reprs_hold_no_token(verifier: TokenVerifier) -> None:
    token = make()
    claims = verifier.verify(token, NOW)
    for text in (repr(claims), str(claims), repr(verifier)):
        assert token not in text
        assert token.split(".")[2] not in text
    assert "key_ids=['a', 'b']" in repr(verifier)


# --- issuing refusals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"session_id": ""},
        {"session_id": "a:b"},
        {"session_id": "x" * 129},
        {"policy": ""},
        {"policy": "a/b"},
        {"audience": ""},
        {"audience": "has space"},
        {"ttl_seconds": 0},
        {"ttl_seconds": -5},
        {"ttl_seconds": True},
        {"ttl_seconds": 1.5},
        {"kid": ""},
        {"kid": "a/b"},
        {"not_before": -1},
    ],
)
def test_issue_refuses_bad_arguments(overrides: dict[str, object]) -> None:
    kid = str(overrides.pop("kid", "a"))
    with pytest.raises(ValueError):
        make(KEY_A, kid, **overrides)


@pytest.mark.parametrize(
    ("keys", "audience", "leeway", "field"),
    [
        ({}, AUD, 30, "public_keys"),
        ({"bad kid": KEY_A.public_key()}, AUD, 30, "public_keys"),
        ({"a": KEY_A}, AUD, 30, "public_keys"),  # a private key
        ({"a": KEY_A.public_key()}, "", 30, "audience"),
        ({"a": KEY_A.public_key()}, AUD, -1, "leeway_seconds"),
        ({"a": KEY_A.public_key()}, AUD, 86_400, "leeway_seconds"),
    ],
)
def test_verifier_configuration_errors(
    keys: dict[str, object], audience: str, leeway: int, field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        TokenVerifier(keys, audience, leeway)  # type: ignore[arg-type]
    assert info.value.field == field


# --- key files -------------------------------------------------------------------------------


def write_pair(directory: Path, kid: str, key: Ed25519PrivateKey) -> None:
    (directory / f"{kid}.private.pem").write_bytes(tokens.private_key_pem(key))
    (directory / f"{kid}.public.pem").write_bytes(tokens.public_key_pem(key.public_key()))


def test_load_public_keys_from_a_directory(tmp_path: Path) -> None:
    write_pair(tmp_path, "k1", KEY_A)
    (tmp_path / "k2.pem").write_bytes(tokens.public_key_pem(KEY_B.public_key()))
    (tmp_path / ".hidden.pem").write_bytes(b"junk")
    (tmp_path / "README").write_text("not a key")
    (tmp_path / "sub.pem").mkdir()
    keys = load_public_keys(tmp_path)
    assert sorted(keys) == ["k1", "k2"]
    verifier = TokenVerifier(keys, AUD)
    assert verifier.verify(make(KEY_B, kid="k2"), NOW).key_id == "k2"


def test_load_public_keys_from_files(tmp_path: Path) -> None:
    write_pair(tmp_path, "k1", KEY_A)
    (tmp_path / "other").mkdir()
    write_pair(tmp_path / "other", "k2", KEY_B)
    keys = load_public_keys([tmp_path / "k1.public.pem", str(tmp_path / "other")])
    assert sorted(keys) == ["k1", "k2"]


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({}, "no public keys found"),
        ({"k.pem": b"not a key"}, "not a PEM Ed25519 public key"),
        ({"k.pem": tokens.private_key_pem(KEY_A)}, "holds a private key"),
        (
            {
                "k.pem": tokens.public_key_pem(KEY_A.public_key()),
                "k.public.pem": tokens.public_key_pem(KEY_B.public_key()),
            },
            "already loaded",
        ),
        ({"bad kid!.pem": tokens.public_key_pem(KEY_A.public_key())}, "key ids are"),
        (
            {
                f"{key_fingerprint(KEY_A.public_key())}.pem": tokens.public_key_pem(
                    KEY_B.public_key()
                )
            },
            "another key's fingerprint",
        ),
    ],
)
def test_load_public_keys_errors(tmp_path: Path, files: dict[str, bytes], problem: str) -> None:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(ConfigError, match=problem):
        load_public_keys(tmp_path)


def test_load_public_keys_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_public_keys(tmp_path / "absent")


def test_load_public_key_rejects_other_key_types(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "ec.pem").write_bytes(pem)
    with pytest.raises(ConfigError, match="Ed25519"):
        load_public_keys(tmp_path)


def test_load_private_key(tmp_path: Path) -> None:
    path = tmp_path / "k.private.pem"
    path.write_bytes(tokens.private_key_pem(KEY_A))
    loaded = load_private_key(path)
    assert key_fingerprint(loaded.public_key()) == key_fingerprint(KEY_A.public_key())
    path.write_bytes(tokens.public_key_pem(KEY_A.public_key()))
    with pytest.raises(ConfigError, match="private key"):
        load_private_key(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_private_key(tmp_path / "absent.pem")


@pytest.mark.parametrize(
    ("name", "kid"),
    [
        ("k1.public.pem", "k1"),
        ("k1.private.pem", "k1"),
        ("k1.pem", "k1"),
        ("ed25519-0123456789abcdef.public.pem", "ed25519-0123456789abcdef"),
        ("2026-01.pem", "2026-01"),
    ],
)
def test_kid_from_path(name: str, kid: str) -> None:
    assert kid_from_path(Path("/keys") / name) == kid


@pytest.mark.parametrize("name", ["k1.key", ".pem", "bad kid.pem"])
def test_kid_from_path_refuses(name: str) -> None:
    with pytest.raises(ConfigError):
        kid_from_path(name)


def test_fingerprint_is_stable() -> None:
    fingerprint = key_fingerprint(KEY_A.public_key())
    assert fingerprint == key_fingerprint(KEY_A.public_key())
    assert fingerprint != key_fingerprint(KEY_B.public_key())
    assert fingerprint.startswith("ed25519-")
    assert len(fingerprint) == len("ed25519-") + 16


# --- properties ------------------------------------------------------------------------------

_verifier = TokenVerifier({"a": KEY_A.public_key()}, AUD)
_token_alphabet = st.sampled_from('v1.AaZz09-_=+/ {}"e3\x00\u00e9')


@given(
    st.one_of(
        st.text(max_size=200),
        st.text(alphabet=_token_alphabet, max_size=200),
        st.binary(max_size=150).map(lambda b: "v1." + b64(b) + "." + b64(b[:64])),
        st.dictionaries(
            st.sampled_from(["sid", "policy", "aud", "kid", "iat", "exp", "nbf", "x"]),
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(),
                st.text(max_size=10),
                st.floats(),
                st.lists(st.integers(), max_size=2),
            ),
        ).map(lambda d: "v1." + b64(json.dumps(d).encode()) + "." + b64(bytes(64))),
    ),
    st.integers(min_value=-(2**40), max_value=2**40),
)
@settings(max_examples=300)
def test_property_garbage_only_raises_auth_error(token: str, now: int) -> None:
    try:
        _verifier.verify(token, now)
    except AuthError as exc:
        assert exc.reason in REFUSAL_REASONS
    else:
        raise AssertionError("garbage verified")


@given(st.binary(min_size=1, max_size=20), st.integers(min_value=0, max_value=200))
@settings(max_examples=200)
def test_property_any_byte_flip_is_refused(mask: bytes, position: int) -> None:
    token = bytearray(make().encode())
    index = position % len(token)
    original = bytes(token)
    token[index] ^= mask[0] | 1
    mutated = bytes(token).decode("latin-1")
    assert mutated.encode("latin-1") != original
    with pytest.raises(AuthError):
        _verifier.verify(mutated, NOW)


# --- CLI -------------------------------------------------------------------------------------


def test_cli_keygen_issue_verify_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "keys"
    assert main(["token", "keygen", "--out-dir", str(keys), "--kid", "k1"]) == 0
    out = capsys.readouterr().out
    assert out == "k1\n"
    private, public = keys / "k1.private.pem", keys / "k1.public.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644

    assert (
        main(
            [
                "token",
                "issue",
                "--key",
                str(private),
                "--session",
                "sess-42",
                "--policy",
                "ci",
                "--audience",
                AUD,
                "--ttl",
                "120",
            ]
        )
        == 0
    )
    issued = capsys.readouterr()
    token = issued.out.strip()
    assert issued.out == token + "\n"
    assert token.startswith("v1.")
    assert token not in issued.err

    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    assert (
        main(
            [
                "token",
                "verify",
                "--public-keys",
                str(keys),
                "--audience",
                AUD,
                "--token-file",
                str(token_file),
            ]
        )
        == 0
    )
    claims = json.loads(capsys.readouterr().out)
    assert claims["session_id"] == "sess-42"
    assert claims["policy"] == "ci"
    assert claims["key_id"] == "k1"
    assert claims["expires_at"] - claims["issued_at"] == 120


def test_cli_verify_reads_stdin_and_reports_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import sys

    write_pair(tmp_path, "a", KEY_A)
    token = make(KEY_A, kid="a", now=int(__import__("time").time()))

    class FakeStdin:
        def __init__(self, data: bytes) -> None:
            self.buffer = io.BytesIO(data)

    monkeypatch.setattr(sys, "stdin", FakeStdin(token.encode() + b"\n"))
    assert main(["token", "verify", "--public-keys", str(tmp_path), "--audience", AUD]) == 0
    assert json.loads(capsys.readouterr().out)["key_id"] == "a"

    monkeypatch.setattr(sys, "stdin", FakeStdin(token.encode()))
    assert main(["token", "verify", "--public-keys", str(tmp_path), "--audience", "x"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "token refused: wrong-audience" in captured.err
    assert token not in captured.err

    monkeypatch.setattr(sys, "stdin", FakeStdin(b"\xff" * 10_000_000))
    assert main(["token", "verify", "--public-keys", str(tmp_path), "--audience", AUD]) == 1
    assert "too-large" in capsys.readouterr().err


def test_cli_reads_options_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPSTREAMPROXY_TOKEN_KEY_DIR", str(tmp_path))
    monkeypatch.setenv("UPSTREAMPROXY_TOKEN_AUDIENCE", AUD)
    monkeypatch.setenv("UPSTREAMPROXY_TOKEN_TTL", "60")
    assert main(["token", "keygen"]) == 0
    kid = capsys.readouterr().out.strip()
    assert kid.startswith("ed25519-")
    monkeypatch.setenv("UPSTREAMPROXY_TOKEN_KEY", str(tmp_path / f"{kid}.private.pem"))
    monkeypatch.setenv("UPSTREAMPROXY_TOKEN_PUBLIC_KEYS", str(tmp_path))
    assert main(["token", "issue", "--session", "s", "--policy", "p"]) == 0
    token = capsys.readouterr().out.strip()
    (tmp_path / "t").write_text(token)
    assert main(["token", "verify", "--token-file", str(tmp_path / "t")]) == 0
    claims = json.loads(capsys.readouterr().out)
    assert claims["key_id"] == kid
    assert claims["expires_at"] - claims["issued_at"] == 60


def test_cli_keygen_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "keygen", "--out-dir", str(tmp_path), "--kid", "k"]) == 0
    before = (tmp_path / "k.private.pem").read_bytes()
    assert main(["token", "keygen", "--out-dir", str(tmp_path), "--kid", "k"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "k.private.pem").read_bytes() == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["token", "keygen"], "--out-dir: is required"),
        (["token", "keygen", "--out-dir", "{tmp}", "--kid", "bad kid"], "--kid"),
        (["token", "issue", "--session", "s", "--policy", "p", "--audience", "a"], "--key"),
        (
            [
                "token",
                "issue",
                "--key",
                "{tmp}/absent.pem",
                "--session",
                "s",
                "--policy",
                "p",
                "--audience",
                "a",
            ],
            "cannot read",
        ),
        (
            [
                "token",
                "issue",
                "--key",
                "{tmp}/a.private.pem",
                "--session",
                "s:x",
                "--policy",
                "p",
                "--audience",
                "a",
            ],
            "sid must match",
        ),
        (
            [
                "token",
                "issue",
                "--key",
                "{tmp}/a.private.pem",
                "--session",
                "s",
                "--policy",
                "p",
                "--audience",
                "a",
                "--ttl",
                "0",
            ],
            "ttl_seconds",
        ),
        (["token", "verify", "--audience", "a"], "--public-keys: is required"),
        (
            [
                "token",
                "verify",
                "--public-keys",
                "{tmp}",
                "--audience",
                "a",
                "--token-file",
                "{tmp}/absent",
            ],
            "cannot read",
        ),
    ],
)
def test_cli_configuration_errors_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    message: str,
) -> None:
    for name in list(os.environ):
        if name.startswith("UPSTREAMPROXY_"):
            monkeypatch.delenv(name)
    write_pair(tmp_path, "a", KEY_A)
    args = [part.replace("{tmp}", str(tmp_path)) for part in argv]
    assert main(args) == 2
    assert message in capsys.readouterr().err


# --- the verified-token cache ----------------------------------------------------------------


def test_a_verified_token_is_not_verified_again_but_its_time_still_is(
    verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = TokenVerifier._signature_ok

    def counting(key: object, signature: bytes, segment: str) -> bool:
        calls.append(segment)
        return real(key, signature, segment)  # type: ignore[arg-type]

    monkeypatch.setattr(TokenVerifier, "_signature_ok", staticmethod(counting))
    token = make()
    for _ in range(5):
        assert verifier.verify(token, NOW + 10).session_id == "sess-1"
    assert len(calls) == 1
    # Cached, but the clock is checked on every call.
    assert refusal(verifier, token, now=NOW + 300 + 61) == "expired"
    assert refusal(verifier, token, now=NOW - 61) == "not-yet-valid"
    assert len(calls) == 1
    # A tampered token is a different string: verified (and refused) on its own.
    assert refusal(verifier, token[:-2] + ("AA" if token[-2:] != "AA" else "BB")) in (
        "bad-signature",
        "malformed",
    )
    assert len(calls) == 2


def test_verified_cache_is_bounded(verifier: TokenVerifier) -> None:
    for index in range(tokens.VERIFIED_CACHE_SIZE + 50):
        verifier.verify(make(session_id=f"sess-{index}"), NOW)
    assert len(verifier._verified) == tokens.VERIFIED_CACHE_SIZE


def test_a_refused_token_is_not_cached(verifier: TokenVerifier) -> None:
    bad = make(key=KEY_B, kid="a")  # signed by the wrong key
    for _ in range(3):
        assert refusal(verifier, bad) == "bad-signature"
    assert not verifier._verified


def _cli(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "upstreamproxy", *args],
        capture_output=kwargs.pop("capture", True),  # type: ignore[arg-type]
        text=True,
        timeout=60,
        **kwargs,  # type: ignore[arg-type]
    )


def test_keygen_into_a_file_is_a_one_line_usage_error(tmp_path: Path) -> None:
    """--out-dir naming a file raised FileExistsError as a traceback."""
    target = tmp_path / "file"
    target.write_text("x")
    done = _cli(["token", "keygen", "--out-dir", str(target)])
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("upstreamproxy: invalid configuration: --out-dir: cannot write")


@needs_unshare
def test_keygen_on_a_full_disk_leaves_no_half_key_pair(tmp_path: Path) -> None:
    """The private key was written, then writing the public key failed (here: the disk is full)
    and the private key stayed behind, half a key pair, with `cannot write None`."""
    keys = tmp_path / "keys"
    keys.mkdir()
    # One page: room for one key file, not two.
    argv = [sys.executable, "-m", "upstreamproxy", "token", "keygen", "--out-dir", str(keys)]
    code, files, err = run_on_full_disk(keys, [*argv, "--kid", "k"])
    assert code == 2, err
    assert files == {}  # neither key file, nor a temporary one
    assert err.count("\n") == 1, err
    assert err.startswith("upstreamproxy: invalid configuration: --out-dir: cannot write")
    assert "No space left on device" in err and "None" not in err


@pytest.mark.parametrize("kind", ["dangling-symlink", "directory"])
def test_keygen_never_replaces_what_is_at_a_key_path(tmp_path: Path, kind: str) -> None:
    """A dangling symlink at the public key's path passed the "already exists" check and was
    replaced, after the private key had been written."""
    public = tmp_path / "k.public.pem"
    if kind == "directory":
        public.mkdir()
    else:
        public.symlink_to(tmp_path / "elsewhere")
    done = _cli(["token", "keygen", "--out-dir", str(tmp_path), "--kid", "k"])
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"upstreamproxy: invalid configuration: --kid: {public} already exists;"
        " choose another key id\n"
    )
    assert sorted(os.listdir(tmp_path)) == ["k.public.pem"]  # no private key, no temporary
    assert public.is_dir() if kind == "directory" else public.is_symlink()


def test_a_key_file_made_meanwhile_is_kept_and_the_half_made_pair_removed(tmp_path: Path) -> None:
    """What keygen's check cannot see: the public key's path is taken after it looked (another
    run with the same --kid). The private key already in place is removed again; the other
    run's file is neither replaced nor removed."""
    from upstreamproxy.certs import write_new_files

    private, public = tmp_path / "k.private.pem", tmp_path / "k.public.pem"
    public.write_bytes(b"the other run's key\n")
    with pytest.raises(FileExistsError) as taken:
        write_new_files([(private, b"private\n", 0o600), (public, b"public\n", 0o644)])
    assert taken.value.filename == str(public)
    assert sorted(os.listdir(tmp_path)) == ["k.public.pem"]
    assert public.read_bytes() == b"the other run's key\n"


def _keys(tmp_path: Path) -> Path:
    assert _cli(["token", "keygen", "--out-dir", str(tmp_path), "--kid", "k"]).returncode == 0
    return tmp_path / "k.private.pem"


ISSUE = ["token", "issue", "--session", "S1", "--policy", "p", "--audience", "a", "--key"]


def test_a_reader_that_left_stdout_ends_issue_quietly(tmp_path: Path) -> None:
    """`token issue | head -c0` and the like: no BrokenPipeError traceback, 128 + SIGPIPE."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = _cli([*ISSUE, str(_keys(tmp_path))], capture=False, stdout=write, stderr=-1)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


def test_a_full_stdout_is_one_line_without_the_token(tmp_path: Path) -> None:
    with open("/dev/full", "w") as full:
        done = _cli([*ISSUE, str(_keys(tmp_path))], capture=False, stdout=full, stderr=-1)
    assert done.returncode == 1
    assert done.stderr == "upstreamproxy: No space left on device\n"


def test_closed_stdin_and_stdout_are_usage_errors_not_tracebacks(tmp_path: Path) -> None:
    key = _keys(tmp_path)
    closed_out = _cli(
        [*ISSUE, str(key)], capture=False, stdout=-1, stderr=-1, preexec_fn=lambda: os.close(1)
    )
    assert closed_out.returncode == 2 and "stdout: is closed" in closed_out.stderr
    verify = ["token", "verify", "--public-keys", str(tmp_path), "--audience", "a"]
    closed_in = _cli(verify, preexec_fn=lambda: os.close(0))
    assert closed_in.returncode == 2 and "stdin is closed" in closed_in.stderr
