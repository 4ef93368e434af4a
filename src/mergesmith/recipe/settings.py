"""Resolving a recipe's parameter setting for one tensor, with mergekit's semantics: a scalar, a gradient over the
layers, or a list of ``{filter, value}`` entries."""

from __future__ import annotations

from typing import Any

from mergesmith.errors import RecipeError
from mergesmith.recipe.schema import Conditional


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """Resolve a scalar / gradient / filter list for one tensor; None when no filter matches.

    A gradient ``[v0, ..., vn]`` is interpolated linearly at t ∈ [0, 1] (t = layer / (num_layers − 1); 0 for
    tensors outside the layers); non-numeric gradients pick the nearest-below entry.
    """
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(v, Conditional) for v in setting):
            for cond in setting:
                if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                    return evaluate_setting(cond.value, tensor_name, t)
            return None
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
        scaled = t * (len(setting) - 1)
        low = int(scaled)
        if not numeric:
            return setting[low]
        high = min(len(setting) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * setting[low] + frac * setting[high]
    raise RecipeError(f"unexpected parameter value {setting!r}")


def resolve_settings(settings: dict[str, Any], tensor_name: str, t: float) -> dict[str, Any]:
    out = {}
    for key, value in settings.items():
        resolved = evaluate_setting(value, tensor_name, t)
        if resolved is not None:
            out[key] = resolved
    return out
