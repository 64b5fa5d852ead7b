"""TLS interception with credential injection, for hosts whose policy rule asks for it.

The egress calls :func:`serve_intercepted` with one end of an in-memory stream pair carrying
an established tunnel's bytes; the engine terminates the sandbox's TLS with a leaf certificate from
the egress CA (:class:`LeafCache`), relays HTTP/1.1 to the real upstream over verified TLS, and
rewrites headers with values from the secrets directory (:class:`SecretStore`) that the sandbox
never sees. The policy loader turns a rule's ``intercept:`` mapping into an
:class:`InterceptRule` with :func:`parse_intercept_rule`.

Modules, one job each: ``rules`` (config, pure), ``secretstore`` (the secrets directory),
``leaves`` (certificates), ``headers`` (the header policy, pure), ``peer`` (h11 over a stream),
``upstream`` (TLS to the origin), ``engine`` (the per-tunnel loop), ``metrics``.
"""

from __future__ import annotations

from .engine import InterceptEnv, InterceptResult, InterceptTimeouts, serve_intercepted
from .headers import Refusal
from .leaves import DEFAULT_CACHE_CAP, LeafCache, normalize_name
from .metrics import NOOP_METRICS, InterceptMetrics, PrometheusInterceptMetrics
from .rules import HeaderRewrite, InterceptRule, parse_intercept_rule
from .secretstore import MAX_SECRET_BYTES, MissingSecretError, ReloadReport, SecretStore
from .upstream import UpstreamConnector, make_upstream_context

__all__ = [
    "DEFAULT_CACHE_CAP",
    "MAX_SECRET_BYTES",
    "NOOP_METRICS",
    "HeaderRewrite",
    "InterceptEnv",
    "InterceptMetrics",
    "InterceptResult",
    "InterceptRule",
    "InterceptTimeouts",
    "LeafCache",
    "MissingSecretError",
    "PrometheusInterceptMetrics",
    "Refusal",
    "ReloadReport",
    "SecretStore",
    "UpstreamConnector",
    "make_upstream_context",
    "normalize_name",
    "parse_intercept_rule",
    "serve_intercepted",
]
