"""PCB-Merging (Du et al., NeurIPS 2024, "Parameter Competition Balancing for Model Merging").

As the official code computes it (``duguodong7/pcb-merging``, ``PCB_merge``), for the N task vectors τ_i flattened
into rows of length D, with Norm = min-max normalization of a row:

1. clip outliers: |τ̃_i| = clamp(|τ_i|, a_i, b_i) with a_i, b_i the ⌊D·c⌋-th and ⌊D(1 − c) − 1⌋-th smallest |τ_i|
   (0-based; c = ``clip``, 1e-4 in the NLP code, 0.01 in the vision script); τ̃_i = sign(τ_i) |τ̃_i|;
2. intra-balancing: β_intra,i = exp(N · Norm(|τ̃_i|)²)  (the paper's softmax, unnormalized);
3. inter-balancing: β_inter,i = tanh(τ_i ⊙ Σ_j τ_j)  (``inter: sum``; the vision script uses
   Σ_j sign(τ_j) Norm(|τ̃_j|) instead: ``inter: normalized``);
4. β_i = β_intra,i ⊙ β_inter,i; drop all but the top ``ratio``: s_i = Norm(clamp(β_i, q_i, max β_i)) with q_i the
   ⌊D(1 − r)⌋-th smallest β_i (0-based), so s_i = 0 below q_i and ∈ (0, 1] above;
5. τ_m = Σ_i w_i s_i ⊙ τ̃_i / max(Σ_i s_i, 1e-12)  (w_i: the per-task λ_i of the official ES/vision scripts,
   ``weight``); θ = θ₀ + λ τ_m.

Scope: the official code flattens the whole model, so a_i, b_i, q_i and max β_i are order statistics over all
parameters (``scope: global``, the default). They are found exactly with bounded memory by ``prepare``: four
streaming passes of radix selection over the float bit patterns (two for the |τ| clip bounds, two for the score
quantile and maximum), see ``selection.order_statistics``; the rule then needs only the tensor itself.
``scope: tensor`` computes the same statistics within each tensor instead.

Degenerate rows, where the official code divides 0 by 0 (NaN): when b_i = a_i, Norm(|τ̃_i|) is taken as 0; when
max β_i = q_i, s_i is taken as 0 (the task drops out of that tensor / the model).

Defaults: ratio 0.1 (the NLP script's 10 %; its T5 runs use 5, 10 and 20 %, the ViT script 0.05), λ 1.0 (IA3
uses 1.0; T5-base searches λ ∈ [0.8, 2.2], T5-large [1.5, 2.2]; the ViT script uses λ_i = 1.2 for every task).

mergekit has no PCB, so there are no paper-vs-mergekit switches.
"""

from __future__ import annotations

from typing import Any

import torch

from mergesmith.errors import RecipeError
from mergesmith.methods.base import MergeMethod, ModelStats, Param, Rule
from mergesmith.methods.params import LAMBDA
from mergesmith.ops.selection import local_order_statistics, order_statistics
from mergesmith.ops.stream import TensorContext, TensorStream
from mergesmith.ops.taskvec import per_model, stack_deltas

_GLOBAL_KEYS = ("ratio", "clip", "inter")


def clip_ranks(total: int, clip: float) -> list[int]:
    """1-based ranks of the official clamp bounds: sorted[⌊D·c⌋] and sorted[⌊D(1 − c) − 1⌋]."""
    low = int(total * clip) + 1
    high = int(total * (1 - clip) - 1) + 1
    return [min(max(low, 1), total), min(max(high, 1), total)]


def score_ranks(total: int, ratio: float) -> list[int]:
    """1-based ranks of the score quantile sorted[⌊D(1 − r)⌋] and of the row maximum."""
    return [min(int(total * (1 - ratio)) + 1, total), total]


