#
# The upstreamproxy egress server as a small, non-root image. Plain Dockerfile syntax: builds
# with the classic builder and with BuildKit alike, no `# syntax=` frontend, no RUN --mount.
#
#   docker build -t upstreamproxy:0.1.0 .
#
# Offline (no package index; what tests/test_egress_image.py does): wheels built beforehand in
# ./wheels are installed instead of downloading, and BASE_IMAGE can be any Debian-like image
# with python3 and python3-venv of the same Python version as the wheels:
#
#   python3 -m pip wheel --wheel-dir wheels .
#   docker build --build-arg BASE_IMAGE=my-debian-python:bookworm -t upstreamproxy:0.1.0 .
#
# Run (the token audience must be the one tokens are issued for: `token issue --audience`):
#
#   docker run --rm --read-only -p 8080:8080 -p 9090:9090 \
#     -v "$PWD/policy:/etc/upstreamproxy/policy:ro" \
#     -v "$PWD/keys:/etc/upstreamproxy/keys:ro" \
#     -v "$PWD/ca-public:/etc/upstreamproxy/ca:ro" \
#     -e UPSTREAMPROXY_AUDIENCE=upstreamproxy \
#     upstreamproxy:0.1.0 --ca-cert /etc/upstreamproxy/ca/ca.pem
#
# Config layout (one directory per mount, so a Kubernetes ConfigMap/Secret update reaches the
# file; subPath mounts never update):
#   /etc/upstreamproxy/policy/policy.yaml   policy file, reloaded when it changes and on SIGHUP
#   /etc/upstreamproxy/keys/*.public.pem    Ed25519 PUBLIC keys that verify session tokens
#                                           (reloaded when they change and on SIGHUP)
#   /etc/upstreamproxy/ca/ca.pem            optional: the CA's certificate (`ca create` writes
#                                           ca.pem; never mount ca-key.pem unless intercepting)
# Every setting is an `upstreamproxy egress` flag; the defaults below are UPSTREAMPROXY_*
# variables, so `docker run IMAGE --max-tunnels 5000` keeps them and `-e` overrides them.
# tests/test_deploy_manifests.py checks this file against the real CLI and runs its command;
# tests/test_egress_image.py builds the image and runs it.

ARG BASE_IMAGE=python:3.11-slim

# --- build: a virtualenv with the project and its dependencies ---
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# `wheel[s]` matches nothing without a wheels/ directory (then pip uses the package index);
# with one, its wheels land in /src and are the only thing installed (no index at all).
COPY pyproject.toml README.md wheel[s] ./
COPY upstreamproxy ./upstreamproxy
RUN python3 -m venv /opt/upstreamproxy \
 && if ls ./*.whl >/dev/null 2>&1; then \
        /opt/upstreamproxy/bin/pip install --no-index --find-links=. upstreamproxy; \
    else \
        /opt/upstreamproxy/bin/pip install --only-binary=:all: --no-binary=upstreamproxy . ; \
    fi \
 && /opt/upstreamproxy/bin/pip uninstall -y -q pip \
 && /opt/upstreamproxy/bin/upstreamproxy --help >/dev/null

# --- runtime: the virtualenv only, no compilers, no sources, no pip ---
FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG UID=10001
LABEL org.opencontainers.image.title="upstreamproxy-egress" \
      org.opencontainers.image.description="upstreamproxy egress server: terminates relay tunnels, enforces policy, dials upstreams" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/example/upstreamproxy"
COPY --from=build /opt/upstreamproxy /opt/upstreamproxy
RUN groupadd --system --gid "${UID}" upstreamproxy \
 && useradd --system --uid "${UID}" --gid "${UID}" --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin upstreamproxy \
 && mkdir -p /etc/upstreamproxy/policy /etc/upstreamproxy/keys /etc/upstreamproxy/ca
ENV PATH=/opt/upstreamproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UPSTREAMPROXY_EGRESS_HOST=0.0.0.0 \
    UPSTREAMPROXY_EGRESS_PORT=8080 \
    UPSTREAMPROXY_METRICS_HOST=0.0.0.0 \
    UPSTREAMPROXY_METRICS_PORT=9090 \
    UPSTREAMPROXY_POLICY=/etc/upstreamproxy/policy/policy.yaml \
    UPSTREAMPROXY_PUBLIC_KEYS=/etc/upstreamproxy/keys \
    UPSTREAMPROXY_AUDIENCE=upstreamproxy \
    UPSTREAMPROXY_DRAIN_GRACE=30
USER 10001:10001
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
# Liveness of the main listener, with the image's own interpreter (no curl in the image, and
# no `python` on the PATH of every base). Plain HTTP only: with --tls-cert use HTTPS probes.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/opt/upstreamproxy/bin/python3", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % os.environ.get('UPSTREAMPROXY_EGRESS_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["upstreamproxy", "egress"]
