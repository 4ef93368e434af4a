"""One evaluation worker: the source models read into memory once, the fitness built once, and each genome
turned into its recipe, merged in memory (no disk write) and scored."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mergesmith.api.state_dicts import load_in_memory, merge_recipe_in_memory
from mergesmith.arch.layers import num_layers
from mergesmith.drivers.evolve.dataflow import DataflowSpace, check_sources, path_recipe
from mergesmith.drivers.evolve.fitness import Fitness
from mergesmith.drivers.evolve.space import ParameterSpace
from mergesmith.errors import RecipeError
from mergesmith.io.models import open_model
from mergesmith.io.reader import Source, close_sources
from mergesmith.recipe.search import SearchSpec

Space = ParameterSpace | DataflowSpace


def layer_counts(
    spec: SearchSpec, loaded: Mapping[str, Source] | None = None
) -> tuple[list[int], list[dict[str, Any]]]:
    """Each model's number of layers (from its config and tensor names) and its config: from the ``loaded``
    sources, else from each checkpoint opened for it (no tensor is read)."""
    counts, configs = [], []
    for model in spec.models:
        source = loaded[model] if loaded is not None else open_model(model)
        try:
            counts.append(num_layers(source.config, source.keys()))
            configs.append(dict(source.config))
        finally:
            if loaded is None:
                close_sources([source])
    return counts, configs


def make_space(spec: SearchSpec, loaded: Mapping[str, Source] | None = None) -> Space:
    """The genome layout of ``spec``: a parameter space over layer blocks, or a data-flow (layer path) space
    (the models' shapes from ``loaded`` sources when the caller holds them)."""
    counts, configs = layer_counts(spec, loaded)
    if spec.space == "dataflow":
        check_sources(configs, spec.models)
        return DataflowSpace(counts, repeats=spec.dataflow.repeats, start=spec.dataflow.start)
    if len(set(counts)) != 1:
        listed = ", ".join(f"{m}: {c}" for m, c in zip(spec.models, counts, strict=True))
        raise RecipeError(f"models: a parameter-space search merges models of one layer count ({listed})")
    return ParameterSpace(spec, counts[0])


def candidate_recipe(space: Space, spec: SearchSpec, x: np.ndarray) -> dict[str, Any]:
    """The plain recipe a genome stands for. RecipeError for a genome with no valid model (an empty path)."""
    if isinstance(space, DataflowSpace):
        return path_recipe(space.decode(x), spec.models, dtype=spec.dtype)
    return space.recipe(x)


class Evaluator:
    """Scores genomes of one search; a Ray actor holds one (``threads`` torch threads each)."""

    def __init__(self, spec: SearchSpec, extra_kinds: Mapping[str, str] | None = None, threads: int = 1):
        torch.set_num_threads(threads)
        self.spec = spec
        models = [*([spec.base_model] if spec.base_model else []), *spec.models]
        self.sources = load_in_memory(models)
        self.space = make_space(spec, self.sources)
        self.fitness = Fitness(spec, extra_kinds)

    def ready(self) -> bool:
        """True once built (a Ray pool waits on it: a worker that cannot start fails before anything is written)."""
        return True

    def merged(self, x: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return merge_recipe_in_memory(candidate_recipe(self.space, self.spec, x), self.sources)

    def score(self, x: list[float]) -> dict[str, Any]:
        """``{"fitness": float | None, "seconds": float}``; None marks a genome that gives no model (the
        search ranks it last). A failing evaluator raises."""
        started = time.perf_counter()
        try:
            state, config = self.merged(np.asarray(x, dtype=float))
        except RecipeError as e:
            if isinstance(self.space, DataflowSpace):
                return {
                    "fitness": None,
                    "invalid": str(e),
                    "seconds": round(time.perf_counter() - started, 3),
                }
            raise
        # a path changes the layer count: the evaluator builds a module of that config
        value = self.fitness(state, config if self.spec.space == "dataflow" else None)
        return {"fitness": value, "seconds": round(time.perf_counter() - started, 3)}
