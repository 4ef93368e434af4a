"""Equations and invariants of linear, task arithmetic, TIES and DARE on small hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from mergesmith import RecipeError, merge_state_dicts


def sd(**tensors) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}


def random_models(count: int, seed: int = 0, shapes=((8, 6), (6,), (5, 7, 3))):
    g = torch.Generator().manual_seed(seed)
    base = {f"w{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    experts = [
        {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(count)
    ]
    return base, experts


# -- linear ---------------------------------------------------------------------------------------------------
def test_linear_weighted_mean_and_sum():
    a, b = sd(x=[1.0, 2.0]), sd(x=[3.0, 6.0])
    out = merge_state_dicts(None, [a, b], "linear", weight=[1.0, 3.0])
    assert torch.allclose(out["x"], torch.tensor([(1 + 9) / 4, (2 + 18) / 4]))
    out = merge_state_dicts(None, [a, b], "linear", weight=[1.0, 3.0], normalize=False)
    assert torch.allclose(out["x"], torch.tensor([10.0, 20.0]))


def test_linear_single_model_at_weight_one_is_identity():
    _, (e,) = random_models(1)
    out = merge_state_dicts(None, [e], "linear", weight=1.0)
    assert all(torch.equal(out[k], e[k]) for k in e)


# -- task arithmetic ------------------------------------------------------------------------------------------
def test_task_arithmetic_equation():
    base, a, b = sd(x=[1.0, 1.0]), sd(x=[2.0, 0.0]), sd(x=[1.5, 3.0])
    out = merge_state_dicts(base, [a, b], "task_arithmetic", weight=[1.0, 0.5], **{"lambda": 0.8})
    expected = torch.tensor([1.0, 1.0]) + 0.8 * (torch.tensor([1.0, -1.0]) + 0.5 * torch.tensor([0.5, 2.0]))
    assert torch.allclose(out["x"], expected)


def test_task_arithmetic_lambda_zero_is_base_and_negation():
    base, experts = random_models(2)
    out = merge_state_dicts(base, experts, "task_arithmetic", **{"lambda": 0.0})
    assert all(torch.equal(out[k], base[k]) for k in base)
    neg = merge_state_dicts(base, experts[:1], "task_arithmetic", weight=-1.0)
    assert all(torch.allclose(neg[k], 2 * base[k] - experts[0][k], atol=1e-6) for k in base)


# -- TIES -----------------------------------------------------------------------------------------------------
def official_ties(base: torch.Tensor, tvs: torch.Tensor, density: float, lam: float, how: str = "mean"):
    """A direct port of the official TIES code (merge_utils.py) on the flattened model, for comparison."""
    d = tvs.shape[1]
    k = d - int(d * density)
    kth = tvs.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = tvs * (tvs.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    if how == "mean":
        merged = selected.sum(0) / torch.clamp((selected != 0).sum(0).float(), min=1)
    else:
        merged = selected.sum(0)
    return base + lam * merged


@pytest.mark.parametrize("density,how", [(0.2, "mean"), (0.5, "sum"), (0.05, "mean")])
def test_ties_global_trim_matches_official_code(density, how):
    base, experts = random_models(3, seed=1, shapes=((40, 30), (30,), (17, 9, 4), (1,)))
    names = list(base)
    flat_base = torch.cat([base[n].reshape(-1) for n in names])
    tvs = torch.stack([torch.cat([(e[n] - base[n]).reshape(-1) for n in names]) for e in experts])
    expected = official_ties(flat_base, tvs, density, 0.7, how)
    out = merge_state_dicts(base, experts, "ties", density=density, disjoint=how, **{"lambda": 0.7})
    got = torch.cat([out[n].reshape(-1) for n in names])
    assert torch.allclose(got, expected, atol=1e-6)


def test_ties_global_threshold_is_exact_selection():
    from mergesmith.ops.stream import TensorInputs
    from mergesmith.ops.ties import global_thresholds

    base, experts = random_models(2, seed=3, shapes=((64, 33), (128,), (5, 5)))
    items = [TensorInputs(n, base[n], [e[n] for e in experts], {}) for n in base]
    thresholds = global_thresholds(lambda: iter(items), [0.1, 0.37])
    for t, density in enumerate([0.1, 0.37]):
        flat = torch.cat([(experts[t][n] - base[n]).abs().reshape(-1) for n in base])
        k = flat.numel() - int(flat.numel() * density)
        assert thresholds[t] == flat.kthvalue(k).values.item()


def test_ties_sign_zero_majority_vs_positive():
    # coordinate 0 cancels exactly; the rest of the model votes negative
    base = sd(x=[0.0, 0.0, 0.0])
    a, b = sd(x=[1.0, -2.0, -3.0]), sd(x=[-1.0, -2.0, -3.0])
    paper = merge_state_dicts(base, [a, b], "ties", density=1.0)
    assert torch.allclose(paper["x"], torch.tensor([-1.0, -2.0, -3.0]))
    mk = merge_state_dicts(base, [a, b], "ties", density=1.0, sign_zero="positive")
    assert torch.allclose(mk["x"], torch.tensor([1.0, -2.0, -3.0]))


def test_ties_hand_computed_tensor_scope():
    base = sd(x=[0.0, 0.0, 0.0, 0.0])
    a = sd(x=[0.5, -0.1, 0.3, 0.0])
    b = sd(x=[-0.2, 0.4, 0.1, 0.6])
    # density 0.5 per tensor (mergekit count rule: 2 entries): a keeps {0.5, 0.3}, b keeps {0.6, 0.4}
    out = merge_state_dicts(base, [a, b], "ties", density=0.5, trim_scope="tensor", **{"lambda": 1.0})
    assert torch.allclose(out["x"], torch.tensor([0.5, 0.4, 0.3, 0.6]))


def test_ties_invariants():
    base, experts = random_models(1)
    out = merge_state_dicts(base, experts, "ties", density=1.0)
    assert all(torch.allclose(out[k], experts[0][k], atol=1e-6) for k in base)  # density 1 turns trim off
    base, experts = random_models(3)
    zero = merge_state_dicts(base, experts, "ties", **{"lambda": 0.0})
    assert all(torch.equal(zero[k], base[k]) for k in base)


def test_ties_global_scope_rejects_per_tensor_densities():
    base, experts = random_models(2)
    with pytest.raises(RecipeError, match="trim_scope: global"):
        from mergesmith.api import merge_state_dicts as msd

        msd(base, experts, "ties", density=[{"filter": "w0", "value": 0.5}, {"value": 0.2}])


# -- DARE -----------------------------------------------------------------------------------------------------
def test_dare_drop_and_inverse_rescale():
    base = {"x": torch.zeros(200_000)}
    expert = {"x": torch.full((200_000,), 0.01)}
    out = merge_state_dicts(base, [expert], "dare_linear", density=0.3, seed=7)["x"]
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01  # Bernoulli(1 − p)
    assert torch.allclose(out[kept], torch.full_like(out[kept], 0.01 / 0.3))  # rescaled by 1/(1 − p)
    assert abs(out.mean().item() - 0.01) < 0.0005  # E[δ̂] = δ


def test_dare_l1_rescale_matches_norm():
    base, (e,) = random_models(1, shapes=((64, 32), (128,)))
    out = merge_state_dicts(base, [e], "dare_linear", density=0.4, rescale="l1", seed=1)
    for k in base:
        assert torch.allclose((out[k] - base[k]).abs().sum(), (e[k] - base[k]).abs().sum(), rtol=1e-5)


def test_dare_is_deterministic_and_seeded():
    base, experts = random_models(2, shapes=((64, 64),))
    one = merge_state_dicts(base, experts, "dare_ties", density=0.5, seed=3)
    again = merge_state_dicts(base, experts, "dare_ties", density=0.5, seed=3, threads=4)
    other = merge_state_dicts(base, experts, "dare_ties", density=0.5, seed=4)
    assert torch.equal(one["w0"], again["w0"])
    assert not torch.equal(one["w0"], other["w0"])


def test_dare_density_one_is_plain_merge():
    base, experts = random_models(2)
    dare = merge_state_dicts(base, experts, "dare_linear", density=1.0, **{"lambda": 0.5})
    ta = merge_state_dicts(base, experts, "task_arithmetic", **{"lambda": 0.5})
    assert all(torch.equal(dare[k], ta[k]) for k in base)


def test_dare_ties_trim_is_ties_over_the_dropped_vectors():
    """DARE's official DARE-TIES: drop (and rescale), then the whole TIES step — the global magnitude trim
    included — on the dropped vectors. Reference: each dropped vector from dare_linear with a one-hot weight (the
    same seeded masks), then paper TIES over them."""
    base, experts = random_models(3, shapes=((16, 12), (12,), (6, 5, 4)))
    settings = {"density": 0.6, "seed": 5}
    dropped = [
        merge_state_dicts(
            base,
            experts,
            "dare_linear",
            weight=[float(j == i) for j in range(3)],
            **{"lambda": 1.0},
            **settings,
        )
        for i in range(3)
    ]
    reference = merge_state_dicts(base, dropped, "ties", density=0.3, trim_scope="global", **{"lambda": 0.8})
    got = merge_state_dicts(base, experts, "dare_ties", trim_density=0.3, **{"lambda": 0.8}, **settings)
    for name in base:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-6, atol=1e-7)
    untrimmed = merge_state_dicts(base, experts, "dare_ties", **{"lambda": 0.8}, **settings)
    assert any(not torch.equal(got[k], untrimmed[k]) for k in base)


def test_bernoulli_mask_is_the_exact_32_bit_law():
    import numpy as np

    from mergesmith.ops.taskvec import bernoulli_mask

    shape = (100, 1001)  # an odd count: the last random word is part used
    count = 100 * 1001

    def plane_bits(seed: int, planes: int) -> np.ndarray:  # [planes, count] bits, little-endian within words
        raw = np.random.PCG64(seed).random_raw((planes, -(-count // 64)))
        return np.stack([np.unpackbits(p.view(np.uint8), bitorder="little")[:count] for p in raw]).astype(
            np.int64
        )

    # the definition, regime by regime, with N = ⌊keep·2³²⌋ = n·2^(32−b), n odd
    cases = {
        0.3: lambda seed: (
            np.random.PCG64(seed).random_raw(-(-count // 2)).view(np.int32)[:count].astype(np.int64)
            < int(0.3 * 2**32) - 2**31
        ),  # b = 30: one int32 word per element
        0.5 + 2**-12: lambda seed: (
            np.random.PCG64(seed).random_raw(-(-count // 4)).view(np.int16)[:count].astype(np.int64)
            < 2049 * 16 - 2**15
        ),  # b = 12: one int16 word per element
        0.75: lambda seed: (
            (2 * plane_bits(seed, 2)[0] + plane_bits(seed, 2)[1]) < 3
        ),  # b = 2: U from two planes
        0.5: lambda seed: plane_bits(seed, 1)[0] < 1,  # b = 1: one bit per element
        3 / 256: lambda seed: (2 ** np.arange(7, -1, -1)) @ plane_bits(seed, 8) < 3,  # b = 8: U from 8 planes
    }
    for keep, definition in cases.items():
        mask = bernoulli_mask(shape, keep, 1234)
        assert mask.dtype == torch.float32 and mask.shape == shape
        assert torch.equal(mask.reshape(-1), torch.from_numpy(np.asarray(definition(1234))).float()), keep
        assert abs(float(mask.mean()) - keep) < 5 * (keep * (1 - keep) / count) ** 0.5
        for dtype in (torch.float64, torch.bfloat16):  # the same bits in any dtype
            assert torch.equal(bernoulli_mask(shape, keep, 1234, dtype).float(), mask)
        assert not torch.equal(bernoulli_mask(shape, keep, 1235), mask)
    assert bernoulli_mask((3,), 1.0, 0).tolist() == [1.0] * 3 and bernoulli_mask((3,), 0.0, 0).sum() == 0
    # extreme keep rates stay exact: ⌊keep·2³²⌋ words out of 2³² pass
    assert float(bernoulli_mask((4096,), 2**-32, 7).sum()) <= 1
