"""Permutations of hidden units: applying them, and weight matching (Git Re-Basin, Ainsworth et al., ICLR 2023).

Weight matching finds, for model B, the unit permutations π that make its weights closest to model A's:

    max_π  Σ_ℓ ⟨W_ℓ^A, P_ℓ W_ℓ^B P_{ℓ−1}^⊤⟩_F      (equivalently  min_π ‖θ_A − π(θ_B)‖²)

by coordinate descent: one permutation group at a time, with all others fixed, the objective is linear in P_p —
a linear assignment problem over the cost  C = Σ_{tensors of p} W^A_(p-axis first) · [π_{−p}(W^B)]_(p-axis first)^⊤
solved exactly (``scipy.optimize.linear_sum_assignment``). Groups are visited in a seeded random order; the search
stops when a whole sweep improves nothing (or after ``max_iter`` sweeps), as the official code does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mergesmith.arch.permutation import PermutationSpec
from mergesmith.io.reader import Source, WrappedSource

Permutations = dict[str, torch.Tensor]  # group → new unit i is old unit perm[i] (int64)


def block_index(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Row indices that move whole blocks: unit i's ``block`` rows come from unit ``perm[i]``'s."""
    return (perm[:, None] * block + torch.arange(block)).reshape(-1)


def permute_tensor(
    tensor: torch.Tensor,
    axes: tuple,
    perms: Mapping[str, torch.Tensor],
    skip_axis: int | None = None,
) -> torch.Tensor:
    """``tensor`` with every permuted axis (except ``skip_axis``) reordered by its group's permutation."""
    for axis, entry in enumerate(axes):
        if entry is None or axis == skip_axis or entry.group not in perms:
            continue
        tensor = tensor.index_select(axis, block_index(perms[entry.group], entry.block))
    return tensor


def permute_state(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Every tensor of ``state`` with its units moved by ``perms`` (tensors outside the spec unchanged)."""
    return {
        name: permute_tensor(t, spec.axes[name], perms) if name in spec.axes else t
        for name, t in state.items()
    }


def invert(perm: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(perm)
    out[perm] = torch.arange(len(perm))
    return out


def identity(spec: PermutationSpec) -> Permutations:
    return {g: torch.arange(n) for g, n in spec.sizes.items()}


def random_permutations(spec: PermutationSpec, seed: int) -> Permutations:
    """A seeded random permutation of every group (for tests and the from-scratch zoo's checks)."""
    g = torch.Generator().manual_seed(seed)
    return {group: torch.randperm(spec.sizes[group], generator=g) for group in spec.groups}


def _unit_rows(tensor: torch.Tensor, axis: int, units: int) -> torch.Tensor:
    """``tensor`` as (units, everything else): the group's axis first, each unit's block flattened into its row."""
    return tensor.movedim(axis, 0).reshape(units, -1)


def group_cost(
    group: str,
    spec: PermutationSpec,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """C[i, j] = Σ over the group's tensors of ⟨unit i of A, unit j of B with every other permutation applied⟩
    (float64; each product in float32, the sum over tensors in float64)."""
    n = spec.sizes[group]
    cost = torch.zeros(n, n, dtype=torch.float64)
    for name, axis, _block in spec.members(group):
        wa = _unit_rows(a[name].float(), axis, n)
        wb = _unit_rows(permute_tensor(b[name].float(), spec.axes[name], perms, skip_axis=axis), axis, n)
        cost += (wa @ wb.T).double()
    return cost


def solve_assignment(cost: torch.Tensor) -> torch.Tensor:
    """The permutation maximizing Σ_i cost[i, perm[i]] (exact: the Hungarian / Jonker–Volgenant solver)."""
    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    assert np.array_equal(rows, np.arange(len(rows)))
    return torch.from_numpy(cols).long()


@dataclass
class MatchingReport:
    """How the search went: sweeps run, the objective ⟨θ_A, π(θ_B)⟩ gained per sweep."""

    sweeps: int = 0
    gains: list[float] = field(default_factory=list)


def weight_matching(
    spec: PermutationSpec,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    seed: int = 0,
    max_iter: int = 100,
    init: Mapping[str, torch.Tensor] | None = None,
    on_sweep: Callable[[int, float], None] | None = None,
) -> tuple[Permutations, MatchingReport]:
    """Permutations of B's units that maximize ⟨θ_A, π(θ_B)⟩ (module docstring): coordinate descent over the
    groups in a seeded random order per sweep, each an exact assignment; stops when a sweep gains nothing."""
    perms = {g: p.clone() for g, p in (init or identity(spec)).items()}
    rng = np.random.default_rng(seed)
    report = MatchingReport()
    groups = spec.groups
    for sweep in range(max_iter):
        gained = 0.0
        for index in rng.permutation(len(groups)):
            group = groups[index]
            cost = group_cost(group, spec, a, b, perms)
            new = solve_assignment(cost)
            old_value = float(cost[torch.arange(len(new)), perms[group]].sum())
            new_value = float(cost[torch.arange(len(new)), new].sum())
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                gained += new_value - old_value
                perms[group] = new
        report.sweeps, report.gains = sweep + 1, [*report.gains, gained]
        if on_sweep is not None:
            on_sweep(sweep, gained)
        if gained == 0.0:
            break
    return perms, report


class PermutedSource(WrappedSource):
    """A checkpoint read with its units moved by ``perms`` (one tensor at a time, as the engine asks for it)."""

    def __init__(self, inner: Source, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]):
        super().__init__(inner)
        self.spec, self.perms = spec, dict(perms)

    def get(self, name: str) -> torch.Tensor:
        tensor = self.inner.get(name)
        axes = self.spec.axes.get(name)
        return permute_tensor(tensor, axes, self.perms).contiguous() if axes is not None else tensor
