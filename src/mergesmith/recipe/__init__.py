"""Recipes: the validated schema (:mod:`~mergesmith.recipe.schema`), per-tensor parameter settings
(:mod:`~mergesmith.recipe.settings`) and data specs (:mod:`~mergesmith.recipe.data`).

``from mergesmith.recipe import Recipe, load_recipe`` is the short spelling of the schema's two public names.
"""

from __future__ import annotations

from mergesmith.recipe.schema import Recipe, load_recipe

__all__ = ["Recipe", "load_recipe"]
