"""DARE (Yu et al., ICML 2024, "Language Models are Super Mario"): Drop And REscale task vectors.

δ̂_t = (δ_t ⊙ m_t) / (1 − p),  m_t ~ Bernoulli(1 − p) elementwise, then merge the δ̂_t:
- ``dare_linear``: θ = θ₀ + λ Σ_t w_t δ̂_t (DARE + task arithmetic);
- ``dare_ties``:   TIES sign election + disjoint merge over the δ̂_t (DARE + TIES; no magnitude trim unless
  ``trim_density`` < 1, below).

``density`` = 1 − p (the keep rate, as mergekit). The drop mask is drawn from a generator seeded by
(seed, tensor name, model index): the same seed gives the same bits whatever the thread count.

Paper vs mergekit (``compat: mergekit``):
- rescale: the paper divides by the keep rate 1 − p (``rescale: inverse``, E[δ̂] = δ); mergekit matches the L1
  norm of each tensor before and after the drop (``rescale: l1``).
- dare_ties disjoint merge: the paper (MergeLM's TIES) takes the mean over agreeing experts; mergekit's
  ``dare_ties`` sums (normalize: false).
- default density: the official LLM script's drop rate p = 0.1 → 0.9 here; mergekit 1.0 (no drop).

DARE's official code (MergeLM) runs the *whole* TIES step after the drop for DARE-TIES, its magnitude trim
included: ``trim_density`` K keeps, per expert, the top K of |δ̂_t| over the whole network (the paper's TIES trim,
on the dropped and rescaled vectors; MergeLM tunes the trim rate 1 − K in {0.7, 0.8, 0.9}). The default 1 keeps
everything, as the paper's text and mergekit describe DARE-TIES.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from mergesmith.errors import RecipeError
from mergesmith.methods.base import MergeMethod, ModelStats, Param, Rule, TensorStats
from mergesmith.methods.params import DISJOINT, LAMBDA, NORMALIZE_ALIAS, SIGN_ZERO, WEIGHT
from mergesmith.ops.gta import merge_task_vectors
from mergesmith.ops.stream import TensorContext, TensorStream
from mergesmith.ops.taskvec import bernoulli_mask, l1_ratio, rescale_kept, stack_deltas
from mergesmith.ops.ties import global_thresholds, keep_at_least, prepare_ties

PAPER = "Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, ICML 2024 (arXiv:2311.03099)"

DENSITY = Param(
    "density",
    float,
    0.9,
    "keep rate 1 − p of the random drop",
    per_model=True,
    low=0.0,
    high=1.0,
    mergekit=1.0,
)
RESCALE = Param(
    "rescale",
    str,
    "inverse",
    "inverse: divide by 1 − p (paper); l1: match the L1 norm (mergekit); none",
    choices=("inverse", "l1", "none"),
    mergekit="l1",
)
# mergekit spells the rescale choice as a boolean
RESCALE_ALIAS = {
    "rescale": ("rescale", {True: "l1", False: "none", "inverse": "inverse", "l1": "l1", "none": "none"})
}


def drop_and_rescale(delta: torch.Tensor, i: int, params: dict[str, Any], ctx: TensorContext) -> torch.Tensor:
    """δ̂ = rescale(δ ⊙ m), written over ``delta``; the L1 factor of a tensor merged in blocks comes from
    ``l1_ratios`` (``ctx.tensor_state``)."""
    density = params["density"][i]
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    ratio = ctx.tensor_state[i] if params["rescale"] == "l1" and ctx.tensor_state is not None else None
    return rescale_kept(delta, _drop_mask(delta, density, i, ctx), density, params["rescale"], ratio)


def _drop_mask(delta: torch.Tensor, density: float, i: int, ctx: TensorContext) -> torch.Tensor:
    # the 0/1 keep mask in delta's float dtype (a float product; no boolean copy)
    return bernoulli_mask(delta.shape, density, ctx.seed_for(f"dare{i}"), delta.dtype, delta.device)


def l1_ratios(stream: TensorStream, params: dict[str, Any], ctx: TensorContext) -> list[float]:
    """mergekit's L1 rescale over a tensor that arrives in row blocks: ‖δ‖₁ / ‖δ ⊙ m‖₁ per expert, with the same
    masks the rule draws (the generator is keyed by the block), and no rescale when either norm is below 1e-7."""
    before = [0.0] * len(params["density"])
    after = [0.0] * len(params["density"])
    for item in stream():
        ctx.rows = item.rows
        for i, delta in enumerate(stack_deltas(item.base, item.experts)):
            density = params["density"][i]
            if 0 < density < 1:
                magnitude = delta.abs_().reshape(-1)  # our own buffer; ‖δ ⊙ m‖₁ = m · |δ| for m ∈ {0, 1}
                before[i] += float(magnitude.sum())
                after[i] += float(torch.dot(_drop_mask(delta, density, i, ctx).reshape(-1), magnitude))
    ctx.rows = None
    return [l1_ratio(b, a) for b, a in zip(before, after)]


def drop_then_trim(delta: torch.Tensor, i: int, params: dict[str, Any], ctx: TensorContext) -> torch.Tensor:
    """δ̂ after the drop, then (``trim_density`` < 1) only its entries ≥ the expert's whole-network threshold."""
    dropped = drop_and_rescale(delta, i, params, ctx)
    trim_density = params.get("trim_density", 1.0)
    if isinstance(ctx.state, dict) and ctx.state.get("trim_density", trim_density) != trim_density:
        raise RecipeError(
            f"tensor '{ctx.name}': trim_density must be the same for every tensor (one top-k over the whole "
            "network)"
        )
    if trim_density >= 1:
        return dropped
    return keep_at_least(dropped, ctx.state["trim_thresholds"][i])


