"""The method registry: every built-in method, listed here explicitly, plus any a user registers.

``get_method(name)`` and ``all_methods()`` are what the engine, the api and the command line look methods up with.
A new built-in method is one module that defines its :class:`~mergesmith.methods.base.MergeMethod` objects in a
``METHODS`` tuple, and its name in the import and in ``MODULES`` below.
"""

from __future__ import annotations

import difflib

from mergesmith.errors import RecipeError
from mergesmith.methods import (
    adamerging,
    arcee_fusion,
    breadcrumbs,
    concrete,
    consensus,
    dam,
    dare,
    della,
    fisher,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    pcb,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
    tsv,
    twin,
)
from mergesmith.methods.base import MergeMethod

MODULES = (
    adamerging,
    arcee_fusion,
    breadcrumbs,
    concrete,
    consensus,
    dam,
    dare,
    della,
    fisher,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    pcb,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
    tsv,
    twin,
)
BUILT_IN: tuple[MergeMethod, ...] = tuple(method for module in MODULES for method in module.METHODS)
registered: dict[str, MergeMethod] = {}  # name -> method (tests may patch entries)


def register(method: MergeMethod) -> MergeMethod:
    """Add a method (a user's own, or a built-in at import); a name can be registered once."""
    if method.name in registered:
        raise ValueError(f"method {method.name!r} registered twice")
    registered[method.name] = method
    return method


for _method in BUILT_IN:
    register(_method)


def get_method(name: str) -> MergeMethod:
    try:
        return registered[name]
    except KeyError:
        hint = difflib.get_close_matches(name, list(registered), n=1)
        extra = f"; did you mean '{hint[0]}'?" if hint else ""
        raise RecipeError(
            f"unknown merge_method '{name}'{extra} (run `mergesmith methods` for the list)"
        ) from None


def all_methods() -> list[MergeMethod]:
    return sorted(registered.values(), key=lambda m: m.name)
