"""breadcrumbs / breadcrumbs_ties: the middle-band mask, invariants, the official row variant, mergekit's numbers."""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup
from mergekit.sparsify import magnitude_outliers

from mergesmith.methods import get_method
from mergesmith.methods.base import resolve_method_params
from mergesmith.methods.breadcrumbs import band_mask
from mergesmith.ops.stream import TensorContext, TensorInputs


def run(name, base, experts, shared=None, per_model=None, compat="paper", seed=0):
    method = get_method(name)
    params = resolve_method_params(method, shared or {}, per_model or [{} for _ in experts], compat=compat)
    state = None
    if method.model_stats is not None:
        state = method.model_stats(lambda: iter([TensorInputs("w", base, experts, params)]), params, seed)
    return method.rule(base, experts, params, TensorContext("w", seed=seed, state=state))


def test_defaults_and_compat():
    method = get_method("breadcrumbs")
    paper = resolve_method_params(method, {}, [{}])
    mk = resolve_method_params(method, {}, [{}], compat="mergekit")
    assert (paper["density"], paper["gamma"], paper["scope"], paper["rescale"]) == (
        [0.15],
        [0.01],
        "tensor",
        "none",
    )
    assert (mk["density"], mk["gamma"]) == ([1.0], [0.01])
    ties = resolve_method_params(get_method("breadcrumbs_ties"), {}, [{}], compat="mergekit")
    assert (ties["disjoint"], ties["sign_zero"]) == ("sum", "positive")


def sorted_band(magnitudes, top, stop):
    """The reference: ranks [top, stop) of a stable descending sort of each row."""
    mask = torch.zeros_like(magnitudes, dtype=torch.bool)
    order = torch.sort(magnitudes, dim=-1, descending=True, stable=True).indices
    return mask.scatter_(-1, order[..., top:stop], True)


@pytest.mark.parametrize("values", ["distinct", "ties"])
def test_band_mask_is_the_stable_sorts_band(values):
    g = torch.Generator().manual_seed(0)
    rows = (
        torch.rand(5, 200, generator=g)
        if values == "distinct"
        else torch.randint(0, 4, (5, 200), generator=g)
    )
    rows = rows.float()
    n = rows.shape[-1]
    for density in (0.0, 0.05, 0.15, 0.5, 0.99, 1.0):
        for gamma in (0.0, 0.01, 0.1, 0.6):
            for counts in ("mergekit", "official"):
                keep, top = int(density * n), int(gamma * n)
                top = min(top, n - keep) if counts == "mergekit" else top
                expected = sorted_band(rows, top, min(n, top + keep))
                assert torch.equal(band_mask(rows, density, gamma, counts), expected), (
                    density,
                    gamma,
                    counts,
                )


def test_band_equation():
    tau = torch.tensor([3.0, -10.0, 1.0, 7.0, -6.0, 2.0, 9.0, -5.0, 4.0, 8.0])
    # n = 10, keep ⌊0.5·10⌋ = 5 right below the top ⌊0.1·10⌋ = 1: |τ| ∈ {9, 8, 7, 6, 5}
    got = run("breadcrumbs", torch.zeros(10), [tau], {"density": 0.5, "gamma": 0.1})
    expected = torch.where(tau.abs().ge(5) & tau.abs().le(9), tau, torch.zeros(()))
    assert torch.equal(got, expected)


def test_gamma_is_reduced_to_keep_the_density():
    tau = torch.arange(1.0, 11.0)
    # keep 8, top ⌊0.3·10⌋ = 3 would leave only 7: only the top 2 are cut
    got = run("breadcrumbs", torch.zeros(10), [tau], {"density": 0.8, "gamma": 0.3})
    assert torch.equal(got, torch.where(tau <= 8, tau, torch.zeros(())))


