"""PLeaS's partial merge (Nasery, Hayase, Koh, Oh, CVPR 2025, "Merging Models with Permutations and Least Squares"):
a model between the permutation-aligned average (width 1×) and the ensemble (2×).

After matching, unit q of A is paired with unit π(q) of B (B is read in A's order below). Per group, a ratio
r ∈ [0, 1] keeps the ⌊r·n⌉ least similar pairs *separate* — both units stay, A's and B's — and merges the rest, so
the group's width becomes n·(1 + r): first the merged units M, then A's separate units S_A, then B's S_B. A weight
W (rows: its output group, columns: its input group) becomes, block by block,

    rows M :  (W_A + W_B)/2 on M columns,  W_A/2 on S_A,  W_B/2 on S_B
    rows S_A:  W_A on M and S_A,  0 on S_B
    rows S_B:  W_B on M and S_B,  0 on S_A

(an axis without a group is shared; a 1-D tensor of a group is averaged on M and kept on S_A, S_B). With r = 1
everywhere the model computes the average of the two models' outputs exactly (the ensemble); with r = 0 it is the
average of A and π(B) (Git Re-Basin). The zero blocks are part of the structure: the least-squares step keeps them.

The budget (merged parameters or FLOPs over one model's) of a matrix between groups of ratios r_in, r_out is
1 + r_in + r_out − r_in·r_out per entry (the paper's ``partial_merge_flops``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mergesmith.arch.permutation import PermutationSpec
from mergesmith.ops.permute import block_index


@dataclass(frozen=True)
class UnitSplit:
    """One group's units (in A's order): those merged with their partner and those kept separate."""

    merged: torch.Tensor
    separate: torch.Tensor

    @property
    def units(self) -> int:
        return len(self.merged) + len(self.separate)

    @property
    def width(self) -> int:
        return len(self.merged) + 2 * len(self.separate)

    @property
    def ratio(self) -> float:
        return len(self.separate) / max(1, self.units)


def split_units(similarity: torch.Tensor, ratio: float) -> UnitSplit:
    """Keep the ⌊ratio·n⌉ least similar pairs separate (ties broken by unit index), merge the others."""
    n = len(similarity)
    count = round(ratio * n)
    order = torch.sort(similarity.double(), stable=True).indices
    return UnitSplit(torch.sort(order[count:]).values, torch.sort(order[:count]).values)


def _segments(split: UnitSplit, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    return block_index(split.merged, block), block_index(split.separate, block)


def widen(
    a: torch.Tensor,
    b: torch.Tensor,
    axes: tuple,
    splits: Mapping[str, UnitSplit],
) -> torch.Tensor:
    """The partial merge of one tensor (module docstring); ``b`` is already in A's unit order. Axes whose group is
    not in ``splits`` are shared (averaged)."""
    moved = [(axis, e) for axis, e in enumerate(axes) if e is not None and e.group in splits]
    if not moved:
        return (a + b) / 2
    if len(moved) == 1:
        axis, entry = moved[0]
        merged, separate = _segments(splits[entry.group], entry.block)
        reads = a.dim() > 1 and axis == 1  # a reader of the group: merged input rows of the next layer halve
        half = 0.5 if reads else 1.0
        parts = [
            (a.index_select(axis, merged) + b.index_select(axis, merged)) / 2,
            a.index_select(axis, separate) * half,
            b.index_select(axis, separate) * half,
        ]
        return torch.cat(parts, axis)
    (out_axis, out_entry), (in_axis, in_entry) = moved[0], moved[1]
    assert (out_axis, in_axis) == (0, 1), "a tensor moved on two axes is (out, in, ...)"
    out_m, out_s = _segments(splits[out_entry.group], out_entry.block)
    in_m, in_s = _segments(splits[in_entry.group], in_entry.block)

    def block(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, rows).index_select(1, cols)

    zeros_ab = torch.zeros_like(block(a, out_s, in_s))
    merged_rows = torch.cat(
        [
            (block(a, out_m, in_m) + block(b, out_m, in_m)) / 2,
            block(a, out_m, in_s) / 2,
            block(b, out_m, in_s) / 2,
        ],
        1,
    )
    a_rows = torch.cat([block(a, out_s, in_m), block(a, out_s, in_s), zeros_ab], 1)
    b_rows = torch.cat([block(b, out_s, in_m), zeros_ab, block(b, out_s, in_s)], 1)
    return torch.cat([merged_rows, a_rows, b_rows], 0)


def partial_merge(
    spec: PermutationSpec,
    a: Mapping[str, torch.Tensor],
    b_aligned: Mapping[str, torch.Tensor],
    splits: Mapping[str, UnitSplit],
) -> dict[str, torch.Tensor]:
    """Every tensor of the partial merge: widened where the spec moves a split group, averaged elsewhere
    (integer buffers, e.g. BatchNorm's step count, are taken from A)."""
    out = {}
    for name, tensor in a.items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
        elif name in spec.axes:
            out[name] = widen(tensor, b_aligned[name], spec.axes[name], splits)
        else:
            out[name] = (tensor + b_aligned[name]) / 2
    return out


def entry_cost(r_in: float, r_out: float) -> float:
    """A matrix entry's cost in the partial model relative to one model's (PLeaS's ``partial_merge_flops``)."""
    return 1 + r_in + r_out - r_in * r_out


def matrix_costs(
    spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]]
) -> list[tuple[float, str | None, str | None]]:
    """For every tensor the spec covers: (its size, its output group, its input group) — what the budget counts."""
    out = []
    for name, axes in spec.axes.items():
        size = 1.0
        for n in shapes[name]:
            size *= n
        groups = [e.group if e is not None else None for e in axes] + [None, None]
        out.append((size, groups[0], groups[1] if len(axes) > 1 else None))
    return out


def budget_of(ratios: Mapping[str, float], costs: list[tuple[float, str | None, str | None]]) -> float:
    """The partial model's size over one model's, for per-group ratios (a missing group: 0)."""
    total = sum(size for size, _o, _i in costs)
    widened = sum(
        size * entry_cost(ratios.get(i, 0.0) if i else 0.0, ratios.get(o, 0.0) if o else 0.0)
        for size, o, i in costs
    )
    return widened / total if total else 1.0


def ratios_for_budget(
    groups: list[str],
    priority: Mapping[str, float],
    costs: list[tuple[float, str | None, str | None]],
    budget: float,
    step: float = 0.05,
) -> dict[str, float]:
    """Per-group ratios meeting ``budget`` (1.0: all merged … 2.0: the ensemble): greedily, in steps of ``step``,
    raise the ratio of the group with the highest ``priority`` per unit of budget it costs (PLeaS solves this as a
    QP over measured sensitivities; here the priority is how badly a group's units match), while the budget allows.
    Deterministic: ties go to the group first in ``groups``."""
    if not 1.0 <= budget <= 2.0:
        raise ValueError(f"the width budget must be between 1.0 and 2.0, got {budget}")
    ratios = dict.fromkeys(groups, 0.0)
    current = budget_of(ratios, costs)
    while True:
        best, best_score, best_budget = None, -1.0, current
        for group in groups:
            if ratios[group] >= 1.0:
                continue
            trial = {**ratios, group: min(1.0, ratios[group] + step)}
            cost = budget_of(trial, costs)
            if cost > budget + 1e-12:
                continue
            score = priority.get(group, 0.0) / max(cost - current, 1e-12)
            if score > best_score:
                best, best_score, best_budget = group, score, cost
        if best is None:
            return ratios
        ratios[best] = min(1.0, ratios[best] + step)
        current = best_budget
