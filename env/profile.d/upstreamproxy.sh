# /etc/profile.d/upstreamproxy.sh: login shells pick up the running upstreamproxy session.
#
# Sources <state-dir>/env.sh (HTTPS_PROXY, NO_PROXY, SSL_CERT_FILE, ...) when the session that
# wrote it is still running; does nothing otherwise. Never fails, never prints. The state
# directory is found as `upstreamproxy start` chooses it: UPSTREAMPROXY_STATE_DIR, else
# $XDG_RUNTIME_DIR/upstreamproxy, else $HOME/.cache/upstreamproxy. For interactive shells that
# are not login shells, source this file from /etc/bash.bashrc (or ~/.bashrc) as well.
#
# "Still running" is decided the way `upstreamproxy env` decides it, whatever pid reuse does
# (a SIGKILLed session leaves its files behind, and after a container restart another process
# may have its pid): start.pid holds "PID START_TICKS BOOT_ID", and the session counts only
# while /proc/PID/stat shows that very start time (field 22) on this boot and the process is
# not a zombie: two reads of world-readable files. Safe under `set -eu`.
#
# And only a directory `upstreamproxy env` would trust: owned by the caller or root, with no
# group or other write bit (and no ACL at all, stricter than `env`, which sees an ACL's mask
# in the group bits) - else whoever can write it chooses what this shell runs. The directory
# is opened once (fd 9, restored afterwards) and checked and read only through that
# descriptor, /proc/self/fd/9: whoever can write its parent could otherwise swap the path (a
# symlink flipped between their directory and a trusted one) between the check and the reads.
# The check takes one `ls -ldLn`: no POSIX shell has a builtin for a file's mode or owner.

_upstreamproxy_dir=${UPSTREAMPROXY_STATE_DIR:-}
if [ -z "$_upstreamproxy_dir" ]; then
    case ${XDG_RUNTIME_DIR:-} in
        /*) _upstreamproxy_dir=$XDG_RUNTIME_DIR/upstreamproxy ;;
        *) _upstreamproxy_dir=${HOME:-/nonexistent}/.cache/upstreamproxy ;;
    esac
fi

# $1 pid, $2 start ticks, $3 boot id, as recorded by the session. Positional parameters are
# the function's own, so `set --` does not touch the shell's.
_upstreamproxy_alive() {
    _upstreamproxy_stat=
    [ -r "/proc/$1/stat" ] || return 1
    read -r _upstreamproxy_stat 2>/dev/null <"/proc/$1/stat" || [ -n "$_upstreamproxy_stat" ] || return 1
    if [ -r /proc/sys/kernel/random/boot_id ] && [ "$3" != - ]; then
        _upstreamproxy_boot=
        read -r _upstreamproxy_boot 2>/dev/null </proc/sys/kernel/random/boot_id
        [ "$_upstreamproxy_boot" = "$3" ] || return 1
    fi
    _upstreamproxy_want=$2
    # Fields after the command name, which may hold spaces and ")": state is the first,
    # the start time the twentieth. Split on spaces whatever the caller's IFS is.
    _upstreamproxy_ifs_set=${IFS+x}
    _upstreamproxy_ifs=${IFS-}
    IFS=' '
    # shellcheck disable=SC2086  # splitting is the point; the fields hold no glob characters
    set -- ${_upstreamproxy_stat##*) }
    if [ -n "$_upstreamproxy_ifs_set" ]; then IFS=$_upstreamproxy_ifs; else unset IFS; fi
    [ "$#" -ge 20 ] || return 1
    case $1 in Z | X | x) return 1 ;; esac
    shift 19
    [ "$1" = "$_upstreamproxy_want" ]
}

# $1 the state directory (its descriptor's path): a directory, ours or root's, that nobody
# else may write.
_upstreamproxy_trusted() {
    _upstreamproxy_ls=$(LC_ALL=C ls -ldLn -- "$1" 2>/dev/null) || return 1
    _upstreamproxy_mode= _upstreamproxy_uid=
    IFS=' ' read -r _upstreamproxy_mode _upstreamproxy_rest _upstreamproxy_uid \
        _upstreamproxy_rest <<_upstreamproxy_EOF
$_upstreamproxy_ls
_upstreamproxy_EOF
    # d, owner rwx, group r, *no group w*, group x, other r, *no other w*, other x; a
    # trailing "+" (an ACL) may grant anyone write, a "." (an SELinux label) does not.
    case $_upstreamproxy_mode in d????-??-? | d????-??-?.) ;; *) return 1 ;; esac
    [ "$_upstreamproxy_uid" = 0 ] || [ -O "$1" ]
}

# "$dir/." opens only a directory (a FIFO swapped in cannot block the open); stderr is quiet
# for the open and everything after it (the snippet never prints).
if [ -d "$_upstreamproxy_dir" ]; then
    {
        _upstreamproxy_fd=/proc/self/fd/9
        if [ -r "$_upstreamproxy_fd/env.sh" ] && [ -r "$_upstreamproxy_fd/start.pid" ] \
            && _upstreamproxy_trusted "$_upstreamproxy_fd"; then
            _upstreamproxy_pid= _upstreamproxy_start= _upstreamproxy_bootid=
            IFS=' ' read -r _upstreamproxy_pid _upstreamproxy_start _upstreamproxy_bootid \
                _upstreamproxy_rest <"$_upstreamproxy_fd/start.pid" || :
            case $_upstreamproxy_pid:$_upstreamproxy_start in
                *[!0-9:]* | :* | *:) ;; # not "PID START": an old or damaged file, trust nothing
                *)
                    if _upstreamproxy_alive "$_upstreamproxy_pid" "$_upstreamproxy_start" \
                        "${_upstreamproxy_bootid:--}"; then
                        . "$_upstreamproxy_fd/env.sh"
                    fi
                    ;;
            esac
        fi
    } 2>/dev/null 9<"$_upstreamproxy_dir/." || :
fi
unset _upstreamproxy_dir _upstreamproxy_pid _upstreamproxy_start _upstreamproxy_bootid \
    _upstreamproxy_rest _upstreamproxy_stat _upstreamproxy_boot _upstreamproxy_want \
    _upstreamproxy_ifs _upstreamproxy_ifs_set _upstreamproxy_ls _upstreamproxy_mode \
    _upstreamproxy_uid _upstreamproxy_fd
unset -f _upstreamproxy_alive _upstreamproxy_trusted
true
