"""Linear merge / model soup (Wortsman et al., ICML 2022, "Model soups").

θ = Σ_i w_i θ_i / Σ_i w_i  (``normalize: true``, the default), or Σ_i w_i θ_i.

Every listed model is an input; ``base_model`` plays no special role (as in mergekit). With equal weights this is
the uniform soup.
"""

from __future__ import annotations

from mergesmith.methods.base import BasePolicy, MergeMethod, Param, Rule
from mergesmith.ops.taskvec import weighted_sum_of


def linear_rule(base, experts, params, ctx):
    return weighted_sum_of(experts, params["weight"], params["normalize"])


LINEAR = MergeMethod(
    name="linear",
    rule=Rule(linear_rule, elementwise=True),
    summary="weighted average of the models (model soup)",
    paper="Wortsman et al., Model soups: averaging weights of multiple fine-tuned models, ICML 2022 "
    "(arXiv:2203.05482)",
    params=(
        Param("weight", float, 1.0, "per-model weight w_i", per_model=True),
        Param("normalize", bool, True, "divide by Σ w_i"),
    ),
    base=BasePolicy.IGNORED,
)

METHODS = (LINEAR,)
