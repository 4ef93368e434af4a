"""MC-SMoE's compression stage: every expert matrix as low-rank + structured sparse (LoSparse, Li et al., ICML
2023; ``mcsmoe/pruning/losparse.py``), on the fused expert tensors of transformers MoE models.

Each expert matrix W ``[out, in]`` becomes

    W ≈ L R + S,    L = U_r √Σ_r,  R = √Σ_r V_rᵀ   (the truncated SVD, rank r = ``rank``),   S = W − L R,

and S is pruned to a ``remaining`` share of its rows (the official default direction; ``columns`` is the other),
globally over every compressed matrix: each row's importance is the mean of its entries' scores and the rows below
the k-th smallest score are zeroed. Scores (the official ``PLATON`` pruner with β₂ = 1):

    I_t = |S ⊙ ∇_S L|,   Ī_t = β₁ Ī_{t−1} + (1 − β₁) I_{t−1}   (β₁ = 0.85)

while fine-tuning, with the remaining share on the cubic schedule

    ρ_t = ρ_final + (1 − ρ_final) (1 − (t − t_i) / (T − t_i − t_f))³

(ρ = 1 for the first t_i steps, ρ_final for the last t_f). Without fine-tuning (``steps = 0``) the scores are the
magnitudes |S| (the official ``Magnitude`` pruner) and S is pruned once. The factors are trained through a
``torch.nn.utils.parametrize`` parametrization of the experts' fused tensors, so the model's own forward runs
unchanged; :func:`bake` writes the dense reconstruction back and returns the factors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from mergesmith.fit.data import Encoded
from mergesmith.fit.distill import distill, teacher_logits

EXPERT_TENSORS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class LoSparseConfig:
    """The official defaults: ``rank`` 32 (the README's; the script's is 16), ``remaining`` 0.10 (README),
    β₁ 0.85, warm-ups ``initial_steps`` / ``final_steps`` (the official 1 × and 4 × 100 steps, scaled here to a
    share of the run: 0.1 and 0.4)."""

    rank: int = 32
    remaining: float = 0.10
    beta1: float = 0.85
    direction: str = "rows"
    initial_share: float = 0.1
    final_share: float = 0.4


class LowRankPlusSparse(nn.Module):
    """Parametrization of a fused expert tensor ``[E, out, in]``: the value is ``left @ right + S`` with S the
    parametrized ``original`` (set to ``W − L R`` when registered)."""

    def __init__(self, weight: torch.Tensor, rank: int):
        super().__init__()
        lefts, rights = [], []
        for matrix in weight.detach().float():
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            root = s[:rank].sqrt()
            lefts.append(u[:, :rank] * root)
            rights.append(root[:, None] * vh[:rank])
        self.left = nn.Parameter(torch.stack(lefts).to(weight.dtype))
        self.right = nn.Parameter(torch.stack(rights).to(weight.dtype))

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        return self.left @ self.right + sparse

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.left.detach() @ self.right.detach()


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules holding fused expert tensors (``…Experts`` with ``gate_up_proj`` and ``down_proj``)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if all(isinstance(getattr(m, t, None), (nn.Parameter, torch.Tensor)) for t in EXPERT_TENSORS)
        and type(m).__name__.endswith("Experts")
    ]


def decompose(model: nn.Module, rank: int) -> list[tuple[str, nn.Module, str]]:
    """Register the low-rank + sparse parametrization on every expert tensor; returns (module name, module, tensor
    name) of each."""
    done = []
    for name, module in expert_modules(model):
        for tensor in EXPERT_TENSORS:
            weight = getattr(module, tensor)
            if rank >= min(weight.shape[-2:]):
                raise ValueError(
                    f"rank {rank} is not below {name}.{tensor}'s smaller side {min(weight.shape[-2:])}"
                )
            parametrize.register_parametrization(module, tensor, LowRankPlusSparse(weight, rank))
            done.append((name, module, tensor))
    return done


def sparse_part(module: nn.Module, tensor: str) -> nn.Parameter:
    return module.parametrizations[tensor].original


def factors(module: nn.Module, tensor: str) -> LowRankPlusSparse:
    return module.parametrizations[tensor][0]


def structured_scores(scores: torch.Tensor, direction: str) -> torch.Tensor:
    """Each row's (or column's) mean score, per expert: ``[E, out]`` (``[E, in]``)."""
    return scores.mean(dim=2) if direction == "rows" else scores.mean(dim=1)


def prune(
    targets: list[tuple[str, nn.Module, str]],
    scores: dict[int, torch.Tensor],
    remaining: float,
    direction: str,
) -> float:
    """Zero the rows (columns) of every S whose structured score is below the global k-th smallest, k =
    ⌊n (1 − remaining)⌋ (the official rule); returns the threshold."""
    structured = {i: structured_scores(scores[i], direction) for i in range(len(targets))}
    pooled = torch.cat([s.reshape(-1) for s in structured.values()]).float()
    k = int(len(pooled) * (1 - remaining))
    if k < 1:
        return float("-inf")
    # rows scoring below the k-th smallest go (the official ``<``: ties at the threshold stay); nothing stays at 0
    threshold = float(torch.kthvalue(pooled, k).values) if remaining > 0 else float("inf")
    with torch.no_grad():
        for i, (_, module, tensor) in enumerate(targets):
            drop = structured[i] < threshold
            mask = drop[:, :, None] if direction == "rows" else drop[:, None, :]
            sparse_part(module, tensor).masked_fill_(mask, 0.0)
    return threshold


def remaining_share(step: int, total: int, config: LoSparseConfig) -> float:
    """The cubic schedule of the module docstring at ``step`` (1-based) of ``total``."""
    initial = math.floor(config.initial_share * total)
    final = math.floor(config.final_share * total)
    if step <= initial:
        return 1.0
    if step > total - final:
        return config.remaining
    progress = 1 - (step - initial) / max(total - initial - final, 1)
    return config.remaining + (1 - config.remaining) * progress**3


@dataclass
class CompressionReport:
    steps: int
    losses: list[float]
    remaining: list[float]


def compress(
    model: nn.Module,
    config: LoSparseConfig,
    batches: Iterable[Encoded] | None = None,
    steps: int = 0,
    lr: float = 2e-4,
) -> tuple[list[tuple[str, nn.Module, str]], CompressionReport]:
    """Decompose every expert tensor of ``model`` and prune S (module docstring): once by magnitude without
    ``steps``, else while fine-tuning the factors for ``steps`` batches (cycled from ``batches``) by distillation
    (:mod:`mergesmith.fit.distill`) from the uncompressed model's logits. Only the experts' factors train."""
    targets = decompose(model, config.rank)
    report = CompressionReport(steps, [], [])
    if steps == 0:
        magnitudes = {i: sparse_part(m, t).detach().abs() for i, (_, m, t) in enumerate(targets)}
        prune(targets, magnitudes, config.remaining, config.direction)
        report.remaining.append(config.remaining)
        return targets, report
    data = list(batches or [])
    with parametrize.cached():  # the teacher: the decomposition before any pruning is W itself
        teacher = teacher_logits(model, data)
    trainable = [p for _, m, t in targets for p in (*factors(m, t).parameters(), sparse_part(m, t))]
    averaged: dict[int, torch.Tensor] = {}
    last: dict[int, torch.Tensor] = {}

    def prune_step(step: int) -> None:
        with torch.no_grad():
            for i, (_, m, t) in enumerate(targets):
                s = sparse_part(m, t)
                previous = last.get(i, torch.zeros_like(s))
                averaged[i] = (
                    config.beta1 * averaged.get(i, torch.zeros_like(s)) + (1 - config.beta1) * previous
                )
                last[i] = (s * s.grad).abs() if s.grad is not None else torch.zeros_like(s)
        share = remaining_share(step, steps, config)
        if share < 1.0:
            prune(targets, averaged, share, config.direction)
        report.remaining.append(share)

    report.losses = distill(model, data, teacher, steps, trainable, lr, prune_step)
    return targets, report


def bake(targets: list[tuple[str, nn.Module, str]], direction: str = "rows") -> dict[str, torch.Tensor]:
    """Replace every parametrization by its dense value (the model loads as an ordinary MoE again) and return the
    stored factors: ``{name}.left``, ``{name}.right``, and per expert e the kept rows (columns) of S,
    ``{name}.sparse.{e}.index`` and ``{name}.sparse.{e}.values``."""
    out: dict[str, torch.Tensor] = {}
    for module_name, module, tensor in targets:
        name = f"{module_name}.{tensor}"
        low_rank = factors(module, tensor)
        out[f"{name}.left"] = low_rank.left.detach().clone().contiguous()
        out[f"{name}.right"] = low_rank.right.detach().clone().contiguous()
        sparse = sparse_part(module, tensor).detach()
        for e, matrix in enumerate(sparse):
            if direction == "rows":
                index = matrix.abs().sum(dim=1).nonzero().flatten()
                values = matrix[index]
            else:
                index = matrix.abs().sum(dim=0).nonzero().flatten()
                values = matrix[:, index]
            out[f"{name}.sparse.{e}.index"] = index.to(torch.int64).contiguous()
            out[f"{name}.sparse.{e}.values"] = values.clone().contiguous()
        parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
    return out


def stored_parameters(stored: dict[str, torch.Tensor]) -> int:
    """The compressed experts' parameter count: factors and kept S values (indices not counted)."""
    return sum(t.numel() for name, t in stored.items() if not name.endswith(".index"))
