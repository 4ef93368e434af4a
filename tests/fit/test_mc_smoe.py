"""MC-SMoE's pieces on hand-made tensors: usage, similarity, the adaptive counts of the official rule, grouping,
the remapped router, and expert alignment and merging."""

from __future__ import annotations

import pytest
import torch

from mergesmith.fit.mc_smoe import (
    LayerGroups,
    adaptive_group_counts,
    group_experts,
    logit_similarity,
    remapped_router,
    slots_for,
    usage_frequencies,
)
from mergesmith.ops.expert_merge import expert_alignment, merge_group, permute_expert

pytestmark = pytest.mark.usefixtures("one_thread")


def expert_output(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2)
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def random_layer(experts: int = 4, inner: int = 6, hidden: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(experts, 2 * inner, hidden, generator=g), torch.randn(
        experts, hidden, inner, generator=g
    )


def test_usage_counts_top_k_selections_and_similarity_is_the_shifted_cosine():
    logits = torch.tensor([[3.0, 2.0, 0.0], [3.0, 0.0, 2.0], [0.0, 3.0, 2.0]])
    assert usage_frequencies(logits, 1).tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert usage_frequencies(logits, 2).tolist() == pytest.approx([2 / 6, 2 / 6, 2 / 6])
    sim = logit_similarity(torch.tensor([[1.0, 2.0, -1.0], [1.0, 2.0, 1.0]]))
    assert (
        sim[0, 1] == pytest.approx(1.0)
        and sim[0, 2] == pytest.approx(0.5)
        and sim[1, 1] == pytest.approx(1.0)
    )


def test_adaptive_counts_follow_the_global_threshold():
    # two layers of four experts; each layer's most used expert is set to 1 before pooling
    f = [torch.tensor([0.5, 0.3, 0.15, 0.05]), torch.tensor([0.7, 0.1, 0.1, 0.1])]
    # pooled, sorted: 1, 1, 0.3, 0.15, 0.1, 0.1, 0.1, 0.05; average 2 → index 4 → threshold 0.1
    assert adaptive_group_counts(f, 2) == [3, 1]
    assert adaptive_group_counts(f, 1) == [1, 1]  # index 2 → threshold 0.3: counts of f > 0.3
    with pytest.raises(ValueError, match="the threshold falls on a layer's most used expert"):
        adaptive_group_counts(f, 0)


def test_grouping_takes_the_most_used_as_centers_and_the_most_similar_center():
    frequency = torch.tensor([0.1, 0.4, 0.2, 0.3])
    similarity = torch.tensor(
        [[1.0, 0.9, 0.2, 0.1], [0.9, 1.0, 0.1, 0.3], [0.2, 0.1, 1.0, 0.8], [0.1, 0.3, 0.8, 1.0]]
    )
    groups = group_experts(frequency, similarity, 2)
    assert groups.centers == [1, 3] and groups.labels == [0, 0, 1, 1]
    assert groups.members(1) == [2, 3]
    assert slots_for(groups, 3, frequency) == [0, 1, 0]  # the extra slot copies the group of most usage
    with pytest.raises(ValueError, match="between 1 and 4"):
        group_experts(frequency, similarity, 5)


def test_the_remapped_router_keeps_singletons_and_fits_the_group_mass():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 6, generator=g)
    x = torch.randn(500, 6, generator=g)
    singletons = LayerGroups([0, 1, 2, 3], [0, 1, 2, 3])
    assert torch.equal(remapped_router(weight, x, singletons, [0, 1, 2, 3]), weight)
    groups = LayerGroups([0, 0, 1, 1], [0, 2])
    rows = remapped_router(weight, x, groups, [0, 1])
    logits = x.double() @ weight.double().T
    target = torch.logsumexp(logits[:, [0, 1]], 1) - logits[:, 0]
    fitted = x.double() @ (rows[0].double() - weight[0].double())
    # least squares: no worse than the center's row alone, and as good as the exact solution
    assert ((fitted - target) ** 2).sum() < (target**2).sum()
    exact = torch.linalg.lstsq(x.double(), target[:, None]).solution[:, 0]
    torch.testing.assert_close(rows[0].double() - weight[0].double(), exact, rtol=1e-4, atol=1e-5)


def test_alignment_recovers_a_permuted_expert_and_keeps_its_function():
    gate_up, down = random_layer()
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    shuffled = permute_expert(gate_up[0], down[0], perm)
    x = torch.randn(7, 5)
    torch.testing.assert_close(expert_output(*shuffled, x), expert_output(gate_up[0], down[0], x))
    found = expert_alignment((gate_up[0], down[0]), shuffled)
    back = permute_expert(*shuffled, found)
    assert torch.equal(back[0], gate_up[0]) and torch.equal(back[1], down[0])


def test_merging_is_the_frequency_weighted_average_of_aligned_experts():
    gate_up, down = random_layer()
    weights = torch.tensor([0.5, 0.25, 0.25, 0.0])
    # a group of one expert is that expert; a group of identical experts is that expert
    single = merge_group(gate_up, down, [2], 2, weights)
    assert torch.equal(single[0], gate_up[2]) and torch.equal(single[1], down[2])
    twins_gate_up, twins_down = gate_up.clone(), down.clone()
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(4))
    twins_gate_up[1], twins_down[1] = permute_expert(gate_up[0], down[0], perm)  # expert 1: expert 0 permuted
    merged = merge_group(twins_gate_up, twins_down, [0, 1], 0, weights)
    torch.testing.assert_close(merged[0], gate_up[0]) and torch.testing.assert_close(merged[1], down[0])
    unaligned = merge_group(twins_gate_up, twins_down, [0, 1], 0, weights, align=False)
    torch.testing.assert_close(unaligned[0], (0.5 * twins_gate_up[0] + 0.25 * twins_gate_up[1]) / 0.75)
    zero = merge_group(gate_up, down, [3, 1], 3, torch.zeros(4), align=False)  # all-zero usage: plain average
    torch.testing.assert_close(zero[1], (down[3] + down[1]) / 2)
