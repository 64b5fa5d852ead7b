# upstreamproxy start-up hook for dev containers and sandboxes (POSIX sh, sourced).
#
# One line in the container's start command:
#
#     . /usr/local/share/upstreamproxy/upstreamproxy-start.sh
#
# e.g. as an entrypoint that then runs the real command with the proxy environment:
#
#     sh -c '. /usr/local/share/upstreamproxy/upstreamproxy-start.sh && exec "$@"' sh CMD ARGS...
#
# It runs `upstreamproxy start --background`, configured by the UPSTREAMPROXY_* variables
# (TOKEN_FILE, SESSION_ID, EGRESS_URL, and optionally STATE_DIR, CA_FILE, NO_PROXY,
# FAIL_CLOSED), waits until the relay is ready, and sources the environment file it wrote, so
# everything started after this line uses the relay and trusts the platform's CA. Run as a
# plain script (`sh upstreamproxy-start.sh`, e.g. a devcontainer postStartCommand) it only
# starts the session; login shells then pick the environment up via profile.d.
#
# Fail-open by default: when anything goes wrong `start` says why on stderr, the environment
# is left as it was, and this returns 0. With UPSTREAMPROXY_FAIL_CLOSED=1 it returns 1.
# UPSTREAMPROXY_BIN names the executable if `upstreamproxy` is not on PATH.
#
# Hardened deployment (recommended): run this hook as root, before dropping to the sandbox's
# user. `start` then runs the relay as its own unprivileged user (UPSTREAMPROXY_RELAY_USER,
# default `upstreamproxy`, created if missing; UPSTREAMPROXY_RELAY_UID to pin its uid), so no
# sandbox process can ever trace it or read its token; UPSTREAMPROXY_LOCK=1 also lets only
# that user leave the network namespace (nftables). As root, the state directory defaults to
# /run/upstreamproxy (readable by everyone, writable by root only); set the same
# UPSTREAMPROXY_STATE_DIR in the container environment so the sandbox's shells find it:
#
#     sh -c '. /usr/local/share/upstreamproxy/upstreamproxy-start.sh &&
#            exec setpriv --reuid=vscode --regid=vscode --init-groups "$@"' sh CMD ARGS...

_upstreamproxy_bin=${UPSTREAMPROXY_BIN:-upstreamproxy}
_upstreamproxy_status=0
if [ "$(id -u)" = 0 ] && [ -z "${UPSTREAMPROXY_STATE_DIR:-}" ]; then
    UPSTREAMPROXY_STATE_DIR=/run/upstreamproxy
    export UPSTREAMPROXY_STATE_DIR
fi
if command -v "$_upstreamproxy_bin" >/dev/null 2>&1; then
    _upstreamproxy_env_file=$("$_upstreamproxy_bin" start --background) || _upstreamproxy_status=$?
    if [ "$_upstreamproxy_status" -eq 0 ] && [ -n "$_upstreamproxy_env_file" ] \
        && [ -r "$_upstreamproxy_env_file" ]; then
        . "$_upstreamproxy_env_file"
    fi
else
    echo "upstreamproxy-start: $_upstreamproxy_bin not found; continuing without the proxy" >&2
    case ${UPSTREAMPROXY_FAIL_CLOSED:-} in
        1 | true | yes | on) _upstreamproxy_status=1 ;;
    esac
fi
unset _upstreamproxy_bin _upstreamproxy_env_file
# The status of the last command is the status of `.`: 0, or 1 under fail-closed.
if [ "$_upstreamproxy_status" -eq 0 ]; then
    unset _upstreamproxy_status
    true
else
    unset _upstreamproxy_status
    false
fi
