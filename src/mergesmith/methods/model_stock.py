"""Model Stock (Jang, Yun, Han, ECCV 2024, "Model Stock: All we need is just a few fine-tuned models").

Per tensor (or per row with ``filter_wise``), with the base w₀ and N ≥ 2 fine-tuned models w_i:

    o_i = w_i − w₀,   cos θ = mean_{i<j} ⟨o_i, o_j⟩ / (‖o_i‖ ‖o_j‖)   (each term clamped to [−1, 1]),
    t = N cos θ / (1 + (N − 1) cos θ),
    w_H = t · (1/N) Σ_i w_i + (1 − t) · w₀.

Where |1 + (N − 1) cos θ| < 1e-6 there is no finite estimate and the base is kept (t = 0), as in mergekit. Norm
products are clamped to ≥ 1e-6. ``filter_wise`` treats each slice along the last dimension (each row of a
``[out, in]`` matrix) separately; 0-D/1-D tensors are one filter.

Paper vs mergekit: the paper derives t for the angle between fine-tuned models, assuming all pairs share it; for
N > 2, averaging the pairwise cosines is mergekit's choice (its code says so) and is what both modes do here. No
other differences; the numbers are mergekit's ``model_stock``.
"""

from __future__ import annotations

from typing import Any

import torch

from mergesmith.methods.base import MERGEKIT_NOOPS, BasePolicy, MergeMethod, Param, Rule
from mergesmith.ops.stream import TensorContext


def model_stock_ratio(offsets: torch.Tensor) -> torch.Tensor:
    """t from the offsets ``[N, F, d]`` (F filters of d entries), as ``[F, 1]``."""
    count = offsets.shape[0]
    norms = torch.linalg.vector_norm(offsets, dim=-1)
    cosines = []
    for i in range(count):
        for j in range(i + 1, count):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), count * cos / safe)


def model_stock_rule(
    base: torch.Tensor, experts: list[torch.Tensor], params: dict[str, Any], ctx: TensorContext
) -> torch.Tensor:
    shape = base.shape
    w0 = base.reshape(-1, shape[-1]) if params["filter_wise"] and base.dim() >= 2 else base.reshape(1, -1)
    models = torch.stack([e.reshape(w0.shape) for e in experts])
    t = model_stock_ratio(models - w0)
    return (t * models.mean(dim=0) + (1 - t) * w0).reshape(shape)


MODEL_STOCK = MergeMethod(
    name="model_stock",
    rule=Rule(model_stock_rule),
    summary="interpolate the average of the fine-tuned models toward the base by their angle",
    paper="Jang, Yun, Han, Model Stock: All we need is just a few fine-tuned models, ECCV 2024 "
    "(arXiv:2403.19522)",
    params=(Param("filter_wise", bool, False, "one ratio t per row (last-dim slice) instead of per tensor"),),
    base=BasePolicy.REQUIRED,
    min_experts=2,
    ignored={
        **MERGEKIT_NOOPS,
        "weight": "model_stock has no per-model weights (its ratio t comes from the angle; mergekit ignores "
        "them too)",
    },
)

METHODS = (MODEL_STOCK,)
