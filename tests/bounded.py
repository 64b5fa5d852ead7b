"""Calls that might block, run so that a test fails instead of hanging."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def promptly(call: Callable[[], T], within: float = 10) -> T:
    """``call()`` in a thread, failing the test (not hanging it) if it blocks."""
    outcome: list[T | BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(within)
    assert not worker.is_alive(), f"blocked for more than {within} s"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]
