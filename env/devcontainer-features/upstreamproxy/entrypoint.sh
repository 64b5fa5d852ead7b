#!/bin/sh
# Entrypoint of the upstreamproxy Dev Container Feature: start the session, then run the
# container's command (if any) with the proxy environment.
#
# It runs at every container start, a `docker restart` included, as the container's user
# (root unless the image says otherwise, which is what lets the relay run under its own uid).
# The devcontainers CLI runs Feature entrypoints before the container's command; a plain
# Dockerfile uses it as ENTRYPOINT:
#
#     ENTRYPOINT ["/usr/local/share/upstreamproxy/entrypoint.sh"]
#     CMD ["sleep", "infinity"]
#
# Every start needs a fresh token in UPSTREAMPROXY_TOKEN_FILE (the first start deleted the
# last one). Without it the session continues without the proxy and the warning goes to
# stderr (`docker logs`); shells then get no proxy settings at all, never stale ones.
# Settings: the container's UPSTREAMPROXY_* variables, else the Feature's options
# (/etc/upstreamproxy/start.env).

if [ -r /etc/upstreamproxy/start.env ]; then
    . /etc/upstreamproxy/start.env
fi
# Sourced, so that the command below inherits HTTPS_PROXY, SSL_CERT_FILE, ...; returns 1 only
# under UPSTREAMPROXY_FAIL_CLOSED=1, and then the command does not run.
. /usr/local/share/upstreamproxy/upstreamproxy-start.sh || exit 1
if [ "$#" -gt 0 ]; then
    exec "$@"
fi
