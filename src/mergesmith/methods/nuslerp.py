"""NuSLERP: mergekit's weighted SLERP of two models, optionally of their task vectors (mergekit ``nuslerp``).

With two models weighted w₁, w₂ the interpolation factor is t = w₂ / (w₁ + w₂) (0.5 when |w₁ + w₂| < 1e-6). For
the vectors x₁, x₂ (the models, or with a base the task vectors τ_i = θ_i − θ₀):

    cos Ω = ⟨x₁/‖x₁‖, x₂/‖x₂‖⟩ (norms clamped to ≥ 1e-7),
    s = (sin((1 − t) Ω) x₁ + sin(t Ω) x₂) / sin Ω,  or (1 − t) x₁ + t x₂ when 1 − cos²Ω ≤ 1e-16,

and θ = s, or θ = θ₀ + s with a base. The vectors are the whole flattened tensor (``nuslerp_flatten: true``, the
default), or, with ``nuslerp_flatten: false``, slices along the last dimension (each row of a ``[out, in]``
matrix) or, with ``nuslerp_row_wise: true``, slices along dimension 0 (each column of a ``[out, in]`` matrix,
i.e. mergekit's naming). Shoemake's SLERP (SIGGRAPH 1985) as packaged by mergekit; there is no separate paper,
so there are no paper-vs-mergekit differences: this is mergekit's method, number for number.
"""

from __future__ import annotations

from typing import Any

import torch

from mergesmith.methods.base import BasePolicy, MergeMethod, Param, Rule
from mergesmith.ops.stream import TensorContext

COLINEAR_EPS = 1e-8
NORM_EPS = 1e-7


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = False
) -> torch.Tensor:
    """SLERP of v0 → v1 by ``t`` along ``dim`` (or of the whole tensors when ``flatten``)."""
    shape = v0.shape
    if flatten or v0.dim() == 0:
        a, b = v0.reshape(-1), v1.reshape(-1)
    else:
        a, b = v0.transpose(dim, -1), v1.transpose(dim, -1)
    unit_a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    unit_b = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos = (unit_a * unit_b).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos * cos) <= COLINEAR_EPS**2
    omega = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_omega = torch.where(colinear, torch.ones_like(omega), torch.sin(omega))
    spherical = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / sin_omega
    out = torch.where(colinear, (1 - t) * a + t * b, spherical)
    if not flatten and v0.dim() > 0:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp_rule(
    base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any], ctx: TensorContext
) -> torch.Tensor:
    w1, w2 = params["weight"]
    total = w1 + w2
    t = 0.5 if abs(total) < 1e-6 else w2 / total
    dim = 0 if params["nuslerp_row_wise"] else -1
    flatten = params["nuslerp_flatten"]
    if base is None:
        return nuslerp(t, experts[0], experts[1], dim=dim, flatten=flatten)
    return base + nuslerp(t, experts[0] - base, experts[1] - base, dim=dim, flatten=flatten)


NUSLERP = MergeMethod(
    name="nuslerp",
    rule=Rule(nuslerp_rule),
    summary="SLERP of two models (of their task vectors when a base is given), t = w2 / (w1 + w2)",
    paper="mergekit nuslerp (Goddard et al., Arcee's MergeKit, EMNLP 2024 Industry, arXiv:2403.13257); "
    "SLERP: Shoemake, SIGGRAPH 1985",
    params=(
        Param("weight", float, 1.0, "per-model weight; t = w2 / (w1 + w2)", per_model=True),
        Param("nuslerp_flatten", bool, True, "SLERP the whole flattened tensor"),
        Param(
            "nuslerp_row_wise",
            bool,
            False,
            "without flatten: SLERP slices along dim 0 (true) or along the last dim (false)",
        ),
    ),
    base=BasePolicy.OPTIONAL,
    min_experts=2,
    max_experts=2,
)

METHODS = (NUSLERP,)
