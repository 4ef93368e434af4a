"""tsv: TSV-M per matrix against the official padded-buffer code, invariants, and non-matrix tensors."""

from __future__ import annotations

import pytest
import torch

from mergesmith.methods import get_method
from mergesmith.methods.base import resolve_method_params
from mergesmith.ops.stream import TensorContext


def run(base, experts, alpha=1.0):
    method = get_method("tsv")
    params = resolve_method_params(method, {"alpha": alpha}, [{} for _ in experts])
    return method.rule(base, experts, params, TensorContext("w"))


def official_tsvm(deltas):
    """Port of compute_and_sum_svd_mem_reduction: zero buffers of width r, then two polar SVDs."""
    count = len(deltas)
    for i, vec in enumerate(deltas):
        u, s, v = torch.linalg.svd(vec, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        k = int(s.shape[0] * (1 / count))
        sum_u[:, i * k : (i + 1) * k] = u[:, :k]
        sum_s[i * k : (i + 1) * k] = s[:k]
        sum_v[i * k : (i + 1) * k, :] = v[:k, :]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


@pytest.mark.parametrize("shape,count", [((12, 8), 3), ((8, 12), 3), ((10, 10), 4), ((16, 6), 2)])
def test_matches_the_official_code(shape, count):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=gen)
    experts = [base + torch.randn(shape, generator=gen) for _ in range(count)]
    expected = base + 0.6 * official_tsvm([e - base for e in experts])
    torch.testing.assert_close(run(base, experts, 0.6), expected, rtol=1e-4, atol=1e-5)


def test_orthogonal_low_rank_tasks_add_up():
    base = torch.zeros(4, 4)
    d1 = torch.zeros(4, 4)
    d1[:2, :2] = torch.tensor([[3.0, 1.0], [1.0, 2.0]])  # rank 2 on rows/cols {0, 1}
    d2 = torch.zeros(4, 4)
    d2[2:, 2:] = torch.tensor([[1.0, -1.0], [0.5, 2.0]])  # rank 2 on rows/cols {2, 3}
    # k = ⌊4 / 2⌋ = 2 keeps each task whole; their singular vectors are already orthogonal: Δ = Δ₁ + Δ₂
    torch.testing.assert_close(run(base, [d1, d2]), d1 + d2, rtol=1e-5, atol=1e-5)


def test_single_task_alpha_zero_and_fp64():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(7, 5, generator=gen)
    expert = base + torch.randn(7, 5, generator=gen)
    torch.testing.assert_close(run(base, [expert]), expert, rtol=1e-5, atol=1e-5)
    assert torch.equal(run(base, [expert, expert + 1], alpha=0.0), base)
    out = run(base.double(), [expert.double(), expert.double() * 2])
    assert out.dtype == torch.float64


def test_non_matrices_take_the_mean_and_tiny_matrices_vanish():
    gen = torch.Generator().manual_seed(2)
    for shape in [(9,), (), (2, 3, 4)]:
        base = torch.randn(shape, generator=gen)
        experts = [base + torch.randn(shape, generator=gen) for _ in range(3)]
        expected = base + 0.5 * sum(e - base for e in experts) / 3
        torch.testing.assert_close(run(base, experts, 0.5), expected)
    base = torch.randn(2, 3, generator=gen)
    experts = [base + torch.randn(2, 3, generator=gen) for _ in range(3)]  # r = 2 < T = 3: k = 0
    assert torch.equal(run(base, experts), base)
