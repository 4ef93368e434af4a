"""NearSwap: take the other model's value where it is near the base's (alchemonaut, "QuartetAnemoi-70B",
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001; mergekit ``nearswap``).

Per element, with a = θ₀ (the base) and b = θ₁ (the one other model):

    w = clamp(t / max(|a − b|, 1e-6), 0, 1),   θ = w · b + (1 − w) · a,

so elements that differ by at most t become b's, and larger differences move toward b by t / |a − b| only.
``t`` is required, as in mergekit. There is no paper: this is mergekit's method, number for number.
"""

from __future__ import annotations

from typing import Any

import torch

from mergesmith.methods.base import MergeMethod, Param, Rule
from mergesmith.ops.stream import TensorContext

DIFF_EPS = 1e-6


def nearswap_rule(
    base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any], ctx: TensorContext
) -> torch.Tensor:
    assert base is not None
    other = experts[0]
    weight = (params["t"] / (base - other).abs().clamp(min=DIFF_EPS)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


NEARSWAP = MergeMethod(
    name="nearswap",
    rule=Rule(nearswap_rule, elementwise=True),
    summary="per element, the other model's value where it is within t of the base's",
    paper="alchemonaut, QuartetAnemoi-70B-t0.0001 (model card, 2024); mergekit nearswap",
    params=(Param("t", float, help="similarity threshold: differences up to t are swapped in", low=0.0),),
    min_experts=1,
    max_experts=1,
)

METHODS = (NEARSWAP,)
