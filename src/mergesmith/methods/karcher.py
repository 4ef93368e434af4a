"""Karcher (Riemannian / Fréchet) mean of the models on the unit sphere, rescaled (mergekit ``karcher``).

Per tensor, with every listed model x_i (the base plays no special role), weights α_i = w_i / Σ_j w_j (uniform by
default, as mergekit) and unit directions u_i = x_i / ‖x_i‖ (models with ‖x_i‖ ≤ tol are left out of the
direction):

    μ₀ = normalize(Σ_i α_i u_i)                            (μ₀ = the first unit direction if that sum vanishes)
    repeat ≤ max_iter:  v = Σ_i α_i · θ_i / sin θ_i · (u_i − cos θ_i · μ),  θ_i = arccos⟨μ, u_i⟩  (log map;
                        terms with θ_i < tol are skipped)
                        stop if ‖v‖ < tol;  μ ← cos‖v‖ · μ + sin‖v‖ · v/‖v‖  (exp map), renormalized
    θ = (Σ_i α_i ‖x_i‖) · μ

i.e. the point on the sphere minimizing Σ_i α_i d(μ, u_i)² (Karcher, "Riemannian center of mass and mollifier
smoothing", CPAM 1977), scaled by the mean norm. This is mergekit's method number for number; a per-model
``weight`` is added (mergekit's method fixes uniform weights, which is the default here), so there are no
paper-vs-mergekit differences.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mergesmith.errors import RecipeError
from mergesmith.methods.base import BasePolicy, MergeMethod, Param, Rule
from mergesmith.ops.stream import TensorContext


def karcher_mean(
    tensors: list[torch.Tensor], weights: list[float], max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """Weighted Karcher mean on the unit sphere of whole flattened tensors, times the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0].clone()
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    shape = tensors[0].shape
    flat = [t.reshape(-1).to(dtype) for t in tensors]
    total_weight = sum(weights)
    alphas = [w / total_weight for w in weights]
    norms = [torch.linalg.vector_norm(x) for x in flat]
    scale = sum(a * n for a, n in zip(alphas, norms))
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros(shape, dtype=dtype, device=flat[0].device)
    valid_sum = sum(alphas[i] for i in valid)
    coef = [alphas[i] / valid_sum for i in valid]
    units = [flat[i] / norms[i] for i in valid]

    mean = sum(c * u for c, u in zip(coef, units))
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for c, u in zip(coef, units):
            cos = torch.dot(mean, u).clamp(-1.0, 1.0)
            angle = torch.arccos(cos)
            if float(angle) < tol:
                continue
            tangent += c * (angle / torch.sin(angle)) * (u - cos * mean)
        step = float(torch.linalg.vector_norm(tangent))
        if step < tol:
            break
        mean = math.cos(step) * mean + math.sin(step) * (tangent / step)
        norm = torch.linalg.vector_norm(mean)
        if float(norm) > tol:
            mean = mean / norm
    return (scale * mean).reshape(shape)


def karcher_rule(
    base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any], ctx: TensorContext
) -> torch.Tensor:
    if sum(params["weight"]) <= 0:
        raise RecipeError(f"tensor '{ctx.name}': karcher needs a positive total weight")
    return karcher_mean(experts, params["weight"], params["max_iter"], params["tol"])


KARCHER = MergeMethod(
    name="karcher",
    rule=Rule(karcher_rule),
    summary="Karcher (Riemannian) mean of the models on the unit sphere, scaled by the mean norm",
    paper="Karcher, Riemannian center of mass and mollifier smoothing, CPAM 1977; mergekit karcher "
    "(arXiv:2603.04972)",
    params=(
        Param("weight", float, 1.0, "per-model weight α_i (normalized to sum 1)", per_model=True, low=0.0),
        Param("max_iter", int, 10, "maximum Riemannian gradient steps", low=0),
        Param("tol", float, 1e-5, "convergence / degeneracy tolerance", low=0.0),
    ),
    base=BasePolicy.IGNORED,
    min_experts=1,
)

METHODS = (KARCHER,)
