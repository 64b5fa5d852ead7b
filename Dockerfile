# syntax=docker/dockerfile:1
#
# The upstreamproxy egress server as a small, non-root image.
#
#   docker build -t upstreamproxy:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9090:9090 \
#     -v "$PWD/policy:/etc/upstreamproxy/policy:ro" \
#     -v "$PWD/keys:/etc/upstreamproxy/keys:ro" \
#     upstreamproxy:0.1.0 [more egress flags, e.g. --ca-cert /etc/upstreamproxy/ca/ca.crt]
#
# Config layout (one directory per mount, so a Kubernetes ConfigMap/Secret update reaches the
# file; subPath mounts never update):
#   /etc/upstreamproxy/policy/policy.yaml   policy file, reloaded on SIGHUP
#   /etc/upstreamproxy/keys/*.public.pem    Ed25519 PUBLIC keys that verify session tokens
#   /etc/upstreamproxy/ca/ca.crt            optional: the interception CA's public certificate
# Every setting is an `upstreamproxy egress` flag; the defaults below are UPSTREAMPROXY_*
# variables, so `docker run IMAGE --max-tunnels 5000` keeps them and `-e` overrides them.
# tests/test_deploy_manifests.py checks this file against the real CLI and runs its command.

ARG PYTHON_VERSION=3.11

# --- build: a wheel of the project and of every dependency, from the package registry only ---
FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY upstreamproxy ./upstreamproxy
RUN pip wheel --wheel-dir /wheels --only-binary=:all: --no-binary=upstreamproxy .

# --- runtime: the installed wheels, no compilers, no sources, no pip cache ---
FROM python:${PYTHON_VERSION}-slim
ARG VERSION=0.1.0
ARG UID=10001
LABEL org.opencontainers.image.title="upstreamproxy-egress" \
      org.opencontainers.image.description="upstreamproxy egress server: terminates relay tunnels, enforces policy, dials upstreams" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/example/upstreamproxy"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels upstreamproxy \
 && groupadd --system --gid "${UID}" upstreamproxy \
 && useradd --system --uid "${UID}" --gid "${UID}" --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin upstreamproxy \
 && mkdir -p /etc/upstreamproxy/policy /etc/upstreamproxy/keys /etc/upstreamproxy/ca
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UPSTREAMPROXY_EGRESS_HOST=0.0.0.0 \
    UPSTREAMPROXY_EGRESS_PORT=8080 \
    UPSTREAMPROXY_METRICS_HOST=0.0.0.0 \
    UPSTREAMPROXY_METRICS_PORT=9090 \
    UPSTREAMPROXY_POLICY=/etc/upstreamproxy/policy/policy.yaml \
    UPSTREAMPROXY_PUBLIC_KEYS=/etc/upstreamproxy/keys \
    UPSTREAMPROXY_DRAIN_GRACE=30
USER 10001:10001
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
# Liveness of the main listener (python: the slim image has no curl). Plain HTTP only: with
# --tls-cert the orchestrator's probes must use HTTPS instead.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % os.environ.get('UPSTREAMPROXY_EGRESS_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["upstreamproxy", "egress"]
