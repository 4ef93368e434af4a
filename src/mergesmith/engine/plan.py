"""Planning: a recipe and its opened sources → a :class:`Plan`, one :class:`Job` per output tensor (which source
tensors feed it, the resolved and validated parameters of the method's rule, the output dtype and shape).

Names and shapes are checked here, before anything is read or written. Structural work (layer slices today;
alignment and MoE later) is a transformation of the plan: which source tensors, renamed how, feed which output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from mergesmith.arch.embeddings import is_input_side, is_tied_output, tied_source, ties_embeddings
from mergesmith.arch.layers import layer_index, num_layers, renumber, with_num_layers
from mergesmith.dtypes import DTYPE_BY_NAME
from mergesmith.engine.effective import check_filters
from mergesmith.errors import CheckpointError, RecipeError
from mergesmith.io.reader import Source
from mergesmith.methods.base import BasePolicy, MergeMethod, resolve_method_params
from mergesmith.methods.registry import get_method
from mergesmith.recipe.schema import Recipe
from mergesmith.recipe.settings import resolve_settings


@dataclass
class Job:
    """One output tensor: where its inputs come from and the resolved parameters of its rule."""

    name: str
    dtype: torch.dtype  # output dtype
    shape: tuple[int, ...]
    base: tuple[Source, str] | None
    experts: list[tuple[Source, str]]
    params: dict[str, Any]
    layer: int | None = None
    copy: bool = False  # not merged (integer buffers): copied from the first input

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(torch.Size(self.shape).numel())


@dataclass
class Plan:
    method: MergeMethod
    jobs: list[Job]
    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    config_source: Source | None = None
    allow_nonfinite: bool = False
    fitted: Any = None  # a data-driven method's FitResult, handed to every rule as ctx.fitted
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the rules run


def natural_key(name: str) -> list[Any]:
    """Sort ``layers.10`` after ``layers.9``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def num_layers_of(source: Source) -> int:
    return num_layers(source.config, source.keys())


def _lookup(source: Source, name: str) -> tuple[Source, str]:
    """Where to read ``name`` in ``source``: itself, or the input embedding for a tied ``lm_head``."""
    if source.has(name):
        return source, name
    tied = tied_source(name, source.has) if ties_embeddings(source.config) else None
    if tied is not None:
        return source, tied
    raise CheckpointError(
        f"tensor '{name}' is missing from {source.label}; the models do not share an architecture"
    )


def _check_same(name: str, reference: tuple[Source, str], other: tuple[Source, str]) -> None:
    ref_shape = reference[0].info(reference[1])[1]
    shape = other[0].info(other[1])[1]
    if ref_shape != shape:
        raise CheckpointError(
            f"tensor '{name}': shape {list(ref_shape)} in {reference[0].label} but {list(shape)} in "
            f"{other[0].label}; these models cannot be merged tensor by tensor"
        )


def assign_roles(
    method: MergeMethod, base_path: str | None, entries: list[tuple[str, dict[str, Any]]]
) -> tuple[str | None, list[tuple[str, dict[str, Any]]]]:
    """Split (model, settings) entries into the method's base and experts."""
    if method.base is BasePolicy.IGNORED:
        return None, entries
    if method.base is BasePolicy.REQUIRED and not base_path:
        raise RecipeError(
            f"method '{method.name}' needs base_model (the model the task vectors are taken from)"
        )
    experts = [e for e in entries if e[0] != base_path]
    return base_path, experts


