"""Task arithmetic (Ilharco et al., ICLR 2023, "Editing Models with Task Arithmetic").

θ = θ₀ + λ · Σ_t w_t τ_t,  τ_t = θ_t − θ₀  (divided by Σ_t w_t when ``normalize``).

The paper defines the merge as the plain sum of task vectors scaled by a λ chosen on validation data
(0.3 is the usual value for 8 vision tasks). Defaults here: λ = 1, w_t = 1 (as mergekit), so λ and the weights
are the user's knobs; negation (forgetting) is w_t = −1.
"""

from __future__ import annotations

from mergesmith.methods.base import MergeMethod, Param, Rule
from mergesmith.methods.params import LAMBDA, WEIGHT
from mergesmith.ops.gta import merge_task_vectors

TASK_ARITHMETIC = MergeMethod(
    name="task_arithmetic",
    rule=Rule(
        lambda base, experts, params, ctx: merge_task_vectors(base, experts, params, ctx), elementwise=True
    ),
    summary="θ₀ + λ Σ w_t (θ_t − θ₀)",
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)",
    params=(
        WEIGHT,
        LAMBDA,
        Param("normalize", bool, False, "divide the weighted sum by Σ_t w_t"),
    ),
)

METHODS = (TASK_ARITHMETIC,)
