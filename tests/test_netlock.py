"""The network lock (``lock``/``unlock``, ``start --lock``): only the relay may leave.

The rules are rendered by a pure function (tested first), then applied with the real ``nft``
in network namespaces the tests create: a "sandbox" namespace running the relay and clients,
joined by a veth pair to an "outside" namespace with an HTTP origin, UDP echo services (one
on port 53) and the real egress (``netns_outside.py``). Nothing here touches any namespace
the tests did not create.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import users_fixtures
from hypothesis import given
from hypothesis import strategies as st
from users_fixtures import User, as_user, relay_name

from upstreamproxy.bootstrap.netlock import (
    Destination,
    LockSpec,
    NetLockError,
    destinations_for,
    render_ruleset,
    spec_for,
    system_resolvers,
)

names = users_fixtures.names
sandbox_user = users_fixtures.sandbox_user
shared_base = users_fixtures.shared_base

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
V4_IN, V4_OUT = "10.77.0.1", "10.77.0.2"
V6_IN, V6_OUT = "fd77::1", "fd77::2"
ORIGIN = 8080
EGRESS_URL = f"ws://{V4_OUT}:9000/v1/code/upstreamproxy/ws"
TOKEN = "tok-netlock-5d1e9a-SECRET"  # netns_outside.py holds the same
SESSION = "sess-netlock"
HELLO = "hello from outside\n"
#: A rejected attempt must fail with an error, promptly: never a timeout.
REFUSALS = {"ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH", "EACCES", "EPERM"}
PROMPT = 5.0

linux_root = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="network namespaces and nft need Linux and root",
)
needs_nft = pytest.mark.skipif(
    shutil.which("nft") is None,
    reason="nft not installed (Debian package nftables; .ci/run installs it)",
)


def new_relay(names: list[str]) -> str:
    """A fresh relay user name, removed after the test if anything created it."""
    relay = relay_name()
    names.append(relay)
    return relay


def write_token(base: Path) -> Path:
    token = base / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    return token


def assert_no_user(name: str) -> None:
    assert subprocess.run(["id", name], capture_output=True, timeout=30).returncode != 0


# -- the rules, without applying them -------------------------------------------------------------


def test_ruleset_allows_only_the_relay_uid_to_the_destinations() -> None:
    spec = LockSpec(
        1234,
        (Destination("2001:db8::5", 443), Destination("192.0.2.7", 443)),
        resolvers=("192.0.2.53",),
    )
    script = render_ruleset(spec)
    lines = [line.strip() for line in script.splitlines()]
    # Idempotent and atomic: create if missing, delete, define; all one transaction.
    assert lines[:3] == [
        "table inet upstreamproxy",
        "delete table inet upstreamproxy",
        "table inet upstreamproxy {",
    ]
    assert "type filter hook output priority filter; policy accept;" in lines
    rules = lines[lines.index("type filter hook output priority filter; policy accept;") + 1 :]
    dns = "ct original ip daddr 192.0.2.53 ct original proto-dst 53 accept"
    assert rules[:8] == [
        "ct direction reply accept",
        "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, "
        "mld-listener-report, mld2-listener-report } accept",
        # DNS by original destination port (before DNAT), before loopback is let through.
        f"meta skuid 1234 meta l4proto udp {dns}",
        f"meta skuid 1234 meta l4proto tcp {dns}",
        "meta l4proto tcp ct original proto-dst 53 reject with tcp reset",
        "meta l4proto udp ct original proto-dst 53 reject with icmpx admin-prohibited",
        'oifname "lo" accept',
        "meta skuid 1234 ip daddr 192.0.2.7 tcp dport 443 accept",
    ]
    assert "meta skuid 1234 ip6 daddr 2001:db8::5 tcp dport 443 accept" in rules
    # Everything else is rejected with an error, never dropped.
    assert rules[-4:-2] == [
        "meta l4proto tcp reject with tcp reset",
        "reject with icmpx admin-prohibited",
    ]
    assert "drop" not in script
    assert render_ruleset(spec) == script  # deterministic


def test_dns_for_everyone_only_when_asked() -> None:
    spec = LockSpec(7, (Destination("192.0.2.7", 443),), ("192.0.2.53",), allow_dns=True)
    script = render_ruleset(spec)
    assert "\t\tmeta l4proto udp ct original ip daddr 192.0.2.53 ct original proto-dst 53" in script


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("wss://192.0.2.7/v1/code/upstreamproxy/ws", [("192.0.2.7", 443)]),
        ("ws://192.0.2.7/x", [("192.0.2.7", 80)]),
        ("ws://[2001:db8::5]:9000/x", [("2001:db8::5", 9000)]),
        ("http://192.0.2.9:3128", [("192.0.2.9", 3128)]),
        ("socks5://192.0.2.9", [("192.0.2.9", 1080)]),
        ("192.0.2.9:8443", [("192.0.2.9", 8443)]),
        ("[2001:db8:0:0::5]:8443", [("2001:db8::5", 8443)]),
        ("localhost:8443", [("127.0.0.1", 8443), ("::1", 8443)]),
    ],
)
def test_destinations(target: str, expected: list[tuple[str, int]]) -> None:
    found = [(d.address, d.port) for d in destinations_for(target)]
    assert set(expected) >= set(found) and found, found


@pytest.mark.parametrize("target", ["ws:///nohost", "wss://192.0.2.7:99999/x", "192.0.2.9:0"])
def test_bad_destinations_are_refused(target: str) -> None:
    with pytest.raises(NetLockError):
        destinations_for(target)


def test_resolvers_only_when_the_relay_has_a_name_to_resolve(tmp_path: Path) -> None:
    assert spec_for(5, "ws://192.0.2.7:9000/x").resolvers == ()
    assert spec_for(5, "ws://localhost:9000/x").resolvers == system_resolvers()
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nnameserver 192.0.2.53\nnameserver [2001:db8::53]\nsearch x\n")
    assert system_resolvers(conf) == ("192.0.2.53", "2001:db8::53")


# -- in network namespaces ------------------------------------------------------------------------


@dataclass
class Net:
    inside: str
    outside: str

    def run(
        self, *argv: str, user: User | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        command = list(argv) if user is None else as_user(user, *argv)
        return subprocess.run(
            ["ip", "netns", "exec", self.inside, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "LANG": "C.UTF-8"},
        )

    def probe(self, *probes: str, user: User | None = None) -> list[dict[str, object]]:
        done = self.run(sys.executable, str(HERE / "netns_probe.py"), *probes, user=user)
        assert done.returncode == 0, done.stderr
        results: list[dict[str, object]] = json.loads(done.stdout)
        return results

    def nft(self, *args: str) -> str:
        done = self.run("nft", *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def cli(self, *args: str, user: User | None = None) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "upstreamproxy", *args, user=user)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def net() -> Iterator[Net]:
    tag = secrets.token_hex(3)
    inside, outside = f"upsbx-{tag}", f"upout-{tag}"
    _ip("netns", "add", inside)
    _ip("netns", "add", outside)
    peer: subprocess.Popen[str] | None = None
    try:
        _ip(
            "link",
            "add",
            "veth0",
            "netns",
            inside,
            "type",
            "veth",
            "peer",
            "name",
            "veth0",
            "netns",
            outside,
        )
        for ns, v4, v6 in ((inside, V4_IN, V6_IN), (outside, V4_OUT, V6_OUT)):
            _ip("-n", ns, "addr", "add", f"{v4}/24", "dev", "veth0")
            _ip("-n", ns, "addr", "add", f"{v6}/64", "dev", "veth0", "nodad")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", "veth0", "up")
        peer = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                outside,
                sys.executable,
                str(HERE / "netns_outside.py"),
                V4_OUT,
                V6_OUT,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)},
        )
        assert peer.stdout is not None
        assert peer.stdout.readline() == "ready\n"
        yield Net(inside, outside)
    finally:
        if peer is not None:
            if peer.stdin:
                peer.stdin.close()
            try:
                peer.wait(15)
            except subprocess.TimeoutExpired:
                peer.kill()
                peer.wait()
        subprocess.run(["ip", "netns", "del", inside], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", outside], capture_output=True, timeout=30)


def assert_refused_promptly(results: list[dict[str, object]]) -> None:
    for result in results:
        assert result["ok"] is False, result
        assert result["error"] in REFUSALS, result
        assert float(result["seconds"]) < PROMPT, result  # type: ignore[arg-type]


DIRECT = (
    f"tcp:{V4_OUT}:{ORIGIN}",
    f"tcp:[{V6_OUT}]:{ORIGIN}",
    f"tcp:{V4_OUT}:9000",  # the egress itself: only the relay's uid
    f"udp:{V4_OUT}:5300",
    f"udp:[{V6_OUT}]:5300",
    f"udp:{V4_OUT}:53",  # DNS, not allowed unless asked for
    f"udp:[{V6_OUT}]:53",
)


@linux_root
def test_the_namespaces_really_connect_without_the_lock(net: Net, sandbox_user: User) -> None:
    # Without this, a refusal below could be a broken test network rather than the lock.
    results = net.probe(*DIRECT, user=sandbox_user)
    assert all(r["ok"] for r in results), results


@linux_root
@needs_nft
def test_start_lock_only_the_relay_leaves(
    net: Net, sandbox_user: User, names: list[str], shared_base: Path
) -> None:
    relay = new_relay(names)
    token = write_token(shared_base)
    start = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            net.inside,
            sys.executable,
            "-m",
            "upstreamproxy",
            "start",
            "--token-file",
            str(token),
            "--session-id",
            SESSION,
            "--egress-url",
            EGRESS_URL,
            "--state-dir",
            str(shared_base / "state"),
            "--relay-user",
            relay,
            "--lock",
            "--fail-closed",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "LANG": "C.UTF-8"},
    )
    try:
        assert start.stdout is not None
        line = start.stdout.readline()
        assert line.startswith("upstreamproxy ready: source "), start.communicate(timeout=30)
        env = json.loads((shared_base / "state" / "env.json").read_text())["env"]
        proxy = env["HTTPS_PROXY"]
        relay_uid = int(
            subprocess.run(["id", "-u", relay], capture_output=True, text=True, check=True).stdout
        )
        rules = net.nft("list", "table", "inet", "upstreamproxy")
        assert f"meta skuid {relay_uid} ip daddr {V4_OUT} tcp dport 9000 accept" in rules

        # Direct: refused at once, IPv4 and IPv6, TCP and UDP, DNS, the egress itself.
        assert_refused_promptly(net.probe(*DIRECT, user=sandbox_user))
        # Root in the sandbox is no exception.
        assert_refused_promptly(net.probe(f"tcp:{V4_OUT}:{ORIGIN}", f"udp:{V4_OUT}:5300"))
        # The relay's uid reaches the egress, and nothing else.
        entry = subprocess.run(["id", "-g", relay], capture_output=True, text=True, check=True)
        relay_user = User(relay, relay_uid, int(entry.stdout))
        reached = net.probe(f"tcp:{V4_OUT}:9000", user=relay_user)
        assert reached[0]["ok"] is True, reached
        assert_refused_promptly(net.probe(f"tcp:{V4_OUT}:{ORIGIN}", user=relay_user))

        # The same requests through the relay work, IPv4 and IPv6, with a real client.
        for url in (f"http://{V4_OUT}:{ORIGIN}/", f"http://[{V6_OUT}]:{ORIGIN}/"):
            done = net.run(
                "curl", "-sS", "--max-time", "20", "-p", "-x", proxy, url, user=sandbox_user
            )
            assert done.stdout == HELLO, (url, done.stderr)
    finally:
        start.send_signal(signal.SIGTERM)
        _, err = start.communicate(timeout=30)
    assert start.returncode == 0, err
    assert "network lock installed: only uid" in err and "network lock removed" in err
    assert TOKEN not in err
    # Stopping removed the table, and the direct route is back.
    assert "upstreamproxy" not in net.nft("list", "tables")
    assert net.probe(f"tcp:{V4_OUT}:{ORIGIN}", user=sandbox_user)[0]["ok"] is True


@linux_root
@needs_nft
def test_lock_is_idempotent_removable_and_leaves_other_tables_alone(
    net: Net, sandbox_user: User, names: list[str]
) -> None:
    relay = new_relay(names)
    # The platform's own table, which the lock must never touch.
    net.nft("add", "table", "inet", "platform")
    chain = "{ type filter hook output priority 10; policy accept; }"
    net.nft("add", "chain", "inet", "platform", "out", chain)
    before = net.nft("list", "table", "inet", "platform")

    args = ("lock", "--relay-user", relay, "--egress-url", EGRESS_URL)
    first = net.cli(*args)
    assert first.returncode == 0, first.stderr
    assert "locked: only uid" in first.stderr
    rules = net.nft("list", "ruleset")
    again = net.cli(*args)
    assert again.returncode == 0, again.stderr
    assert net.nft("list", "ruleset") == rules  # the same rules, not twice
    assert len(re.findall(r"^table inet upstreamproxy", rules, re.M)) == 1
    printed = net.cli(*args, "--print")
    assert printed.returncode == 0 and "meta skuid" in printed.stdout
    assert_refused_promptly(net.probe(f"tcp:{V4_OUT}:{ORIGIN}", user=sandbox_user))

    # Not root: refused with a clear message, rules untouched.
    denied = net.cli("unlock", user=sandbox_user)
    assert denied.returncode == 1 and "must run as root" in denied.stderr
    assert net.nft("list", "ruleset") == rules

    removed = net.cli("unlock")
    assert removed.returncode == 0 and "table inet upstreamproxy removed" in removed.stderr
    assert "upstreamproxy" not in net.nft("list", "tables")
    assert net.nft("list", "table", "inet", "platform") == before
    assert net.probe(f"tcp:{V4_OUT}:{ORIGIN}", user=sandbox_user)[0]["ok"] is True
    twice = net.cli("unlock")
    assert twice.returncode == 0 and "not locked" in twice.stderr


@linux_root
def test_start_lock_without_root_fails_clearly(
    net: Net, sandbox_user: User, shared_base: Path
) -> None:
    token = write_token(shared_base)
    os.chown(token, sandbox_user.uid, sandbox_user.gid)
    state = shared_base / "state"
    state.mkdir()
    os.chown(state, sandbox_user.uid, sandbox_user.gid)
    done = net.cli(
        "start",
        "--token-file",
        str(token),
        "--session-id",
        SESSION,
        "--egress-url",
        EGRESS_URL,
        "--state-dir",
        str(state),
        "--lock",
        "--fail-closed",
        user=sandbox_user,
    )
    assert done.returncode == 1
    assert "--lock needs start to run as root" in done.stderr
    assert token.exists()


@linux_root
@pytest.mark.parametrize(
    "where", [("--egress-url", "ws://127.0.0.1:99999/x"), ("--lock-allow-to", ":443")]
)
def test_lock_with_a_bad_destination_creates_no_relay_user(
    where: tuple[str, str], names: list[str]
) -> None:
    relay = new_relay(names)
    args = ["--egress-url", "ws://127.0.0.1:9000/x", *where, "--relay-user", relay]
    done = subprocess.run(
        [sys.executable, "-m", "upstreamproxy", "lock", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "upstreamproxy lock:" in done.stderr and ("port" in done.stderr or "host" in done.stderr)
    assert_no_user(relay)


@linux_root
def test_start_lock_with_a_bad_destination_creates_no_relay_user(
    names: list[str], shared_base: Path
) -> None:
    relay = new_relay(names)
    token = write_token(shared_base)
    done = subprocess.run(
        [
            sys.executable, "-m", "upstreamproxy", "start", "--token-file", str(token),
            # Outside a namespace: a loopback egress, so nothing leaves even if this regresses.
            "--session-id", SESSION, "--egress-url", "ws://127.0.0.1:9/v1/code/upstreamproxy/ws",
            "--state-dir", str(shared_base / "state"), "--relay-user", relay,
            "--lock", "--lock-allow-to", ":443", "--fail-closed",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "LANG": "C.UTF-8"},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "no host in ':443'" in done.stderr
    assert token.exists()  # left for a retry
    assert_no_user(relay)


@given(
    uid=st.integers(min_value=0, max_value=2**32 - 2),
    addresses=st.lists(
        st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), min_size=1, max_size=5
    ),
    port=st.integers(min_value=1, max_value=65535),
)
def test_any_spec_renders_every_destination_once_and_rejects_the_rest(
    uid: int, addresses: list[object], port: int
) -> None:
    destinations = tuple(Destination(str(a), port) for a in addresses)
    script = render_ruleset(LockSpec(uid, destinations))
    for dest in set(destinations):
        rule = f"meta skuid {uid} {dest.family} daddr {dest.address} tcp dport {port} accept"
        assert script.count(rule + "\n") == 1
    assert script.rstrip().endswith("reject with icmpx admin-prohibited\n\t}\n}")


LOOPBACK_ECHO = """
import socket, sys
socks = []
for host, port in (("127.0.0.53", 53), ("127.0.0.11", 5353)):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, port))
    socks.append(s)
