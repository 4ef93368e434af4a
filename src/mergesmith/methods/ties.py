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

from mergesmith.methods.base import MergeMethod, ModelStats, Param, Rule, TensorStats
from mergesmith.methods.params import DISJOINT, LAMBDA, NORMALIZE_ALIAS, SIGN_ZERO, WEIGHT
from mergesmith.ops.gta import merge_task_vectors
from mergesmith.ops.ties import prepare_ties, tensor_thresholds, trim


def ties_rule(base, experts, params, ctx):
    return merge_task_vectors(base, experts, params, ctx, sparsify=trim, consensus=True)


TRIM_SCOPE = Param(
    "trim_scope",
    str,
    "global",
    "rank |τ| over each expert's whole network (paper) or per tensor (mergekit)",
    choices=("global", "tensor"),
    mergekit="tensor",
    global_over=("density",),
)

TIES = MergeMethod(
    name="ties",
    # the majority-sign pass of a per-tensor trim needs whole tensors; every other setting merges in blocks
    rule=Rule(
        ties_rule,
        elementwise=lambda params: params["trim_scope"] == "global" or params["sign_zero"] == "positive",
    ),
    summary="trim to top-k |τ|, elect signs by mass, disjoint mean",
    paper="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 (arXiv:2306.01708)",
    params=(
        WEIGHT,
        Param(
            "density",
            float,
            0.2,
            "fraction of |τ| kept (paper K = 20 %)",
            per_model=True,
            low=0.0,
            high=1.0,
            mergekit=1.0,
        ),
        LAMBDA,
        DISJOINT,
        TRIM_SCOPE,
        SIGN_ZERO,
    ),
    aliases=dict(NORMALIZE_ALIAS),
    model_stats=ModelStats(prepare_ties),
    tensor_stats=TensorStats(
        tensor_thresholds,
        needed=lambda params: params["trim_scope"] == "tensor" and any(d < 1 for d in params["density"]),
    ),
)

METHODS = (TIES,)
