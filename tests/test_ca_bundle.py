"""The CA super bundle: discovery, fetch (direct, capped, timed), validation, dedupe, writing."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from bounded import promptly
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from testpki import make_ca

from upstreamproxy.bootstrap import ca_bundle
from upstreamproxy.bootstrap.ca_bundle import (
    MAX_CA_RESPONSE_SIZE,
    build_super_bundle,
    fetch_ca_cert,
    find_system_bundle,
    prepare_ca_bundle,
    redact_url,
    write_bundle,
)
from upstreamproxy.errors import ConfigError

# -- throwaway CAs ------------------------------------------------------------------------------

SYS_A = make_ca("system root A")
SYS_B = make_ca("system root B")
EGRESS = make_ca("egress CA")
OTHER = make_ca("user CA")
LEAF = EGRESS.issue(["127.0.0.1"])


def system_pem() -> bytes:
    return SYS_A.cert_pem() + SYS_B.cert_pem()


def ders(pem: bytes) -> list[bytes]:
    return [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(pem)]


def der(ca_pem: bytes) -> bytes:
    return ders(ca_pem)[0]


# -- a local HTTP server ------------------------------------------------------------------------

Route = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Server:
    base: str
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base + path


def body(data: bytes, status: int = 200, length: bool = True) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/x-pem-file")
        if length:
            handler.send_header("Content-Length", str(len(data)))
        else:
            handler.send_header("Connection", "close")
        handler.end_headers()
        with contextlib.suppress(OSError):  # the client gave up early (size cap): expected
            handler.wfile.write(data)

    return route


def redirect(location: str) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return route


def serve(context: ssl.SSLContext | None = None) -> Iterator[Server]:
    holder: dict[str, Server] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            srv = holder["server"]
            srv.requests.append(self.path)
            route = srv.routes.get(self.path)
            if route is None:
                body(b"not found", 404)(self)
            else:
                route(self)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    scheme = "http"
    if context is not None:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        scheme = "https"
    holder["server"] = Server(f"{scheme}://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield holder["server"]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    yield from serve()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[Server]:
    (tmp_path / "leaf.pem").write_bytes(LEAF.chain_pem())
    (tmp_path / "leaf.key").write_bytes(LEAF.key_pem())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    yield from serve(context)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/ca-cert"
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


@pytest.fixture(autouse=True)
def hostile_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with proxy variables pointing at a dead port: the fetch must ignore them."""
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)


# -- fetch --------------------------------------------------------------------------------------


def test_fetch_goes_direct_despite_proxy_env(server: Server) -> None:
    server.routes["/ca-cert"] = body(EGRESS.cert_pem())
    assert fetch_ca_cert(server.url("/ca-cert"), timeout=5) == EGRESS.cert_pem()
    assert server.requests == ["/ca-cert"]


def test_fetch_over_https_with_given_context(tls_server: Server) -> None:
    tls_server.routes["/ca-cert"] = body(EGRESS.cert_pem())
    context = ssl.create_default_context(cadata=EGRESS.cert_pem().decode())
    assert fetch_ca_cert(tls_server.url("/ca-cert"), 5, context) == EGRESS.cert_pem()


def test_fetch_over_https_verifies_by_default(tls_server: Server) -> None:
    tls_server.routes["/ca-cert"] = body(EGRESS.cert_pem())
    with pytest.raises(ConfigError) as info:
        fetch_ca_cert(tls_server.url("/ca-cert"), 5)
    assert info.value.field == "ca_url"


def test_fetch_without_content_length(server: Server) -> None:
    server.routes["/ca-cert"] = body(EGRESS.cert_pem(), length=False)
    assert fetch_ca_cert(server.url("/ca-cert"), timeout=5) == EGRESS.cert_pem()


def test_fetch_http_error(server: Server) -> None:
    with pytest.raises(ConfigError, match="HTTP 404"):
        fetch_ca_cert(server.url("/missing"), timeout=5)


@pytest.mark.parametrize("length", [True, False])
def test_fetch_oversized_answer(server: Server, length: bool) -> None:
    server.routes["/big"] = body(b"A" * (MAX_CA_RESPONSE_SIZE + 1), length=length)
    with pytest.raises(ConfigError, match="larger than"):
        fetch_ca_cert(server.url("/big"), timeout=5)


def test_fetch_timeout_when_server_never_answers(silent_server: str) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match="timed out"):
        fetch_ca_cert(silent_server, timeout=0.3)
    assert time.monotonic() - started < 3


