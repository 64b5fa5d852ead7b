#!/bin/sh
# Dev Container Feature "upstreamproxy": install script (runs as root at image build time).
#
# The devcontainers CLI (and VS Code) run it from the Feature's folder with the options of
# devcontainer-feature.json as upper-case variables (egressUrl -> EGRESSURL, ...). It can also
# be run by hand in a Dockerfile (see env/README.md, "Installing into a sandbox image"):
#
#     COPY . /tmp/upstreamproxy-feature
#     RUN SOURCE=wheels /tmp/upstreamproxy-feature/install.sh && rm -rf /tmp/upstreamproxy-feature
#
# What it installs and creates:
#   /opt/upstreamproxy                        a virtual environment with upstreamproxy (so no
#                                             fight with the distribution's Python, PEP 668)
#   /usr/local/bin/upstreamproxy              -> the venv's console script
#   /usr/local/share/upstreamproxy/           upstreamproxy-start.sh (the start hook),
#                                             entrypoint.sh (the Feature's entrypoint) and
#                                             poststart.sh (its postStartCommand)
#   /etc/profile.d/upstreamproxy.sh           login shells pick up the running session
#   /etc/bash.bashrc (and the like)           one line: interactive shells do too
#   /etc/upstreamproxy/start.env              the options as defaults for the start hook
#   /run/upstreamproxy                        the state directory (UPSTREAMPROXY_STATE_DIR)
#   the relay user (option relayUser)         a system user without home or login shell
set -eu

VENV=/opt/upstreamproxy
SHARE=/usr/local/share/upstreamproxy
CONF=/etc/upstreamproxy
STATE_DIR=/run/upstreamproxy
MARKER='# upstreamproxy: interactive shells pick up the running session'

VERSION=${VERSION:-latest}
SOURCE=${SOURCE:-}
EGRESSURL=${EGRESSURL:-}
SESSIONID=${SESSIONID:-}
TOKENFILE=${TOKENFILE-/run/secrets/upstreamproxy/token}
CAFILE=${CAFILE:-}
NOPROXY=${NOPROXY:-}
FAILCLOSED=${FAILCLOSED:-false}
RELAYUSER=${RELAYUSER-upstreamproxy}

FEATURE_DIR=$(cd "$(dirname "$0")" && pwd)

