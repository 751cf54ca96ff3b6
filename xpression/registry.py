"""One small registry for everything a user can add by name: backbones, target kinds, map sinks.

A registry maps names to objects (classes or factories). Adding one is a decorator in a new
file::

    from xpression.models.registry import BACKBONES

    @BACKBONES.register("my_net")
    class MyNet(nn.Module): ...

A package that owns a registry imports its own modules when it is imported (every file of
``xpression/data/kinds/``, ``xpression/inference/sinks/``, ``xpression/models/backbones/``), so a
new file there is found without editing any other. A name of the form ``package.module:Name``
imports that module and returns its attribute, for objects that live outside the project.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterator, TypeVar

__all__ = ["Registry", "import_submodules"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named objects of one kind (``what``, used in error messages)."""

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Add ``obj`` under ``name`` (or use as a decorator: ``@registry.register(name)``).
        Registering another object under a taken name is an error; the same object again is not."""

        def add(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.what} {name!r} is already registered")
            self._items[name] = item
            return item

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """The object registered as ``name``, or the attribute ``Name`` of ``package.module:Name``.

        Raises ``ValueError`` naming the valid names when there is none."""
        if name in self._items:
            return self._items[name]
        if isinstance(name, str) and ":" in name:
            module, _, attr = name.partition(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as err:
                raise ValueError(f"{self.what} {name!r} cannot be imported: {err}") from err
        raise ValueError(f"unknown {self.what} {name!r}; valid names: {', '.join(self.names())}")

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self.names())})"


def import_submodules(package: str) -> None:
    """Import every module of ``package`` (not sub-packages' children), so each registers itself."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
