"""The environment that makes tools use the relay and trust the super bundle.

Public API::

    proxy_environment(proxy_url: str, ca_bundle: Path, no_proxy_extra: Sequence[str] = (), *,
                      base_env: Mapping[str, str],
                      merged_ca_files: Collection[str | Path] = (),
                      plain_http: bool = True,
                      tool_files: ToolFiles | None = None) -> EnvPlan
    user_ca_files(base_env: Mapping[str, str], *, exclude: Path | None = None) -> list[str]
    single_label_names(hosts_text: str) -> list[str]        # from /etc/hosts, for NO_PROXY
    java_options(proxy_url, truststore, no_proxy, user_options, plain_http) -> EnvVar
    java_non_proxy_hosts(no_proxy: str) -> str              # NO_PROXY as http.nonProxyHosts
    render_sh(plan) -> str          # sourceable POSIX sh: "export K='v'" lines
    render_dotenv(plan) -> str      # KEY=value lines (see render_dotenv for the dialect)
    render_json(plan) -> str        # {"env": {...}, "variables": [...], "notes": [...]}
    apply(plan, env) -> dict[str, str]          # env + the exports, for `exec`
    class EnvPlan, EnvVar, Action, ToolFiles; DEFAULT_NO_PROXY, PROXY_VARIABLES,
    HTTP_PROXY_VARIABLES, CA_VARIABLES

Pure: nothing here reads ``os.environ`` or files; the caller passes ``base_env`` and logs the
plan (every variable carries an :class:`Action` and a reason).

Typical wiring in ``start``::

    report = prepare_ca_bundle(bundle, ca_url=..., extra_bundles=user_ca_files(os.environ,
                                                                              exclude=bundle))
    files, problems = write_tool_files(state_dir, bundle, os.environ)   # tool_files.py
    plan = proxy_environment(relay_url, bundle, base_env=os.environ,
                             merged_ca_files=report.extra_sources, tool_files=files)

Decisions
---------
* ``HTTP_PROXY``/``http_proxy`` (and ``npm_config_proxy``, ``YARN_HTTP_PROXY``) point at the
  relay too: it forwards absolute-form ``http://`` requests over a tunnel, so ``apt-get``
  with the usual http:// sources, ``wget http://`` and the rest work in a sandbox whose only
  way out is the relay. ``plain_http=False`` (``start --no-http-proxy``) gives CCR's exact
  behaviour instead: none of them is set and plain HTTP keeps its default route.
  ``ALL_PROXY`` is never set (it would also catch non-HTTP protocols some tools speak).
* What keeps its direct route: loopback, link-local and the private ranges (DEFAULT_NO_PROXY,
  as names, literals and CIDRs, since tools differ, see below), and the single-label names
  passed in ``no_proxy_extra`` (``start`` adds those of /etc/hosts: ``--link``ed
  containers, Kubernetes host aliases) with ``--no-proxy``. No NO_PROXY syntax means "any
  name without a dot", so a compose service (``http://api:8080``) that only DNS knows needs
  ``--no-proxy api``; otherwise its request goes to the relay and the egress decides (it
  refuses names it does not know, and the relay's answer says to add it to NO_PROXY).
* CA variables always point at the super bundle. Each of these tools *replaces* its trust
  store with the file, which is why the bundle holds the system roots too. A user's previous
  value is folded into the bundle when the caller passed it to ``prepare_ca_bundle``
  (``merged``); otherwise it is ``replaced`` and the reason says its certificates are no
  longer trusted. ``SSL_CERT_DIR`` is not touched: OpenSSL reads it *in addition* to the file.
* ``NO_PROXY``/``no_proxy`` become the same value: the user's entries (from both spellings,
  in order), then DEFAULT_NO_PROXY, then ``no_proxy_extra``; duplicates removed
  case-insensitively. A user's ``*`` is kept (it is their explicit choice) but noted, since it
  sends everything around the relay.
* ``NODE_USE_ENV_PROXY=1`` is a user's to override (``kept``); everything else is ours.
* Tools that read none of the CA variables get a file made for them (``ToolFiles``, written
  by ``start`` from the super bundle) and the variable that points them at it: ``WGETRC``
  (GNU wget built with GnuTLS, Debian's and Ubuntu's), ``WGET2RC`` (wget2, Fedora's
  ``wget``), ``APT_CONFIG`` (apt's https method),
  and for the JVM ``JAVA_TOOL_OPTIONS`` with the proxy properties, ``http.nonProxyHosts``
  translated from NO_PROXY, and a PKCS#12 trust store built from the bundle.
  A user's ``JAVA_TOOL_OPTIONS`` is kept after ours (later ``-D`` options win).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import urllib.parse
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Final

from ..errors import ConfigError

# Hosts, then CIDRs. Support differs by tool, so both forms are listed:
# * literal hosts and ``.suffix`` domains: everyone (curl, git via libcurl, Python urllib and
#   requests, Go, Node/undici, npm, gRPC, wget).
# * CIDR blocks: Go (v4+v6), curl/git with libcurl >= 7.86, requests (IPv4 only), gRPC
#   C-core, Ruby. Python's urllib and Node/undici ignore them (they compare strings), hence
#   the literal loopback entries.
# CIDRs only match URLs that contain an IP literal: no tool resolves a name before deciding.
# Private and link-local ranges bypass the relay because the egress refuses them anyway;
# whatever direct route the sandbox has to them (often none) is the right one.
DEFAULT_NO_PROXY: Final[tuple[str, ...]] = (
    "localhost",
    "127.0.0.1",
    "::1",
    ".localhost",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
    "fe80::/10",
)

# Proxy for https:// URLs. Both spellings, with the same value: tools differ in which one
# they read first (Python and curl prefer lower case, Go upper), so they must never disagree.
# npm_config_https_proxy: npm already honours HTTPS_PROXY, but an https-proxy line in a
# user's .npmrc would win over it; the npm_config_ variable wins over .npmrc.
PROXY_VARIABLES: Final[tuple[str, ...]] = (
    "HTTPS_PROXY",
    "https_proxy",
    "npm_config_https_proxy",
    "YARN_HTTPS_PROXY",  # Yarn 2+ ignores HTTPS_PROXY; Yarn 1 reads it as https-proxy too
)
# Proxy for http:// URLs (the relay forwards absolute-form requests); curl reads only the lower
# case spelling (httpoxy), Go the upper one; npm's ``proxy`` is its http:// proxy.
HTTP_PROXY_VARIABLES: Final[tuple[str, ...]] = (
    "HTTP_PROXY",
    "http_proxy",
    "npm_config_proxy",
    "YARN_HTTP_PROXY",
)
NO_PROXY_VARIABLES: Final[tuple[str, ...]] = ("NO_PROXY", "no_proxy")

# Every variable that names a trust file, and who reads it.
CA_VARIABLES: Final[tuple[str, ...]] = (
    "SSL_CERT_FILE",  # OpenSSL default file: Python ssl, Ruby, PHP/composer, Go, uv, curl tool
    "NODE_EXTRA_CA_CERTS",  # Node (added to its built-in roots; read once at start), Bun
    "REQUESTS_CA_BUNDLE",  # requests and everything on it (poetry, conda, ...)
    "CURL_CA_BUNDLE",  # curl tool (checked before SSL_CERT_FILE), requests fallback
    "GIT_SSL_CAINFO",  # git over https (its libcurl does not read SSL_CERT_FILE)
    "PIP_CERT",  # pip --cert (pip < 24.2 uses certifi and ignores SSL_CERT_FILE)
    "npm_config_cafile",  # npm; redundant with NODE_EXTRA_CA_CERTS but beats a .npmrc cafile
    "AWS_CA_BUNDLE",  # botocore/AWS CLI use certifi otherwise
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",  # gRPC C-core (grpcio, Ruby, PHP) bundled roots
    "CARGO_HTTP_CAINFO",  # cargo's http.cainfo
    "DENO_CERT",  # Deno: added to its root store
    "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE",  # gcloud (bundles its own certifi)
    "HEX_CACERTS_PATH",  # Elixir's hex (bundles its own CA store)
    "NIX_SSL_CERT_FILE",  # nix, which ignores SSL_CERT_FILE inside its sandboxed fetchers
)

#: Files made from the bundle for tools that read no CA variable, and the variables naming them.
WGETRC: Final = "WGETRC"
WGET2RC: Final = "WGET2RC"
APT_CONFIG: Final = "APT_CONFIG"
JAVA_TOOL_OPTIONS: Final = "JAVA_TOOL_OPTIONS"

# Node >= 24.0 (fetch) and >= 24.5 / 22.21 (also http/https modules) honour HTTPS_PROXY and
# NO_PROXY only when this is 1. Older Node (e.g. 20) ignores it: there, only libraries that
# read the proxy variables themselves (npm, undici's EnvHttpProxyAgent, axios, ...) use the
# relay, and native fetch()/https.get fail with no route. Setting it is harmless either way.
NODE_USE_ENV_PROXY: Final = "NODE_USE_ENV_PROXY"

# Not set, only noted when present (see the module docstring).
UNMANAGED_PROXY_VARIABLES: Final[tuple[str, ...]] = ("ALL_PROXY", "all_proxy", "grpc_proxy")


@dataclass(frozen=True)
class ToolFiles:
    """Files ``start`` wrote for tools that read no CA variable (None: not written)."""

    wgetrc: Path | None = None
    apt_config: Path | None = None
    #: PKCS#12 trust store (trusted certificate entries only, no password).
    java_truststore: Path | None = None
    wget2rc: Path | None = None


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Action(StrEnum):
    SET = "set"  # was unset, or already had exactly this value
    REPLACED = "replaced"  # the user's value was overridden (the reason says what is lost)
    MERGED = "merged"  # the user's value is included in the new one
    KEPT = "kept"  # the user's value is left as it is; not exported by the renderers


@dataclass(frozen=True)
class EnvVar:
    name: str
    value: str
    action: Action
    reason: str


@dataclass(frozen=True)
class EnvPlan:
    variables: tuple[EnvVar, ...]
    notes: tuple[str, ...] = field(default=())

    def exports(self) -> dict[str, str]:
        """The variables to export: every one not KEPT (a kept one already has its value)."""
        return {var.name: var.value for var in self.variables if var.action is not Action.KEPT}

    def get(self, name: str) -> EnvVar | None:
        return next((var for var in self.variables if var.name == name), None)


def redact_proxy_url(url: str) -> str:
    """A proxy URL without its user info, for reasons and logs."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable>"
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def _check_proxy_url(url: str) -> None:
    if _CONTROL.search(url) or any(ch.isspace() for ch in url):
        raise ConfigError("proxy_url", "contains whitespace or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError("proxy_url", f"not a URL: {exc}") from None
    if parts.scheme != "http":
        raise ConfigError("proxy_url", "the relay is a plain-HTTP CONNECT proxy: use http://")
    if not parts.hostname or port is None:
        raise ConfigError("proxy_url", "needs a host and a port, e.g. http://127.0.0.1:3128")


def _split_no_proxy(value: str) -> list[str]:
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def _valid_entry(entry: str) -> bool:
    return not _CONTROL.search(entry) and not any(ch.isspace() for ch in entry)


def _merge_no_proxy(
    base_env: Mapping[str, str], extra: Sequence[str]
) -> tuple[str, list[str], list[str]]:
    """The merged list, the user's entries, and notes."""
    notes: list[str] = []
    for entry in extra:
        if not entry.strip() or not _valid_entry(entry.strip()) or "," in entry:
            raise ConfigError("no_proxy", f"invalid entry {entry!r}")
    user: list[str] = []
    for name in NO_PROXY_VARIABLES:
        for entry in _split_no_proxy(base_env.get(name, "")):
            if not _valid_entry(entry):
                notes.append(
                    f"dropped an entry of the user's {name} with whitespace or control characters"
                )
            else:
                user.append(entry)
    merged: list[str] = []
    seen: set[str] = set()
    for entry in (*user, *DEFAULT_NO_PROXY, *(e.strip() for e in extra)):
        if entry.lower() not in seen:
            seen.add(entry.lower())
            merged.append(entry)
    if "*" in user:
        notes.append("the user's NO_PROXY contains '*': tools will bypass the relay entirely")
    return ",".join(merged), user, notes


#: At most this many names are taken from /etc/hosts (NO_PROXY stays a sane length).
MAX_HOSTS_NAMES: Final = 64
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


def single_label_names(hosts_text: str) -> list[str]:
    """The single-label names an /etc/hosts file gives addresses to, in order, no duplicates.

    These are reached directly in a container (``--link``ed containers, Kubernetes host
    aliases, the container's own name), and no NO_PROXY syntax matches "names without a
    dot", so ``start`` lists them explicitly. Names with a dot are left to the defaults.
    """
    names: list[str] = []
    for line in hosts_text.splitlines():
        fields = line.split("#", 1)[0].split()
        for name in fields[1:]:
            if (
                _HOSTNAME.match(name)
                and not name.isdigit()
                and name.lower() not in (n.lower() for n in names)
            ):
                names.append(name)
                if len(names) >= MAX_HOSTS_NAMES:
                    return names
    return names


def user_ca_files(base_env: Mapping[str, str], *, exclude: Path | None = None) -> list[str]:
    """Distinct values of CA_VARIABLES in ``base_env``, in order, except ``exclude``.

    Pass them to ``prepare_ca_bundle(extra_bundles=...)`` so that a user's own CAs stay
    trusted once the variables point at the super bundle.
    """
    found: list[str] = []
    for name in CA_VARIABLES:
        value = base_env.get(name, "")
        if value and value not in found and (exclude is None or Path(value) != exclude):
            found.append(value)
    return found


def proxy_environment(
    proxy_url: str,
    ca_bundle: Path,
    no_proxy_extra: Sequence[str] = (),
    *,
    base_env: Mapping[str, str],
    merged_ca_files: Collection[str | Path] = (),
    plain_http: bool = True,
    tool_files: ToolFiles | None = None,
) -> EnvPlan:
    """Compute the variables to export; see the module docstring for every decision.

    ``base_env`` is the environment the tools would otherwise see (usually ``os.environ``);
    ``merged_ca_files`` the CA files whose certificates the bundle already includes
    (``BundleReport.extra_sources`` and ``system_source``). Raises ConfigError for a proxy
    URL that is not ``http://host:port``, a relative bundle path (tools would resolve it
    against their own working directory), a path with control characters, or a malformed
    extra NO_PROXY entry.
    """
    _check_proxy_url(proxy_url)
    bundle = str(ca_bundle)
    if not ca_bundle.is_absolute():
        raise ConfigError("ca_bundle", "must be an absolute path")
    if _CONTROL.search(bundle):
        raise ConfigError("ca_bundle", "path contains control characters")

    variables: list[EnvVar] = []
    notes: list[str] = []

    proxied = [(name, "route https through the relay") for name in PROXY_VARIABLES]
    if plain_http:
        proxied += [(name, "route plain http through the relay") for name in HTTP_PROXY_VARIABLES]
    for name, why in proxied:
        old = base_env.get(name)
        if old is None or old == proxy_url:
            variables.append(EnvVar(name, proxy_url, Action.SET, why))
        else:
            variables.append(
                EnvVar(
                    name,
                    proxy_url,
                    Action.REPLACED,
                    f"replaced the user's {redact_proxy_url(old)!r}: the relay is the only way out",
                )
            )

    no_proxy, user_entries, no_proxy_notes = _merge_no_proxy(base_env, no_proxy_extra)
    notes.extend(no_proxy_notes)
    for name in NO_PROXY_VARIABLES:
        if user_entries:
            variables.append(
                EnvVar(
                    name,
                    no_proxy,
                    Action.MERGED,
                    "the user's NO_PROXY/no_proxy entries, then the defaults",
                )
            )
        else:
            variables.append(
                EnvVar(
                    name,
                    no_proxy,
                    Action.SET,
                    "loopback, link-local and private ranges skip the relay",
                )
            )

    merged = {Path(path) for path in merged_ca_files}
    for name in CA_VARIABLES:
        old = base_env.get(name)
        if not old or Path(old) == ca_bundle:
            variables.append(EnvVar(name, bundle, Action.SET, "trust the super bundle"))
        elif Path(old) in merged:
            variables.append(
                EnvVar(
                    name,
                    bundle,
                    Action.MERGED,
                    f"the user's {old!r} is included in the super bundle",
                )
            )
        else:
            variables.append(
                EnvVar(
                    name,
                    bundle,
                    Action.REPLACED,
                    f"replaced the user's {old!r}, which is not in the super bundle: its extra "
                    "certificates are no longer trusted by tools reading this variable",
                )
            )

    old = base_env.get(NODE_USE_ENV_PROXY)
    if old is None:
        variables.append(
            EnvVar(
                NODE_USE_ENV_PROXY,
                "1",
                Action.SET,
                "Node >= 24 (fetch) / 22.21 use HTTPS_PROXY; older Node ignores",
            )
        )
    else:
        variables.append(EnvVar(NODE_USE_ENV_PROXY, old, Action.KEPT, "the user set it explicitly"))

    files = tool_files or ToolFiles()
    for name, path, why in (
        (WGETRC, files.wgetrc, "GNU wget (GnuTLS) reads ca_certificate from it, not SSL_CERT_FILE"),
        (WGET2RC, files.wget2rc, "wget2 (GnuTLS) reads ca-certificate from it, not SSL_CERT_FILE"),
        (APT_CONFIG, files.apt_config, "apt's https method reads Acquire::https::CAInfo from it"),
    ):
        if path is None:
            continue
        old = base_env.get(name)
        action = Action.SET if not old or old == str(path) else Action.MERGED
        reason = why if action is Action.SET else f"{why}; it includes the user's {old!r}"
        variables.append(EnvVar(name, str(path), action, reason))
    if files.java_truststore is not None:
        variables.append(
            java_options(
                proxy_url,
                files.java_truststore,
                no_proxy,
                base_env.get(JAVA_TOOL_OPTIONS),
                plain_http,
            )
        )

    if not plain_http:
        for name in HTTP_PROXY_VARIABLES:
            if base_env.get(name):
                notes.append(
                    f"{name} is set by the user and left alone (plain HTTP is not proxied "
                    "by this session)"
                )
    for name in UNMANAGED_PROXY_VARIABLES:
        if base_env.get(name):
            notes.append(f"{name} is set by the user and left alone")
    return EnvPlan(tuple(variables), tuple(notes))


def java_non_proxy_hosts(no_proxy: str) -> str:
    """NO_PROXY translated to ``http.nonProxyHosts`` (``|``-separated globs, ``*`` at an end).

    ``.suffix`` becomes ``*.suffix`` (NO_PROXY's suffix match also covers the bare name,
    which is kept too); IPv4 CIDRs become the octet-prefix globs they cover (``10.*``;
    ``172.16.0.0/12`` is 16 of them), at most 256 per block; IPv6 CIDRs are left out,
    as a glob such as ``fd*`` would also match host names. Port suffixes are dropped.
    """
    out: list[str] = []
    for entry in _split_no_proxy(no_proxy):
        if "/" in entry:
            out.extend(_ipv4_cidr_globs(entry))
        elif entry.startswith("[") and "]" in entry:
            out.append(entry[: entry.index("]") + 1])
        elif ":" in entry and entry.count(":") > 1:  # a bare IPv6 literal
            out.extend((entry, f"[{entry}]"))
        else:
            host = entry.rsplit(":", 1)[0] if ":" in entry else entry
            if host.startswith("."):
                out.extend((f"*{host}", host[1:]))
            elif host:
                out.append(host)
    unique: dict[str, str] = {}
    for glob in out:
        unique.setdefault(glob.lower(), glob)
    return "|".join(unique.values())


def _ipv4_cidr_globs(entry: str) -> list[str]:
    try:
        network = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return []
    if not isinstance(network, ipaddress.IPv4Network):
        return []
    octets = -(-network.prefixlen // 8)  # the octets a glob must fix
    if octets == 0:
        return ["*"]
    if octets == 4:
        return [str(network.network_address)] if network.num_addresses <= 256 else []
    subnets = (
        list(network.subnets(new_prefix=octets * 8))
        if network.prefixlen < octets * 8
        else [network]
    )
    if len(subnets) > 256:
        return []
    return [".".join(str(s.network_address).split(".")[:octets]) + ".*" for s in subnets]


def java_options(
    proxy_url: str,
    truststore: Path,
    no_proxy: str,
    user_options: str | None,
    plain_http: bool = True,
) -> EnvVar:
    """``JAVA_TOOL_OPTIONS`` for every JVM: proxy properties, nonProxyHosts, trust store.

    The JVM splits this variable on white space with no quoting, so a path or value with
    white space cannot be passed: then the trust store is left out and the reason says so.
    """
    parts = urllib.parse.urlsplit(proxy_url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    options = [f"-Dhttps.proxyHost={host}", f"-Dhttps.proxyPort={port}"]
    if plain_http:
        options += [f"-Dhttp.proxyHost={host}", f"-Dhttp.proxyPort={port}"]
    non_proxy = java_non_proxy_hosts(no_proxy)
    if non_proxy and not any(ch.isspace() for ch in non_proxy):
        options.append(f"-Dhttp.nonProxyHosts={non_proxy}")
    reason = (
        "JVMs read neither HTTPS_PROXY nor PEM bundles: proxy properties and a PKCS#12 trust store"
    )
    if any(ch.isspace() for ch in str(truststore)):
        reason += f"; the trust store path {str(truststore)!r} has white space, so it is left out"
    else:
        options += [
            f"-Djavax.net.ssl.trustStore={truststore}",
            "-Djavax.net.ssl.trustStoreType=PKCS12",
        ]
    value = " ".join(options)
    user_options = (user_options or "").strip()
    if user_options.startswith(value):  # a shell that already sourced env.sh
        user_options = user_options[len(value) :].strip()
    if user_options:
        return EnvVar(
            JAVA_TOOL_OPTIONS,
            f"{value} {user_options}",
            Action.MERGED,
            reason + "; the user's options follow ours, so theirs win",
        )
    return EnvVar(JAVA_TOOL_OPTIONS, value, Action.SET, reason)


def _check_exportable(name: str, value: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"not a valid environment variable name: {name!r}")
    if "\x00" in value:
        raise ValueError(f"value of {name} contains NUL, which no environment can hold")


def render_sh(plan: EnvPlan) -> str:
    """A POSIX sh file to source (``. file``): one ``export NAME=value`` line per variable.

    Values are quoted with shlex.quote (single quotes), so nothing in them is expanded or
    executed, newlines included.
    """
    lines = ["# Generated by upstreamproxy; source it with: . <this file>"]
    for name, value in plan.exports().items():
        _check_exportable(name, value)
        lines.append(f"export {name}={shlex.quote(value)}")
    return "\n".join(lines) + "\n"


_DOTENV_BARE = re.compile(r"[A-Za-z0-9_./:,@%+=*\[\]-]*\Z")
_DOTENV_SINGLE = re.compile(r"[^'\\\x00-\x1f\x7f]*\Z")


def render_dotenv(plan: EnvPlan) -> str:
    """``NAME=value`` lines for env files.

    Values made only of ``A-Za-z0-9_./:,@%+=*[]-`` (URLs, paths, NO_PROXY lists: the normal
    case) are written bare, which every reader (docker ``--env-file``, compose, python-dotenv,
    systemd ``EnvironmentFile``) takes literally. Anything else is single-quoted, which
    compose, python-dotenv and systemd take literally (docker ``--env-file`` does not strip
    quotes). Values that no dialect can hold literally (a single quote, a backslash or a
    control character) raise ValueError: use render_sh or render_json for those.
    """
    lines = ["# Generated by upstreamproxy"]
    for name, value in plan.exports().items():
        _check_exportable(name, value)
        if _DOTENV_BARE.match(value):
            lines.append(f"{name}={value}")
        elif _DOTENV_SINGLE.match(value):
            lines.append(f"{name}='{value}'")
        else:
            raise ValueError(f"value of {name} cannot be written to a .env file literally")
    return "\n".join(lines) + "\n"


def render_json(plan: EnvPlan) -> str:
    """``{"env": {name: value}, "variables": [{name, value, action, reason}], "notes": []}``.

    ``env`` is exactly ``plan.exports()``; ``variables`` also lists the kept ones.
    """
    for name, value in plan.exports().items():
        _check_exportable(name, value)
    document = {
        "env": plan.exports(),
        "variables": [
            {"name": v.name, "value": v.value, "action": v.action.value, "reason": v.reason}
            for v in plan.variables
        ],
        "notes": list(plan.notes),
    }
    return json.dumps(document, indent=2) + "\n"


def apply(plan: EnvPlan, env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` with the plan's exports applied (for ``exec``/subprocess ``env=``).

    ``env`` should be the ``base_env`` the plan was computed from, so merges stay correct.
    """
    result = dict(env)
    result.update(plan.exports())
    return result
