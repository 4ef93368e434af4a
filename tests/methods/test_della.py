"""della / della_linear: MagPrune probabilities and rescale, determinism, invariants, mergekit's numbers."""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup

from mergesmith.errors import RecipeError
from mergesmith.methods import get_method
from mergesmith.methods.base import resolve_method_params
from mergesmith.methods.della import magprune_probabilities
from mergesmith.ops.stream import TensorContext, TensorInputs


def run(name, base, experts, shared=None, per_model=None, compat="paper", seed=0, tensor="w"):
    method = get_method(name)
    params = resolve_method_params(method, shared or {}, per_model or [{} for _ in experts], compat=compat)
    state = None
    if method.model_stats is not None:
        state = method.model_stats(lambda: iter([TensorInputs(tensor, base, experts, params)]), params, seed)
    return method.rule(base, experts, params, TensorContext(tensor, seed=seed, state=state))


def test_defaults_and_compat():
    paper = resolve_method_params(get_method("della"), {}, [{}])
    mk = resolve_method_params(get_method("della"), {}, [{}], compat="mergekit")
    assert (paper["density"], paper["epsilon"], paper["rescale"], paper["disjoint"]) == (
        [0.7],
        [0.15],
        "inverse",
        "mean",
    )
    assert (mk["density"], mk["epsilon"], mk["rescale"], mk["disjoint"]) == ([1.0], [0.15], "l1", "mean")
    assert get_method("della").random and get_method("della_linear").random


def test_probabilities_equation():
    delta = torch.tensor([[0.1, -0.5, 0.3], [2.0, 1.0, -3.0]])
    # ranks within each row (0 = smallest |δ|) → rank/(n − 1) → p = (0.5 − 0.1) + 0.2 · rank_norm
    expected = torch.tensor([[0.4, 0.6, 0.5], [0.5, 0.4, 0.6]])
    torch.testing.assert_close(magprune_probabilities(delta, 0.5, 0.1), expected)
    # 1-D: one row
    torch.testing.assert_close(
        magprune_probabilities(torch.tensor([3.0, 1.0]), 0.5, 0.1), torch.tensor([0.6, 0.4])
    )


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_inverse_rescale_divides_each_kept_entry_by_its_probability(name):
    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(16, 32, generator=gen)
    got = run(name, torch.zeros(16, 32), [tau], {"density": 0.5, "epsilon": 0.2})
    probs = magprune_probabilities(tau, 0.5, 0.2)
    kept = got != 0
    assert 0.3 < kept.float().mean() < 0.7
    torch.testing.assert_close(got[kept], (tau / probs)[kept])


def test_keep_rate_follows_the_rank():
    tau = torch.arange(1.0, 1001.0).repeat(64, 1)  # every row ranks the same way
    got = run("della_linear", torch.zeros_like(tau), [tau], {"density": 0.5, "epsilon": 0.3})
    rate = (got != 0).float().mean(dim=0)
    assert abs(rate[:100].mean() - 0.23) < 0.03  # p ≈ 0.2 … 0.26 for the smallest
    assert abs(rate[-100:].mean() - 0.77) < 0.03  # p ≈ 0.74 … 0.8 for the largest


def test_l1_rescale_matches_the_norm():
    gen = torch.Generator().manual_seed(1)
    tau = torch.randn(8, 16, generator=gen)
    got = run("della_linear", torch.zeros(8, 16), [tau], {"density": 0.4, "rescale": "l1"})
    torch.testing.assert_close(got.abs().sum(), tau.abs().sum())


def test_determinism():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(10, 12, generator=gen)
    experts = [base + torch.randn(10, 12, generator=gen) for _ in range(2)]
    a = run("della", base, experts, seed=5)
    assert torch.equal(a, run("della", base, experts, seed=5))
    assert not torch.equal(a, run("della", base, experts, seed=6))
    assert not torch.equal(a, run("della", base, experts, seed=5, tensor="other"))


def test_invariants():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(5, 6, generator=gen)
    expert = base + torch.randn(5, 6, generator=gen)
    assert torch.allclose(run("della_linear", base, [expert], {"density": 1.0}), expert, atol=1e-6)
    assert torch.allclose(run("della", base, [expert], {"density": 1.0}), expert, atol=1e-6)
    assert torch.equal(run("della", base, [expert], {"lambda": 0.0}), base)
    with pytest.raises(RecipeError):
        run("della", base, [expert], {"density": 0.9, "epsilon": 0.15})


def _mergekit(name, base, experts, weights, densities, epsilons, **shared):
    ids = range(1, len(experts) + 1)
    return registry.get(name).merge_group(
        TensorGroup.from_tensors([base, *experts], base_index=0),
        int8_mask=False,
        **shared,
        weight=dict(zip(ids, weights)),
        density=dict(zip(ids, densities)),
        epsilon=dict(zip(ids, epsilons)),
    )


@pytest.mark.parametrize(
    "name,normalize,rescale",
    [
        ("della", True, True),
        ("della_linear", False, True),
        ("della", False, False),
        ("della_linear", True, False),
    ],
)
def test_matches_mergekit_with_the_same_mask(monkeypatch, name, normalize, rescale):
    """mergekit draws from the global RNG: feed both implementations the same uniforms instead."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(9, 14, generator=gen)
    experts = [base + torch.randn(9, 14, generator=gen) for _ in range(3)]
    weights, densities, epsilons = [1.0, 0.6, 1.3], [0.5, 0.7, 0.4], [0.15, 0.1, 0.3]

    def fake_bernoulli(probs, *args, generator=None, **kwargs):
        uniforms = torch.rand(probs.shape, generator=torch.Generator().manual_seed(int(probs.numel())))
        return (uniforms < probs).to(probs.dtype)

    monkeypatch.setattr(torch, "bernoulli", fake_bernoulli)
    shared = {"normalize": normalize, "rescale": rescale, "lambda": 0.9}
    per_model = [{"weight": w, "density": d, "epsilon": e} for w, d, e in zip(weights, densities, epsilons)]
    got = run(name, base, experts, shared, per_model, compat="mergekit")
    expected = _mergekit(name, base, experts, weights, densities, epsilons, **shared)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_matches_mergekit_without_pruning(name):
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(7, 3, generator=gen)
    experts = [base + torch.randn(7, 3, generator=gen) for _ in range(3)]
    weights = [1.0, 2.0, 0.5]
    got = run(name, base, experts, per_model=[{"weight": w} for w in weights], compat="mergekit")
    normalize = name == "della"
    expected = _mergekit(
        name,
        base,
        experts,
        weights,
        [1.0] * 3,
        [0.15] * 3,
        normalize=normalize,
        rescale=True,
        **{"lambda": 1.0},
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
