"""Merging the experts of one MoE layer (MC-SMoE's M-SMoE step, Li et al., ICLR 2024), on the fused layout of
transformers' Mixtral / Qwen2-MoE / Qwen3-MoE experts: ``gate_up [E, 2I, H]`` (each expert's gate rows, then its
up rows) and ``down [E, H, I]``.

**Alignment.** An expert's FFN units can be permuted without changing its function (gate and up rows, down
columns together). Before merging, each member of a group is aligned to the group's dominant expert by weight
matching: the permutation π maximising

    Σ_i ⟨G_ref[i], G_e[π(i)]⟩ + ⟨U_ref[i], U_e[π(i)]⟩ + ⟨D_ref[:, i], D_e[:, π(i)]⟩

(an exact linear assignment; the official code's ``W_in·W_inᵀ + W_outᵀ·W_out`` weight-matching cost).

**Merge.** Per group g with weights a_e (MC-SMoE: the usage frequencies f_e; uniform averaging: 1):

    W_g = Σ_{e∈g} a_e · π_e(W_e) / Σ_{e∈g} a_e

with uniform weights where a group's frequencies are all zero (the official code adds ε = 1.19e-7 to the
denominator against that case instead, which also shrinks every merged expert by a factor 1 − ε/Σa; here a group
of one expert is that expert, bit for bit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergesmith.ops.permute import solve_assignment


def split_gate_up(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2I, H]`` → gate ``[I, H]``, up ``[I, H]``."""
    half = gate_up.shape[0] // 2
    return gate_up[:half], gate_up[half:]


def expert_alignment(
    reference: tuple[torch.Tensor, torch.Tensor], expert: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The permutation of ``expert``'s units (``(gate_up [2I, H], down [H, I])``) into ``reference``'s order (the
    module docstring's assignment)."""
    ref_gate, ref_up = split_gate_up(reference[0].double())
    gate, up = split_gate_up(expert[0].double())
    cost = ref_gate @ gate.T + ref_up @ up.T + reference[1].double().T @ expert[1].double()
    return solve_assignment(cost)


def permute_expert(
    gate_up: torch.Tensor, down: torch.Tensor, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same expert with its units in the order ``perm`` (unit i of the result is unit ``perm[i]``)."""
    gate, up = split_gate_up(gate_up)
    return torch.cat([gate[perm], up[perm]]), down[:, perm]


def merge_group(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    members: Sequence[int],
    reference: int,
    weights: torch.Tensor,
    align: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One merged expert from ``members`` of a layer (``gate_up [E, 2I, H]``, ``down [E, H, I]``), each aligned to
    ``reference`` first when ``align``, averaged with ``weights`` ``[E]`` (the module docstring)."""
    if len(members) == 1:
        return gate_up[members[0]].clone(), down[members[0]].clone()
    total = sum(float(weights[e]) for e in members)
    coefficients = {e: (float(weights[e]) if total > 0 else 1.0) for e in members}
    denominator = total if total > 0 else float(len(members))
    merged_gate_up = torch.zeros_like(gate_up[reference], dtype=torch.float32)
    merged_down = torch.zeros_like(down[reference], dtype=torch.float32)
    for e in members:
        member = (gate_up[e].float(), down[e].float())
        if align and e != reference:
            member = permute_expert(*member, expert_alignment((gate_up[reference], down[reference]), member))
        merged_gate_up += coefficients[e] * member[0]
        merged_down += coefficients[e] * member[1]
    return (merged_gate_up / denominator).to(gate_up.dtype), (merged_down / denominator).to(down.dtype)
