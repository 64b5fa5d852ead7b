"""The two egress behaviours a fleet needs: the drain delay and key files reloaded on change.

``--drain-delay``: after SIGTERM readiness is 503 at once, but new tunnels are still accepted for
that long (a balancer is taking the replica out), then refused with ``503 draining``.
Public keys: a Secret-volume update (``..data`` swap) is picked up without SIGHUP, like the policy.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SESSION, TOKEN, connect_via, loopback_policy, raw_request
from fleet import AUDIENCE, ProjectedDir, SigningKey, clean_env, free_port, http_status

from upstreamproxy.egress.auth import Session, SignedTokens, StaticTokens
from upstreamproxy.egress.policy import PolicyStore
from upstreamproxy.egress.server import EgressConfig, EgressServer
from upstreamproxy.errors import AuthError
from upstreamproxy.relay import Relay, RelayConfig
from upstreamproxy.secret import Secret
from upstreamproxy.tokens import TokenVerifier, load_public_keys, public_keys_fingerprint

ROOT = Path(__file__).resolve().parent.parent


async def _hold_origin() -> tuple[asyncio.Server, int]:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    origin = await asyncio.start_server(hold, "127.0.0.1", 0)
    return origin, origin.sockets[0].getsockname()[1]


async def test_drain_delay_accepts_while_not_ready_then_refuses() -> None:
    origin, port = await _hold_origin()
    server = EgressServer(
        EgressConfig(), StaticTokens({TOKEN: Session(SESSION)}), loopback_policy()
    )
    await server.start()
    relay = Relay(RelayConfig(egress_url=server.url, session_id=SESSION, token=Secret(TOKEN)))
    await relay.start()
    try:
        started = time.monotonic()
        stopping = asyncio.ensure_future(server.stop(grace=5, delay=1.5))
        await asyncio.sleep(0.1)
        assert await http_status(f"http://127.0.0.1:{server.port}/readyz") == 503
        assert await http_status(f"http://127.0.0.1:{server.port}/healthz") == 200
        # Within the delay: a CONNECT routed here before the balancer noticed still works.
        _, writer, head = await connect_via(relay.port, f"127.0.0.1:{port}")
        assert head.startswith(b"HTTP/1.1 200"), head
        await asyncio.sleep(1.6)
        # After it: refused, with the reason passed on by the relay.
        late = await raw_request(relay.port, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        assert late.startswith(b"HTTP/1.1 503") and b"draining" in late, late
        writer.close()
        await asyncio.wait_for(stopping, 10)
        assert time.monotonic() - started < 5  # the open tunnel ended, so did the drain
    finally:
        await relay.stop()
        await server.stop()
        origin.close()


def test_drain_delay_flag_is_checked() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "upstreamproxy",
            "egress",
            "--allow",
            "x:1",
            "--static-tokens",
            "/dev/null",
            "--drain-delay",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=clean_env(),
        check=False,
    )
    assert result.returncode != 0 and "--drain-delay" in result.stderr, result.stderr


def test_key_fingerprint_follows_content_and_never_raises(tmp_path: Path) -> None:
    keys = ProjectedDir(tmp_path / "keys")
    a, b = SigningKey.new(), SigningKey.new()
    keys.publish({f"{a.kid}.public.pem": a.public_pem})
    first = public_keys_fingerprint([keys.path])
    assert public_keys_fingerprint([keys.path]) == first
    keys.publish({f"{a.kid}.public.pem": a.public_pem, f"{b.kid}.public.pem": b.public_pem})
    assert public_keys_fingerprint([keys.path]) != first
    assert public_keys_fingerprint([tmp_path / "missing"]) == public_keys_fingerprint([])


async def test_key_files_reload_on_change_without_sighup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = ProjectedDir(tmp_path / "keys")
    old, new = SigningKey.new(), SigningKey.new()
    keys.publish({f"{old.kid}.public.pem": old.public_pem})
    sources = [str(keys.path)]
    authenticator = SignedTokens(
        lambda: TokenVerifier(load_public_keys(sources), AUDIENCE), sources=sources
    )
    server = EgressServer(EgressConfig(reload_interval=0.1), authenticator, loopback_policy())
    async with server:
        authenticator.authenticate(old.token("s"))
        with pytest.raises(AuthError):
            authenticator.authenticate(new.token("s"))
        with caplog.at_level(logging.INFO, "upstreamproxy.egress"):
            keys.publish(
                {f"{old.kid}.public.pem": old.public_pem, f"{new.kid}.public.pem": new.public_pem}
            )
            for _ in range(50):
                try:
                    authenticator.authenticate(new.token("s"))
                    break
                except AuthError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("the new key was not picked up")
        assert f"reloaded public keys from {keys.path}" in caplog.text  # said, once it worked
        # A broken update is refused; the keys in force stay.
        with caplog.at_level(logging.ERROR, "upstreamproxy.egress"):
            keys.publish({f"{new.kid}.public.pem": b"not a key"})
            for _ in range(50):
                if "key reload failed" in caplog.text:
                    break
                await asyncio.sleep(0.1)
        assert "key reload failed" in caplog.text
        authenticator.authenticate(old.token("s"))
        authenticator.authenticate(new.token("s"))


async def test_sigterm_with_drain_delay_in_the_real_command(tmp_path: Path) -> None:
    """`upstreamproxy egress --drain-delay`: 503 readiness at once, exit 0 after the delay."""
    port = free_port()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{SESSION} {TOKEN}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "upstreamproxy",
        "egress",
        "--port",
        str(port),
        "--allow",
        "localhost:443",
        "--static-tokens",
        str(tokens),
        "--drain-delay",
        "1.5",
        cwd=ROOT,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        assert b"egress listening" in await asyncio.wait_for(proc.stdout.readline(), 20)
        # Signalled the moment it says it listens: the handlers were installed before that
        # line (a SIGTERM used to kill it outright there, with no drain).
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert await http_status(f"http://127.0.0.1:{port}/readyz") == 503
        # A reload or a second SIGTERM during the drain does not kill it either.
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        took = time.monotonic() - started
        assert proc.returncode == 0, err.decode()
        assert 1.4 < took < 10, took
        assert b"still accepting tunnels for 1.5s" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_relay_signalled_right_after_its_ready_line_exits_cleanly(tmp_path: Path) -> None:
    token = tmp_path / "token"
    for _ in range(3):
        token.write_text("t0k3n-value")  # the relay deletes it once it listens
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "upstreamproxy",
                "relay",
                "--egress-url",
                "ws://127.0.0.1:9/v1/code/upstreamproxy/ws",
                "--session-id",
                "s",
                "--token-file",
                str(token),
                "--port",
                "0",
            ],
            cwd=ROOT,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert b"relay listening" in proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err.decode()[-1000:]


async def test_the_watcher_reloads_only_the_file_that_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken policy file is reported once: a later token file change does not re-read it
    (which logged the same error and counted a failed policy reload again)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("policies:\n  default:\n    rules: []\n")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{SESSION} {TOKEN}\n")
    authenticator = StaticTokens.from_file(tokens)
    server = EgressServer(
        EgressConfig(reload_interval=0.1), authenticator, PolicyStore.from_file(policy)
    )

    def reloads(result: str) -> float:
        sample = server.metrics.registry.get_sample_value(
            "upstreamproxy_policy_reloads_total", {"result": result}
        )
        return sample or 0.0

    async with server:
        with caplog.at_level(logging.INFO, "upstreamproxy.egress"):
            policy.write_text("policies:\n  default:\n    rules: [\n")
            for _ in range(50):
                if "policy reload failed" in caplog.text:
                    break
                await asyncio.sleep(0.1)
            tokens.write_text(f"{SESSION} {TOKEN}\nother other-token\n")
            for _ in range(50):
                try:
                    authenticator.authenticate("other-token")
                    break
                except AuthError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("the new token was not picked up")
            await asyncio.sleep(0.3)  # a few more rounds of the watcher
    assert caplog.text.count("policy reload failed") == 1, caplog.text
    assert (reloads("failed"), reloads("ok")) == (1, 0)


async def test_a_removed_key_stops_its_cached_tokens_at_once(tmp_path: Path) -> None:
    # The egress remembers tokens whose signature it verified; removing their key (a leaked
    # signing key is revoked) must refuse them on the next upgrade, cached or not.
    keys = ProjectedDir(tmp_path / "keys")
    leaked, new = SigningKey.new(), SigningKey.new()
    keys.publish({f"{leaked.kid}.public.pem": leaked.public_pem})
    sources = [str(keys.path)]
    authenticator = SignedTokens(
        lambda: TokenVerifier(load_public_keys(sources), AUDIENCE), sources=sources
    )
    origin, port = await _hold_origin()
    server = EgressServer(EgressConfig(reload_interval=0.1), authenticator, loopback_policy())
    async with server:
        relay = Relay(
            RelayConfig(egress_url=server.url, session_id="s", token=Secret(leaked.token("s")))
        )
        await relay.start()
        try:
            for _ in range(2):  # the second upgrade is served from the cache
                _, writer, head = await connect_via(relay.port, f"127.0.0.1:{port}")
                writer.close()
                assert head.startswith(b"HTTP/1.1 200"), head
            keys.publish({f"{new.kid}.public.pem": new.public_pem})
            for _ in range(50):
                if not authenticator.changed():
                    break
                await asyncio.sleep(0.1)
            _, writer, head = await connect_via(relay.port, f"127.0.0.1:{port}")
            writer.close()
            assert not head.startswith(b"HTTP/1.1 200"), head
        finally:
            await relay.stop()
    origin.close()
    with pytest.raises(AuthError, match="unknown-key"):
        authenticator.authenticate(leaked.token("s"))
