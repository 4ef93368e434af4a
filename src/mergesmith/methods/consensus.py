"""Consensus Merging with TALL masks (Wang, Dimitriadis, Favero, Ortiz-Jiménez, Fleuret, Frossard, ICML 2024,
"Localizing Task Information for Improved Model Merging and Compression").

Per tensor (elementwise, so per tensor = over the flattened model), with τ_t = θ_t − θ₀:

1. multi-task vector τ_MTL: the task-arithmetic sum Σ_t τ_t (``base_method: ta``), or TIES with K = 20 % and
   dis-sum (``base_method: ties``: global top-``density`` trim, sign election by mass with the whole-model majority
   sign for exact zeros, sum over the agreeing experts — ``ops/ties.py``'s trim and whole-model pass);
2. TALL mask of each task: m_t = 1{ |θ₀ − θ_t| > λ_t · |θ_MTL − θ_t| },  θ_MTL = θ₀ + τ_MTL
   (strict >, as ``tall_masks/src/utils/tallmask_utils.py::generate_task_masks``);
3. consensus mask: m = 1{ Σ_t m_t ≥ k }  (k = 2 drops "catastrophic" (0 tasks) and "selfish" (1 task) weights;
   k = 1 only catastrophic ones; k = 0 gives plain TA/TIES; k > T gives the base);
4. θ = θ₀ + λ · (m ⊙ τ_MTL).

Defaults: ``k`` 2 (the official ``prun_thre_k``); ``lambda_t`` 0.6: the official code picks λ_t per task on
validation data from {0.2, 0.3, 0.4, 0.5, 0.6}; without data we use FusionBench's data-free default
(``tall_mask_lambda: 0.6``), the top of that grid (the strictest masks); ``lambda`` (α) 1.0 — the official code
searches α ∈ {0.1, …, 1.0} on validation; ``density`` 0.2 and ``trim_scope: global`` (TIES K = 20 over the whole
model, as the official ``ties_merging(reset_thresh=20)``).

mergekit has no consensus merging, so there are no paper-vs-mergekit switches (``compat: mergekit`` changes
nothing here, not even the TIES trim scope).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from mergesmith.methods.base import REQUIRED, MergeMethod, ModelStats, Param, Rule
from mergesmith.methods.params import LAMBDA
from mergesmith.methods.ties import TRIM_SCOPE
from mergesmith.ops.stream import TensorContext, TensorInputs, TensorStream
from mergesmith.ops.taskvec import disjoint_merge, elect_signs, stack_deltas
from mergesmith.ops.ties import prepare_ties, trim


def multitask_vector(deltas: torch.Tensor, params: dict[str, Any], ctx: TensorContext) -> torch.Tensor:
    """τ_MTL from the ``[T, *shape]`` task vectors: TA sum, or TIES (trim, elect, dis-sum), unscaled."""
    if params["base_method"] == "ta":
        return deltas.sum(dim=0)
    trimmed = torch.stack([trim(deltas[i], i, params, ctx) for i in range(deltas.shape[0])])
    majority = ctx.state.get("majority", 1.0) if isinstance(ctx.state, dict) else 1.0
    signs = elect_signs(trimmed, "majority", majority)
    return disjoint_merge(trimmed, torch.ones_like(trimmed), signs, "sum")


def tall_masks(
    base: torch.Tensor, experts: list[torch.Tensor], mtl: torch.Tensor, lambdas: list[float]
) -> torch.Tensor:
    """m_t = |θ₀ − θ_t| > λ_t |θ_MTL − θ_t|, stacked ``[T, *shape]`` (bool)."""
    multi = base + mtl
    return torch.stack([(base - e).abs() > lam * (multi - e).abs() for e, lam in zip(experts, lambdas)])


def consensus_rule(
    base: torch.Tensor, experts: list[torch.Tensor], params: dict[str, Any], ctx: TensorContext
) -> torch.Tensor:
    mtl = multitask_vector(stack_deltas(base, experts), params, ctx)
    agree = tall_masks(base, experts, mtl, params["lambda_t"]).sum(dim=0) >= params["k"]
    return base + params["lambda"] * (mtl * agree)


def prepare_consensus(stream: TensorStream, params: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """base_method: ties needs TIES' whole-model passes (global thresholds, majority sign), with unit weights."""
    if params["base_method"] != "ties":
        return {}

    def unit_weights():
        for item in stream():
            yield TensorInputs(
                item.name, item.base, item.experts, {**item.params, "weight": [1.0] * len(item.experts)}
            )

    return prepare_ties(unit_weights, {"trim_scope": params["trim_scope"], "sign_zero": "majority"}, seed)


CONSENSUS = MergeMethod(
    name="consensus",
    rule=Rule(consensus_rule),
    summary="keep the multi-task vector only where ≥ k tasks' TALL masks agree",
    paper="Wang et al., Localizing Task Information for Improved Model Merging and Compression, ICML 2024 "
    "(arXiv:2405.07813)",
    params=(
        LAMBDA,
        Param("k", int, 2, "minimum number of tasks whose TALL mask keeps a weight", low=0),
        Param(
            "lambda_t",
            float,
            0.6,
            "per-task TALL mask threshold λ_t (official grid 0.2–0.6)",
            per_model=True,
            low=0.0,
        ),
        Param(
            "base_method",
            str,
            "ta",
            "multi-task vector: task-arithmetic sum or TIES (dis-sum)",
            choices=("ta", "ties"),
        ),
        Param(
            "density",
            float,
            0.2,
            "TIES keep fraction K for base_method: ties",
            per_model=True,
            low=0.0,
            high=1.0,
        ),
        replace(TRIM_SCOPE, mergekit=REQUIRED),
    ),
    model_stats=ModelStats(prepare_consensus),
)

METHODS = (CONSENSUS,)
