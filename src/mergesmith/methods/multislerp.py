"""Multi-SLERP: barycentric interpolation of several models on a hypersphere (C. Goddard, "Multi-SLERP",
https://goddard.blog/posts/multislerp-wow-what-a-cool-idea; mergekit ``multislerp``).

Per tensor, with x_i the flattened models (or, with a base, their task vectors θ_i − θ₀) and weights w_i
(normalized to sum 1 when ``normalize_weights``):

    u_i = x_i / (‖x_i‖ + ε),   μ = Σ w_i u_i / ‖Σ w_i u_i‖                    (weighted mean direction)
    v_i = u_i − ⟨u_i, μ⟩ μ,    v = Σ w_i v_i                                  (interpolation in the tangent space at μ)
    r = (μ cos‖v‖ + v sin‖v‖ / ‖v‖) · Σ w_i ‖x_i‖                             (exponential map, mean norm)

and θ = r (+ θ₀ with a base); ‖v‖ is taken + ε. With one model the result is that model; when ‖Σ w_i u_i‖ < ε
two models are averaged linearly and more are an error (antipodal inputs). mergekit's method, number for number.
"""

from __future__ import annotations

from typing import Any

import torch

from mergesmith.errors import MergeError
from mergesmith.methods.base import BasePolicy, MergeMethod, Param, Rule
from mergesmith.ops.stream import TensorContext


def multislerp_rule(
    base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any], ctx: TensorContext
) -> torch.Tensor:
    if len(experts) == 1:
        return experts[0].clone()
    eps = params["eps"]
    points = torch.stack(experts)
    if base is not None:
        points = points - base
    flat = points.reshape(points.shape[0], -1)
    weights = torch.tensor(params["weight"], dtype=flat.dtype, device=flat.device)
    if params["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.reshape(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(experts) != 2:
            raise MergeError(
                f"tensor '{ctx.name}': multislerp: the weighted directions cancel out (antipodal models); "
                "change the weights"
            )
        result = (points[0] * weights[0] + points[1] * weights[1]).reshape(points.shape[1:])
        return result + base if base is not None else result
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangent * weights.reshape(-1, 1)).sum(0)
    length = torch.linalg.vector_norm(step) + eps
    result = (mean * torch.cos(length) + step * (torch.sin(length) / length)) * (
        norms.squeeze(-1) * weights
    ).sum()
    result = result.reshape(points.shape[1:])
    return result + base if base is not None else result


MULTISLERP = MergeMethod(
    name="multislerp",
    rule=Rule(multislerp_rule),
    summary="weighted interpolation of any number of models on the hypersphere (task vectors with a base)",
    paper="C. Goddard, Multi-SLERP (2025; mergekit multislerp)",
    params=(
        Param("weight", float, 1.0, "per-model weight w_i", per_model=True),
        Param("normalize_weights", bool, True, "divide the weights by their sum"),
        Param("eps", float, 1e-8, "ε of the norms", low=0.0),
    ),
    base=BasePolicy.OPTIONAL,
    min_experts=1,
)

METHODS = (MULTISLERP,)
