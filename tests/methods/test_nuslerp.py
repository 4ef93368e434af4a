"""nuslerp: weighted SLERP (of task vectors with a base), invariants, and mergekit's numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mergekit.merge_methods.nuslerp import nuslerp as mk_nuslerp

from mergesmith.methods import get_method
from mergesmith.methods.base import BasePolicy, resolve_method_params
from mergesmith.ops.stream import TensorContext


def run(base, experts, shared=None, weights=(1.0, 1.0), compat="paper"):
    method = get_method("nuslerp")
    params = resolve_method_params(method, shared or {}, [{"weight": w} for w in weights], compat=compat)
    return method.rule(base, experts, params, TensorContext("w"))


def slerp_np(t, a, b):
    cos = float((a / np.linalg.norm(a) * (b / np.linalg.norm(b))).sum())
    omega = math.acos(cos)
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def test_schema():
    method = get_method("nuslerp")
    assert method.base is BasePolicy.OPTIONAL
    assert (method.min_experts, method.max_experts) == (2, 2)


def test_equation_without_base_t_from_weights():
    a = np.array([1.0, 0.0, 1.0])
    b = np.array([0.0, 2.0, 0.5])
    got = run(
        None, [torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)], weights=(1.0, 3.0)
    )
    np.testing.assert_allclose(got.numpy(), slerp_np(0.75, a, b), rtol=1e-6)


def test_equation_with_base_slerps_task_vectors():
    base = np.array([0.5, -1.0, 2.0])
    a = base + np.array([1.0, 0.0, 0.0])
    b = base + np.array([0.0, 1.0, 1.0])
    t32 = [torch.tensor(x, dtype=torch.float32) for x in (base, a, b)]
    got = run(t32[0], t32[1:], weights=(2.0, 2.0))
    np.testing.assert_allclose(got.numpy(), base + slerp_np(0.5, a - base, b - base), rtol=1e-6)


def test_row_wise_equation():
    # without flatten, each slice along the last dim (each row) is slerped on its own
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    got = run(None, [a, b], {"nuslerp_flatten": False})
    row0 = slerp_np(0.5, a[0].numpy().astype(float), b[0].numpy().astype(float))
    row1 = 0.5 * a[1].numpy() + 0.5 * b[1].numpy()  # collinear rows: lerp
    np.testing.assert_allclose(got.numpy(), np.stack([row0, row1]), rtol=1e-6)


def test_identical_models_give_the_model():
    torch.manual_seed(1)
    x = torch.randn(4, 3)
    assert torch.allclose(run(None, [x, x.clone()], weights=(0.3, 0.9)), x, atol=1e-6)
    base = torch.randn(4, 3)
    assert torch.allclose(run(base, [x, x.clone()]), x, atol=1e-6)


def test_weight_endpoints():
    torch.manual_seed(2)
    a, b = torch.randn(2, 5)
    assert torch.allclose(run(None, [a, b], weights=(1.0, 0.0)), a, atol=1e-6)
    assert torch.allclose(run(None, [a, b], weights=(0.0, 1.0)), b, atol=1e-5)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("row_wise", [False, True])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.2, 0.7), (1.0, -1.0)])
def test_matches_mergekit(with_base, flatten, row_wise, weights):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=gen)
    a = base + torch.randn(6, 5, generator=gen)
    b = base + torch.randn(6, 5, generator=gen)
    shared = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    got = run(base if with_base else None, [a, b], shared, weights, compat="mergekit")
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if row_wise else -1
    if with_base:
        expected = base + mk_nuslerp(t, a - base, b - base, dim=dim, flatten=flatten)
    else:
        expected = mk_nuslerp(t, a, b, dim=dim, flatten=flatten)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
