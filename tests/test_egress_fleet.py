"""Three egress replicas behind a real HAProxy, rolled one at a time under load.

The replicas are ``upstreamproxy egress`` processes configured exactly as the image configures
them (the default suite), or the image itself run with ``docker run`` (marker ``containers``).
HAProxy (Debian's package) balances tunnels in TCP mode and health-checks ``/readyz``; relays
on the host carry continuous traffic to an HTTPS origin on loopback: many short tunnels plus
long downloads. Rolling a replica is SIGTERM, drain, restart; the clients must see zero failed
CONNECTs and no transfer cut that was shorter than the drain grace.

Why that holds: on SIGTERM a replica turns ``/readyz`` 503 at once but keeps accepting tunnels
for ``--drain-delay`` seconds, long enough for HAProxy's checks to take it out; only then does it
refuse new tunnels, and its open ones get ``--drain-grace`` seconds to finish. Without the delay,
a CONNECT routed in the moment between SIGTERM and the next health check gets ``503 draining``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import TLSFiles
from containers import docker_engine, egress_image  # noqa: F401  (a fixture)
from fleet import (
    ContainerReplica,
    Figures,
    FleetConfig,
    HAProxy,
    Load,
    ProcessReplica,
    RelayProcess,
    Replica,
    SigningKey,
    figures_report,
    http_status,
    https_origin,
    pattern,
    policy_yaml,
    relay_pool_flags,
    replica_flags,
    tunnel_get,
)
from test_deploy_manifests import image as dockerfile_image

from upstreamproxy.relay import Relay, RelayConfig
from upstreamproxy.secret import Secret

DRAIN_GRACE = 10.0
DRAIN_DELAY = 2.0
REPLICAS = 3


@pytest.fixture(autouse=True)
def haproxy_installed() -> None:
    if shutil.which("haproxy") is None:
        message = "no haproxy (Debian package haproxy; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@dataclass
class Fleet:
    kind: str
    base: Path
    config: FleetConfig
    replicas: list[Replica]
    haproxy: HAProxy
    relays: list[RelayProcess] = field(default_factory=list)

    async def relay(self, name: str, token: str, session: str) -> RelayProcess:
        relay = RelayProcess(
            self.base, name, self.haproxy.ws_url, session, token, relay_pool_flags()
        )
        await relay.start()
        self.relays.append(relay)
        return relay

    def logs(self) -> str:
        return "\n".join(f"--- {r.name}\n{r.logs()[-1500:]}" for r in self.replicas)


@pytest.fixture(params=["process", pytest.param("container", marks=pytest.mark.containers)])
def replica_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "container":
        request.getfixturevalue("docker_engine")
    return str(request.param)


def make_replica_factory(kind: str, base: Path) -> Callable[[str, FleetConfig, list[str]], Replica]:
    if kind == "process":
        image_env = dockerfile_image().env
        return lambda name, config, flags: ProcessReplica(name, config, flags, base, image_env)
    tag = egress_image()
    prefix = f"upstreamproxy-fleet-{os.getpid()}-{base.name[-12:]}"
    return lambda name, config, flags: ContainerReplica(f"{prefix}-{name}", tag, config, flags)


@contextlib.asynccontextmanager
async def running_fleet(
    kind: str, base: Path, tls: TLSFiles, *policy_hosts: str, extra_flags: tuple[str, ...] = ()
) -> AsyncIterator[Fleet]:
    base.chmod(0o755)
    config = FleetConfig.create(base, tls.ca.cert_pem(), *policy_hosts)
    make = make_replica_factory(kind, base)
    flags = [*replica_flags(DRAIN_GRACE, DRAIN_DELAY), *extra_flags]
    replicas = [make(f"egress{i}", config, flags) for i in range(REPLICAS)]
    haproxy = HAProxy(base, replicas)
    fleet = Fleet(kind, base, config, replicas, haproxy)
    try:
        await asyncio.gather(*(r.start() for r in replicas))
        await haproxy.start()
        for replica in replicas:
            await haproxy.wait_status(replica.name, "UP")
        yield fleet
    finally:
        for relay in fleet.relays:
            await relay.stop()
        await haproxy.stop()
        for replica in replicas:
            await replica.kill()


async def roll(fleet: Fleet, replica: Replica) -> dict[str, float]:
    """SIGTERM, drain, exit, restart, back in the balancer: how long each step took."""
    started = time.monotonic()
    replica.terminate()
    await fleet.haproxy.wait_status(replica.name, "DOWN", deadline=DRAIN_DELAY + 5)
    marked_down = time.monotonic() - started
    code = await replica.wait_exit(DRAIN_DELAY + DRAIN_GRACE + 20)
    assert code == 0, f"{replica.name} exited {code}:\n{replica.logs()[-2000:]}"
    exited = time.monotonic() - started
    await replica.start()
    await fleet.haproxy.wait_status(replica.name, "UP")
    return {"down": marked_down, "exit": exited, "back": time.monotonic() - started}


async def test_rolling_restart_under_load_fails_no_tunnel(
    replica_kind: str, tmp_path: Path, tls: TLSFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    async with (
        https_origin(tls.server_context()) as origin_port,
        running_fleet(replica_kind, tmp_path, tls, "localhost") as fleet,
    ):
        key = fleet.config.signing[0]
        relays = [
            await fleet.relay(f"relay{i}", key.token(f"fleet-s{i}"), f"fleet-s{i}")
            for i in range(2)
        ]
        load = Load([r.port for r in relays], origin_port, tls.client_context())
        load.start()
        await asyncio.sleep(2)
        before_roll = load.figures.opened
        timings = [await roll(fleet, replica) for replica in fleet.replicas]
        await asyncio.sleep(2)
        figures = await load.stop()
        stats = await fleet.haproxy.servers()
        served = {name: int(row["stot"]) for name, row in stats.items()}
        pool = relay_pool_flags()
        figures_report(
            capsys,
            f"fleet/{replica_kind}",
            figures,
            lambda: (
                f"tunnels during the roll {figures.opened - before_roll}; "
                f"per replica (haproxy) {served}; "
                + "; ".join(
                    f"{r.name}: down {t['down']:.1f}s exit {t['exit']:.1f}s back {t['back']:.1f}s"
                    for r, t in zip(fleet.replicas, timings, strict=True)
                )
                + f"; relay pool {' '.join(pool) if pool else 'none (one WebSocket per CONNECT)'}"
            ),
        )
        assert not figures.failed, f"{len(figures.failed)} CONNECTs failed: {figures.failed[:5]}"
        early = [c for c in figures.cut if c[0] < DRAIN_GRACE]
        assert not early, f"transfers cut before the drain grace: {early[:5]}"
        assert figures.opened - before_roll >= 50, "too little traffic during the roll to prove it"
        assert figures.long_completed >= REPLICAS, "no long download ran across the roll"
        assert all(count > 0 for count in served.values()), served
        # Pre-opened WebSockets (when the relay has a pool; today one WebSocket per CONNECT):
        # - no replica needed its whole grace: idle pooled sockets must not hold a drain up
        #   (the egress closes them with 1001 and the relay retires them);
        for replica, t in zip(fleet.replicas, timings, strict=True):
            assert t["exit"] < DRAIN_DELAY + DRAIN_GRACE, (replica.name, t)
        # - after the roll every relay still opens a tunnel at once on its first try: sockets
        #   pooled on a replica that has since restarted were replaced, not handed out dead.
        for relay in relays:
            assert relay.proc is not None and relay.proc.returncode is None, relay.logs()[-2000:]
            quick = Figures()
            started = time.monotonic()
            for _ in range(REPLICAS * 2):
                await tunnel_get(
                    relay.port, origin_port, "/bytes/10", tls.client_context(), 10, quick
                )
            assert not quick.failed and not quick.cut, (quick.failed, quick.cut)
            assert time.monotonic() - started < 10
        # Tokens never reach a log (each is unique: its signature is the secret part).
        logs = fleet.logs() + "".join(r.logs() for r in relays)
        for relay in relays:
            assert relay.token.rsplit(".", 1)[-1] not in logs


async def direct_status(replica: Replica, token: str, session: str, target: str) -> int:
    """Status a CONNECT gets from one replica, through a relay that talks to it alone."""
    relay = Relay(
        RelayConfig(
            egress_url=f"ws://127.0.0.1:{replica.port}/v1/code/upstreamproxy/ws",
            session_id=session,
            token=Secret(token),
        )
    )
    await relay.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        writer.close()
        await writer.wait_closed()
        for _ in range(100):  # let the relay close its side before it is stopped
            if relay.active_tunnels == 0:
                break
            await asyncio.sleep(0.05)
        return int(head.split()[1])
    finally:
        await relay.stop()


async def every_replica(
    fleet: Fleet, token: str, session: str, target: str, want: int, deadline: float = 15
) -> float:
    """Seconds until every replica answers ``want`` (fails after ``deadline``)."""
    started = time.monotonic()
    pending = list(fleet.replicas)
    while pending:
        statuses = [await direct_status(r, token, session, target) for r in pending]
        pending = [r for r, s in zip(pending, statuses, strict=True) if s != want]
        if pending:
            assert time.monotonic() - started < deadline, (
                f"{[r.name for r in pending]} still answer {statuses} instead of {want}"
            )
            await asyncio.sleep(0.2)
    return time.monotonic() - started


async def test_policy_and_key_updates_reach_every_replica_without_restart(
    replica_kind: str, tmp_path: Path, tls: TLSFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    async with (
        https_origin(tls.server_context()) as origin_port,
        running_fleet(replica_kind, tmp_path, tls, "localhost") as fleet,
    ):
        old = fleet.config.signing[0]
        session_token = old.token("rotating-session")
        relay = await fleet.relay("relay", session_token, "rotating-session")
        load = Load(
            [relay.port], origin_port, tls.client_context(), short_workers=3, long_workers=1
        )
        load.start()
        by_ip = f"127.0.0.1:{origin_port}"
        # 1. A policy update (ConfigMap-style ..data swap) reaches every replica.
        assert await every_replica(fleet, session_token, "rotating-session", by_ip, 403) < 1
        fleet.config.policy.publish({"policy.yaml": policy_yaml("localhost", "127.0.0.1")})
        policy_s = await every_replica(fleet, session_token, "rotating-session", by_ip, 200)
        # 2. A new public key (Secret-style swap): its tokens work everywhere once it is there.
        new = SigningKey.new()
        new_token = new.token("new-key-session")
        assert await every_replica(fleet, new_token, "new-key-session", by_ip, 502) < 1
        fleet.config.publish_keys([old, new])
        key_s = await every_replica(fleet, new_token, "new-key-session", by_ip, 200)
        figures = await load.stop()
        # 3. The old key retired: its tokens are refused everywhere, new ones still work, and a
        #    tunnel opened before (checked when it opened) runs on.
        target = f"localhost:{origin_port}"
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)).startswith(
            b"HTTP/1.1 200"
        )
        await asyncio.wait_for(
            writer.start_tls(tls.client_context(), server_hostname="localhost"), 10
        )
        fleet.config.publish_keys([new])
        retire_s = await every_replica(fleet, session_token, "rotating-session", by_ip, 502)
        await every_replica(fleet, new_token, "new-key-session", by_ip, 200, deadline=1)
        writer.write(
            f"GET /bytes/1000 HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode()
        )
        answer = await asyncio.wait_for(reader.read(-1), 20)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(pattern(1000)), answer[:200]
        figures_report(
            capsys,
            f"rotation/{replica_kind}",
            figures,
            lambda: (
                f"policy everywhere in {policy_s:.1f}s, new key in {key_s:.1f}s, "
                f"old key gone in {retire_s:.1f}s"
            ),
        )
        assert not figures.failed, figures.failed[:5]
        assert not figures.cut, figures.cut[:5]
        assert figures.completed >= 10
        # No replica restarted: each still runs the process it started with and reloaded.
        for replica in fleet.replicas:
            status = await http_status(f"http://127.0.0.1:{replica.port}/readyz")
            assert status == 200
            assert "policy reloaded" in replica.logs(), replica.logs()[-2000:]
            assert replica.logs().count("metrics on http") == 1, "the replica restarted"


async def test_session_limits_add_up_across_replicas(
    tmp_path: Path, tls: TLSFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    """Limits are per replica: behind a balancer spreading tunnels evenly, a session holds up
    to N x --max-session-tunnels at once (README: "Per-session limits in a fleet")."""
    per_replica = 2
    async with (
        https_origin(tls.server_context()) as origin_port,
        running_fleet(
            "process",
            tmp_path,
            tls,
            "localhost",
            extra_flags=(f"--max-session-tunnels={per_replica}",),
        ) as fleet,
    ):
        key = fleet.config.signing[0]
        relay = await fleet.relay("relay", key.token("limited"), "limited")
        target = f"localhost:{origin_port}"
        held: list[asyncio.StreamWriter] = []
        heads: list[bytes] = []
        try:
            for _ in range(REPLICAS * per_replica + 1):
                reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
                held.append(writer)
                writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
                heads.append(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20))
            statuses = [int(h.split()[1]) for h in heads]
            with capsys.disabled():
                print(f"\n[limits] {REPLICAS} replicas x {per_replica}: statuses {statuses}")
            assert statuses[:-1] == [200] * (REPLICAS * per_replica)
            assert statuses[-1] == 429 and b"session-concurrency-limit" in heads[-1]
        finally:
            for writer in held:
                writer.close()
