"""mergesmith: merge neural-network checkpoints with a streaming engine and every major merging method."""

__version__ = "0.1.0"

from mergesmith.api import MergeResult, merge, merge_state_dicts
from mergesmith.errors import CheckpointError, MergeError, RecipeError
from mergesmith.recipe import Recipe, load_recipe

__all__ = [
    "CheckpointError",
    "MergeError",
    "MergeResult",
    "Recipe",
    "RecipeError",
    "__version__",
    "load_recipe",
    "merge",
    "merge_state_dicts",
]
