"""A clock around a callable, for the benchmark scripts that time one step inside library code."""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Callable, Iterator, Mapping


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


@contextlib.contextmanager
def timed_methods(parts: Mapping[str, tuple[Any, str]], seconds: dict[str, float]) -> Iterator[dict[str, float]]:
    """While inside, each ``owner.name`` of ``parts`` (``{label: (owner, name)}``) adds each call's
    wall time (seconds) to ``seconds[label]`` (created at 0); the originals are put back on leaving."""
    originals = {label: getattr(owner, name) for label, (owner, name) in parts.items()}
    for label, (owner, name) in parts.items():
        seconds.setdefault(label, 0.0)
        setattr(owner, name, timed_calls(originals[label], lambda s, key=label: seconds.__setitem__(key, seconds[key] + s)))
    try:
        yield seconds
    finally:
        for label, (owner, name) in parts.items():
            setattr(owner, name, originals[label])
