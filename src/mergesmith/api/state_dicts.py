"""In-memory merges: ``merge_state_dicts`` and ``fit_state_dicts`` run the same planner, fits and engine as
checkpoint merges, over dicts of tensors; ``merge_recipe_in_memory`` runs a whole recipe (slices, gradients,
filters) over models read once into memory (``load_in_memory``), as a search scores many candidate recipes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergesmith.engine.effective import effective_recipe
from mergesmith.engine.execute import execute
from mergesmith.engine.plan import Plan, Planner
from mergesmith.errors import RecipeError
from mergesmith.fit.task import FitInputs, FitResult, Task
from mergesmith.io.models import open_model
from mergesmith.io.reader import DictSource, Source, close_sources
from mergesmith.methods.registry import get_method
from mergesmith.recipe.schema import Recipe, load_recipe


def merge_state_dicts(
    base: Mapping[str, torch.Tensor] | None,
    experts: Sequence[Mapping[str, torch.Tensor]],
    method: str,
    *,
    seed: int = 0,
    compat: str = "paper",
    threads: int = 1,
    tasks: Sequence[Task] | None = None,
    fitted: FitResult | None = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with the same engine and rules as checkpoint merges.

    Shared parameters are scalars (``lambda=0.5``); a per-model parameter is a scalar for every expert or a list
    with one value per expert (``weight=[1.0, 0.5]``). For methods that ignore the base (linear, karcher) the
    experts are all the models. Returns tensors in the reference model's dtype.

    Data-driven methods (Fisher, RegMean, AdaMerging, ...) need ``tasks`` (one :class:`mergesmith.fit.task.Task`
    per expert) to fit on, or a ``fitted`` result from :func:`fit_state_dicts` to replay.
    """
    plan = plan_state_dicts(base, experts, method, seed, compat, params)
    if plan.method.fit is not None:
        if fitted is None:
            if tasks is None:
                raise RecipeError(
                    f"method '{method}' learns from data: pass tasks=[...] (one per expert) or fitted="
                )
            fitted = run_fit(plan, base, experts, tasks)
        plan.fitted = fitted
    out: dict[str, torch.Tensor] = {}
    execute(plan, out.__setitem__, threads=threads, progress=False)
    return {j.name: out[j.name] for j in plan.jobs}


def fit_state_dicts(
    base: Mapping[str, torch.Tensor] | None,
    experts: Sequence[Mapping[str, torch.Tensor]],
    method: str,
    tasks: Sequence[Task],
    *,
    seed: int = 0,
    compat: str = "paper",
    progress: bool = False,
    **params: Any,
) -> FitResult:
    """Run a data-driven method's fit (statistics, learned coefficients or masks) and return its FitResult,
    which ``merge_state_dicts(..., fitted=result)`` replays and ``result.save(path)`` stores."""
    plan = plan_state_dicts(base, experts, method, seed, compat, params)
    if plan.method.fit is None:
        raise RecipeError(f"method '{method}' does not learn from data; merge it directly")
    return run_fit(plan, base, experts, tasks, progress)


def run_fit(
    plan: Plan,
    base: Mapping[str, torch.Tensor] | None,
    experts: Sequence[Mapping[str, torch.Tensor]],
    tasks: Sequence[Task],
    progress: bool = False,
) -> FitResult:
    """The one fit path (``merge``, ``merge_state_dicts``, ``fit_state_dicts``): the experts' mergeable parameters
    (the task model's, minus its head) in fp32, and the method's shared parameters as resolved for the plan."""
    fit = plan.method.fit
    if fit is None:
        raise RecipeError(f"method '{plan.method.name}' does not learn from data")
    if len(tasks) != len(experts):
        raise RecipeError(
            f"method '{plan.method.name}' needs one task per expert: got {len(tasks)} for "
            f"{len(experts)} experts"
        )
    names = [n for n in tasks[0].model.merge_names() if n in experts[0]]
    first = next((j for j in plan.jobs if not j.copy), None)
    inputs = FitInputs(
        base={n: base[n].float() for n in names} if base is not None else None,
        experts=[{n: e[n].float() for n in names} for e in experts],
        tasks=list(tasks),
        params=dict(first.params) if first else {},
        seed=plan.seed,
        progress=progress,
    )
    return fit(inputs)