class Planner:
    """Turns a recipe and opened sources into a Plan, validating names, shapes and parameters."""

    def __init__(
        self,
        recipe: Recipe,
        sources: dict[str, Source],
        out_dtype: str | None = None,
        task_heads: frozenset[str] = frozenset(),
        method: MergeMethod | None = None,
    ):
        self.recipe = recipe
        self.sources = sources
        # a driver's own per-tensor rule (continual merging's steps), else the recipe's registered method
        self.method = method or get_method(recipe.merge_method)
        self.out_dtype = DTYPE_BY_NAME[out_dtype] if out_dtype else None
        # Task-specific heads (each expert's classifier, seen by a data-driven fit): never merged. The output keeps
        # the reference model's (the base, else the first model) when it has one; the others may differ in shape.
        self.task_heads = task_heads

    def _job(
        self,
        out_name: str,
        reference: tuple[Source, str],
        base: tuple[Source, str] | None,
        experts: list[tuple[Source, str]],
        shared: dict[str, Any],
        per_model: list[dict[str, Any]],
        t: float,
        layer: int | None,
    ) -> Job:
        for other in ([base] if base else []) + experts:
            _check_same(out_name, reference, other)
        dtype, shape = reference[0].info(reference[1])
        if not dtype.is_floating_point:
            return Job(out_name, dtype, shape, base, experts or [reference], {}, layer, copy=True)
        params = resolve_method_params(
            self.method,
            resolve_settings(shared, reference[1], t),
            [resolve_settings(settings, name, t) for (_, name), settings in zip(experts, per_model)],
            compat=self.recipe.compat,
            where=f"tensor '{out_name}'",
        )
        return Job(out_name, self.out_dtype or dtype, shape, base, experts, params, layer)

    def plan(self) -> Plan:
        recipe = self.recipe
        jobs = self._plan_slices() if recipe.slices else self._plan_whole()
        check_filters(recipe, {n for source in self.sources.values() for n in source.keys()})
        jobs.sort(key=lambda j: natural_key(j.name))
        first = self._config_source()
        config = dict(first.config)
        if recipe.slices:
            # each output layer's type (sliding or full attention, …) from the model its layer comes from
            order = [(s.sources[0].model, i) for s in recipe.slices for i in range(*s.sources[0].layer_range)]
            types = [self.sources[model].config.get("layer_types") for model, _ in order]
            config = with_num_layers(
                config,
                len(order),
                [i for _, i in order],
                [t[i] if isinstance(t, list) and i < len(t) else None for t, (_, i) in zip(types, order)],
            )
        return Plan(self.method, jobs, recipe.seed, config, first)

    def _config_source(self) -> Source:
        recipe = self.recipe
        if recipe.base_model:
            return self.sources[recipe.base_model]
        if recipe.models:
            return self.sources[recipe.models[0].model]
        return self.sources[recipe.slices[0].sources[0].model]  # type: ignore[index]

    def _plan_whole(self) -> list[Job]:
        recipe, method = self.recipe, self.method
        if not recipe.models:
            raise RecipeError("the recipe lists no models (add `models:` or `slices:`)")
        base_path, experts = assign_roles(
            method, recipe.base_model, [(m.model, m.parameters) for m in recipe.models]
        )
        method.check_expert_count(len(experts))
        base = self.sources[base_path] if base_path else None
        expert_sources = [self.sources[p] for p, _ in experts]
        reference = base or expert_sources[0]
        names = reference.keys()
        self._check_names(reference, [s for s in ([base] if base else []) + expert_sources])
        n_layers = num_layers_of(reference)
        jobs = []
        for name in names:
            layer = layer_index(name)
            if name in self.task_heads:
                dtype, shape = reference.info(name)
                jobs.append(
                    Job(name, self.out_dtype or dtype, shape, (reference, name), [], {}, layer, copy=True)
                )
                continue
            t = self._t(layer, n_layers)
            jobs.append(
                self._job(
                    name,
                    (reference, name),
                    (base, name) if base else None,
                    [_lookup(s, name) for s in expert_sources],
                    recipe.parameters,
                    [settings for _, settings in experts],
                    t,
                    layer,
                )
            )
        return jobs

    @staticmethod
    def _t(layer: int | None, n_layers: int) -> float:
        if layer is None:
            return 0.0
        return layer / (n_layers - 1) if n_layers > 1 else 1.0

    def _check_names(self, reference: Source, others: list[Source]) -> None:
        ref = set(reference.keys()) - self.task_heads
        for other in others:
            if other is reference:
                continue
            names = set(other.keys()) - self.task_heads
            missing = sorted(ref - names, key=natural_key)
            missing = [n for n in missing if not (is_tied_output(n) and ties_embeddings(other.config))]
            extra = sorted(names - ref, key=natural_key)
            extra = [n for n in extra if not (is_tied_output(n) and ties_embeddings(reference.config))]
            if missing:
                raise CheckpointError(
                    f"tensor '{missing[0]}' is in {reference.label} but not in {other.label} "
                    f"({len(missing)} missing); the models do not share an architecture"
                )
            if extra:
                raise CheckpointError(
                    f"tensor '{extra[0]}' is in {other.label} but not in {reference.label} "
                    f"({len(extra)} extra); the models do not share an architecture"
                )

    def _plan_slices(self) -> list[Job]:
        recipe, method = self.recipe, self.method
        assert recipe.slices is not None
        jobs: list[Job] = []
        out_layer = 0
        for k, slc in enumerate(recipe.slices):
            lengths = {s.layer_range[1] - s.layer_range[0] for s in slc.sources}
            if len(lengths) != 1:
                raise RecipeError(
                    f"slices[{k}]: every source must have the same number of layers, got {sorted(lengths)}"
                )
            for src in slc.sources:
                available = num_layers_of(self.sources[src.model])
                if src.layer_range[1] > available:
                    raise RecipeError(
                        f"slices[{k}]: layer_range {list(src.layer_range)} of {src.model} is out of bounds "
                        f"(it has {available} layers)"
                    )
            base_path, experts = assign_roles(
                method, recipe.base_model, [(s.model, s.parameters) for s in slc.sources]
            )
            method.check_expert_count(len(experts))
            shared = {**recipe.parameters, **slc.parameters}
            count = lengths.pop()
            base_src = next((s for s in slc.sources if s.model == base_path), None)
            if base_path and base_src is None:
                raise RecipeError(f"slices[{k}]: base_model {base_path} is not among the slice's sources")
            expert_srcs = [next(s for s in slc.sources if s.model == p) for p, _ in experts]
            for i in range(count):
                t = i / (count - 1) if count > 1 else 1.0
                reference_src = base_src or expert_srcs[0]
                reference = self.sources[reference_src.model]
                in_layer = reference_src.layer_range[0] + i
                for name in reference.keys():
                    if layer_index(name) != in_layer:
                        continue
                    out_name = renumber(name, out_layer + i)

                    def locate(src, name=name, i=i):
                        source_name = renumber(name, src.layer_range[0] + i)
                        return _lookup(self.sources[src.model], source_name)

                    jobs.append(
                        self._job(
                            out_name,
                            (reference, name),
                            locate(base_src) if base_src else None,
                            [locate(s) for s in expert_srcs],
                            shared,
                            [settings for _, settings in experts],
                            t,
                            out_layer + i,
                        )
                    )
            out_layer += count
        # tensors outside the layers: embeddings from the first slice's sources, the rest from the last's
        first, last = recipe.slices[0], recipe.slices[-1]
        for name in self.sources[first.sources[0].model].keys():
            if layer_index(name) is not None:
                continue
            slc = first if is_input_side(name) else last
            base_path, experts = assign_roles(
                method, recipe.base_model, [(s.model, s.parameters) for s in slc.sources]
            )
            base = self.sources[base_path] if base_path else None
            expert_sources = [self.sources[p] for p, _ in experts]
            reference = base or expert_sources[0]
            jobs.append(
                self._job(
                    name,
                    _lookup(reference, name),
                    (base, name) if base else None,
                    [_lookup(s, name) for s in expert_sources],
                    {**recipe.parameters, **slc.parameters},
                    [settings for _, settings in experts],
                    0.0,
                    None,
                )
            )
        return jobs
