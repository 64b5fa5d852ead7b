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
# last one). Without it the session continues without the proxy and the reason goes to
# stderr (`docker logs`); shells then get no proxy settings at all, never stale ones.
# Settings: the container's UPSTREAMPROXY_* variables, else the Feature's options
# (/etc/upstreamproxy/start.env).
#
# What the start said on stderr (its warnings and its outcome, one line each; never the token)
# is also kept in <state-dir>/entrypoint.log, tagged with this container run (PID 1's start
# time), for poststart.sh: the Feature's postStartCommand shows it to whoever started the dev
# container, once the session is ready.

if [ -r /etc/upstreamproxy/start.env ]; then
    . /etc/upstreamproxy/start.env
fi
_upstreamproxy_run=$(sed 's/.*) //' /proc/1/stat 2>/dev/null | cut -d' ' -f20)
_upstreamproxy_log=${UPSTREAMPROXY_STATE_DIR:-/run/upstreamproxy}/entrypoint.log
_upstreamproxy_tmp=$(mktemp 2>/dev/null) || _upstreamproxy_tmp=
_upstreamproxy_rc=0
# Sourced, so that the command below inherits HTTPS_PROXY, SSL_CERT_FILE, ...; returns 1 only
# under UPSTREAMPROXY_FAIL_CLOSED=1, and then the command does not run.
if [ -n "$_upstreamproxy_tmp" ]; then
    . /usr/local/share/upstreamproxy/upstreamproxy-start.sh 2>"$_upstreamproxy_tmp" ||
        _upstreamproxy_rc=1
    cat "$_upstreamproxy_tmp" >&2
    {
        echo "run $_upstreamproxy_run"
        cat "$_upstreamproxy_tmp"
    } >"$_upstreamproxy_log.tmp" 2>/dev/null &&
        chmod 0644 "$_upstreamproxy_log.tmp" 2>/dev/null &&
        mv -f "$_upstreamproxy_log.tmp" "$_upstreamproxy_log" 2>/dev/null
    rm -f "$_upstreamproxy_tmp" "$_upstreamproxy_log.tmp"
else
    . /usr/local/share/upstreamproxy/upstreamproxy-start.sh || _upstreamproxy_rc=1
fi
[ "$_upstreamproxy_rc" -eq 0 ] || exit 1
unset _upstreamproxy_run _upstreamproxy_log _upstreamproxy_tmp _upstreamproxy_rc
if [ "$#" -gt 0 ]; then
    exec "$@"
fi
