"""PLeaS's partial merge and least-squares step on hand-made networks: the block rules, the two ends (the ensemble
at ratio 1, the aligned average at ratio 0), the budget, and the closed form against ``torch.linalg.lstsq``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mergesmith.arch.permutation import AxisGroup, PermutationSpec
from mergesmith.fit.least_squares import _solve, refit_layers
from mergesmith.ops.partial_merge import (
    UnitSplit,
    budget_of,
    entry_cost,
    matrix_costs,
    partial_merge,
    ratios_for_budget,
    split_units,
    widen,
)


class TwoLayer(nn.Module):
    def __init__(self, hidden: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.l0, self.l1 = nn.Linear(4, hidden), nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l1(torch.relu(self.l0(x)))


def mlp_spec(hidden: int) -> PermutationSpec:
    spec = PermutationSpec({"h": hidden})
    h = AxisGroup("h")
    spec.add("l0.weight", 2, a0=h)
    spec.add("l0.bias", 1, a0=h)
    spec.add("l1.weight", 2, a1=h)
    spec.add("l1.bias", 1)
    return spec


def widened(state: dict[str, torch.Tensor]) -> TwoLayer:
    model = TwoLayer(state["l0.weight"].shape[0], 0)
    model.load_state_dict(state)
    return model.eval()


def test_split_keeps_the_least_similar_pairs_separate():
    split = split_units(torch.tensor([0.9, 0.1, 0.5, 0.3, 0.8]), 0.4)
    assert split.separate.tolist() == [1, 3] and split.merged.tolist() == [0, 2, 4]
    assert (split.units, split.width, split.ratio) == (5, 7, 0.4)


def test_the_block_rules_on_a_hand_made_matrix():
    a, b = torch.arange(16.0).reshape(4, 4), 100 + torch.arange(16.0).reshape(4, 4)
    split = UnitSplit(merged=torch.tensor([0, 2]), separate=torch.tensor([1, 3]))
    g = AxisGroup("g")
    w = widen(a, b, (g, g), {"g": split})
    assert w.shape == (6, 6)
    m, s = [0, 2], [1, 3]
    torch.testing.assert_close(w[:2, :2], (a[m][:, m] + b[m][:, m]) / 2)
    torch.testing.assert_close(w[:2, 2:4], a[m][:, s] / 2)
    torch.testing.assert_close(w[:2, 4:], b[m][:, s] / 2)
    torch.testing.assert_close(w[2:4, :4], torch.cat([a[s][:, m], a[s][:, s]], 1))
    torch.testing.assert_close(w[4:, :2], b[s][:, m])
    assert not w[2:4, 4:].any() and not w[4:, 2:4].any()  # A's and B's separate units never mix
    torch.testing.assert_close(
        widen(a[0], b[0], (g,), {"g": split}), torch.tensor([50.0, 52.0, 1.0, 3.0, 101.0, 103.0])
    )


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_the_ends_are_the_aligned_average_and_the_ensemble(ratio):
    a, b = TwoLayer(6, 0).eval(), TwoLayer(6, 1).eval()
    spec = mlp_spec(6)
    split = split_units(torch.linspace(0, 1, 6), ratio)
    merged = widened(partial_merge(spec, a.state_dict(), b.state_dict(), {"h": split}))
    assert merged.l0.out_features == 6 + round(6 * ratio)
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if ratio == 1.0:
            torch.testing.assert_close(merged(x), (a(x) + b(x)) / 2)
        if ratio == 0.0:
            average = {k: (a.state_dict()[k] + b.state_dict()[k]) / 2 for k in a.state_dict()}
            torch.testing.assert_close(merged(x), widened(average)(x))


def test_budget_of_uniform_ratios_and_the_greedy_allocation():
    spec = PermutationSpec({"h1": 8, "h2": 8})
    spec.add("in.weight", 2, a0=AxisGroup("h1"))
    spec.add("mid.weight", 2, a0=AxisGroup("h2"), a1=AxisGroup("h1"))
    spec.add("out.weight", 2, a1=AxisGroup("h2"))
    shapes = {"in.weight": (8, 4), "mid.weight": (8, 8), "out.weight": (2, 8)}
    costs = matrix_costs(spec, shapes)
    r = 0.5
    expected = (32 * entry_cost(0, r) + 64 * entry_cost(r, r) + 16 * entry_cost(r, 0)) / (32 + 64 + 16)
    assert budget_of({"h1": r, "h2": r}, costs) == pytest.approx(expected)
    assert budget_of({"h1": 1.0, "h2": 1.0}, costs) == pytest.approx(2.0)
    assert ratios_for_budget(["h1", "h2"], {"h1": 1, "h2": 1}, costs, 1.0) == {"h1": 0.0, "h2": 0.0}
    assert ratios_for_budget(["h1", "h2"], {"h1": 1, "h2": 1}, costs, 2.0) == {"h1": 1.0, "h2": 1.0}
    ratios = ratios_for_budget(["h1", "h2"], {"h1": 1.0, "h2": 0.1}, costs, 1.3)
    assert budget_of(ratios, costs) <= 1.3 + 1e-9 and ratios["h1"] > ratios["h2"]
    with pytest.raises(ValueError, match=r"between 1\.0 and 2\.0"):
        ratios_for_budget(["h1"], {}, costs, 2.5)


def test_the_closed_form_is_least_squares_with_the_block_zeros():
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [torch.randn(200, 5, generator=g, dtype=torch.float64), torch.ones(200, 1, dtype=torch.float64)], 1
    )
    y = torch.randn(200, 4, generator=g, dtype=torch.float64)
    plain = _solve(x.T @ x, x.T @ y, None, None, has_bias=True)
    torch.testing.assert_close(plain, torch.linalg.lstsq(x, y).solution.T, rtol=1e-4, atol=1e-6)
    # rows (merged 2, separate 1 + 1) over columns (merged 1, separate 2 + 2): each segment on its allowed columns
    split = _solve(x.T @ x, x.T @ y, (2, 1), (1, 2), has_bias=True)
    allowed_a, allowed_b = [0, 1, 2, 5], [0, 3, 4, 5]
    torch.testing.assert_close(
        split[2, allowed_a],
        torch.linalg.lstsq(x[:, allowed_a], y[:, 2:3]).solution[:, 0],
        rtol=1e-4,
        atol=1e-6,
    )
    torch.testing.assert_close(
        split[3, allowed_b],
        torch.linalg.lstsq(x[:, allowed_b], y[:, 3:4]).solution[:, 0],
        rtol=1e-4,
        atol=1e-6,
    )
    assert not split[2, [3, 4]].any() and not split[3, [1, 2]].any()
    no_bias = _solve(x.T @ x, x.T @ y, None, None, has_bias=False)
    assert not no_bias[:, -1].any()


def test_refit_reproduces_the_ensemble_and_never_fits_worse():
    a, b = TwoLayer(6, 0).eval(), TwoLayer(6, 1).eval()
    spec = mlp_spec(6)
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    batches = [x[:128], x[128:]]
    for ratio in (1.0, 0.5):
        splits = {"h": split_units(torch.linspace(0, 1, 6), ratio)}
        merged = partial_merge(spec, a.state_dict(), b.state_dict(), splits)
        refit = refit_layers(spec, splits, merged, a, b, batches)
        with torch.no_grad():
            if ratio == 1.0:  # the ensemble is exactly reachable: least squares finds it
                torch.testing.assert_close(widened(refit)(x), (a(x) + b(x)) / 2, rtol=1e-4, atol=1e-4)
            target = torch.cat(
                [
                    (a.l0(x) + b.l0(x))[:, splits["h"].merged] / 2,
                    a.l0(x)[:, splits["h"].separate],
                    b.l0(x)[:, splits["h"].separate],
                ],
                1,
            )
            before = (widened(merged).l0(x) - target).square().mean()
            after = (widened(refit).l0(x) - target).square().mean()
        assert after <= before + 1e-9