say() { echo "upstreamproxy feature: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

[ "$(id -u)" = 0 ] || die "install.sh must run as root (Features do)"

# -- a Python (>= 3.11) with venv and ensurepip ---------------------------------------------

python_ok() {
    command -v python3 >/dev/null 2>&1 &&
        python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

if ! python_ok; then
    say "installing python3 (with venv) from the distribution"
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            python3 python3-venv ca-certificates
        rm -rf /var/lib/apt/lists/*
    elif command -v apk >/dev/null 2>&1; then
        apk add --no-cache python3 ca-certificates
    elif command -v dnf >/dev/null 2>&1; then
        dnf install -y python3 ca-certificates && dnf clean all
    elif command -v microdnf >/dev/null 2>&1; then
        microdnf install -y python3 ca-certificates && microdnf clean all
    fi
    python_ok || die "upstreamproxy needs python3 >= 3.11 with the venv module; install it first"
fi

# -- upstreamproxy in its own virtual environment ---------------------------------------------

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
python3 -m venv "$VENV"
pip="$VENV/bin/python -m pip install -q"

requirement=upstreamproxy
[ "$VERSION" = latest ] || [ -z "$VERSION" ] || requirement="upstreamproxy==$VERSION"

case $SOURCE in
    "") source_path= ;;
    /*) source_path=$SOURCE ;;
    *) source_path=$FEATURE_DIR/$SOURCE ;;
esac
if [ -z "$source_path" ]; then
    say "installing $requirement from the package index"
    $pip "$requirement"
elif [ -d "$source_path" ] && ls "$source_path"/upstreamproxy-*.whl >/dev/null 2>&1; then
    say "installing $requirement from the wheels in $SOURCE (no index)"
    $pip --no-index --find-links "$source_path" "$requirement"
elif [ -f "$source_path" ] && [ "${source_path%.whl}" != "$source_path" ]; then
    say "installing $SOURCE (dependencies from its folder, else the package index)"
    $pip --find-links "$(dirname "$source_path")" "$source_path"
elif [ -f "$source_path/pyproject.toml" ]; then
    say "installing from the source tree $SOURCE"
    $pip "$source_path"
else
    die "source '$SOURCE': not a directory of wheels, a .whl file or a source tree"
fi
"$VENV/bin/upstreamproxy" --version >/dev/null || die "the installed upstreamproxy does not run"
ln -sf "$VENV/bin/upstreamproxy" /usr/local/bin/upstreamproxy

# -- hooks ----------------------------------------------------------------------------------

mkdir -p "$SHARE" "$CONF" /etc/profile.d
install -m 0644 "$FEATURE_DIR/upstreamproxy-start.sh" "$SHARE/upstreamproxy-start.sh"
install -m 0755 "$FEATURE_DIR/entrypoint.sh" "$SHARE/entrypoint.sh"
install -m 0755 "$FEATURE_DIR/poststart.sh" "$SHARE/poststart.sh"
install -m 0644 "$FEATURE_DIR/profile.d/upstreamproxy.sh" /etc/profile.d/upstreamproxy.sh

# Interactive shells that are not login shells (VS Code terminals, `docker exec -it C bash`)
# read only their rc file. zsh does not split words like sh, hence `emulate sh`.
add_line() { # FILE LINE
    [ -f "$1" ] || return 0
    grep -qF "$MARKER" "$1" && return 0
    printf '\n%s\n%s\n' "$MARKER" "$2" >>"$1"
}
add_line /etc/bash.bashrc '[ -r /etc/profile.d/upstreamproxy.sh ] && . /etc/profile.d/upstreamproxy.sh'
add_line /etc/bash/bashrc '[ -r /etc/profile.d/upstreamproxy.sh ] && . /etc/profile.d/upstreamproxy.sh'
add_line /etc/bashrc '[ -r /etc/profile.d/upstreamproxy.sh ] && . /etc/profile.d/upstreamproxy.sh'
add_line /etc/zsh/zshrc "[ -r /etc/profile.d/upstreamproxy.sh ] && emulate sh -c '. /etc/profile.d/upstreamproxy.sh'"
add_line /etc/zshrc "[ -r /etc/profile.d/upstreamproxy.sh ] && emulate sh -c '. /etc/profile.d/upstreamproxy.sh'"

# -- the options, as defaults the container's own UPSTREAMPROXY_* variables override ----------

quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
default() { # NAME VALUE
    [ -n "$2" ] || return 0
    printf '[ -n "${%s+x}" ] || export %s=%s\n' "$1" "$1" "$(quote "$2")"
}
case $FAILCLOSED in true | 1 | yes | on) failclosed=1 ;; *) failclosed= ;; esac
{
    echo "# Written by the upstreamproxy Feature's install.sh: defaults for the start hook."
    echo "# Sourced by $SHARE/entrypoint.sh; a variable the container already has wins."
    default UPSTREAMPROXY_EGRESS_URL "$EGRESSURL"
    default UPSTREAMPROXY_SESSION_ID "$SESSIONID"
    default UPSTREAMPROXY_TOKEN_FILE "$TOKENFILE"
    default UPSTREAMPROXY_CA_FILE "$CAFILE"
    default UPSTREAMPROXY_NO_PROXY "$NOPROXY"
    default UPSTREAMPROXY_FAIL_CLOSED "$failclosed"
    # Only a root start runs the relay as another user; any other start refuses the setting.
    [ -z "$RELAYUSER" ] || printf '[ -n "${%s+x}" ] || [ "$(id -u)" != 0 ] || export %s=%s\n' \
        UPSTREAMPROXY_RELAY_USER UPSTREAMPROXY_RELAY_USER "$(quote "$RELAYUSER")"
    default UPSTREAMPROXY_STATE_DIR "$STATE_DIR"
} >"$CONF/start.env"
chmod 0644 "$CONF/start.env"

# -- what the session needs at run time -------------------------------------------------------

# The state directory: root's, readable by all (shells of every user source env.sh from it).
mkdir -p "$STATE_DIR"
chmod 0755 "$STATE_DIR"
# Where the platform puts the token (usually a mount replaces it): root's only.
if [ -n "$TOKENFILE" ]; then
    mkdir -p "$(dirname "$TOKENFILE")"
    chmod 0700 "$(dirname "$TOKENFILE")"
fi
# The relay's own user, so that a root start never has to create it at run time.
case $RELAYUSER in
    "" | root | 0) ;;
    *[!0-9]*)
        if ! id "$RELAYUSER" >/dev/null 2>&1; then
            nologin=/usr/sbin/nologin
            [ -x "$nologin" ] || nologin=/sbin/nologin
            [ -x "$nologin" ] || nologin=/bin/false
            if command -v useradd >/dev/null 2>&1; then
                useradd --system --user-group --no-create-home --home-dir /nonexistent \
                    --shell "$nologin" "$RELAYUSER"
            elif command -v adduser >/dev/null 2>&1; then # busybox (Alpine)
                adduser -S -D -H -h /nonexistent -s "$nologin" "$RELAYUSER"
            else
                say "warning: cannot create the relay user $RELAYUSER (no useradd/adduser)"
            fi
        fi
        ;;
esac

say "installed $("$VENV/bin/upstreamproxy" --version) in $VENV"