def plan_state_dicts(
    base: Mapping[str, torch.Tensor] | None,
    experts: Sequence[Mapping[str, torch.Tensor]],
    method: str,
    seed: int,
    compat: str,
    params: dict[str, Any],
) -> Plan:
    """The plan of an in-memory merge: a recipe over dict sources (``base``, ``model_0``, …)."""
    sources: dict[str, Source] = {}
    models = []
    base_key = None
    if base is not None:
        base_key = "base"
        sources[base_key] = DictSource(base, "base")
    per_model_names = {p.name for p in get_method(method).params if p.per_model}
    for i, sd in enumerate(experts):
        key = f"model_{i}"
        sources[key] = DictSource(sd, f"model {i}")
        settings = {}
        for name, value in params.items():
            if _is_per_model_list(name, value, per_model_names):
                if len(value) != len(experts):
                    raise RecipeError(
                        f"parameter '{name}' has {len(value)} values for {len(experts)} experts"
                    )
                settings[name] = value[i]
        models.append({"model": key, "parameters": settings})
    shared = {k: v for k, v in params.items() if not _is_per_model_list(k, v, per_model_names)}
    recipe = load_recipe(
        {
            "merge_method": method,
            "base_model": base_key,
            "models": models,
            "parameters": shared,
            "compat": compat,
            "seed": seed,
        }
    )
    return Planner(recipe, sources).plan()


def _is_per_model_list(name: str, value: Any, per_model_names: set[str]) -> bool:
    """A list for a per-model parameter holds one value per expert, unless it is a filter list (of dicts)."""
    return (
        name in per_model_names
        and isinstance(value, (list, tuple))
        and not all(isinstance(v, dict) for v in value)
    )


def load_in_memory(models: Sequence[str], allow_pickle: bool = False) -> dict[str, Source]:
    """Every tensor of each model (a folder, file or Hub id, as in recipes) read once into memory, keyed by the
    model string, with its config: the sources of many in-memory merges of recipes over these models."""
    loaded: dict[str, Source] = {}
    for spec in dict.fromkeys(models):
        source = open_model(spec, allow_pickle)
        try:
            # copies: a checkpoint's tensors may be views of a file mapping that closing it unmaps
            tensors = {name: source.get(name).clone() for name in source.keys()}
            held = DictSource(tensors, source.label, source.config)
        finally:
            close_sources([source])
        loaded[spec] = held
    return loaded


def merge_recipe_in_memory(
    recipe: str | Path | dict[str, Any] | Recipe, sources: Mapping[str, Source], threads: int = 1
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Merge a data-free recipe over ``sources`` (keyed by the recipe's model strings, e.g. from
    :func:`load_in_memory`) into a dict, with the same effective parameters, plan and rules as ``merge()`` writes
    to disk: the tensors equal the folder that ``merge(recipe, out)`` writes. Returns them and the output's
    config.json dict (a sliced recipe has its own layer count)."""
    parsed = load_recipe(recipe)
    method = get_method(parsed.merge_method)
    if method.fit is not None:
        raise RecipeError(
            f"method '{parsed.merge_method}' learns from data; an in-memory recipe merge takes data-free methods"
        )
    parsed, _ = effective_recipe(parsed, method)
    missing = [m for m in parsed.model_paths() if m not in sources]
    if missing:
        raise RecipeError(f"the recipe names model '{missing[0]}', which was not loaded")
    plan = Planner(parsed, dict(sources), parsed.out_dtype or parsed.dtype, method=method).plan()
    out: dict[str, torch.Tensor] = {}
    execute(plan, out.__setitem__, threads=threads, progress=False)
    return {j.name: out[j.name] for j in plan.jobs}, dict(plan.config)
