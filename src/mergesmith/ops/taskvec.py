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
    deltas = torch.empty((len(experts), *base.shape), dtype=base.dtype, device=base.device)
    for i, e in enumerate(experts):
        torch.sub(e, base, out=deltas[i])
    return deltas


def per_model(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """A per-model scalar list as a tensor that broadcasts against a ``[T, *shape]`` stack."""
    return torch.tensor(list(values), dtype=like.dtype, device=like.device).reshape(
        -1, *([1] * (like.dim() - 1))
    )


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


def bernoulli_mask(
    shape: Sequence[int] | torch.Size,
    keep: float,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """m ~ Bernoulli(keep) elementwise, as 0/1 in ``dtype``, with P(m = 1) = ⌊keep · 2³²⌋ / 2³² exactly.

    With N = ⌊keep · 2³²⌋ = n · 2^(32−b) (n odd), the law needs b random bits per element: m = [U < n] for U
    uniform on b bits (one bit for keep = 0.5, two for 0.25 or 0.75). The bits are PCG64's raw output (numpy,
    seeded by ``seed``, little-endian):
    - b ≤ 8: as b bit planes, 64 elements per 64-bit word (plane k holds bit k of every U, most significant
      first), compared with n bitwise — 1/64 of a word per element at keep = 0.5;
    - else one 16- or 32-bit word w per element, read as a signed integer and kept iff w < n − 2^(W−1).
    The mask is a large part of a DARE merge: torch.rand + compare costs 5× (32-bit words) to 17× (one bit) more.
    The bits are drawn on the CPU whatever ``device`` the mask goes to: the same seed gives the same mask on any
    device.
    """
    if torch.device(device).type != "cpu":
        return bernoulli_mask(shape, keep, seed, dtype).to(device)
    count = math.prod(shape)
    numerator = (
        int(keep * 2**32) if keep < 1 else 2**32
    )  # keep is a double: keep · 2³² is exact, the floor is the law
    if numerator >= 2**32:
        return torch.ones(tuple(shape), dtype=dtype, device="cpu")
    if numerator <= 0:
        return torch.zeros(tuple(shape), dtype=dtype, device="cpu")
    zeros = (numerator & -numerator).bit_length() - 1
    bits, n = 32 - zeros, numerator >> zeros
    generator = np.random.PCG64(seed)
    out = torch.empty(tuple(shape), dtype=dtype, device="cpu")
    if bits <= 8:
        kept = _less_than_planes(generator.random_raw((bits, -(-count // 64))), n)
        bytes_ = np.unpackbits(kept.view(np.uint8), count=count, bitorder="little")
        return out.copy_(torch.from_numpy(bytes_).reshape(tuple(shape)))
    width = 16 if bits <= 16 else 32
    word = np.int16 if width == 16 else np.int32
    words = generator.random_raw(-(-count // (64 // width))).view(word)[:count]
    threshold = word((n << (width - bits)) - 2 ** (width - 1))
    if dtype in (
        torch.float32,
        torch.float64,
    ):  # straight into the float mask (torch's int < scalar is slower)
        np.less(words, threshold, out=out.numpy().reshape(-1), casting="unsafe")
        return out
    return out.copy_(torch.lt(torch.from_numpy(words), int(threshold)).reshape(tuple(shape)))


def _less_than_planes(planes: np.ndarray, n: int) -> np.ndarray:
    """Bitwise [U < n] for 64 elements per word, U's bits given as planes (most significant first): U < n at the
    first bit where they differ with U's bit 0 and n's bit 1."""
    bits = planes.shape[0]
    less = np.zeros(planes.shape[1], dtype=np.uint64)
    equal = np.full(planes.shape[1], np.iinfo(np.uint64).max, dtype=np.uint64)  # U = n on the bits so far
    for k, plane in enumerate(planes):
        if (n >> (bits - 1 - k)) & 1:
            less |= equal & ~plane
            equal &= plane
        else:
            equal &= ~plane
    return less


def rescale_kept(
    delta: torch.Tensor,
    mask: torch.Tensor,
    keep_prob: float | torch.Tensor,
    how: str,
    ratio: float | None = None,
) -> torch.Tensor:
    """Apply a drop mask and rescale what survives, written over ``delta`` (the callers' own scratch copy of the
    task vector: the drop is memory-bound, so no temporaries).

    ``inverse`` (DARE / DELLA papers): divide by the keep probability, so that E[result] = δ.
    ``l1`` (mergekit): multiply by ‖δ‖₁ / ‖δ ⊙ m‖₁, matching the L1 norm of the tensor (equal in expectation only);
    ``ratio`` is that factor when the tensor arrives in blocks (computed over all of them first).
    ``none``: just drop.
    """
    if how not in ("none", "inverse", "l1"):
        raise ValueError(f"unknown rescale {how!r}")
    # l1 over the whole tensor: ‖δ‖₁ before the drop overwrites δ
    before = float(delta.abs().sum()) if how == "l1" and ratio is None else 0.0
    kept = delta.mul_(mask)  # a 0/1 mask: exact; one rounding in the rescale
    if how == "none":
        return kept
    if how == "inverse":
        return kept.div_(keep_prob)
    return kept.mul_(ratio if ratio is not None else l1_ratio(before, float(kept.abs().sum())))


def l1_ratio(before: float, after: float) -> float:
    """mergekit's L1 rescale factor ‖δ‖₁ / ‖δ ⊙ m‖₁, or 1 when either norm is below 1e-7."""
    return before / after if before >= 1e-7 and after >= 1e-7 else 1.0


def sum_rows(stack: torch.Tensor) -> torch.Tensor:
    """Σ over the first dimension of a ``[T, *shape]`` stack, as T − 1 in-place adds (on CPU a reduction over the
    leading dimension is ~3× slower than adding the rows)."""
    if len(stack) == 1:
        return stack[0].clone()
    out = torch.add(stack[0], stack[1])  # one pass for the first two rows (not a copy and an add)
    for row in stack[2:]:
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


def disjoint_merge(
    deltas: torch.Tensor, weights: torch.Tensor, signs: torch.Tensor, how: str
) -> torch.Tensor:
    """TIES disjoint merge over the experts whose (weighted) entry agrees with the elected sign.

    ``deltas`` are already weighted, and overwritten (the callers pass their own scratch stack). ``mean`` divides
    by the total weight of the agreeing experts (the paper's dis-mean when weights are 1; mergekit's
    ``normalize: true``), ``sum`` does not (dis-sum).
    """
    # τ_t·[sign τ_t = γ] = γ·relu(γ·τ_t): float arithmetic only (no boolean masks, which are slow on CPU);
    # zero entries never agree (they were trimmed or dropped)
    aligned = deltas.mul_(signs).relu_()
    merged = sum_rows(aligned).mul_(signs)
    if how == "sum":
        return merged
    agreeing = aligned.sign_()  # 1 where expert t agrees, else 0
    divisor = sum_rows(agreeing if bool((weights == 1).all()) else agreeing.mul_(weights))  # Σ w_t over them
    # where no expert agrees the sum is 0: any non-zero divisor keeps it 0. With positive weights a clamp does it
    # (masked_fill is ~40× slower on CPU); other weights can sum to 0 with agreeing experts: keep those at 0/1
    if bool((weights > 0).all()):
        return merged.div_(divisor.clamp_min_(torch.finfo(divisor.dtype).tiny))
    return merged.div_(divisor.masked_fill_(divisor == 0, 1.0))


def weighted_sum_of(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool
) -> torch.Tensor:
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
