"""karcher: Karcher mean on the sphere, invariants, and mergekit's numbers."""

from __future__ import annotations

import math

import pytest
import torch
from mergekit.merge_methods.karcher import karcher_merge_tensors

from mergesmith.methods import get_method
from mergesmith.methods.base import BasePolicy, resolve_method_params
from mergesmith.ops.stream import TensorContext


def run(experts, weights=None, shared=None, compat="paper"):
    method = get_method("karcher")
    per_model = [{} for _ in experts] if weights is None else [{"weight": w} for w in weights]
    params = resolve_method_params(method, shared or {}, per_model, compat=compat)
    return method.rule(None, experts, params, TensorContext("w"))


def test_schema():
    method = get_method("karcher")
    assert method.base is BasePolicy.IGNORED
    method.check_expert_count(1)


def test_single_and_identical_models():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    assert torch.equal(run([x]), x)
    assert torch.allclose(run([x, x.clone(), x.clone()]), x, atol=1e-6)


def test_orthogonal_pair_is_the_bisector_times_the_mean_norm():
    got = run([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])])
    # equal weights: direction (1, 1)/√2, scale (1 + 3) / 2
    assert torch.allclose(got, torch.tensor([2 / math.sqrt(2), 2 / math.sqrt(2)]), atol=1e-6)


def test_points_on_a_great_circle_average_their_angles():
    angles = [0.0, 0.1, 0.5, 0.9]
    weights = [1.0, 2.0, 1.0, 0.5]
    norms = [1.0, 2.0, 0.5, 3.0]
    # embed the circle in 3-D (z = 0): the Karcher mean of points on one arc is the weighted mean angle
    points = [torch.tensor([n * math.cos(a), n * math.sin(a), 0.0]) for a, n in zip(angles, norms)]
    total = sum(weights)
    mean_angle = sum(w * a for w, a in zip(weights, angles)) / total
    scale = sum(w * n for w, n in zip(weights, norms)) / total
    expected = torch.tensor([scale * math.cos(mean_angle), scale * math.sin(mean_angle), 0.0])
    assert torch.allclose(run(points, weights), expected, atol=1e-5)


def test_zero_tensor_keeps_its_weight_in_the_scale_only():
    a = torch.tensor([2.0, 0.0])
    got = run([a, torch.zeros(2)])
    assert torch.allclose(got, torch.tensor([1.0, 0.0]), atol=1e-6)  # direction of a, scale (2 + 0) / 2


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 3.0]])
@pytest.mark.parametrize("spread", [0.3, 3.0])
def test_matches_mergekit(weights, spread):
    gen = torch.Generator().manual_seed(11)
    center = torch.randn(8, 6, generator=gen)
    tensors = [center + spread * torch.randn(8, 6, generator=gen) for _ in range(3)]
    alphas = [1 / 3] * 3 if weights is None else [w / sum(weights) for w in weights]
    expected = karcher_merge_tensors(tensors, alphas, max_iter=10, tol=1e-5)
    got = run(tensors, weights, compat="mergekit")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_matches_mergekit_with_iteration_settings_and_a_zero_model():
    gen = torch.Generator().manual_seed(12)
    tensors = [torch.randn(20, generator=gen) for _ in range(2)] + [torch.zeros(20)]
    expected = karcher_merge_tensors(tensors, [1 / 3] * 3, max_iter=3, tol=1e-4)
    got = run(tensors, shared={"max_iter": 3, "tol": 1e-4}, compat="mergekit")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
