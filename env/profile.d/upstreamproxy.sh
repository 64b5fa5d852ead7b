# /etc/profile.d/upstreamproxy.sh: login shells pick up the running upstreamproxy session.
#
# Sources <state-dir>/env.sh (HTTPS_PROXY, NO_PROXY, SSL_CERT_FILE, ...) when the session that
# wrote it is still running; does nothing otherwise. Never fails, never prints. The state
# directory is found as `upstreamproxy start` chooses it: UPSTREAMPROXY_STATE_DIR, else
# $XDG_RUNTIME_DIR/upstreamproxy, else $HOME/.cache/upstreamproxy. For interactive shells that
# are not login shells, source this file from /etc/bash.bashrc (or ~/.bashrc) as well.

_upstreamproxy_dir=${UPSTREAMPROXY_STATE_DIR:-}
if [ -z "$_upstreamproxy_dir" ]; then
    case ${XDG_RUNTIME_DIR:-} in
        /*) _upstreamproxy_dir=$XDG_RUNTIME_DIR/upstreamproxy ;;
        *) _upstreamproxy_dir=${HOME:-/nonexistent}/.cache/upstreamproxy ;;
    esac
fi
if [ -r "$_upstreamproxy_dir/env.sh" ] && [ -r "$_upstreamproxy_dir/start.pid" ]; then
    _upstreamproxy_pid=$(cat "$_upstreamproxy_dir/start.pid" 2>/dev/null)
    case $_upstreamproxy_pid in
        '' | *[!0-9]*) ;;
        *)
            # /proc works for a session of another user too (kill -0 would say EPERM).
            if [ -d "/proc/$_upstreamproxy_pid" ] || kill -0 "$_upstreamproxy_pid" 2>/dev/null; then
                . "$_upstreamproxy_dir/env.sh"
            fi
            ;;
    esac
fi
unset _upstreamproxy_dir _upstreamproxy_pid
true
