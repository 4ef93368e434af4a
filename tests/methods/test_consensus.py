"""consensus: TALL masks + consensus count, over TA or TIES, against the official formulas on the flat model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergesmith.methods import get_method
from mergesmith.methods.base import resolve_method_params
from tests.helpers import run_method


def merge_model(base, experts, shared=None, per_model=None, seed=0):
    return run_method("consensus", base, experts, shared, per_model, seed)


def run(base, experts, shared=None, per_model=None):
    return merge_model({"w": base}, [{"w": e} for e in experts], shared, per_model)["w"]


def test_defaults():
    params = resolve_method_params(get_method("consensus"), {}, [{}, {}])
    assert (params["k"], params["lambda_t"], params["base_method"], params["lambda"]) == (
        2,
        [0.6, 0.6],
        "ta",
        1.0,
    )
    mk = resolve_method_params(get_method("consensus"), {}, [{}, {}], compat="mergekit")
    assert mk["trim_scope"] == "global"


def test_equation_hand_made():
    taus = np.array([[1.0, 0.1, 1.0, 0.0, -0.5], [1.0, 0.0, -1.0, 0.1, -0.4], [0.9, 0.05, 0.01, 0.0, 0.3]])
    base = np.array([0.5, -0.5, 0.0, 1.0, 2.0])
    lambdas = [0.5, 0.6, 0.4]
    mtl = taus.sum(axis=0)
    masks = np.stack([np.abs(t) > lam * np.abs(mtl - t) for t, lam in zip(taus, lambdas)])
    keep = masks.sum(axis=0) >= 2
    expected = base + 0.8 * mtl * keep
    got = run(
        torch.tensor(base, dtype=torch.float32),
        [torch.tensor(base + t, dtype=torch.float32) for t in taus],
        {"lambda": 0.8},
        [{"lambda_t": lam} for lam in lambdas],
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    assert 0 < keep.sum() < keep.size  # the example exercises both outcomes


def test_mask_is_strict():
    base = torch.zeros(1)
    experts = [torch.ones(1), torch.ones(1)]  # |τ_t| = 1 = 1 · |τ_MTL − τ_t|
    assert torch.equal(run(base, experts, {"k": 1}, [{"lambda_t": 1.0}] * 2), base)
    assert torch.allclose(run(base, experts, {"k": 1}, [{"lambda_t": 0.999}] * 2), torch.tensor([2.0]))


def test_k_extremes_and_lambda_zero():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=gen)
    experts = [base + torch.randn(6, 5, generator=gen) for _ in range(3)]
    ta = base + sum(e - base for e in experts)
    assert torch.allclose(run(base, experts, {"k": 0}), ta, atol=1e-6)
    assert torch.equal(run(base, experts, {"k": 4}), base)
    assert torch.equal(run(base, experts, {"lambda": 0.0}), base)


# --- official TIES (K = 20, majority sign, dis-sum) + TALL/consensus on the flattened model ---------------------
def ref_ties_dis_sum(flat, density):
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    return (trimmed * keep).sum(dim=0)


def ref_consensus(flat_ptm, flat_ft, merged_tv, lambdas, k):
    flat_multi = flat_ptm + merged_tv
    masks = torch.stack(
        [(flat_ptm - ft).abs() > (flat_multi - ft).abs() * lam for ft, lam in zip(flat_ft, lambdas)]
    )
    return merged_tv * (masks.float().sum(dim=0) >= k)


@pytest.mark.parametrize("base_method", ["ta", "ties"])
def test_matches_the_official_code_on_the_flattened_model(base_method):
    gen = torch.Generator().manual_seed(1)
    shapes = {"a": (30, 8), "b": (8,), "c": (12, 12)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    experts = [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(4)]
    lambdas = [0.2, 0.4, 0.5, 0.6]
    got = merge_model(
        base,
        experts,
        {"base_method": base_method, "lambda": 0.7, "k": 2},
        [{"lambda_t": lam} for lam in lambdas],
    )
    flat_ptm = torch.cat([v.reshape(-1) for v in base.values()])
    flat_ft = torch.stack([torch.cat([e[k].reshape(-1) for k in base]) for e in experts])
    tvs = flat_ft - flat_ptm
    merged = tvs.sum(dim=0) if base_method == "ta" else ref_ties_dis_sum(tvs, 0.2)
    expected = flat_ptm + 0.7 * ref_consensus(flat_ptm, flat_ft, merged, lambdas, 2)
    start = 0
    for k, v in base.items():
        torch.testing.assert_close(
            got[k], expected[start : start + v.numel()].reshape(v.shape), rtol=1e-5, atol=1e-6
        )
        start += v.numel()
