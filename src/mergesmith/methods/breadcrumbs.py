"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
Sparse Masks").

Per tensor, each task vector keeps a middle band of its magnitudes: the largest ``gamma`` fraction (outliers) and
the smallest entries (noise) are dropped so that a ``density`` fraction remains:

    m_t = 1{ rank↓(|τ_t|) ∈ [n_top, n_top + n_keep) },  n_keep = ⌊density·n⌋,  n_top = min(⌊gamma·n⌋, n − n_keep)
    τ̂_t = τ_t ⊙ m_t  (optionally L1-rescaled, ``rescale: l1``)

(when ``gamma`` would leave fewer than ``density`` entries, fewer outliers are cut: mergekit's counts). Then
- ``breadcrumbs``:      θ = θ₀ + λ Σ_t w_t τ̂_t  (÷ Σ_t w_t with ``normalize``), the paper's task arithmetic;
- ``breadcrumbs_ties``: TIES sign election + disjoint merge over the τ̂_t (mergekit's combination).

density 1 and gamma 0 keep everything (density 1 alone does too: the band is then the whole tensor).

Defaults: the official code's hyper-parameter search (``rezazzr/breadcrumbs``, ``find_best_hyperparam.py``)
starts at keep β = 0.15, γ = 0.006 and searches β ∈ [0.05, 0.20], γ ∈ [0.001, 0.01], i.e. the 85–90 % sparsity
the paper reports; ``density`` therefore defaults to 0.15 (mergekit: 1.0, no masking) and ``gamma`` to 0.01
(mergekit's default, the top of the paper's range).

Paper vs mergekit (``compat: mergekit``):
- default density: 0.15 (paper's search start, 85 % sparsity); mergekit 1.0.
- breadcrumbs_ties disjoint merge: TIES' dis-mean (``disjoint: mean``); mergekit sums (normalize: false).
- breadcrumbs_ties sign of an exact zero sum: TIES' majority sign; mergekit +.
- mask granularity: the paper masks each layer (tensor), as mergekit, the default ``scope: tensor``. The official
  code instead ranks each slice along the last dimension (each row of a ``[out, in]`` matrix: ``topk`` on the
  last dim) and counts ⌊γ·n_cols⌋ removed, then ⌊β·n_cols⌋ kept of what remains: ``scope: row``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from mergesmith.methods.base import MergeMethod, ModelStats, Param, Rule
from mergesmith.methods.dare import RESCALE_ALIAS
from mergesmith.methods.params import DISJOINT, LAMBDA, NORMALIZE_ALIAS, SIGN_ZERO, WEIGHT
from mergesmith.ops.gta import merge_task_vectors
from mergesmith.ops.stream import TensorContext
from mergesmith.ops.taskvec import rescale_kept
from mergesmith.ops.ties import majority_sign_pass

PAPER = (
    "Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, ECCV 2024 "
    "(arXiv:2312.06795)"
)


def band_mask(
    magnitudes: torch.Tensor, density: float, gamma: float, counts: str = "mergekit"
) -> torch.Tensor:
    """Keep a middle band of each row of ``[R, n]`` magnitudes (ties broken by position).

    ``mergekit``: keep ⌊density·n⌋ entries right below the top min(⌊gamma·n⌋, n − keep).
    ``official``: drop the top ⌊gamma·n⌋, keep the next ⌊density·n⌋ (fewer if the band runs off the bottom).
    """
    n = magnitudes.shape[-1]
    keep = int(density * n)
    top = int(gamma * n)
    if counts == "mergekit":
        top = min(top, n - keep)
    stop = min(n, top + keep)
    if stop <= top:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    return leading(magnitudes, stop) & ~leading(magnitudes, top)


def leading(values: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` entries of each row of ``[R, n]`` in descending order, ties broken by position (what a stable
    descending sort puts first), as a mask. By the k-th largest value and a count of its ties, not a sort: a stable
    sort of a 28M-entry embedding matrix takes seconds per expert, the selection a tenth of that."""
    n = values.shape[-1]
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    threshold = values.kthvalue(n - k + 1, dim=-1, keepdim=True).values
    above = values > threshold
    tied = values == threshold
    wanted = k - above.sum(dim=-1, keepdim=True)  # how many of the tied entries, first by position
    return above | (tied & (tied.cumsum(dim=-1, dtype=torch.int32) <= wanted))


def breadcrumbs_sparsify(
    delta: torch.Tensor, i: int, params: dict[str, Any], ctx: TensorContext
) -> torch.Tensor:
    density, gamma = params["density"][i], params["gamma"][i]
    if delta.dim() == 0 or (density >= 1 and (gamma <= 0 or params["scope"] == "tensor")):
        return delta
    if params["scope"] == "row":
        rows = delta.reshape(-1, delta.shape[-1])
        mask = band_mask(rows.abs(), density, gamma, "official").reshape(delta.shape)
    else:
        mask = band_mask(delta.abs().reshape(1, -1), density, gamma, "mergekit").reshape(delta.shape)
    return rescale_kept(delta, mask, density, params["rescale"])


def breadcrumbs_rule(
    base: torch.Tensor, experts: list[torch.Tensor], params: dict[str, Any], ctx: TensorContext
) -> torch.Tensor:
    return merge_task_vectors(base, experts, params, ctx, sparsify=breadcrumbs_sparsify)


def breadcrumbs_ties_rule(
    base: torch.Tensor, experts: list[torch.Tensor], params: dict[str, Any], ctx: TensorContext
) -> torch.Tensor:
    return merge_task_vectors(base, experts, params, ctx, sparsify=breadcrumbs_sparsify, consensus=True)


DENSITY = Param(
    "density",
    float,
    0.15,
    "fraction of each task vector kept (paper: 85–90 % sparsity)",
    per_model=True,
    low=0.0,
    high=1.0,
    mergekit=1.0,
)
GAMMA = Param(
    "gamma", float, 0.01, "fraction of the largest |τ| dropped as outliers", per_model=True, low=0.0, high=1.0
)
SCOPE = Param(
    "scope",
    str,
    "tensor",
    "rank per tensor (paper text, mergekit) or per last-dim row with the official code's counts",
    choices=("tensor", "row"),
)
RESCALE = Param(
    "rescale",
    str,
    "none",
    "none (paper) or l1: match each tensor's L1 norm after masking",
    choices=("none", "l1"),
)

BREADCRUMBS = MergeMethod(
    name="breadcrumbs",
    rule=Rule(breadcrumbs_rule),
    summary="drop the largest and smallest |τ| (keep a middle band), then task arithmetic",
    paper=PAPER,
    params=(
        WEIGHT,
        DENSITY,
        GAMMA,
        LAMBDA,
        Param("normalize", bool, False, "divide by Σ_t w_t"),
        SCOPE,
        RESCALE,
    ),
    aliases=dict(RESCALE_ALIAS),
)

BREADCRUMBS_TIES = MergeMethod(
    name="breadcrumbs_ties",
    rule=Rule(breadcrumbs_ties_rule),
    summary="breadcrumbs masks, then TIES sign election and disjoint merge",
    paper=PAPER,
    params=(WEIGHT, DENSITY, GAMMA, LAMBDA, replace(DISJOINT, mergekit="sum"), SIGN_ZERO, SCOPE, RESCALE),
    aliases={**NORMALIZE_ALIAS, **RESCALE_ALIAS},
    model_stats=ModelStats(majority_sign_pass(breadcrumbs_sparsify)),
)

METHODS = (
    BREADCRUMBS,
    BREADCRUMBS_TIES,
)
