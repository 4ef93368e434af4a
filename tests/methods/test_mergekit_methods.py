"""mergekit's own methods (sce, nearswap, arcee_fusion, multislerp): each rule on small hand-made tensors whose
answer is worked out by hand. (Equality with mergekit itself: tests/api/test_mergekit_compat.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import run_method


def test_nearswap_swaps_near_elements_and_moves_far_ones_by_t():
    base = {"w": torch.zeros(3)}
    other = {"w": torch.tensor([0.01, 0.1, 1.0])}
    got = run_method("nearswap", base, [other], {"t": 0.05})["w"]
    # w = clamp(t / |a − b|): 1 (swapped), 0.5, 0.05 → θ = w · b
    torch.testing.assert_close(got, torch.tensor([0.01, 0.05, 0.05]))


def test_sce_weights_by_energy_and_erases_sign_conflicts():
    base = {"w": torch.zeros(4)}
    a = {"w": torch.tensor([2.0, 2.0, -2.0, 0.0])}  # energy mean(τ²) = 3
    b = {"w": torch.tensor([1.0, -1.0, -1.0, 1.0])}  # energy 1
    got = run_method("sce", base, [a, b])["w"]
    w_a, w_b = 0.75, 0.25
    expected = torch.tensor(
        [
            (w_a * 2 + w_b * 1) / (w_a + w_b),  # signs agree: energy-weighted mean
            2.0,  # sum 1 > 0: b's −1 is erased
            (w_a * -2 + w_b * -1) / (w_a + w_b),
            1.0,  # a's 0 is erased (sign 0 ≠ +): b alone
        ]
    )
    torch.testing.assert_close(got, expected)


def test_sce_selects_elements_by_variance_across_models():
    base = {"w": torch.zeros(4)}
    a = {"w": torch.tensor([1.0, 5.0, 1.0, 0.0])}
    b = {"w": torch.tensor([1.0, -3.0, 2.0, 0.0])}
    # variances: 0, 16, 0.25, 0 → nnz = 2, k = 0.5 keeps ⌊0.5 · 2⌋ = 1 element: index 1
    got = run_method("sce", base, [a, b], {"select_topk": 0.5})["w"]
    assert got[0] == 0 and got[2] == 0 and got[3] == 0
    assert got[1] == pytest.approx(5.0)  # sum 2 > 0: only a's +5 survives the erase


def test_arcee_fusion_keeps_only_the_outlier_change():
    base = {"w": torch.zeros(1, 20)}
    change = torch.cat([torch.arange(1, 20) * 0.01, torch.tensor([3.0])]).reshape(1, 20)
    # one row, so the KL factor is common: quartiles of |b − a| at ⌊q · 19⌋ are 0.05, 0.10, 0.15 → τ = 0.25
    got = run_method("arcee_fusion", base, [{"w": change}])["w"]
    expected = torch.zeros(1, 20)
    expected[0, 19] = 3.0  # the only score above median + 1.5 IQR
    torch.testing.assert_close(got, expected)


def test_multislerp_of_two_orthogonal_unit_vectors_lies_halfway_on_the_circle():
    a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    got = run_method(
        "multislerp", {"w": torch.zeros(2)}, [a, b], per_model=[{"weight": 1.0}, {"weight": 1.0}]
    )
    # with the zero base the task vectors are the points themselves
    half = math.sqrt(0.5)
    torch.testing.assert_close(got["w"], torch.tensor([half, half]), atol=1e-6, rtol=0)
    uneven = run_method(
        "multislerp", {"w": torch.zeros(2)}, [a, b], per_model=[{"weight": 3.0}, {"weight": 1.0}]
    )
    angle = math.atan2(float(uneven["w"][1]), float(uneven["w"][0]))
    # weights 3 : 1 pull the point toward a, and it stays on the unit circle (the weighted mean norm is 1)
    assert 0 < angle < math.pi / 4 and float(uneven["w"].norm()) == pytest.approx(1.0, abs=1e-6)
