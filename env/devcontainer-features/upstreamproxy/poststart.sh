#!/bin/sh
# postStartCommand of the upstreamproxy Dev Container Feature (runs as the remote user).
#
# Waits until the Feature's entrypoint has started the session for *this* container run (a
# dev container tool probes the user's environment right after the lifecycle commands, so the
# session must be ready by then), and repeats on stderr what the start said: its warnings and
# its outcome, one line each, so they appear in the postStart output and not only in
# `docker logs`. Never fails: a session that is not there is reported, not fatal.

log=${UPSTREAMPROXY_STATE_DIR:-/run/upstreamproxy}/entrypoint.log
run=$(sed 's/.*) //' /proc/1/stat 2>/dev/null | cut -d' ' -f20)
wait=${UPSTREAMPROXY_POSTSTART_WAIT:-60}
i=0
while [ "$i" -lt $((wait * 5)) ]; do
    if [ -r "$log" ] && [ "$(head -n 1 "$log" 2>/dev/null)" = "run $run" ]; then
        tail -n +2 "$log" >&2
        exit 0
    fi
    sleep 0.2
    i=$((i + 1))
done
echo "upstreamproxy: the container's entrypoint did not report on the session within ${wait}s" \
    "(see docker logs); continuing" >&2
exit 0
