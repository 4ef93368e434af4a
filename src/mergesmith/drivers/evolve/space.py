"""The parameter space (Akiba et al.'s PS merging, as mergekit-evolve lays it out): a genome → a plain recipe.

The genome holds, for every block of ``layer_granularity`` layers, every model and every filter set (the
``filters`` and a fallback), one value of each searched per-model parameter (``weight``, ``density``, ...), then,
per block and filter set, each searched shared parameter (SLERP's ``t``, ...). A coordinate x ∈ [0, 1] maps to
``low + clip(x, 0, 1) · (high − low)`` over its range. The recipe is what ``mergesmith merge`` runs: one slice
per block (tensors outside the layers take the first block's values for the input side, the last block's for
the output side, as in any sliced recipe), or with ``smooth`` a gradient over the layers.

Differences from mergekit-evolve (decided in docs/evolve.md): coordinates are normalized to the ranges and
clipped (mergekit takes |x| and clamps density to [0, 1]); density's range starts at 0.1 (a density of 0 drops
the whole task vector); ``normalize`` is the method's own default (mergekit-evolve forces it on for linear, TIES
and DARE-TIES), set ``parameters: {normalize: true}`` for mergekit's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mergesmith.errors import RecipeError
from mergesmith.methods.registry import get_method
from mergesmith.recipe.search import SearchSpec

# searched by default when the method has them (mergekit-evolve's METHOD_PARAM_MAPS, generalized)
DEFAULT_SEARCHED = ("weight", "density", "t")
DEFAULT_RANGES = {"weight": (0.0, 1.0), "density": (0.1, 1.0), "t": (0.0, 1.0)}


@dataclass(frozen=True)
class Coordinate:
    """One genome entry: which parameter, of which model (None: a shared parameter), block and filter."""

    param: str
    model: int | None
    group: int
    filter: str | None
    low: float
    high: float

    def value(self, x: float) -> float:
        return self.low + min(max(x, 0.0), 1.0) * (self.high - self.low)


class ParameterSpace:
    """The genome of a parameter-space search over ``spec`` for models of ``num_layers`` layers."""

    def __init__(self, spec: SearchSpec, num_layers: int):
        assert spec.merge_method is not None
        self.spec = spec
        method = get_method(spec.merge_method)
        if method.fit is not None:
            raise RecipeError(
                f"merge_method: '{spec.merge_method}' learns from data; the search takes data-free methods"
            )
        params = {p.name: p for p in method.params}
        names = spec.search or [n for n in DEFAULT_SEARCHED if n in params]
        if not names:
            raise RecipeError(
                f"search: method '{method.name}' has no weight, density or t; name the parameters to search "
                f"(its parameters: {', '.join(params) or 'none'})"
            )
        for name in names:
            if name not in params:
                raise RecipeError(
                    f"search: method '{method.name}' has no parameter '{name}' (its parameters: "
                    f"{', '.join(params)})"
                )
            if params[name].type is not float:
                raise RecipeError(f"search: '{name}' is not a number; the search varies numeric parameters")
        for name in spec.ranges:
            if name not in names:
                raise RecipeError(f"ranges.{name}: '{name}' is not searched (search: {', '.join(names)})")
        for name in spec.initial:
            if name not in names:
                raise RecipeError(f"initial.{name}: '{name}' is not searched (search: {', '.join(names)})")
        self.ranges = {name: self._range(name, params[name]) for name in names}
        self.per_model = [n for n in names if params[n].per_model]
        self.shared = [n for n in names if not params[n].per_model]
        self.base_ignored = method.base.value == "ignored"
        if spec.layer_granularity and num_layers % spec.layer_granularity:
            raise RecipeError(
                f"layer_granularity: {spec.layer_granularity} does not divide the models' {num_layers} layers"
            )
        self.num_layers = num_layers
        self.groups = num_layers // spec.layer_granularity if spec.layer_granularity else 1
        self.sets: list[str | None] = [*spec.filters, None]
        self.coordinates = self._coordinates()
        self.fixed = dict(spec.parameters)
        varying = self.groups > 1 or spec.filters
        for scope in (p for p in method.params if p.global_over and set(p.global_over) & set(names)):
            # a global scope (one top-k over the whole network) needs one value per model: values that vary
            # by block or filter are applied per tensor, as mergekit does
            if varying and self.fixed.get(scope.name, "tensor") != "tensor":
                raise RecipeError(
                    f"parameters.{scope.name}: {self.fixed[scope.name]} needs one "
                    f"{'/'.join(scope.global_over)} per model; it cannot vary by block or filter (use tensor)"
                )
            if varying:
                self.fixed[scope.name] = "tensor"

    def _range(self, name: str, param: Any) -> tuple[float, float]:
        default = DEFAULT_RANGES.get(name)
        if name == "weight" and self.spec.allow_negative_weights:
            default = (-1.0, 1.0)
        if default is None and param.low is not None and param.high is not None:
            default = (param.low, param.high)
        low, high = self.spec.ranges.get(name, default or (None, None))  # type: ignore[misc]
        if low is None or high is None:
            raise RecipeError(
                f"ranges.{name}: '{name}' has no natural range; give ranges: {{{name}: [low, high]}}"
            )
        if (param.low is not None and low < param.low) or (param.high is not None and high > param.high):
            domain = f"[{param.low if param.low is not None else '-inf'}, {param.high if param.high is not None else 'inf'}]"
            raise RecipeError(f"ranges.{name}: [{low}, {high}] is outside {name}'s domain {domain}")
        return float(low), float(high)

    def _coordinates(self) -> list[Coordinate]:
        out = []
        for group in range(self.groups):
            for model in range(len(self.spec.models)):
                for filter_ in self.sets:
                    for name in self.per_model:
                        out.append(Coordinate(name, model, group, filter_, *self.ranges[name]))
            for filter_ in self.sets:
                for name in self.shared:
                    out.append(Coordinate(name, None, group, filter_, *self.ranges[name]))
        return out

    @property
    def size(self) -> int:
        return len(self.coordinates)

    def initial(self) -> np.ndarray:
        """The search's starting mean: ``initial:`` values, else weight 1/n, density 1, t 0.5 (mergekit-evolve's
        start), normalized into the ranges."""
        start = {"weight": 1.0 / len(self.spec.models), "density": 1.0, "t": 0.5, **self.spec.initial}
        x0 = []
        for c in self.coordinates:
            value = start.get(c.param, (c.low + c.high) / 2)
            x0.append(0.5 if c.high == c.low else min(max((value - c.low) / (c.high - c.low), 0.0), 1.0))
        return np.asarray(x0, dtype=float)

    def recipe(self, x: np.ndarray) -> dict[str, Any]:
        """The plain recipe (a dict, as ``mergesmith merge`` reads it) that genome ``x`` stands for."""
        if len(x) != self.size:
            raise RecipeError(f"a genome of {len(x)} values for a search space of {self.size}")
        table: dict[tuple[str, int | None, int, str | None], float] = {
            (c.param, c.model, c.group, c.filter): c.value(float(v))
            for c, v in zip(self.coordinates, x, strict=True)
        }
        spec = self.spec
        recipe: dict[str, Any] = {"merge_method": spec.merge_method}
        if spec.base_model:
            recipe["base_model"] = spec.base_model
        recipe["parameters"] = dict(self.fixed)
        if spec.smooth or self.groups == 1:
            blocks = list(range(self.groups))
            models = [
                {"model": m, "parameters": self._settings(table, i, blocks)}
                for i, m in enumerate(spec.models)
            ]
            if spec.base_model and spec.base_model not in spec.models and not self.base_ignored:
                models.append({"model": spec.base_model})
            recipe["models"] = models
            recipe["parameters"].update(self._settings(table, None, blocks))
        else:
            recipe["slices"] = [self._slice(table, g) for g in range(self.groups)]
        recipe["dtype"] = spec.dtype
        recipe["seed"] = spec.seed
        return recipe

    def _slice(self, table: dict, group: int) -> dict[str, Any]:
        step = self.num_layers // self.groups
        layer_range = [group * step, (group + 1) * step]
        sources = [
            {"model": m, "layer_range": layer_range, "parameters": self._settings(table, i, [group])}
            for i, m in enumerate(self.spec.models)
        ]
        base = self.spec.base_model
        if base and base not in self.spec.models and not self.base_ignored:
            sources.append({"model": base, "layer_range": layer_range})
        out: dict[str, Any] = {"sources": sources}
        shared = self._settings(table, None, [group])
        if shared:
            out["parameters"] = shared
        return out

    def _settings(self, table: dict, model: int | None, blocks: list[int]) -> dict[str, Any]:
        """One model's (or the shared) searched settings over ``blocks``: a scalar, a gradient over the blocks,
        and per filter a ``{filter, value}`` entry (the fallback last)."""
        names = self.per_model if model is not None else self.shared
        out: dict[str, Any] = {}
        for name in names:
            per_set = []
            for filter_ in self.sets:
                points = [round(table[(name, model, g, filter_)], 6) for g in blocks]
                per_set.append(points[0] if len(points) == 1 else points)
            if len(self.sets) == 1:
                out[name] = per_set[0]
            else:
                out[name] = [
                    {"filter": f, "value": v} if f is not None else {"value": v}
                    for f, v in zip(self.sets, per_set, strict=True)
                ]
        return out
