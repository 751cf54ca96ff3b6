"""A clock around a callable, for the benchmark scripts that time one step inside library code."""

from __future__ import annotations

import functools
import time
from typing import Any, Callable


def timed_calls(fn: Callable[..., Any], record: Callable[[float], Any]) -> Callable[..., Any]:
    """``fn``, wrapped so that each call's wall time (seconds) goes to ``record``, returned or raised."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record(time.perf_counter() - t0)

    return wrapper