def prepare_dare_ties(stream: TensorStream, params: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """The whole-model passes: the trim thresholds over the dropped vectors (``trim_density`` < 1), then the
    majority sign of exact-zero sums (``sign_zero: majority``) on the vectors as the rule leaves them."""
    state: dict[str, Any] = {"trim_density": params["trim_density"]}  # ``params``: the first tensor's
    if params["trim_density"] < 1:
        count = len(params["density"])
        state["trim_thresholds"] = global_thresholds(
            stream, [params["trim_density"]] * count, drop_and_rescale, seed
        )

    def sparsify(delta: torch.Tensor, i: int, p: dict[str, Any], ctx: TensorContext) -> torch.Tensor:
        ctx.state = {**(ctx.state or {}), **state}
        return drop_then_trim(delta, i, p, ctx)

    signs = prepare_ties(stream, {**params, "trim_scope": "tensor"}, seed, sparsify=sparsify)
    return {**state, **signs}


def dare_linear_rule(base, experts, params, ctx):
    return merge_task_vectors(base, experts, params, ctx, sparsify=drop_and_rescale)


def dare_ties_rule(base, experts, params, ctx):
    return merge_task_vectors(base, experts, params, ctx, sparsify=drop_then_trim, consensus=True)


DARE_LINEAR = MergeMethod(
    name="dare_linear",
    rule=Rule(dare_linear_rule, elementwise=True),
    summary="random drop with rescale, then task arithmetic",
    paper=PAPER,
    params=(WEIGHT, DENSITY, LAMBDA, RESCALE, Param("normalize", bool, False, "divide by Σ_t w_t")),
    aliases=dict(RESCALE_ALIAS),
    random=True,
    tensor_stats=TensorStats(l1_ratios, needed=lambda params: params["rescale"] == "l1"),
)

DARE_TIES = MergeMethod(
    name="dare_ties",
    # the majority-sign pass with an L1 rescale would need whole tensors; every other setting merges in blocks
    rule=Rule(
        dare_ties_rule,
        elementwise=lambda params: params["rescale"] != "l1" or params["sign_zero"] == "positive",
    ),
    summary="random drop with rescale, then TIES sign election and disjoint merge",
    paper=PAPER,
    params=(
        WEIGHT,
        DENSITY,
        LAMBDA,
        RESCALE,
        replace(DISJOINT, mergekit="sum"),
        SIGN_ZERO,
        Param(
            "trim_density",
            float,
            1.0,
            "TIES trim after the drop: keep the top K of |δ̂| over the whole network (DARE's official code); 1: none",
            low=0.0,
            high=1.0,
        ),
    ),
    aliases={**NORMALIZE_ALIAS, **RESCALE_ALIAS},
    random=True,
    model_stats=ModelStats(prepare_dare_ties),
    tensor_stats=TensorStats(l1_ratios, needed=lambda params: params["rescale"] == "l1"),
)

METHODS = (
    DARE_LINEAR,
    DARE_TIES,
)
