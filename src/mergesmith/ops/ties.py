"""The TIES trim (Yadav et al., NeurIPS 2023): keep the top ``density`` of each task vector's magnitudes, with the
threshold found over the whole network (the paper's code) or per tensor (mergekit), by exact streaming radix
selection; and the whole-model majority sign for exact-zero sums. Shared by TIES, DARE-TIES, Breadcrumbs-TIES,
DELLA, Consensus and AdaMerging++.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mergesmith.errors import RecipeError
from mergesmith.ops.gta import Sparsifier
from mergesmith.ops.selection import order_statistics
from mergesmith.ops.stream import TensorContext, TensorStream
from mergesmith.ops.taskvec import (
    elect_signs,
    magnitude_mask,
    mergekit_keep_count,
    paper_keep_count,
    per_model,
    stack_deltas,
)


def _magnitude_rows(
    stream: TensorStream, sparsify: Sparsifier | None = None, seed: int = 0
) -> Iterator[torch.Tensor]:
    """One pass: |τ_t| of each tensor as fp32 ``[T, n]`` rows (the chunks that the radix selection ranks); with
    ``sparsify``, of the task vectors as it leaves them (DARE's drop, drawn with the rule's seeds)."""
    ctx = TensorContext(name="", seed=seed)
    for item in stream():
        deltas = stack_deltas(item.base, item.experts)
        if sparsify is not None:
            ctx.name, ctx.rows = item.name, item.rows
            deltas = torch.stack([sparsify(deltas[i], i, item.params, ctx) for i in range(len(item.experts))])
        yield deltas.abs_().to(torch.float32).reshape(len(item.experts), -1)


def global_thresholds(
    stream: TensorStream, densities: list[float], sparsify: Sparsifier | None = None, seed: int = 0
) -> list[float]:
    """Exact κ_t per expert over the whole model: the (⌊D·K_t⌋ + 1)-th largest |τ_t| (of ``sparsify``'s output when
    given), with O(1) memory.

    Radix selection on the fp32 bit patterns (``selection.order_statistics``): two histogram passes.
    """

    def ranks(total: int) -> list[list[int]]:
        # rank (1-based, ascending) of the threshold = D − keep + 1
        return [[total - paper_keep_count(total, d) + 1] for d in densities]

    return [row[0] for row in order_statistics(lambda: _magnitude_rows(stream, sparsify, seed), ranks)]


def trim(delta: torch.Tensor, i: int, params: dict[str, Any], ctx: TensorContext) -> torch.Tensor:
    if params["trim_scope"] == "global":
        if params["density"][i] >= 1:
            return delta
        return keep_at_least(delta, ctx.state["thresholds"][i])
    if ctx.tensor_state is not None:  # per-tensor thresholds, found over the tensor's row blocks
        return keep_at_least(delta, ctx.tensor_state[i])
    return delta * magnitude_mask(delta, params["density"][i], "mergekit")


def keep_at_least(delta: torch.Tensor, threshold: float) -> torch.Tensor:
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


def prepare_ties(
    stream: TensorStream, shared: dict[str, Any], seed: int = 0, sparsify: Sparsifier = trim
) -> dict[str, Any]:
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
        state["majority"] = float((total > 0) - (total < 0))  # sign(total)
    return state


def majority_sign_pass(sparsify: Sparsifier) -> Callable[[TensorStream, dict[str, Any], int], dict[str, Any]]:
    """The whole-model pass of a TIES-style method with its own sparsifier (DARE, Breadcrumbs, DELLA): the majority
    sign of exact-zero sums, measured on the task vectors as that sparsifier leaves them (no global trim)."""

    def compute(stream: TensorStream, params: dict[str, Any], seed: int) -> dict[str, Any]:
        return prepare_ties(stream, {**params, "trim_scope": "tensor"}, seed, sparsify=sparsify)

    return compute
