"""DELLA-Merging (Deep, Bhardwaj, Poria, 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling").

MagPrune, per row of each task vector (the rows of a ``[out, in]`` matrix; a 1-D tensor is one row; a ≥3-D
tensor is flattened to ``[shape[0], -1]``):

    r_ij = rank of |τ_ij| in its row (1 = smallest),  r̄_ij = (r_ij − 1) / (n − 1) ∈ [0, 1],
    p_ij = (density − ε) + 2ε · r̄_ij          (keep probability; larger |τ| → kept more often),
    m_ij ~ Bernoulli(p_ij),   τ̂_ij = m_ij τ_ij / p_ij    (paper: E[τ̂] = τ)

then ``della``: TIES sign election + disjoint mean over the τ̂_t (the paper's method); ``della_linear``: plain task
arithmetic θ₀ + λ Σ_t w_t τ̂_t. Requires 0 < density − ε and density + ε < 1 (when density < 1). The masks are
drawn from a generator seeded by (seed, tensor name, model index): reproducible and independent of the order in
which tensors are merged. A row of a single entry gets p = density.

Defaults: ε = 0.15 (mergekit's default; the official README example uses window 0.14, i.e. ε = 0.07);
density 0.7 (the official README example, drop rate 0.3); λ 1.0 (the README example uses 1.1).

Paper vs mergekit (``compat: mergekit``):
- rescale: the paper (official code, ``rank_magnitude``) divides each kept entry by its own keep probability p_ij
  (``rescale: inverse``); mergekit multiplies the whole tensor by ‖τ‖₁ / ‖τ ⊙ m‖₁ (``rescale: l1``).
- default density: 0.7 (paper's example); mergekit 1.0 (no pruning).
- the sign of an exact zero sum is + in both (the official code is a mergekit fork): ``sign_zero`` defaults to
  ``positive`` (``majority``, TIES' rule, is available and costs one pass); the disjoint merge is the weighted
  mean in both.
- ≥3-D tensors: mergekit ranks along dim 1 of the unflattened tensor; here along the flattened trailing dims.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from mergesmith.errors import RecipeError
from mergesmith.methods.base import MergeMethod, ModelStats, Param, Rule
from mergesmith.methods.dare import RESCALE_ALIAS
from mergesmith.methods.params import DISJOINT, LAMBDA, NORMALIZE_ALIAS, SIGN_ZERO, WEIGHT
from mergesmith.ops.gta import merge_task_vectors
from mergesmith.ops.stream import TensorContext
from mergesmith.ops.taskvec import rescale_kept
from mergesmith.ops.ties import majority_sign_pass

PAPER = (
    "Deep, Bhardwaj, Poria, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
    "Sampling, 2024 (arXiv:2406.11617)"
)


def magprune_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-row rank-based keep probabilities p = (density − ε) + 2ε · rank_norm, shaped like ``delta``."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    if n < 2:
        return torch.full_like(delta, density)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=order.device).expand_as(order).contiguous())
    rank_norm = ranks.to(delta.dtype) / (n - 1)
    return ((density - epsilon) + rank_norm * (2 * epsilon)).reshape(delta.shape)


def magprune(delta: torch.Tensor, i: int, params: dict[str, Any], ctx: TensorContext) -> torch.Tensor:
    density, epsilon = params["density"][i], params["epsilon"][i]
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise RecipeError(
            f"tensor '{ctx.name}': della needs 0 < density − epsilon and density + epsilon < 1, got density "
            f"{density}, epsilon {epsilon}"
        )
    probs = magprune_probabilities(delta, density, epsilon)
    # drawn on the CPU (the seeded generator's device): the same seed gives the same mask on any device
    mask = torch.bernoulli(probs.to("cpu", torch.float32), generator=ctx.generator(f"della{i}"))
    mask = mask.to(delta.device, delta.dtype)
    return rescale_kept(delta, mask, probs, params["rescale"])


def della_rule(
    base: torch.Tensor, experts: list[torch.Tensor], params: dict[str, Any], ctx: TensorContext
) -> torch.Tensor:
    return merge_task_vectors(base, experts, params, ctx, sparsify=magprune, consensus=True)


def della_linear_rule(
    base: torch.Tensor, experts: list[torch.Tensor], params: dict[str, Any], ctx: TensorContext
) -> torch.Tensor:
    return merge_task_vectors(base, experts, params, ctx, sparsify=magprune)


DENSITY = Param(
    "density",
    float,
    0.7,
    "mean keep rate (official example: drop rate 0.3)",
    per_model=True,
    low=0.0,
    high=1.0,
    mergekit=1.0,
)
EPSILON = Param(
    "epsilon", float, 0.15, "half-width ε of the keep-probability window", per_model=True, low=0.0, high=1.0
)
RESCALE = Param(
    "rescale",
    str,
    "inverse",
    "inverse: divide each kept entry by its p (paper); l1: match the L1 norm (mergekit); none",
    choices=("inverse", "l1", "none"),
    mergekit="l1",
)

DELLA = MergeMethod(
    name="della",
    rule=Rule(della_rule),
    summary="MagPrune (rank-based random drop, rescale), then TIES sign election and disjoint mean",
    paper=PAPER,
    params=(
        WEIGHT,
        DENSITY,
        EPSILON,
        LAMBDA,
        RESCALE,
        DISJOINT,
        replace(SIGN_ZERO, default="positive", mergekit="positive"),
    ),
    aliases={**NORMALIZE_ALIAS, **RESCALE_ALIAS},
    random=True,
    model_stats=ModelStats(majority_sign_pass(magprune)),
)

DELLA_LINEAR = MergeMethod(
    name="della_linear",
    rule=Rule(della_linear_rule),
    summary="MagPrune (rank-based random drop, rescale), then task arithmetic",
    paper=PAPER,
    params=(WEIGHT, DENSITY, EPSILON, LAMBDA, RESCALE, Param("normalize", bool, False, "divide by Σ_t w_t")),
    aliases=dict(RESCALE_ALIAS),
    random=True,
)

METHODS = (
    DELLA,
    DELLA_LINEAR,
)
