"""The generalized task-arithmetic pipeline that TA, TIES, DARE, Breadcrumbs and DELLA share.

Per tensor: τ_t = θ_t − θ₀ → sparsify τ_t (method-specific) → weight w_t τ_t → either a plain (optionally
normalized) sum, or TIES sign election + disjoint merge → θ = θ₀ + λ · τ_m.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mergesmith.ops.stream import TensorContext
from mergesmith.ops.taskvec import disjoint_merge, elect_signs, per_model, stack_deltas

# sparsify(delta of expert i, i, params, ctx) -> sparsified delta; ``delta`` is the caller's own scratch copy, which
# a sparsifier may overwrite (the drop and trim are memory-bound: no temporaries)
Sparsifier = Callable[[torch.Tensor, int, dict[str, Any], TensorContext], torch.Tensor]


def merge_task_vectors(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: dict[str, Any],
    ctx: TensorContext,
    sparsify: Sparsifier | None = None,
    consensus: bool = False,
) -> torch.Tensor:
    if not consensus:
        return _summed(base, experts, params, ctx, sparsify)
    deltas = stack_deltas(base, experts)  # our own buffer: updated in place below
    if sparsify is not None:
        for i in range(len(experts)):
            deltas[i] = sparsify(deltas[i], i, params, ctx)
    weights = per_model(params["weight"], deltas)
    if any(w != 1 for w in params["weight"]):
        deltas.mul_(weights)
    majority = ctx.state.get("majority", 1.0) if isinstance(ctx.state, dict) else 1.0
    signs = elect_signs(deltas, params["sign_zero"], majority)
    merged = disjoint_merge(deltas, weights, signs, params["disjoint"])
    return (merged if params["lambda"] == 1 else merged.mul_(params["lambda"])).add_(base)


def _summed(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: dict[str, Any],
    ctx: TensorContext,
    sparsify: Sparsifier | None,
) -> torch.Tensor:
    """θ₀ + λ Σ_t w_t s(τ_t) (÷ Σ_t w_t when ``normalize``), one task vector at a time in a scratch buffer: no
    [T, *shape] stack, and the sum accumulates in place (the merge is memory-bound)."""
    weights = [float(w) for w in params["weight"]]
    total = sum(weights)
    scale = (
        params["lambda"] / total
        if params.get("normalize", False) and abs(total) >= 1e-8
        else params["lambda"]
    )
    merged = torch.sub(experts[0], base)  # the first task vector is written straight into the sum
    if sparsify is not None:
        merged = sparsify(merged, 0, params, ctx)
    if weights[0] != 1:
        merged.mul_(weights[0])
    scratch: torch.Tensor | None = None  # allocated by the second task vector, reused by the rest
    for i in range(1, len(experts)):
        scratch = torch.sub(experts[i], base, out=scratch)
        delta = scratch if sparsify is None else sparsify(scratch, i, params, ctx)
        merged.add_(delta, alpha=weights[i])
    return (merged if scale == 1 else merged.mul_(scale)).add_(base)
