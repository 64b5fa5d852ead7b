"""The relay process a root ``start`` launches under the relay user (see :mod:`.privsep`).

Run as ``python -m upstreamproxy.bootstrap.relay_child`` with stdin and stdout pipes to the
supervisor. In this order, before anything else that could fail or take time:

1. ``PR_SET_DUMPABLE 0`` and no core dumps (:mod:`.hardening`, which imports only the
   standard library), and ``PR_SET_PDEATHSIG`` so the relay never outlives its supervisor
   (set here because the uid change before ``execve`` clears it);
2. refuse to go on if a tracer is attached (``TracerPid``) or the supervisor is gone;
3. read one JSON line from stdin: the relay configuration, the token, the log level;
4. start the relay and answer ``{"status": "ready", "proxy_url": ...}`` on stdout (or
   ``{"status": "failed", "reason": ...}`` and exit 1, with the ``field`` and ``problem`` of a
   setting the relay user cannot use, e.g. a CA file it cannot read); serve until
   SIGTERM/SIGINT.

Nothing here writes the token anywhere; it lives only in the Relay's :class:`Secret`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

from .hardening import HardeningError, _libc_prctl, make_non_dumpable, refuse_if_traced

PR_SET_PDEATHSIG = 1
MAX_INPUT = 1024 * 1024


def _answer(document: dict[str, object]) -> None:
    os.write(1, json.dumps(document).encode() + b"\n")


def _fail(reason: str, **setting: str) -> int:
    _answer({"status": "failed", "reason": reason, **setting})
    return 1


def _read_input() -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_INPUT:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def main() -> int:
    hardening = make_non_dumpable()
    # The supervisor stops us on its way out anyway; this covers a supervisor killed -9.
    with contextlib.suppress(OSError, AttributeError):
        _libc_prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getuid() == 0 or os.geteuid() == 0:  # never: the supervisor runs a root relay itself
        return _fail("the relay process still runs as root; refusing")
    if not hardening.ok:
        return _fail(f"process hardening incomplete: {hardening.describe()}")
    try:
        refuse_if_traced()
    except HardeningError as exc:
        return _fail(str(exc))
    data = _read_input()
    if len(data) > MAX_INPUT:
        return _fail("configuration larger than 1 MiB")
    try:
        document = json.loads(data)
        fields = dict(document["config"])
        token = str(document["token"])
        level = int(document.get("log_level", 20))
        parent = int(document.get("parent", 0))
    except (ValueError, KeyError, TypeError):
        return _fail("malformed configuration on stdin")
    del data, document
    if parent and os.getppid() != parent:
        return _fail("the supervisor is gone")

    import asyncio
    import logging

    from ..errors import ConfigError
    from ..relay import Relay, RelayConfig
    from ..secret import Secret

    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("upstreamproxy.relay_child")
    log.info("relay process hardened: %s", hardening.describe())
    try:
        config = RelayConfig(token=Secret(token), **fields)
        config.validate()
    except ConfigError as exc:  # valid to start (it checked), not to us: an unreadable file
        return _fail(f"invalid relay configuration: {exc}", field=exc.field, problem=exc.problem)
    except Exception as exc:  # the supervisor gets the reason, never the token
        return _fail(f"invalid relay configuration: {type(exc).__name__}: {exc}")
    del token

    async def serve() -> int:
        relay = Relay(config)
        try:
            await relay.start()
        except OSError as exc:
            return _fail(
                f"relay cannot listen on {config.listen_host}:{config.listen_port}: "
                f"{exc.strerror or exc}"
            )
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[int] = loop.create_future()

        def _stop(signum: int) -> None:
            if not stop.done():
                stop.set_result(signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, _stop, signum)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            _answer({"status": "ready", "proxy_url": relay.proxy_url})
            received = await stop
            log.info("relay process received %s, stopping", signal.Signals(received).name)
        finally:
            await relay.stop()
        return 0

    try:
        return asyncio.run(serve())
    except Exception as exc:
        log.debug("relay process failed", exc_info=True)
        return _fail(f"unexpected {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
