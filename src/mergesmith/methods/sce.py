"""SCE — Select, Calculate, Erase: the merge of FuseChat (Wan et al., "FuseChat: Knowledge Fusion of Chat Models",
arXiv:2408.07990), as mergekit runs it (its ``sce``, contributed by the authors).

Per tensor, with task vectors τ_i = θ_i − θ₀ (i = 1 … n):

    Select:    with k = select_topk < 1, v = Var_i(τ_i) (population variance over the models, per element); keep the
               ⌊k · nnz(v)⌋ elements of largest v (torch.topk) in every τ_i, zero the rest (k ≥ 1 keeps all);
    Calculate: w_i = mean(τ_i²) / Σ_j mean(τ_j²)   (1/n each when the sum is below 1e-6);
    Erase:     m_i = [sign(τ_i) = sign(Σ_j τ_j)], with sign(0) of the sum taken as + (an entry τ_i = 0 is erased);
    θ = θ₀ + Σ_i w_i m_i τ_i / max(Σ_i w_i m_i, 1e-6).

The paper's experiments and mergekit agree on the algorithm; mergekit's default ``select_topk`` is 1 (no selection)
and the paper does not fix one value, so 1 is the default here too. mergekit's ``int8_mask`` changes memory only.
"""

from __future__ import annotations

from typing import Any

import torch

from mergesmith.methods.base import MergeMethod, Param, Rule
from mergesmith.ops.stream import TensorContext
from mergesmith.ops.taskvec import elect_signs, stack_deltas

TOTAL_EPS = 1e-6


def variance_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """1 on the ⌊k · nnz(v)⌋ elements of largest variance over the models, 0 elsewhere (shape of one τ)."""
    if select_topk >= 1:
        return torch.ones_like(deltas[0])
    mask = torch.zeros_like(deltas[0])
    if select_topk <= 0:
        return mask
    variance = deltas.var(dim=0, unbiased=False)
    count = int(int(torch.count_nonzero(variance)) * select_topk)
    if count > 0:
        _, index = torch.topk(variance.abs().reshape(-1), k=count, largest=True)
        mask.view(-1)[index] = 1
    return mask


def sce_rule(
    base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any], ctx: TensorContext
) -> torch.Tensor:
    assert base is not None
    deltas = stack_deltas(base, experts)
    if params["select_topk"] < 1:
        deltas = deltas * variance_mask(deltas, params["select_topk"]).unsqueeze(0)
    erase = (deltas.sign() == elect_signs(deltas, "positive").unsqueeze(0)).to(deltas.dtype)
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    weights = torch.full_like(energy, 1 / len(energy)) if abs(total) < TOTAL_EPS else energy / total
    weights = weights.reshape(-1, *([1] * (deltas.dim() - 1))) * erase
    merged = (deltas * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=TOTAL_EPS)
    return base + merged


SCE = MergeMethod(
    name="sce",
    rule=Rule(sce_rule),
    summary="select high-variance elements, weight task vectors by their energy, erase sign conflicts",
    paper="Wan et al., FuseChat: Knowledge Fusion of Chat Models, 2024 (arXiv:2408.07990); mergekit sce",
    params=(
        Param(
            "select_topk",
            float,
            1.0,
            "fraction k of the elements kept by variance across the models (1: all)",
            low=0.0,
            high=1.0,
        ),
    ),
)

METHODS = (SCE,)
