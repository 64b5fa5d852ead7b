"""upstreamproxy: an egress relay for sandboxes with no direct route to the internet."""

from __future__ import annotations

__version__ = "0.1.0"
