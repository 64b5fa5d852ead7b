from __future__ import annotations

from conftest import Origin, TLSFiles, run

from upstreamproxy.relay import Relay


async def test_curl_through_relay(relay: Relay, https_origin: Origin, tls: TLSFiles) -> None:
    result = await run(
        "curl",
        "-sS",
        "--cacert",
        str(tls.ca_file),
        "-x",
        relay.proxy_url,
        "-p",
        https_origin.url + "/",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello from origin\n"
