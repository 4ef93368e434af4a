"""slerp: the SLERP equation, invariants, and mergekit's numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mergekit.merge_methods.slerp import slerp as mk_slerp

from mergesmith.errors import RecipeError
from mergesmith.methods import get_method
from mergesmith.methods.base import resolve_method_params
from mergesmith.ops.stream import TensorContext


def run(base, other, t, compat="paper"):
    method = get_method("slerp")
    params = resolve_method_params(method, {"t": t}, [{}], compat=compat)
    return method.rule(base, [other], params, TensorContext("w"))


def test_equation_orthogonal_vectors():
    v0 = torch.tensor([1.0, 0.0])
    v1 = torch.tensor([0.0, 2.0])
    t = 0.3
    omega = math.acos(0.0)  # the unit directions are orthogonal
    expected = math.sin((1 - t) * omega) / math.sin(omega) * np.array([1.0, 0.0]) + math.sin(
        t * omega
    ) / math.sin(omega) * np.array([0.0, 2.0])
    np.testing.assert_allclose(run(v0, v1, t).numpy(), expected, rtol=1e-6)


def test_equation_general_angle():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 4))
    t = 0.7
    cos = float((a / np.linalg.norm(a) * (b / np.linalg.norm(b))).sum())
    omega = math.acos(cos)
    expected = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
    got = run(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), t)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_endpoints():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 6)
    assert torch.allclose(run(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(run(a, b, 1.0), b, atol=1e-5)


@pytest.mark.parametrize("factor", [2.0, -3.0])
def test_collinear_and_antipodal_fall_back_to_lerp(factor):
    a = torch.tensor([1.0, 2.0, -1.0])
    b = factor * a
    t = 0.25
    assert torch.allclose(run(a, b, t), (1 - t) * a + t * b, atol=1e-6)


def test_zero_tensor_is_not_normalized():
    a = torch.zeros(4)
    b = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # ‖a‖ is taken as 1, cos = 0 → orthogonal SLERP of a (= 0) and b
    t = 0.5
    expected = math.sin(t * math.pi / 2) * b
    assert torch.allclose(run(a, b, t), expected, atol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.93, 1.0])
@pytest.mark.parametrize("shape", [(16, 8), (33,), ()])
def test_matches_mergekit(t, shape):
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(shape, generator=gen)
    b = a + 0.5 * torch.randn(shape, generator=gen) if shape else torch.randn(shape, generator=gen)
    expected = mk_slerp(torch.tensor([t]), a.reshape(1, *shape), b.reshape(1, *shape))[0]
    torch.testing.assert_close(run(a, b, t, compat="mergekit"), expected, rtol=1e-5, atol=1e-6)


def test_schema():
    method = get_method("slerp")
    with pytest.raises(RecipeError):
        resolve_method_params(method, {}, [{}])  # t is required, as in mergekit
    with pytest.raises(RecipeError):
        resolve_method_params(method, {"t": 1.5}, [{}])
    with pytest.raises(RecipeError):
        method.check_expert_count(2)
    method.check_expert_count(1)
