"""The benchmark's fitness kinds for ``mergesmith evolve``: the text8 zoo and a user's BENCH.yaml, scored as the
benchmark tables score a merge (the normalized average over the tasks, each task's value divided by its fine-tuned
expert's test value), on the validation split the search may see.

``{kind: text8, zoo: PATH (default: the built text8 zoo), split: val, limit: 100}``;
``{kind: bench, bench: BENCH.yaml, split: val, limit: null}``. The search merges checkpoints of one format (bare
encoders, or models with their heads); the fitness reads the candidate's backbone (a head model's weights under
its ``bert.``-style prefix, that prefix stripped) into each task's own model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergesmith.bench.suite import Suite, backbone
from mergesmith.bench.zoo.bench import accuracies
from mergesmith.bench.zoo.text8 import Zoo, summarize
from mergesmith.errors import RecipeError
from mergesmith.fit.hf import causal_lm_from_state
from mergesmith.io.cache import zoo_dir
from mergesmith.recipe.search import SearchSpec

BENCH_KINDS = {"text8": f"{__name__}:text8", "bench": f"{__name__}:bench"}


def _normalized(zoo: Any, split: str, limit: int | None, finetuned: dict[str, float], prefix: str = ""):
    if split == "test":
        raise RecipeError(
            "fitness: the search scores the validation split (split: val); test is for the report"
        )

    def score(state: Mapping[str, torch.Tensor], config: dict[str, Any] | None) -> float:
        if config is None:
            outcomes = zoo.outcomes(backbone(state, prefix), split, limit=limit)
        elif hasattr(zoo, "module_outcomes"):  # a layer path: its own causal LM on the suite's LM tasks
            outcomes = zoo.module_outcomes(causal_lm_from_state(config, state), split, limit)
        else:
            raise RecipeError(
                "fitness text8 scores merges of the zoo's encoders, not models of another shape"
            )
        return summarize(accuracies(outcomes), finetuned, zoo.kinds)["normalized"]

    return score


def text8(settings: dict[str, Any], spec: SearchSpec):
    zoo = Zoo(Path(settings.get("zoo") or zoo_dir("text8")))
    return _normalized(
        zoo, settings.get("split", "val"), settings.get("limit"), zoo.finetuned_accuracy("test")
    )


def bench(settings: dict[str, Any], spec: SearchSpec):
    if "bench" not in settings:
        raise RecipeError("fitness kind 'bench' needs bench: path/to/BENCH.yaml")
    suite = Suite(settings["bench"], progress=False)
    finetuned = accuracies(suite.reference_outcomes()["finetuned"])
    split, limit = settings.get("split", "val"), settings.get("limit")
    return _normalized(suite, split, limit, finetuned, suite.arch_prefix)
