"""Renamed: see :mod:`upstreamproxy.egress.intercept_wiring` (this name was too close to the
``intercept`` engine package). Kept so imports written before the rename still work."""

from __future__ import annotations

from .intercept_wiring import Interception, InterceptionConfig

__all__ = ["Interception", "InterceptionConfig"]