print("ready", flush=True)
import select
while True:
    for s in select.select(socks, [], [])[0]:
        data, addr = s.recvfrom(512)
        s.sendto(data, addr)
"""


@pytest.fixture
def loopback_dns(net: Net) -> Iterator[None]:
    """Resolvers *on loopback* in the sandbox, as containers have them: one on 127.0.0.53:53
    (systemd-resolved's stub) and Docker's 127.0.0.11:53, DNAT-ed to another port."""
    net.nft("add", "table", "ip", "dockerlike")
    net.nft("add", "chain", "ip", "dockerlike", "out", "{ type nat hook output priority -100; }")
    net.nft(
        "add", "rule", "ip", "dockerlike", "out",
        "ip", "daddr", "127.0.0.11", "udp", "dport", "53", "dnat", "to", "127.0.0.11:5353",
    )  # fmt: skip
    echo = subprocess.Popen(
        ["ip", "netns", "exec", net.inside, sys.executable, "-c", LOOPBACK_ECHO],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert echo.stdout is not None and echo.stdout.readline() == "ready\n"
        yield
    finally:
        echo.kill()
        echo.wait()


@linux_root
@needs_nft
def test_dns_through_a_loopback_resolver_is_refused_too(
    net: Net, loopback_dns: None, sandbox_user: User, names: list[str]
) -> None:
    relay = new_relay(names)
    dns = ("udp:127.0.0.53:53", "udp:127.0.0.11:53")
    before = net.probe(*dns, "udp:127.0.0.11:5353", user=sandbox_user)
    assert all(r["ok"] for r in before), before  # the resolvers answer without the lock
    locked = net.cli("lock", "--relay-user", relay, "--egress-url", EGRESS_URL)
    assert locked.returncode == 0, locked.stderr
    # A loopback resolver forwards queries out, so DNS to it is refused like any other, also
    # when DNAT has rewritten the port; other loopback traffic still passes.
    assert_refused_promptly(net.probe(*dns, user=sandbox_user))
    assert net.probe("udp:127.0.0.11:5353", user=sandbox_user)[0]["ok"] is True


@linux_root
@needs_nft
def test_allow_dns_opens_only_the_configured_resolvers(
    net: Net, loopback_dns: None, sandbox_user: User, names: list[str]
) -> None:
    relay = new_relay(names)
    # `ip netns exec` shows /etc/netns/NAME/resolv.conf as the namespace's /etc/resolv.conf.
    conf_dir = Path("/etc/netns") / net.inside
    conf_dir.mkdir(parents=True)
    try:
        (conf_dir / "resolv.conf").write_text("nameserver 127.0.0.53\n")
        args = ("lock", "--relay-user", relay, "--egress-url", EGRESS_URL, "--lock-allow-dns")
        locked = net.cli(*args)
        assert locked.returncode == 0, locked.stderr
        assert "127.0.0.53" in net.nft("list", "table", "inet", "upstreamproxy")
        assert net.probe("udp:127.0.0.53:53", user=sandbox_user)[0]["ok"] is True
        assert_refused_promptly(
            net.probe(
                "udp:127.0.0.11:53", f"udp:{V4_OUT}:53", f"udp:[{V6_OUT}]:53", user=sandbox_user
            )
        )
    finally:
        shutil.rmtree(conf_dir, ignore_errors=True)


@linux_root
@needs_nft
def test_an_ipv6_egress_is_reachable_through_the_lock(
    net: Net, sandbox_user: User, names: list[str]
) -> None:
    """IPv6 needs neighbour discovery, which the kernel sends without a socket (no uid): the
    lock must let it out, or a relay could never reach an IPv6 egress on its link."""
    relay = new_relay(names)
    locked = net.cli("lock", "--relay-user", relay, "--egress-url", f"ws://[{V6_OUT}]:9000/x")
    assert locked.returncode == 0, locked.stderr
    entry = subprocess.run(["id", relay], capture_output=True, text=True, check=True).stdout
    uid, gid = (int(re.search(rf"{k}=(\d+)", entry).group(1)) for k in ("uid", "gid"))  # type: ignore[union-attr]
    relay_user = User(relay, uid, gid)
    reached = net.probe(f"tcp:[{V6_OUT}]:9000", user=relay_user)
    assert reached[0]["ok"] is True, reached
    assert_refused_promptly(net.probe(f"tcp:[{V6_OUT}]:9000", user=sandbox_user))