def test_fetch_total_deadline_against_a_dribbling_server(server: Server) -> None:
    def dribble(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        try:
            for _ in range(100):
                handler.wfile.write(b"A")
                handler.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    server.routes["/slow"] = dribble
    started = time.monotonic()
    with pytest.raises(ConfigError, match="timed out"):
        fetch_ca_cert(server.url("/slow"), timeout=0.5)
    assert time.monotonic() - started < 3


def test_fetch_connection_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(ConfigError) as info:
        fetch_ca_cert(f"http://127.0.0.1:{port}/ca-cert", timeout=2)
    assert info.value.field == "ca_url"


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "data:,x", "nope"])
def test_fetch_refuses_other_schemes(url: str) -> None:
    with pytest.raises(ConfigError, match="only http and https"):
        fetch_ca_cert(url, timeout=1)


def test_fetch_follows_a_same_scheme_redirect(server: Server) -> None:
    server.routes["/old"] = redirect("/ca-cert")
    server.routes["/ca-cert"] = body(EGRESS.cert_pem())
    assert fetch_ca_cert(server.url("/old"), timeout=5) == EGRESS.cert_pem()


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/ca.pem"])
def test_fetch_refuses_redirect_to_other_schemes(server: Server, target: str) -> None:
    server.routes["/old"] = redirect(target)
    with pytest.raises(ConfigError, match="refusing redirect"):
        fetch_ca_cert(server.url("/old"), timeout=5)


def test_fetch_refuses_https_to_http_downgrade(tls_server: Server, server: Server) -> None:
    server.routes["/ca-cert"] = body(EGRESS.cert_pem())
    tls_server.routes["/old"] = redirect(server.url("/ca-cert"))
    context = ssl.create_default_context(cadata=EGRESS.cert_pem().decode())
    with pytest.raises(ConfigError, match="refusing redirect"):
        fetch_ca_cert(tls_server.url("/old"), 5, context)
    assert server.requests == []


def test_errors_never_show_url_credentials(server: Server) -> None:
    url = server.url("/missing").replace("http://", "http://user:hunter2@") + "?token=s3cret"
    with pytest.raises(ConfigError) as info:
        fetch_ca_cert(url, timeout=5)
    assert "hunter2" not in str(info.value) and "s3cret" not in str(info.value)


def test_redact_url() -> None:
    assert redact_url("https://u:p@h.example:8443/v1/ca?t=1#f") == "https://h.example:8443/v1/ca"
    assert redact_url("http://[::1]:80/x") == "http://[::1]:80/x"


# -- build_super_bundle -------------------------------------------------------------------------


def test_super_bundle_is_system_then_custom() -> None:
    pem = build_super_bundle(system_pem(), [EGRESS.cert_pem()])
    assert ders(pem) == [der(SYS_A.cert_pem()), der(SYS_B.cert_pem()), der(EGRESS.cert_pem())]
    # every TLS stack we care about loads it (OpenSSL here)
    context = ssl.create_default_context(cadata=pem.decode())
    assert len(context.get_ca_certs()) == 3


def test_super_bundle_dedupes_across_system_and_custom() -> None:
    pem = build_super_bundle(
        system_pem() + SYS_A.cert_pem(), [SYS_B.cert_pem(), EGRESS.cert_pem(), EGRESS.cert_pem()]
    )
    assert ders(pem) == [der(SYS_A.cert_pem()), der(SYS_B.cert_pem()), der(EGRESS.cert_pem())]


def test_super_bundle_normalises_formatting() -> None:
    # CRLF line endings, comments, different wrapping: same certificate, one canonical copy.
    messy = b"# Comment\r\n" + SYS_A.cert_pem().replace(b"\n", b"\r\n") + b"\ntrailing junk\n"
    pem = build_super_bundle(messy + SYS_A.cert_pem(), [])
    assert pem == SYS_A.cert_pem()


def test_system_non_certificate_blocks_are_dropped() -> None:
    key = SYS_A.key_pem()
    trusted = SYS_B.cert_pem().replace(b"CERTIFICATE", b"TRUSTED CERTIFICATE")
    broken = b"-----BEGIN CERTIFICATE-----\n!!!notbase64!!!\n-----END CERTIFICATE-----\n"
    pem = build_super_bundle(key + SYS_A.cert_pem() + trusted + broken, [])
    assert pem == SYS_A.cert_pem()
    assert b"PRIVATE KEY" not in pem


