"""Pieces shared by the task-vector methods (TA, TIES, DARE, Breadcrumbs, DELLA, Consensus, ...).

Every function is pure and works on a stack of task vectors ``deltas`` of shape ``[T, *shape]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def stack_deltas(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """τ_t = θ_t − θ₀, stacked: ``[T, *shape]`` (written straight into one buffer: no per-expert temporaries)."""
    deltas = torch.empty((len(experts), *base.shape), dtype=base.dtype)
    for i, e in enumerate(experts):
        torch.sub(e, base, out=deltas[i])
    return deltas


def per_model(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """A per-model scalar list as a tensor that broadcasts against a ``[T, *shape]`` stack."""
    return torch.tensor(list(values), dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def kth_largest(magnitudes: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count``-th largest value of a flat tensor, by selection (no sort)."""
    n = magnitudes.numel()
    return magnitudes.reshape(-1).kthvalue(n - count + 1).values


def paper_keep_count(numel: int, density: float) -> int:
    """How many entries the official TIES code keeps: it thresholds at the (D − ⌊D·K⌋)-th smallest |τ| and keeps
    every entry >= it, i.e. ⌊D·K⌋ + 1 entries (more on ties)."""
    return min(numel, int(numel * density) + 1)


def mergekit_keep_count(numel: int, density: float) -> int:
    """How many entries mergekit's per-tensor magnitude sparsifier keeps: max(1, ⌊density·n⌋)."""
    return max(1, int(density * numel))


def magnitude_mask(delta: torch.Tensor, density: float, count_rule: str) -> torch.Tensor:
    """Keep the largest-|δ| fraction ``density`` of one tensor (per-tensor trim)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    magnitudes = delta.abs()
    rule = paper_keep_count if count_rule == "paper" else mergekit_keep_count
    threshold = kth_largest(magnitudes, rule(delta.numel(), density))
    return magnitudes >= threshold


def bernoulli_mask(shape: Sequence[int] | torch.Size, keep: float, seed: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """m ~ Bernoulli(keep) elementwise, as 0/1 in ``dtype``, with P(m = 1) = ⌊keep · 2³²⌋ / 2³² exactly.

    Each element takes one 32-bit word of PCG64 (numpy, seeded by ``seed``), read as a signed int32 w, and is kept
    iff w < ⌊keep · 2³²⌋ − 2³¹: one comparison written straight into the float mask. torch.rand + compare costs
    ~4× more (a Mersenne-Twister draw and an int→float conversion per element), and the drop mask is most of a
    DARE merge. The words are little-endian on every platform numpy supports in practice.
    """
    count = math.prod(shape)
    if keep >= 1:
        return torch.ones(tuple(shape), dtype=dtype)
    if keep <= 0:
        return torch.zeros(tuple(shape), dtype=dtype)
    words = np.random.PCG64(seed).random_raw((count + 1) // 2).view(np.int32)[:count]
    threshold = int(keep * 2**32) - 2**31  # keep is a double: keep · 2³² is exact, the floor is the law
    out = torch.empty(tuple(shape), dtype=dtype)
    return torch.lt(torch.from_numpy(words).reshape(tuple(shape)), threshold, out=out)


def rescale_kept(delta: torch.Tensor, mask: torch.Tensor, keep_prob: float | torch.Tensor, how: str) -> torch.Tensor:
    """Apply a drop mask and rescale what survives.

    ``inverse`` (DARE / DELLA papers): divide by the keep probability, so that E[result] = δ.
    ``l1`` (mergekit): multiply by ‖δ‖₁ / ‖δ ⊙ m‖₁, matching the L1 norm of the tensor (equal in expectation only).
    ``none``: just drop.
    """
    kept = delta * mask
    if how == "none":
        return kept
    if how == "inverse":
        return kept / keep_prob
    if how == "l1":
        before = delta.abs().sum()
        after = kept.abs().sum()
        eps = 1e-7
        if before < eps or after < eps:
            return kept
        return kept * (before / after)
    raise ValueError(f"unknown rescale {how!r}")


def sum_rows(stack: torch.Tensor) -> torch.Tensor:
    """Σ over the first dimension of a ``[T, *shape]`` stack, as T − 1 in-place adds (on CPU a reduction over the
    leading dimension is ~3× slower than adding the rows)."""
    out = stack[0].clone()
    for row in stack[1:]:
        out.add_(row)
    return out


def elect_signs(deltas: torch.Tensor, zero: str, majority: float = 1.0) -> torch.Tensor:
    """TIES sign election by mass: γ = sign(Σ_t τ̂_t), as ±1.

    Where the sum is exactly 0 the paper uses the sign of the whole model's elected signs (``majority``, computed
    by a pass over the model and passed in); mergekit takes + (``positive``).
    """
    # float arithmetic in place on the fresh sum (torch.where with scalars is ~15× slower on CPU)
    total = sum_rows(deltas)
    if zero == "positive":
        return total.ge_(0).mul_(2).sub_(1)  # [Σ ≥ 0] → +1, else −1
    sign = total.sign_()
    return sign.add_(sign.abs().mul_(-majority).add_(majority))  # 0 → majority, ±1 unchanged


def disjoint_merge(deltas: torch.Tensor, weights: torch.Tensor, signs: torch.Tensor, how: str) -> torch.Tensor:
    """TIES disjoint merge over the experts whose (weighted) entry agrees with the elected sign.

    ``deltas`` are already weighted. ``mean`` divides by the total weight of the agreeing experts (the paper's
    dis-mean when weights are 1; mergekit's ``normalize: true``), ``sum`` does not (dis-sum).
    """
    # τ_t·[sign τ_t = γ] = γ·relu(γ·τ_t): float arithmetic only (no boolean masks, which are slow on CPU);
    # zero entries never agree (they were trimmed or dropped)
    aligned = (deltas * signs).relu_()
    merged = sum_rows(aligned).mul_(signs)
    if how == "sum":
        return merged
    divisor = sum_rows(aligned.sign_().mul_(weights))  # Σ w_t over the agreeing experts
    # where no expert agrees the sum is 0: any non-zero divisor keeps it 0. With positive weights a clamp does it
    # (masked_fill is ~40× slower on CPU); other weights can sum to 0 with agreeing experts: keep those at 0/1
    if bool((weights > 0).all()):
        return merged.div_(divisor.clamp_min_(torch.finfo(divisor.dtype).tiny))
    return merged.div_(divisor.masked_fill_(divisor == 0, 1.0))


def weighted_sum_of(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """Σ_t w_t x_t (÷ Σ_t w_t when ``normalize``) accumulated in place: no stacked copy of the inputs, one pass
    per input (the linear merge is memory-bound, so every avoided copy is time)."""
    out = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        out.add_(tensor, alpha=weight)
    total = float(sum(weights))
    if normalize and abs(total) >= 1e-8:
        out.div_(total)
    return out


def weighted_sum(deltas: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Σ_t w_t τ_t, divided by Σ_t w_t when ``normalize`` (a weighted mean)."""
    merged = (deltas * weights).sum(dim=0)
    if normalize:
        total = float(weights.sum())
        if abs(total) >= 1e-8:
            merged = merged / total
    return merged
