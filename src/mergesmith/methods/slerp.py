"""SLERP: spherical linear interpolation between two models (Shoemake, "Animating rotation with quaternion
curves", SIGGRAPH 1985; as used for model merging by mergekit).

Per tensor, on the whole flattened tensors v₀ (base) and v₁ (the other model):

    cos Ω = ⟨v₀/‖v₀‖, v₁/‖v₁‖⟩,
    slerp(v₀, v₁; t) = sin((1 − t) Ω)/sin Ω · v₀ + sin(t Ω)/sin Ω · v₁,

applied to the *unnormalized* tensors (so norms are interpolated as well), with a plain lerp (1 − t) v₀ + t v₁
when |cos Ω| > 0.9995 (nearly collinear or antipodal). t = 0 gives the base, t = 1 the other model. A tensor with
‖v‖ ≤ 1e-8 is not normalized (its norm is taken as 1), as in mergekit.

Same numbers as mergekit's ``slerp`` (fp32 arithmetic, fp64 when the inputs are fp64); no paper-vs-mergekit
differences. ``t`` is required, as in mergekit.
"""

from __future__ import annotations

from typing import Any

import torch

from mergesmith.methods.base import BasePolicy, MergeMethod, Param, Rule
from mergesmith.ops.stream import TensorContext

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS
) -> torch.Tensor:
    """Whole-tensor SLERP of two same-shape tensors (t = 0 → v0)."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    if a.numel() == 0:
        return v0.clone()
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = norm_a if norm_a > eps else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > eps else torch.ones_like(norm_b)
    cos = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if cos.abs() > dot_threshold:
        out = (1 - t) * a + t * b
    else:
        omega = torch.acos(cos)
        sin_omega = torch.sin(omega)
        out = (torch.sin((1 - t) * omega) / sin_omega) * a + (torch.sin(t * omega) / sin_omega) * b
    return out.reshape(v0.shape)


def slerp_rule(
    base: torch.Tensor, experts: list[torch.Tensor], params: dict[str, Any], ctx: TensorContext
) -> torch.Tensor:
    return slerp(params["t"], base, experts[0])


SLERP = MergeMethod(
    name="slerp",
    rule=Rule(slerp_rule),
    summary="spherical interpolation between the base and one other model",
    paper="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985 (model merging: mergekit)",
    params=(
        Param("t", float, help="interpolation factor: 0 = base, 1 = the other model", low=0.0, high=1.0),
    ),
    base=BasePolicy.REQUIRED,
    min_experts=1,
    max_experts=1,
)

METHODS = (SLERP,)
