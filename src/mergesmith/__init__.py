"""mergesmith: merge neural-network checkpoints with a streaming engine and every major merging method.

The public names below are imported on first use (PEP 562), so that importing one submodule — the engine, a
method — does not load the whole library.
"""

from __future__ import annotations

from typing import Any

from mergesmith.version import __version__

_PUBLIC = {
    "CheckpointError": "mergesmith.errors",
    "MergeError": "mergesmith.errors",
    "RecipeError": "mergesmith.errors",
    "MergeResult": "mergesmith.api",
    "merge": "mergesmith.api",
    "merge_state_dicts": "mergesmith.api",
    "fit_state_dicts": "mergesmith.api",
    "Recipe": "mergesmith.recipe",
    "load_recipe": "mergesmith.recipe",
}
__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'mergesmith' has no attribute {name!r}")
