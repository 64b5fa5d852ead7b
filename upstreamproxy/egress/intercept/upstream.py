"""Re-originating TLS to the real upstream, on a TCP connection the egress dialer opened.

The dialer (passed in by the egress) has already resolved and checked the address; this module
only adds TLS with full verification against ``server_hostname=connect_host`` and maps every
failure to a :class:`~.headers.Refusal` the engine answers with (502/504).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

from ..dialer import DialError
from .headers import Refusal
from .leaves import ALPN_PROTOCOLS
from .peer import close_quietly

UpstreamConnector = Callable[
    [str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
]


def make_upstream_context(cafile: str | None = None) -> ssl.SSLContext:
    """Client context verifying upstreams: system roots, or only ``cafile`` when given (tests,
    private upstreams). Offers HTTP/1.1 only; TLS 1.2 minimum."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
    return ctx


async def open_upstream(
    connector: UpstreamConnector,
    connect_host: str,
    tls_name: str,
    port: int,
    context: ssl.SSLContext,
    connect_timeout: float,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Dial through ``connector`` and complete a verified TLS handshake for ``tls_name``."""
    try:
        async with asyncio.timeout(connect_timeout):
            reader, writer = await connector(connect_host, port)
    except DialError as exc:
        raise Refusal(exc.status, exc.reason, "the upstream could not be reached") from None
    except TimeoutError:
        raise Refusal(
            504, "upstream-connect-timeout", "connecting to the upstream timed out"
        ) from None
    except OSError as exc:
        raise Refusal(502, "upstream-connect-failed", exc.strerror or type(exc).__name__) from None
    try:
        async with asyncio.timeout(connect_timeout):
            await writer.start_tls(
                context, server_hostname=tls_name, ssl_handshake_timeout=connect_timeout
            )
    except ssl.SSLCertVerificationError as exc:
        await close_quietly(writer)
        raise Refusal(
            502,
            "upstream-certificate-invalid",
            f"the upstream's certificate failed verification: {exc.verify_message}",
        ) from None
    except TimeoutError:
        await close_quietly(writer)
        raise Refusal(504, "upstream-tls-timeout", "the upstream TLS handshake timed out") from None
    except (ssl.SSLError, OSError) as exc:
        await close_quietly(writer)
        raise Refusal(
            502, "upstream-tls-failed", f"TLS to the upstream failed ({type(exc).__name__})"
        ) from None
    ssl_object = writer.get_extra_info("ssl_object")
    alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
    if alpn not in (None, *ALPN_PROTOCOLS):
        await close_quietly(writer)
        raise Refusal(502, "upstream-alpn", f"the upstream chose {alpn!r}, not HTTP/1.1")
    return reader, writer