def test_turned_off_and_reductions():
    torch.manual_seed(0)
    base = torch.randn(6, 7)
    experts = [base + torch.randn(6, 7) for _ in range(3)]
    tv_sum = sum(e - base for e in experts)
    off = {"density": 1.0, "gamma": 0.0}
    assert torch.allclose(run("breadcrumbs", base, experts, off), base + tv_sum, atol=1e-6)
    assert torch.allclose(run("breadcrumbs", base, experts, {"density": 1.0}), base + tv_sum, atol=1e-6)
    assert torch.allclose(run("breadcrumbs", base, experts[:1], off), experts[0], atol=1e-6)
    assert torch.equal(run("breadcrumbs", base, experts, {"lambda": 0.0}), base)
    assert torch.equal(run("breadcrumbs_ties", base, experts, {"lambda": 0.0}), base)


def official_middle_keep(tensor: torch.Tensor, keep: float, remove: float) -> torch.Tensor:
    """Port of the official TaskVectorMiddleKeep (remove_first): topk along the last dim."""
    n = tensor.shape[-1]
    _, top = torch.topk(tensor.abs(), int(n * remove))
    mask = torch.ones(tensor.shape).scatter(-1, top, 0.0)
    removed = mask * tensor
    _, kept = torch.topk(removed.abs(), int(n * keep))
    return torch.zeros(tensor.shape).scatter(-1, kept, 1.0) * removed


@pytest.mark.parametrize("density,gamma", [(0.3, 0.05), (0.15, 0.01), (0.9, 0.2)])
@pytest.mark.parametrize("shape", [(5, 40), (64,), (2, 3, 20)])
def test_row_scope_matches_the_official_code(density, gamma, shape):
    gen = torch.Generator().manual_seed(1)
    tau = torch.randn(shape, generator=gen)
    got = run("breadcrumbs", torch.zeros(shape), [tau], {"density": density, "gamma": gamma, "scope": "row"})
    torch.testing.assert_close(got, official_middle_keep(tau, density, gamma))


def test_tensor_scope_matches_mergekit_sparsifier():
    gen = torch.Generator().manual_seed(2)
    tau = torch.randn(12, 9, generator=gen)
    for density, gamma in [(0.2, 0.01), (0.5, 0.1), (0.95, 0.2), (0.0, 0.1)]:
        got = run("breadcrumbs", torch.zeros(12, 9), [tau], {"density": density, "gamma": gamma})
        torch.testing.assert_close(got, magnitude_outliers(tau, density, gamma=gamma))


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_mergekit(name, rescale, normalize):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(10, 8, generator=gen)
    experts = [base + torch.randn(10, 8, generator=gen) for _ in range(3)]
    weights, densities, gammas = [1.0, 0.5, 0.8], [0.3, 0.5, 0.9], [0.05, 0.02, 0.2]
    shared = {"lambda": 0.7, "rescale": rescale, "normalize": normalize}
    per_model = [{"weight": w, "density": d, "gamma": g} for w, d, g in zip(weights, densities, gammas)]
    got = run(name, base, experts, shared, per_model, compat="mergekit")
    ids = range(1, 4)
    expected = registry.get(name).merge_group(
        TensorGroup.from_tensors([base, *experts], base_index=0),
        int8_mask=False,
        normalize=normalize,
        rescale=rescale,
        **{"lambda": 0.7},
        weight=dict(zip(ids, weights)),
        density=dict(zip(ids, densities)),
        gamma=dict(zip(ids, gammas)),
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_ties_paper_defaults_use_the_disjoint_mean():
    base = torch.zeros(4)
    experts = [torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([3.0, 2.0, -1.0, 0.5])]
    off = {"density": 1.0, "gamma": 0.0}
    got = run("breadcrumbs_ties", base, experts, off)
    # signs by mass: +, 0 → majority (+), +, +; dis-mean over the agreeing experts
    assert torch.allclose(got, torch.tensor([2.0, 2.0, 3.0, 0.5]))
