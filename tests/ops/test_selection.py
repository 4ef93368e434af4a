"""selection: exact streamed order statistics (radix selection), and TIES' global thresholds built on it."""

from __future__ import annotations

import pytest
import torch

from mergesmith.ops.selection import local_order_statistics, order_statistics
from mergesmith.ops.stream import TensorInputs
from mergesmith.ops.taskvec import paper_keep_count
from mergesmith.ops.ties import global_thresholds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_a_full_sort(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3000, generator=gen, dtype=dtype) * torch.logspace(-6, 6, 3000, dtype=dtype)
    x[0, :10] = 0.0
    x[0, 10:20] = -0.0
    x[1, 5] = float("inf")
    x[2, 7] = -float("inf")
    x[1, 100:300] = 1.5  # many equal values

    def chunks():
        for start in range(0, 3000, 700):
            yield x[:, start : start + 700]

    def ranks(total):
        return [[1, 17, 1500, total], [1, 150, 2000, total], [3, 999, total - 1]]

    got = order_statistics(chunks, ranks)
    ordered = x.sort(dim=1).values
    for row, wanted in enumerate(ranks(3000)):
        assert got[row] == [float(ordered[row, k - 1]) for k in wanted]
        local = local_order_statistics(x[row : row + 1], wanted)[0]
        assert local.tolist() == got[row]


@pytest.mark.parametrize("magnitudes", [True, False])
def test_large_chunks_take_the_fast_histograms_and_stay_exact(magnitudes):
    # chunks of >= 4 × 65 536 columns take the bincount paths (non-negative keys: shift-only top digit and the
    # clamped last digit); signed values fall back to the general path. Both must equal a full sort.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 700_000, generator=gen) * torch.logspace(-4, 2, 700_000)
    x[:, :5000] = 0.0
    x[0, 5000:60000] = 0.25  # a bucket crowded with equal values
    if magnitudes:
        x = x.abs()

    def chunks():
        for start in range(0, x.shape[1], 300_000):
            yield x[:, start : start + 300_000]

    def ranks(total):
        return [[1, 5000, 5001, 30000, 350_000, total], [2, 123_456, total - 3, total]]

    got = order_statistics(chunks, ranks)
    ordered = x.sort(dim=1).values
    for row, wanted in enumerate(ranks(x.shape[1])):
        assert got[row] == [float(ordered[row, k - 1]) for k in wanted]


def test_rejects_out_of_range_ranks():
    with pytest.raises(ValueError):
        order_statistics(lambda: iter([torch.ones(1, 4)]), lambda total: [[total + 1]])


def test_ties_global_thresholds_are_the_flattened_kthvalue():
    gen = torch.Generator().manual_seed(1)
    shapes = [(37, 11), (5,), (13, 13), ()]
    base = [torch.randn(s, generator=gen) for s in shapes]
    experts = [[b + (i + 1) * torch.randn(b.shape, generator=gen) for b in base] for i in range(3)]

    def stream():
        for j, b in enumerate(base):
            yield TensorInputs(f"t{j}", b, [e[j] for e in experts], {})

    flat = torch.stack(
        [torch.cat([(e[j] - base[j]).abs().reshape(-1) for j in range(len(base))]) for e in experts]
    )
    total = flat.shape[1]
    densities = [0.2, 0.5, 0.01]
    expected = [
        float(flat[t].kthvalue(total - paper_keep_count(total, d) + 1).values)
        for t, d in enumerate(densities)
    ]
    assert global_thresholds(stream, densities) == expected


def test_mixed_fp32_and_fp64_chunks_are_ranked_exactly_as_fp64():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(2, 500, generator=gen)  # fp32
    b = torch.randn(2, 700, generator=gen, dtype=torch.float64) * 1e-3 + 1e-9

    def chunks():
        yield a
        yield b

    full = torch.cat([a.double(), b], dim=1).sort(dim=1).values
    wanted = [[1, 600, 1200], [2, 7, 1199]]
    got = order_statistics(chunks, lambda total: wanted)
    for row in range(2):
        assert got[row] == [float(full[row, k - 1]) for k in wanted[row]]
