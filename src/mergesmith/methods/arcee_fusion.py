"""Arcee Fusion: fuse only the elements where the other model differs most, by an outlier rule on importance
scores (Arcee AI, https://arcee.ai; mergekit ``arcee_fusion``).

Per tensor, with a = θ₀ (the base) and b = θ₁ (the one other model):

    p = softmax(b) + 1e-8, q = softmax(a) + 1e-8                (over the last dimension)
    s = |b − a| · Σ_last p log(p / q)                           (importance: the change × the row's KL divergence)
    τ = median(s) + 1.5 · (Q3(s) − Q1(s))                       (quantile q: sorted(s)[⌊q · (N − 1)⌋])
    θ = a + (b − a) · [s ≥ τ].

Difference with mergekit: for tensors above 10⁶ elements mergekit estimates the quantiles from 10⁶ elements drawn
at random *without a seed* (so its outputs vary from run to run); here they are exact (a sort of all N scores),
the same as mergekit's for every smaller tensor. There is no paper: mergekit's rule otherwise, number for number.
"""

from __future__ import annotations

from typing import Any

import torch

from mergesmith.methods.base import MergeMethod, Rule
from mergesmith.ops.stream import TensorContext

PROB_EPS = 1e-8
QUARTILES = (0.25, 0.5, 0.75)


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|b − a| times the KL divergence of each last-dimension row's softmax, KL(softmax(b) ‖ softmax(a))."""
    p = torch.softmax(other, dim=-1) + PROB_EPS
    q = torch.softmax(base, dim=-1) + PROB_EPS
    divergence = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (other - base).abs() * divergence


def outlier_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 · IQR, each quantile the sorted score at ⌊q (N − 1)⌋."""
    ordered, _ = torch.sort(scores.reshape(-1))
    index = (torch.tensor(QUARTILES, device=ordered.device) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[index]
    return median + 1.5 * (q3 - q1)


def arcee_fusion_rule(
    base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any], ctx: TensorContext
) -> torch.Tensor:
    assert base is not None
    other = experts[0]
    scores = importance(other, base)
    keep = (scores >= outlier_threshold(scores)).to(base.dtype)
    return base + (other - base) * keep


ARCEE_FUSION = MergeMethod(
    name="arcee_fusion",
    rule=Rule(arcee_fusion_rule),
    summary="fuse the other model's elements whose importance (change × row KL) is an upper outlier",
    paper="Arcee AI, Arcee Fusion (mergekit arcee_fusion, 2025)",
    min_experts=1,
    max_experts=1,
)

METHODS = (ARCEE_FUSION,)
