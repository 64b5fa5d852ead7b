"""Direct connection attempts from inside the sandbox namespace (run by test_netlock.py).

Usage: ``python netns_probe.py PROBE...`` with PROBE ``tcp:HOST:PORT`` or ``udp:HOST:PORT``
(HOST may be an IPv6 literal in brackets). Prints one JSON list: for each probe, whether it
got through (``ok``: TCP connected / UDP echo received), the errno name otherwise, and how
long it took. Every attempt is bounded by a 10 s timeout, reported as ``timeout``.
"""

from __future__ import annotations

import errno
import json
import socket
import sys
import time

TIMEOUT = 10.0


def probe(spec: str) -> dict[str, object]:
    kind, rest = spec.split(":", 1)
    host, _, port_text = rest.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    started = time.monotonic()
    result: dict[str, object] = {"probe": spec}
    sock_type = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, sock_type) as sock:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect((host, int(port_text)))
            if kind == "udp":
                # A rejected datagram comes back as an ICMP error: the send may succeed, the
                # error then surfaces on the next call on the connected socket.
                sock.send(b"ping")
                sock.recv(64)
            result["ok"] = True
        except TimeoutError:
            result.update(ok=False, error="timeout")
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc))
            result.update(ok=False, error=name)
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


if __name__ == "__main__":
    print(json.dumps([probe(spec) for spec in sys.argv[1:]]))
