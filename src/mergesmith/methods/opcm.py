"""One step of OPCM (Tang et al., NeurIPS 2025, "Merging Models on the Fly Without Retraining: A Sequential
Approach to Scalable Continual Model Merging"), as its official code (``fusion_bench/method/opcm/opcm.py``) runs
it. Not a registry method: ``mergesmith continual`` (:mod:`mergesmith.drivers.continual`) runs it, once per
arriving model, with the running merge as the first model and the new one as the second.

With the running merged task vector τ̄ = θ^(t−1) − θ₀ and the new task vector τ = θ_t − θ₀, for every Linear weight
(a 2-D tensor that is not an embedding table):

    τ̄ = U Σ Vᵀ (full SVD),   P = Uᵀ τ V,   P_ii = 0,   P[:r_α, :r_α] = 0,   τ̃ = U P Vᵀ
    (computed from the thin SVD: :func:`project_out`)

where r_α is the first index (0-based) at which Σ_{i≤k} σ_i / Σ_i σ_i exceeds α (α = 0.5): the new task keeps only
what lies outside the running merge's dominant singular directions and off their diagonal. Then

    θ' = θ₀ + λ_{t−1} τ̄ + τ̃        (other tensors: θ₀ + λ_{t−1} τ̄ + τ)

and the driver rescales θ' − θ₀ to the mean of the task vectors' norms, which sets λ_t.
"""

from __future__ import annotations

import torch

from mergesmith.arch.embeddings import is_input_side
from mergesmith.methods.base import MergeMethod, Param, Rule
from mergesmith.ops.stream import TensorContext


def split_rank(singular_values: torch.Tensor, alpha: float) -> int:
    """The official ``(s.cumsum() / s.sum() > alpha).float().argmax()``: the first index past mass α (0 when none)."""
    share = singular_values.cumsum(dim=0) / singular_values.sum()
    return int((share > alpha).float().argmax())


def project_out(merged_tv: torch.Tensor, task_tv: torch.Tensor, alpha: float) -> torch.Tensor:
    """τ̃: ``task_tv`` without its components along ``merged_tv``'s diagonal and dominant block (module docstring).

    The official code takes the full SVD; the entries it zeroes — the diagonal and the top-left r_α × r_α block of
    P — all lie in the first k = min(m, n) singular directions, so with the thin SVD τ̃ = τ − U_k R V_kᵀ, R those
    entries of U_kᵀ τ V_k: the same matrix (equal to rounding; tested) without the m × m factor that a vocabulary-
    sized LM head would need (32000² floats: 4 GB and minutes per add)."""
    u, s, vh = torch.linalg.svd(merged_tv, full_matrices=False)
    core = u.T @ task_tv @ vh.T
    k = split_rank(s, alpha)
    removed = torch.diag_embed(core.diagonal())
    removed[:k, :k] = core[:k, :k]
    return task_tv - u @ removed @ vh


def is_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    """A Linear layer's weight as the official code treats it: 2-D, not a token or position embedding table."""
    return tensor.dim() == 2 and not is_input_side(name)


def opcm_rule(
    base: torch.Tensor, experts: list[torch.Tensor], params: dict, ctx: TensorContext
) -> torch.Tensor:
    merged, new = experts
    merged_tv, task_tv = merged - base, new - base
    if is_linear_weight(ctx.name, base):
        task_tv = project_out(merged_tv, task_tv, params["alpha"])
    return base + params["previous_lambda"] * merged_tv + task_tv


OPCM_STEP = MergeMethod(
    name="opcm",
    rule=Rule(opcm_rule),
    summary="one OPCM step: the running merge plus the new task vector projected off its dominant directions",
    paper="Tang et al., Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable Continual "
    "Model Merging, NeurIPS 2025",
    params=(
        Param("alpha", float, 0.5, "the singular-value mass whose directions the new task vector avoids"),
        Param(
            "previous_lambda", float, 1.0, "λ_{t−1}: the running merge's task vector is the sum over λ_{t−1}"
        ),
    ),
    min_experts=2,
    max_experts=2,
)
