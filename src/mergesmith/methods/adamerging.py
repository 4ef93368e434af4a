"""AdaMerging and AdaMerging++ (Yang et al., ICLR 2024, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning").

    θ(λ) = θ₀ + Σ_k λ_k^l τ_k^l,   λ* = argmin_λ Σ_k E_{x ∈ D_k} H(f_{θ(λ)}(x; head_k))

with l = every parameter tensor (``granularity: layer``, one λ per task and tensor) or one λ per task
(``granularity: task``); H is the Shannon entropy of task k's softmax, measured on its unlabeled test inputs.
λ starts at 0.3, Adam (lr 1e-3, betas (0.9, 0.999)) for 500 steps, one batch of 16 inputs per task per step
(``mergesmith.fit.adamerging``). ``ties: true`` is AdaMerging++: τ_k is replaced by its TIES-selected entries
(trimmed to the top ``density`` = 20 % of |τ_k| over the whole network, then only the entries agreeing with the
elected sign γ = sign(Σ_k τ̂_k); the official ``ties_merging_split``), and λ is learned over those.

Paper vs other tools:
- ``clamp`` (true): the official code clamps λ to [0, 1] in the forward; FusionBench does not (``clamp: false``).
- ``batches_per_step`` (1): the paper and FusionBench use one batch of 16 per task and step; the official loop
  (``if i > 0: break``) actually sums the entropies of two batches per task (``batches_per_step: 2``).
- FusionBench runs 1000 steps (``steps: 1000``).

The rule is θ₀ + Σ_k λ_k τ_k with the fitted λ (``lambda.{name}``, the clamped values the forward used); for ++
it recomputes the selected entries per tensor with the fit's whole-network thresholds and majority sign
(``ties.thresholds``, ``ties.majority``), so the merge is exactly what was learned. A tensor the fit did not see
(not a parameter of the task model) gets ``fallback.lambda``: the learned λ task-wise, the initial λ layer-wise
(what the loop leaves for a tensor without gradient). ``fit.adamerging.adamerging_recipe`` turns an AdaMerging
fit into a plain ``task_arithmetic`` recipe that merges the same tensors; AdaMerging++ replays from its saved fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergesmith.errors import RecipeError
from mergesmith.fit.adamerging import (
    FALLBACK_LAMBDA,
    GRANULARITIES,
    fit_adamerging,
    ties_selected,
    write_learned_recipe,
)
from mergesmith.fit.task import FitResult
from mergesmith.methods.base import Artifacts, DataNeed, Fit, MergeMethod, Param, Rule
from mergesmith.ops.stream import TensorContext
from mergesmith.ops.taskvec import stack_deltas
from mergesmith.recipe.schema import Recipe


def fitted_tensors(ctx: TensorContext, method: str) -> dict[str, torch.Tensor]:
    if ctx.fitted is None:
        raise RecipeError(
            f"method '{method}' merges with learned coefficients: fit it first (tasks=...) or "
            "replay a saved fit"
        )
    return ctx.fitted.tensors


def fitted_lambdas(fitted: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The (K,) λ of one tensor, or the fallback for a tensor the fit did not see."""
    return fitted.get(f"lambda.{name}", fitted[FALLBACK_LAMBDA])


def combine(
    base: torch.Tensor, deltas: torch.Tensor, lambdas: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """θ₀ + Σ_k λ_k (m ⊙ τ_k) for one tensor; ``deltas`` is ``[K, *shape]``."""
    weights = lambdas.to(deltas.dtype).reshape(-1, *([1] * (deltas.dim() - 1)))
    merged = (deltas * weights).sum(0)
    if mask is not None:
        merged = merged * mask.to(merged.dtype)
    return base + merged


def adamerging_rule(base, experts, params, ctx):
    fitted = fitted_tensors(ctx, "adamerging")
    deltas = stack_deltas(base, experts)
    if params["ties"]:
        thresholds = [float(v) for v in fitted["ties.thresholds"]]
        deltas = ties_selected(deltas, thresholds, float(fitted["ties.majority"][0]))
    return combine(base, deltas, fitted_lambdas(fitted, ctx.name))


GRANULARITY = Param(
    "granularity",
    str,
    "layer",
    "one λ per task and parameter tensor (layer) or per task (task)",
    choices=GRANULARITIES,
)
INIT = Param("init", float, 0.3, "initial λ (the official prior)")
BATCH_SIZE = Param("batch_size", int, 16, "unlabeled inputs per task and batch", low=1)


def learned_recipe(fitted: FitResult, recipe: Recipe, folder: Path) -> dict[str, Any]:
    """Learned coefficients replay as a plain task_arithmetic recipe, ``learned_recipe.yaml`` (not AdaMerging++)."""
    path = write_learned_recipe(fitted, recipe, folder)
    return {"learned_recipe": path.name} if path is not None else {}


ADAMERGING = MergeMethod(
    name="adamerging",
    rule=Rule(adamerging_rule),
    summary="θ₀ + Σ λ_k τ_k with λ (per tensor or per task) learned by test-time entropy minimisation; "
    "ties: true = AdaMerging++",
    paper="Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024 "
    "(arXiv:2310.02575)",
    params=(
        GRANULARITY,
        Param("ties", bool, False, "AdaMerging++: learn λ over TIES-trimmed, sign-elected task vectors"),
        Param(
            "density",
            float,
            0.2,
            "AdaMerging++: fraction of |τ_k| kept, over the whole network (K = 20 %)",
            low=0.0,
            high=1.0,
        ),
        INIT,
        Param("clamp", bool, True, "clamp λ to [0, 1] in the forward (official code; FusionBench: false)"),
        Param("steps", int, 500, "Adam steps (FusionBench: 1000)", low=0),
        Param("lr", float, 1e-3, "Adam learning rate on λ", low=0.0),
        BATCH_SIZE,
        Param(
            "batches_per_step",
            int,
            1,
            "batches per task whose entropies are summed each step (the official loop: 2)",
            low=1,
        ),
    ),
    fit=Fit(fit_adamerging, DataNeed.UNLABELED),
    artifacts=Artifacts(learned_recipe),
)

METHODS = (ADAMERGING,)
