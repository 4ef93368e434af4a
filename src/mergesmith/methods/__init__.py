"""Merge methods: one module each (its per-tensor rule, parameters and hooks), the interface in
:mod:`~mergesmith.methods.base`, the registry in :mod:`~mergesmith.methods.registry`.

``from mergesmith.methods import get_method, all_methods, register`` works; the registry (and with it every method
module) is imported on that first use, not when a submodule such as ``methods.base`` is imported.
"""

from __future__ import annotations

from typing import Any

__all__ = ["all_methods", "get_method", "register"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mergesmith.methods import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'mergesmith.methods' has no attribute {name!r}")
