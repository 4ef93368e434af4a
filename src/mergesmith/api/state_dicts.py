"""In-memory merges: ``merge_state_dicts`` and ``fit_state_dicts`` run the same planner, fits and engine as
checkpoint merges, over dicts of tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergesmith.engine.execute import execute
from mergesmith.engine.plan import Plan, Planner
from mergesmith.errors import RecipeError
from mergesmith.fit.task import FitInputs, FitResult, Task
from mergesmith.io.reader import DictSource, Source
from mergesmith.methods.registry import get_method
from mergesmith.recipe.schema import load_recipe


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