def pcb_scores(
    deltas: torch.Tensor, low: torch.Tensor, high: torch.Tensor, inter: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped task vectors τ̃ and balancing scores β for ``[N, n]`` deltas, given the ``[N, 1]`` clip bounds."""
    magnitudes = torch.minimum(torch.maximum(deltas.abs(), low), high)
    clipped = torch.sign(deltas) * magnitudes
    span = high - low
    norm = torch.where(span > 0, (magnitudes - low) / torch.where(span > 0, span, 1), 0)
    intra = torch.exp(deltas.shape[0] * norm**2)
    trend = deltas.sum(dim=0) if inter == "sum" else (torch.sign(deltas) * norm).sum(dim=0)
    return clipped, intra * torch.tanh(deltas * trend)


def pcb_combine(
    clipped: torch.Tensor,
    scores: torch.Tensor,
    quantile: torch.Tensor,
    top: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """τ_m = Σ_i w_i s_i τ̃_i / max(Σ_i s_i, 1e-12) with s_i = Norm(clamp(β_i, q_i, max β_i))."""
    span = top - quantile
    kept = torch.minimum(torch.maximum(scores, quantile), top) - quantile
    scale = torch.where(span > 0, kept / torch.where(span > 0, span, 1), 0)
    return (clipped * weights * scale).sum(dim=0) / torch.clamp(scale.sum(dim=0), min=1e-12)


def _check_ratio(ratio: float, where: str) -> None:
    if ratio <= 0:
        raise RecipeError(f"{where}: pcb needs ratio > 0 (the fraction of scores kept), got {ratio}")


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(-1, 1)


def prepare_pcb(stream: TensorStream, params: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """scope: global — the clip bounds, score quantile and score maximum of each task over the whole model."""
    if params["scope"] != "global":
        return {}
    _check_ratio(params["ratio"], "parameters")
    counts: list[int] = []

    def rows(item) -> torch.Tensor:
        for key in _GLOBAL_KEYS:
            if item.params[key] != params[key]:
                raise RecipeError(
                    f"tensor '{item.name}': with scope: global, '{key}' must be the same for every tensor (the "
                    "statistics are over the whole model); use scope: tensor to vary it"
                )
        if not counts:
            counts.append(len(item.experts))
        return stack_deltas(item.base, item.experts).reshape(len(item.experts), -1)

    def magnitude_chunks():
        for item in stream():
            yield rows(item).abs()

    bounds = order_statistics(
        magnitude_chunks, lambda total: [clip_ranks(total, params["clip"])] * sum(counts)
    )
    low = [b[0] for b in bounds]
    high = [b[1] for b in bounds]

    def score_chunks():
        for item in stream():
            deltas = rows(item)
            yield pcb_scores(deltas, _column(low, deltas), _column(high, deltas), params["inter"])[1]

    quantiles = order_statistics(
        score_chunks, lambda total: [score_ranks(total, params["ratio"])] * sum(counts)
    )
    return {"low": low, "high": high, "quantile": [q[0] for q in quantiles], "top": [q[1] for q in quantiles]}


def pcb_rule(
    base: torch.Tensor, experts: list[torch.Tensor], params: dict[str, Any], ctx: TensorContext
) -> torch.Tensor:
    deltas = stack_deltas(base, experts).reshape(len(experts), -1)
    if deltas.shape[1] == 0:
        return base.clone()
    _check_ratio(params["ratio"], f"tensor '{ctx.name}'")
    if params["scope"] == "global":
        state = ctx.state
        if not isinstance(state, dict) or "quantile" not in state:
            raise RuntimeError("pcb with scope: global needs the statistics from prepare()")
        low, high = _column(state["low"], deltas), _column(state["high"], deltas)
        clipped, scores = pcb_scores(deltas, low, high, params["inter"])
        quantile, top = _column(state["quantile"], deltas), _column(state["top"], deltas)
    else:
        total = deltas.shape[1]
        bounds = local_order_statistics(deltas.abs(), clip_ranks(total, params["clip"]))
        clipped, scores = pcb_scores(deltas, bounds[:, :1], bounds[:, 1:], params["inter"])
        stats = local_order_statistics(scores, score_ranks(total, params["ratio"]))
        quantile, top = stats[:, :1], stats[:, 1:]
    merged = pcb_combine(clipped, scores, quantile, top, per_model(params["weight"], deltas))
    return base + params["lambda"] * merged.reshape(base.shape)


PCB = MergeMethod(
    name="pcb",
    rule=Rule(pcb_rule),
    summary="balance intra-/inter-task parameter importance, keep the top ratio, weighted merge",
    paper="Du et al., Parameter Competition Balancing for Model Merging, NeurIPS 2024 (arXiv:2410.02396)",
    params=(
        Param(
            "weight",
            float,
            1.0,
            "per-task coefficient λ_i inside the weighted sum (official ES/ViT: 1.2)",
            per_model=True,
        ),
        LAMBDA,
        Param(
            "ratio",
            float,
            0.1,
            "fraction r of the balancing scores kept (T5: 0.05–0.2, ViT: 0.05)",
            low=0.0,
            high=1.0,
        ),
        Param(
            "clip",
            float,
            1e-4,
            "quantile of |τ| clipped at each end (NLP code 1e-4, vision 0.01)",
            low=0.0,
            high=0.5,
        ),
        Param(
            "scope",
            str,
            "global",
            "statistics over the whole model (official code) or per tensor",
            choices=("global", "tensor"),
            global_over=_GLOBAL_KEYS,
        ),
        Param(
            "inter",
            str,
            "sum",
            "inter-balancing trend: Σ_j τ_j (NLP code) or Σ_j sign(τ_j) Norm|τ̃_j| (vision script)",
            choices=("sum", "normalized"),
        ),
    ),
    model_stats=ModelStats(prepare_pcb),
)

METHODS = (PCB,)
