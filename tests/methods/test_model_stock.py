"""model_stock: the Model Stock ratio, invariants, and mergekit's numbers."""

from __future__ import annotations

import math

import pytest
import torch
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.model_stock import model_stock_merge_method

from mergesmith.errors import RecipeError
from mergesmith.methods import get_method
from mergesmith.methods.base import resolve_method_params
from mergesmith.ops.stream import TensorContext


def run(base, experts, shared=None, compat="paper"):
    method = get_method("model_stock")
    params = resolve_method_params(method, shared or {}, [{} for _ in experts], compat=compat)
    return method.rule(base, experts, params, TensorContext("w"))


def test_needs_two_fine_tuned_models():
    with pytest.raises(RecipeError):
        get_method("model_stock").check_expert_count(1)


def test_equation_two_models_at_60_degrees():
    base = torch.tensor([1.0, 1.0])
    o1 = torch.tensor([1.0, 0.0])
    o2 = torch.tensor([math.cos(math.pi / 3), math.sin(math.pi / 3)])
    cos = 0.5
    t = 2 * cos / (1 + cos)
    average = base + (o1 + o2) / 2
    expected = t * average + (1 - t) * base
    assert torch.allclose(run(base, [base + o1, base + o2]), expected, atol=1e-6)


def test_equation_three_models_mean_pairwise_cosine():
    base = torch.zeros(3)
    offsets = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])]
    cosines = [0.0, 1 / math.sqrt(2), 1 / math.sqrt(2)]
    cos = sum(cosines) / 3
    t = 3 * cos / (1 + 2 * cos)
    expected = t * sum(offsets) / 3
    assert torch.allclose(run(base, offsets), expected, atol=1e-6)


def test_identical_models_give_the_model():
    torch.manual_seed(0)
    base, x = torch.randn(2, 4, 5)
    assert torch.allclose(run(base, [x, x.clone(), x.clone()]), x, atol=1e-6)


def test_singular_denominator_keeps_the_base():
    base = torch.tensor([0.5, 0.5])
    o = torch.tensor([1.0, -2.0])
    assert torch.allclose(run(base, [base + o, base - o]), base)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(7, 5), (9,), (3, 2, 4)])
@pytest.mark.parametrize("count", [2, 4])
def test_matches_mergekit(filter_wise, shape, count):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(shape, generator=gen)
    experts = [base + 0.1 * torch.randn(shape, generator=gen) + 0.05 for _ in range(count)]
    group = TensorGroup.from_tensors([base, *experts], base_index=0)
    expected = model_stock_merge_method.merge_group(group, filter_wise=filter_wise)
    got = run(base, experts, {"filter_wise": filter_wise}, compat="mergekit")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
