"""TIES-Merging (Yadav et al., NeurIPS 2023, "Resolving Interference When Merging Models").

1. Trim: τ̂_t = τ_t ⊙ 1{|τ_t| ≥ κ_t}, keeping the top ``density`` fraction of |τ_t|.
2. Elect: γ = sign(Σ_t w_t τ̂_t) (sign by mass).
3. Disjoint merge: τ_m = Σ_{t∈A} w_t τ̂_t / Σ_{t∈A} w_t over A = {t : sign(τ̂_t) = γ} (``mean``) or without the
   division (``sum``).
4. θ = θ₀ + λ τ_m.

Paper vs mergekit (``compat: mergekit`` switches every item):
- trim scope: the paper's code ranks each expert's task vector over the *whole network* (κ_t is one threshold per
  expert, found by an exact streaming selection over all tensors: two histogram passes over the float bits,
  ``selection.order_statistics``);
  mergekit ranks per tensor. ``trim_scope: global | tensor``.
- kept count: the paper's code keeps |τ| ≥ the (D − ⌊D·K⌋)-th smallest value, i.e. ⌊D·K⌋ + 1 entries; mergekit
  keeps max(1, ⌊K·n⌋). Follows ``trim_scope``.
- sign of an exact zero sum: paper = the sign of the sum of all elected signs of the model (one more pass);
  mergekit = +. ``sign_zero: majority | positive``.
- default density: paper K = 20 % (``density: 0.2``); mergekit 1.0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from mergesmith.errors import RecipeError
from mergesmith.methods.base import MergeMethod, Param, TensorContext, TensorStream, register
from mergesmith.methods.gta import DISJOINT, LAMBDA, NORMALIZE_ALIAS, SIGN_ZERO, WEIGHT, merge_task_vectors
from mergesmith.methods.selection import order_statistics
from mergesmith.methods.taskvec import (
    elect_signs,
    magnitude_mask,
    mergekit_keep_count,
    paper_keep_count,
    per_model,
    stack_deltas,
)


def _magnitude_rows(stream: TensorStream) -> Iterator[torch.Tensor]:
    """One pass: |τ_t| of each tensor as fp32 ``[T, n]`` rows (the chunks that the radix selection ranks)."""
    for item in stream():
        yield stack_deltas(item.base, item.experts).abs_().to(torch.float32).reshape(len(item.experts), -1)


def global_thresholds(stream: TensorStream, densities: list[float]) -> list[float]:
    """Exact κ_t per expert over the whole model: the (⌊D·K_t⌋ + 1)-th largest |τ_t|, with O(1) memory.

    Radix selection on the fp32 bit patterns (``selection.order_statistics``): two histogram passes.
    """

    def ranks(total: int) -> list[list[int]]:
        # rank (1-based, ascending) of the threshold = D − keep + 1
        return [[total - paper_keep_count(total, d) + 1] for d in densities]

    return [row[0] for row in order_statistics(lambda: _magnitude_rows(stream), ranks)]


def _trim(delta: torch.Tensor, i: int, params: dict[str, Any], ctx: TensorContext) -> torch.Tensor:
    if params["trim_scope"] == "global":
        if params["density"][i] >= 1:
            return delta
        return _keep_at_least(delta, ctx.state["thresholds"][i])
    if ctx.tensor_state is not None:  # per-tensor thresholds, found over the tensor's row blocks
        return _keep_at_least(delta, ctx.tensor_state[i])
    return delta * magnitude_mask(delta, params["density"][i], "mergekit")


def _keep_at_least(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """δ ⊙ [|δ| ≥ κ] with a float 0/1 mask (a float × bool product is ~4× slower on CPU); the thresholds are
    fp32 values, so fp64 deltas compare in fp32 as the selection ranked them."""
    magnitude = delta.abs()
    if magnitude.dtype != torch.float32:
        return delta * (magnitude.to(torch.float32) >= threshold)
    return delta * magnitude.ge_(threshold)


def tensor_thresholds(stream: TensorStream, params: dict[str, Any], ctx: TensorContext) -> list[float]:
    """Per-tensor trim (mergekit): κ_t = the max(1, ⌊K_t·n⌋)-th largest |τ_t| of this tensor, by an exact radix
    selection over its row blocks (the same value as a kthvalue over the whole tensor, in bounded memory)."""
    densities = list(params["density"])

    def ranks(total: int) -> list[list[int]]:
        return [[total - mergekit_keep_count(total, d) + 1] if total else [1] for d in densities]

    found = [row[0] for row in order_statistics(lambda: _magnitude_rows(stream), ranks)]
    # density ≥ 1 keeps everything, ≤ 0 nothing (as magnitude_mask)
    return [-math.inf if d >= 1 else math.inf if d <= 0 else k for d, k in zip(densities, found)]


def _constant_densities(stream: TensorStream) -> list[float]:
    densities: list[float] | None = None
    for item in stream():
        if densities is None:
            densities = list(item.params["density"])
        elif list(item.params["density"]) != densities:
            raise RecipeError(
                f"tensor '{item.name}': with trim_scope: global each model's density must be the same for every "
                "tensor (it is one top-k over the whole network); use trim_scope: tensor for per-tensor densities"
            )
    return densities or []


def prepare_ties(stream: TensorStream, shared: dict[str, Any], seed: int = 0, sparsify=_trim) -> dict[str, Any]:
    """The whole-model passes: global thresholds (trim_scope: global) and the majority sign (sign_zero: majority)."""
    state: dict[str, Any] = {}
    if shared["trim_scope"] == "global":
        densities = _constant_densities(stream)
        state["thresholds"] = (
            global_thresholds(stream, densities) if any(d < 1 for d in densities) else [0.0] * len(densities)
        )
    if shared["sign_zero"] == "majority":
        ctx = TensorContext(name="", state=state, seed=seed)
        total = 0.0
        for item in stream():
            ctx.name, ctx.rows = item.name, item.rows  # a row block draws the same random bits as in the rule
            deltas = stack_deltas(item.base, item.experts)
            deltas = torch.stack([sparsify(deltas[i], i, item.params, ctx) for i in range(len(item.experts))])
            deltas = deltas * per_model(item.params["weight"], deltas)
            total += float(elect_signs(deltas, "positive").sum()) - float((deltas.sum(0) == 0).sum())
        state["majority"] = float(torch.sign(torch.tensor(total)))
    return state


def ties_rule(base, experts, params, ctx):
    return merge_task_vectors(base, experts, params, ctx, sparsify=_trim, consensus=True)


TRIM_SCOPE = Param(
    "trim_scope",
    str,
    "global",
    "rank |τ| over each expert's whole network (paper) or per tensor (mergekit)",
    choices=("global", "tensor"),
    mergekit="tensor",
)

METHOD = register(
    MergeMethod(
        name="ties",
        rule=ties_rule,
        summary="trim to top-k |τ|, elect signs by mass, disjoint mean",
        paper="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 (arXiv:2306.01708)",
        params=(
            WEIGHT,
            Param("density", float, 0.2, "fraction of |τ| kept (paper K = 20 %)", per_model=True, low=0.0,
                  high=1.0, mergekit=1.0),
            LAMBDA,
            DISJOINT,
            TRIM_SCOPE,
            SIGN_ZERO,
        ),
        prepare=prepare_ties,
        aliases=dict(NORMALIZE_ALIAS),
        # the majority-sign pass of a per-tensor trim needs whole tensors; every other setting merges in blocks
        elementwise=lambda params: params["trim_scope"] == "global" or params["sign_zero"] == "positive",
        tensor_stats=tensor_thresholds,
        uses_tensor_stats=lambda params: params["trim_scope"] == "tensor" and any(d < 1 for d in params["density"]),
    )
)