def test_custom_multi_certificate_file_is_accepted() -> None:
    pem = build_super_bundle(system_pem(), [EGRESS.cert_pem() + OTHER.cert_pem()])
    assert len(ders(pem)) == 4


@pytest.mark.parametrize(
    ("custom", "problem"),
    [
        (b"<html>not a certificate</html>", "not a PEM certificate"),
        (LEAF.cert_pem(), "not a CA"),
        (EGRESS.key_pem() + EGRESS.cert_pem(), "PRIVATE KEY"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a PEM"),
        (b"", "not a PEM certificate"),
    ],
)
def test_custom_pem_must_be_ca_certificates_only(custom: bytes, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        build_super_bundle(system_pem(), [custom])
    assert info.value.field == "ca_certificate[0]"


# -- files --------------------------------------------------------------------------------------


def test_write_bundle_mode_is_0644_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_bundle(tmp_path / "sub" / "bundle.pem", system_pem())
    finally:
        os.umask(old)
    info = (tmp_path / "sub" / "bundle.pem").stat()
    assert stat.S_IMODE(info.st_mode) == 0o644
    assert (tmp_path / "sub" / "bundle.pem").read_bytes() == system_pem()


def test_write_bundle_replaces_atomically_and_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "bundle.pem"
    write_bundle(target, SYS_A.cert_pem())

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(ConfigError, match="No space left"):
        write_bundle(target, system_pem())
    assert target.read_bytes() == SYS_A.cert_pem()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.pem"]


def test_write_bundle_refuses_empty(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        write_bundle(tmp_path / "b.pem", b"")
    assert not (tmp_path / "b.pem").exists()


def test_find_system_bundle_takes_first_usable_candidate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty.crt"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.crt"
    junk.write_bytes(b"no certificates here")
    good = tmp_path / "good.crt"
    good.write_bytes(system_pem())
    monkeypatch.setattr(
        ssl,
        "get_default_verify_paths",
        lambda: ssl.DefaultVerifyPaths(
            str(tmp_path / "nope"),
            str(tmp_path),
            "SSL_CERT_FILE",
            str(tmp_path / "nope"),
            "SSL_CERT_DIR",
            str(tmp_path),
        ),
    )
    candidates = [str(tmp_path / "missing"), str(empty), str(junk), str(tmp_path), str(good)]
    assert find_system_bundle(candidates) == good
    assert find_system_bundle([str(empty)]) is None


def test_find_system_bundle_falls_back_to_openssl_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "cert.pem"
    good.write_bytes(system_pem())
    monkeypatch.setattr(
        ssl,
        "get_default_verify_paths",
        lambda: ssl.DefaultVerifyPaths(
            str(good), str(tmp_path), "SSL_CERT_FILE", str(good), "SSL_CERT_DIR", str(tmp_path)
        ),
    )
    assert find_system_bundle([]) == good


def test_this_machine_has_a_system_bundle() -> None:
    found = find_system_bundle()
    if found is None:
        pytest.skip("no system CA bundle on this machine")
    assert ca_bundle._bundle_data(found) is not None


def test_only_a_regular_pem_file_looks_like_a_bundle(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes it: a blocking open would hang the search for ever
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    pem = tmp_path / "roots.pem"
    pem.write_bytes(system_pem())
    for path in (fifo, empty, tmp_path, Path("/dev/zero"), tmp_path / "missing"):
        assert promptly(lambda p=path: ca_bundle._bundle_data(p), 5) is None, path
    assert ca_bundle._bundle_data(pem) == pem.read_bytes()


# -- prepare_ca_bundle --------------------------------------------------------------------------


@pytest.fixture
def system_file(tmp_path: Path) -> Path:
    path = tmp_path / "system.crt"
    path.write_bytes(system_pem())
    return path


def test_prepare_from_url(tmp_path: Path, server: Server, system_file: Path) -> None:
    server.routes["/v1/code/upstreamproxy/ca-cert"] = body(EGRESS.cert_pem())
    out = tmp_path / "out" / "bundle.pem"
    report = prepare_ca_bundle(
        out, ca_url=server.url("/v1/code/upstreamproxy/ca-cert"), system_bundle=system_file
    )
    assert ders(out.read_bytes()) == [*ders(system_pem()), der(EGRESS.cert_pem())]
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert (report.system_certs, report.custom_certs, report.total_certs) == (2, 1, 3)
    assert report.system_source == str(system_file)
    assert report.custom_sources == (server.url("/v1/code/upstreamproxy/ca-cert"),)
    assert report.duplicates == 0
    assert report.warnings == ()
    assert "3 certificates" in report.describe()


def test_prepare_from_file_and_extras(tmp_path: Path, system_file: Path) -> None:
    ca_file = tmp_path / "egress.pem"
    ca_file.write_bytes(EGRESS.cert_pem())
    user = tmp_path / "user.pem"
    user.write_bytes(OTHER.cert_pem() + SYS_A.cert_pem())
    out = tmp_path / "bundle.pem"
    out.write_bytes(b"stale bundle from an earlier run")
    report = prepare_ca_bundle(
        out,
        ca_file=ca_file,
        system_bundle=system_file,
        extra_bundles=[user, out, tmp_path / "absent.pem"],
    )
    assert ders(out.read_bytes()) == [
        der(SYS_A.cert_pem()),
        der(SYS_B.cert_pem()),
        der(EGRESS.cert_pem()),
        der(OTHER.cert_pem()),
    ]
    assert report.extra_sources == (str(user),)
    assert (report.extra_certs, report.duplicates) == (1, 1)
    assert any("output bundle itself" in w for w in report.warnings)
    assert any("absent.pem" in w for w in report.warnings)


def test_prepare_system_only(tmp_path: Path, system_file: Path) -> None:
    report = prepare_ca_bundle(tmp_path / "b.pem", system_bundle=system_file)
    assert report.total_certs == 2 and report.custom_sources == ()


def test_prepare_falls_back_to_certifi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("certifi")
    monkeypatch.setattr(ca_bundle, "_read_system_bundle", lambda candidates: None)
    report = prepare_ca_bundle(tmp_path / "b.pem")
    assert report.system_source_kind == "certifi"
    assert report.system_certs > 50
    assert any("certifi" in w for w in report.warnings)


def test_each_bundle_is_read_once_when_it_is_chosen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The system bundle and each extra one were read to be chosen, then again by path: a
    file rewritten in between (a package update) failed the start with "holds no
    certificates" instead of being used as read."""
    roots = tmp_path / "roots.pem"
    roots.write_bytes(system_pem())
    extra = tmp_path / "mine.pem"
    extra.write_bytes(make_ca("Mine").cert_pem())
    monkeypatch.setattr(ca_bundle, "SYSTEM_BUNDLE_CANDIDATES", (str(roots),))
    reads: list[str] = []
    real = ca_bundle.read_capped

    def counting(path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        reads.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ca_bundle, "read_capped", counting)
    report = prepare_ca_bundle(tmp_path / "b.pem", extra_bundles=[extra])
    assert report.system_source == str(roots) and report.system_certs == 2
    assert report.extra_sources == (str(extra),) and report.extra_certs == 1
    assert reads.count(str(roots)) == 1 and reads.count(str(extra)) == 1


def test_prepare_uses_the_real_system_store_by_default(tmp_path: Path) -> None:
    if find_system_bundle() is None:
        pytest.skip("no system CA bundle on this machine")
    report = prepare_ca_bundle(tmp_path / "b.pem")
    assert report.system_source_kind == "system"
    assert report.system_certs > 10


@pytest.mark.parametrize(
    "answer",
    [b"<html>gateway error page</html>", LEAF.cert_pem(), b"A" * (MAX_CA_RESPONSE_SIZE + 10)],
)
def test_prepare_failure_leaves_previous_bundle_untouched(
    tmp_path: Path, server: Server, system_file: Path, answer: bytes
) -> None:
    out = tmp_path / "bundle.pem"
    write_bundle(out, SYS_A.cert_pem())
    server.routes["/ca-cert"] = body(answer)
    with pytest.raises(ConfigError) as info:
        prepare_ca_bundle(out, ca_url=server.url("/ca-cert"), system_bundle=system_file)
    assert info.value.field == "ca_url"
    assert server.url("/ca-cert") in str(info.value)
    assert out.read_bytes() == SYS_A.cert_pem()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.pem", "system.crt"]


def test_prepare_timeout(tmp_path: Path, silent_server: str, system_file: Path) -> None:
    with pytest.raises(ConfigError, match="timed out"):
        prepare_ca_bundle(
            tmp_path / "b.pem", ca_url=silent_server, timeout=0.2, system_bundle=system_file
        )
    assert not (tmp_path / "b.pem").exists()


def test_prepare_bad_ca_file(tmp_path: Path, system_file: Path) -> None:
    ca_file = tmp_path / "leaf.pem"
    ca_file.write_bytes(LEAF.cert_pem())
    with pytest.raises(ConfigError, match="not a CA") as info:
        prepare_ca_bundle(tmp_path / "b.pem", ca_file=ca_file, system_bundle=system_file)
    assert info.value.field == "ca_file"
    with pytest.raises(ConfigError, match="cannot read") as info:
        prepare_ca_bundle(tmp_path / "b.pem", ca_file=tmp_path / "nope", system_bundle=system_file)
    assert info.value.field == "ca_file"


def prepare_within(seconds: float, **kwargs: object) -> ca_bundle.BundleReport | ConfigError:
    """prepare_ca_bundle, the test's own wait bounded: its report or ConfigError."""
    try:
        return promptly(lambda: prepare_ca_bundle(**kwargs), seconds)  # type: ignore[arg-type]
    except ConfigError as exc:
        return exc


def test_prepare_ca_file_from_a_pipe(tmp_path: Path, system_file: Path) -> None:
    # --ca-file <(cat ca.pem): a pipe under /dev/fd, its writer still at work.
    read_end, write_end = os.pipe()
    pem = EGRESS.cert_pem()

    def write() -> None:
        with os.fdopen(write_end, "wb") as handle:
            for start in range(0, len(pem), 100):
                handle.write(pem[start : start + 100])
                handle.flush()
                time.sleep(0.005)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        report = prepare_within(
            10,
            out_path=tmp_path / "b.pem",
            ca_file=Path(f"/dev/fd/{read_end}"),
            system_bundle=system_file,
            timeout=5,
        )
    finally:
        writer.join(10)
        os.close(read_end)
    assert isinstance(report, ca_bundle.BundleReport), report
    assert report.custom_certs == 1
    assert der(EGRESS.cert_pem()) in ders((tmp_path / "b.pem").read_bytes())


def test_prepare_ca_file_fifo_nobody_writes_fails_within_the_timeout(
    tmp_path: Path, system_file: Path
) -> None:
    # It blocked for ever: the file was opened, blocking, for a writer that never came.
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    error = prepare_within(
        10, out_path=tmp_path / "b.pem", ca_file=fifo, system_bundle=system_file, timeout=0.3
    )
    assert time.monotonic() - started < 5
    assert isinstance(error, ConfigError) and error.field == "ca_file"
    assert error.problem == f"{fifo} did not finish within 0.3 s"
    assert not (tmp_path / "b.pem").exists()


def test_prepare_ca_file_dev_zero_is_refused_by_the_cap(tmp_path: Path, system_file: Path) -> None:
    started = time.monotonic()
    error = prepare_within(
        10,
        out_path=tmp_path / "b.pem",
        ca_file=Path("/dev/zero"),
        system_bundle=system_file,
        timeout=5,
    )
    assert time.monotonic() - started < 5
    assert isinstance(error, ConfigError) and error.field == "ca_file"
    assert error.problem == f"/dev/zero is larger than {MAX_CA_RESPONSE_SIZE} bytes"


def test_prepare_ca_file_directory_is_refused(tmp_path: Path, system_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*: not a regular file") as info:
        prepare_ca_bundle(tmp_path / "b.pem", ca_file=tmp_path, system_bundle=system_file)
    assert info.value.field == "ca_file"


def test_prepare_system_bundle_must_be_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "system.fifo"
    os.mkfifo(fifo)
    error = prepare_within(10, out_path=tmp_path / "b.pem", system_bundle=fifo)
    assert isinstance(error, ConfigError) and error.field == "system_bundle"
    assert error.problem == f"cannot read {fifo}: not a regular file"


def test_prepare_empty_system_bundle_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.crt"
    empty.write_bytes(b"# nothing\n")
    with pytest.raises(ConfigError, match="holds no certificates") as info:
        prepare_ca_bundle(tmp_path / "b.pem", system_bundle=empty)
    assert info.value.field == "system_bundle"


def test_prepare_warns_about_an_expired_custom_ca(tmp_path: Path, system_file: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old egress CA")])
    now = dt.datetime.now(dt.UTC)
    expired = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    ca_file = tmp_path / "old.pem"
    ca_file.write_bytes(expired.public_bytes(Encoding.PEM))
    report = prepare_ca_bundle(tmp_path / "b.pem", ca_file=ca_file, system_bundle=system_file)
    assert any("expired" in w for w in report.warnings)
