"""MC-SMoE's compression stage: the low-rank + sparse parametrization, structured global pruning, the cubic
schedule, fine-tuning, and the stored factors."""

from __future__ import annotations

import itertools

import pytest
import torch

from mergesmith.fit.losparse import (
    LoSparseConfig,
    bake,
    compress,
    decompose,
    expert_modules,
    prune,
    remaining_share,
    sparse_part,
)
from tests.fit.test_moe_routing import batch, tiny_moe

pytestmark = pytest.mark.usefixtures("one_thread")


def experts_of(model):
    return {
        f"{n}.{t}": getattr(m, t).detach().clone()
        for n, m in expert_modules(model)
        for t in ("gate_up_proj", "down_proj")
    }


def rebuild(stored: dict[str, torch.Tensor], key: str, experts: int) -> torch.Tensor:
    """An expert tensor from its stored factors: L R plus the kept rows of S."""
    out = stored[f"{key}.left"] @ stored[f"{key}.right"]
    for e in range(experts):
        out[e, stored[f"{key}.sparse.{e}.index"]] += stored[f"{key}.sparse.{e}.values"]
    return out


def test_the_decomposition_starts_as_the_weight_and_s_at_zero_is_the_truncated_svd():
    model = tiny_moe("mixtral")
    before = experts_of(model)
    targets = decompose(model, rank=4)
    after = experts_of(model)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-5)
    prune(
        targets, {i: torch.ones_like(sparse_part(m, t)) for i, (_, m, t) in enumerate(targets)}, 0.0, "rows"
    )
    name, module, tensor = targets[0]
    w = before[f"{name}.{tensor}"][1]
    u, s, vh = torch.linalg.svd(w)
    torch.testing.assert_close(
        getattr(module, tensor)[1].detach(), (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-4, atol=1e-5
    )


def test_pruning_keeps_the_most_important_rows_globally():
    model = tiny_moe("mixtral")
    targets = decompose(model, rank=2)
    scores = {}
    for i, (_, m, t) in enumerate(targets):
        s = sparse_part(m, t)
        scores[i] = torch.arange(s.numel(), dtype=torch.float32).reshape(s.shape) * (
            i + 1
        )  # later rows matter more
    prune(targets, scores, 0.25, "rows")
    rows = [(sparse_part(m, t).detach().abs().sum(dim=2) > 0) for _, m, t in targets]
    kept = sum(int(r.sum()) for r in rows)
    total = sum(r.numel() for r in rows)
    assert abs(kept - 0.25 * total) <= 1
    assert bool(rows[-1][-1, -1]) and not bool(rows[0][0, 0])  # the highest score kept, the lowest dropped
    for r in rows:  # whole rows: a row is either all zero or kept as it was
        assert r.dtype == torch.bool


def test_the_cubic_schedule():
    config = LoSparseConfig(remaining=0.1, initial_share=0.1, final_share=0.4)
    shares = [remaining_share(step, 100, config) for step in range(1, 101)]
    assert shares[:10] == [1.0] * 10 and shares[60:] == [0.1] * 40
    assert all(a >= b for a, b in itertools.pairwise(shares))
    assert remaining_share(35, 100, config) == pytest.approx(0.1 + 0.9 * (1 - 25 / 50) ** 3)


def test_fine_tuning_reaches_the_final_share_and_the_factors_rebuild_the_weights():
    model = tiny_moe("qwen3_moe").requires_grad_(False)  # frozen, as `load_causal_lm` gives it
    data = [batch((7, 5)), batch((6, 6))]
    config = LoSparseConfig(rank=3, remaining=0.2)
    targets, report = compress(model, config, data, steps=10, lr=1e-3)
    assert len(report.losses) == 10 and all(torch.isfinite(torch.tensor(report.losses)))
    assert report.remaining[-1] == 0.2 and report.remaining[0] == 1.0
    # S was scored by its gradients and pruned to the final share: the rows below the k-th smallest score go,
    # k = ⌊0.8 n⌋ (the k-th itself stays: the official `<`)
    rows = torch.cat([sparse_part(m, t).detach().abs().sum(dim=2).reshape(-1) for _, m, t in targets])
    assert int((rows > 0).sum()) == len(rows) - int(len(rows) * 0.8) + 1
    assert not any(sparse_part(m, t).requires_grad for _, m, t in targets)  # frozen again, as it came
    stored = bake(targets)
    assert not any(
        hasattr(m, "parametrizations") and len(m.parametrizations) for _, m in expert_modules(model)
    )
    for name, module in expert_modules(model):
        for tensor in ("gate_up_proj", "down_proj"):
            key = f"{name}.{tensor}"
            dense = getattr(module, tensor).detach()
            torch.testing.assert_close(rebuild(stored, key, len(dense)), dense, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=data[0].input_ids).logits).all()
