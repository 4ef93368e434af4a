"""Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022, "Merging Models with Fisher-Weighted Averaging").

Each model's posterior is approximated by a Gaussian with diagonal precision F_i (its diagonal Fisher on its own
task's examples, ``mergesmith.fit.fisher``); the merge maximises the joint posterior, per coordinate j:

    θ*_j = Σ_i λ_i F_i,j θ_i,j / Σ_i λ_i F_i,j

Options as in the official code (``mmatena/model_merging``, ``merging.py::_merge_with_coeffs``):

- ``fisher_floor`` (1e-6): F is raised to at least this value before weighting;
- ``favor_target_model`` (true): only the first model's (the target's) Fisher is floored, so where every model's
  Fisher is tiny the target's value wins and a donor with zero Fisher contributes nothing; false floors all;
- ``normalize_fishers`` (true): λ_i is divided by ‖F_i‖₂, the global L2 norm of model i's whole Fisher
  (computed in the fit), so that models whose Fishers differ in overall scale weigh alike;
- ``weight`` λ_i: the paper searches them (Σλ = 1); only their ratios matter, so the default 1 per model is the
  equal-weight merge.

Estimators (``estimator``): ``exact`` (default, the paper's expectation over the model's predictive
distribution), ``empirical`` (true labels; needs a labeled task), ``batch`` (MergeLM/FusionBench's fast batch-level
approximation, not the Fisher; it depends on ``fisher_batch_size``). ``n_examples`` 4096 per model as in the
official ``compute_fisher.py`` (fewer when the task has fewer; the fit records how many).

Fallbacks: a tensor without a fitted Fisher (a buffer, a parameter the task model does not have) is the
λ-weighted average. Where Σ_i λ_i F_i = 0 (no floor applies: ``favor_target_model`` with λ_target = 0 and zero
donor Fishers) the λ-weighted average is used too. A model whose Fisher is zero everywhere keeps its λ unnormalised.
The base model plays no role.
"""

from __future__ import annotations

import torch

from mergesmith.errors import MergeError
from mergesmith.fit.fisher import ESTIMATORS, fisher_key, fit_fisher, norm_key
from mergesmith.methods.base import BasePolicy, DataNeed, Fit, MergeMethod, Param, Rule
from mergesmith.ops.taskvec import per_model, weighted_sum


def fisher_rule(base, experts, params, ctx):
    stacked = torch.stack(experts)
    weights = params["weight"]
    average = weighted_sum(stacked, per_model(weights, stacked), normalize=True)
    keys = [fisher_key(i, ctx.name) for i in range(len(experts))]
    fitted = ctx.fitted.tensors if ctx.fitted is not None else {}
    present = [k in fitted for k in keys]
    if not any(present):
        return average
    if not all(present):
        raise MergeError(f"tensor '{ctx.name}': the fit has a Fisher for some models but not all; refit")
    coefficients = list(weights)
    if params["normalize_fishers"]:
        norms = [float(fitted[norm_key(i)].reshape(-1)[0]) for i in range(len(experts))]
        coefficients = [w / n if n > 0 else w for w, n in zip(coefficients, norms, strict=True)]
    fishers = torch.stack([fitted[k].to(stacked.dtype) for k in keys])  # a new tensor: flooring it is safe
    if params["favor_target_model"]:
        fishers[0] = fishers[0].clamp_min(params["fisher_floor"])
    else:
        fishers = fishers.clamp_min(params["fisher_floor"])
    scaled = fishers * per_model(coefficients, fishers)
    denominator = scaled.sum(0)
    merged = (scaled * stacked).sum(0) / denominator
    return torch.where(denominator > 0, merged, average)


FISHER = MergeMethod(
    name="fisher",
    rule=Rule(fisher_rule),
    summary="Fisher-weighted average: each coordinate weighted by each model's diagonal Fisher",
    paper="Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022 (arXiv:2111.09832)",
    params=(
        Param("weight", float, 1.0, "model coefficient λ_i (only ratios matter)", per_model=True, low=0.0),
        Param(
            "estimator",
            str,
            "exact",
            "Fisher estimator: exact (paper), empirical (true labels), batch "
            "(MergeLM/FusionBench approximation)",
            choices=ESTIMATORS,
        ),
        Param("n_examples", int, 4096, "examples per model for its Fisher (capped at the data given)", low=1),
        Param(
            "fisher_batch_size",
            int,
            2,
            "examples per vectorised chunk (exact, empirical) or per batch gradient (batch)",
            low=1,
        ),
        Param("fisher_floor", float, 1e-6, "lower bound on F", low=0.0),
        Param("favor_target_model", bool, True, "floor only the first model's Fisher (official code)"),
        Param("normalize_fishers", bool, True, "divide λ_i by the global L2 norm of F_i"),
    ),
    base=BasePolicy.IGNORED,
    fit=Fit(fit_fisher, DataNeed.UNLABELED),
)

METHODS = (FISHER,)
