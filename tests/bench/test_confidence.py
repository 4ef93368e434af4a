"""Bootstrap confidence intervals of benchmark rows, on cases with a known answer."""

from __future__ import annotations

import math

import pytest
import torch

from mergesmith.bench.confidence import bootstrap_normalized, normalized_average, paired_difference


def bernoulli(p: float, n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < p


def test_one_task_interval_matches_the_binomial_standard_error():
    """n = 2,000 examples at 70 %: the 95 % interval is p ± 1.96 √(p(1 − p)/n) = ± 2.0 points, to a few %."""
    correct = bernoulli(0.7, 2000, 0)
    p = float(correct.double().mean())
    ci = bootstrap_normalized({"t": correct}, {"t": 1.0}, resamples=4000)
    assert ci.estimate == pytest.approx(p)
    half = 1.96 * math.sqrt(p * (1 - p) / 2000)
    assert (ci.high - ci.low) / 2 == pytest.approx(half, rel=0.08)
    assert ci.contains(p) and ci.level == 0.95


def test_normalization_and_task_average():
    outcomes = {"a": torch.tensor([1, 1, 0, 0]), "b": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])}
    # a: 0.5 / 0.5 = 1; b: mean of the seeds (0.75, 0.25) = 0.5, / 1.0
    assert normalized_average(outcomes, {"a": 0.5, "b": 1.0}) == pytest.approx(0.75)
    constant = bootstrap_normalized({"a": torch.ones(50)}, {"a": 0.8})
    assert constant.estimate == constant.low == constant.high == pytest.approx(1.25)


def test_seeds_widen_the_interval():
    """The same examples, but the merge is random: seeds that disagree add their spread to the interval."""
    one = bootstrap_normalized({"t": bernoulli(0.6, 500, 1)}, {"t": 1.0})
    seeds = torch.stack([bernoulli(p, 500, 1) for p in (0.45, 0.6, 0.75)])
    many = bootstrap_normalized({"t": seeds}, {"t": 1.0})
    assert many.high - many.low > 2 * (one.high - one.low)


def test_the_interval_is_reproducible_and_follows_its_seed():
    outcomes = {"a": bernoulli(0.6, 300, 2), "b": bernoulli(0.8, 200, 3)}
    first = bootstrap_normalized(outcomes, {"a": 0.9, "b": 0.9}, seed=5)
    assert first == bootstrap_normalized(outcomes, {"a": 0.9, "b": 0.9}, seed=5)
    assert first != bootstrap_normalized(outcomes, {"a": 0.9, "b": 0.9}, seed=6)


def test_paired_difference_of_identical_rows_is_zero_and_not_significant():
    row = {"a": bernoulli(0.6, 400, 4)}
    diff = paired_difference(row, row, {"a": 1.0})
    assert diff.estimate == diff.low == diff.high == 0 and diff.p_value == 1 and not diff.significant


def test_pairing_detects_a_small_consistent_gain_that_unpaired_intervals_miss():
    """B = A with 2 % of the examples fixed: the unpaired intervals overlap, the paired one excludes 0."""
    a = bernoulli(0.6, 2000, 5)
    b = a.clone()
    wrong = torch.nonzero(~a).flatten()[:40]
    b[wrong] = True
    finetuned = {"t": 1.0}
    ci_a, ci_b = bootstrap_normalized({"t": a}, finetuned), bootstrap_normalized({"t": b}, finetuned)
    assert ci_b.low < ci_a.high  # overlapping
    diff = paired_difference({"t": b}, {"t": a}, finetuned)
    assert diff.estimate == pytest.approx(40 / 2000)
    assert diff.significant and diff.low > 0 and diff.p_value < 0.01


def test_bad_inputs():
    with pytest.raises(ValueError, match="no fine-tuned accuracy for task 'b'"):
        bootstrap_normalized({"b": torch.ones(3)}, {"a": 1.0})
    with pytest.raises(ValueError, match="must be positive"):
        bootstrap_normalized({"a": torch.ones(3)}, {"a": 0.0})
    with pytest.raises(ValueError, match="at least one of each"):
        bootstrap_normalized({"a": torch.ones(0)}, {"a": 1.0})
    with pytest.raises(ValueError, match="same examples"):
        paired_difference({"a": torch.ones(3)}, {"a": torch.ones(4)}, {"a": 1.0})
    with pytest.raises(ValueError, match="different tasks"):
        paired_difference({"a": torch.ones(3)}, {"b": torch.ones(3)}, {"a": 1.0, "b": 1.0})


def test_packed_outcomes_round_trip_bit_for_bit():
    from mergesmith.bench.confidence import pack_outcomes, runs_outcomes, unpack_outcomes

    g = torch.Generator().manual_seed(3)
    outcomes = {"a": torch.rand(1003, generator=g) > 0.4, "b": torch.tensor([True]), "c": torch.zeros(8) > 1}
    packed = pack_outcomes(outcomes)
    assert len(packed["a"]) == len("1003:") + 2 * 126  # 8 examples a byte
    back = unpack_outcomes(packed)
    assert all(torch.equal(back[t], outcomes[t]) for t in outcomes)
    stacked = runs_outcomes([{"outcomes": packed}, {"outcomes": packed}])
    assert stacked is not None and stacked["a"].shape == (2, 1003)
    assert runs_outcomes([{"accuracy": {}}]) is None  # rows written before intervals existed


def test_loss_tasks_normalize_by_the_perplexity_ratio():
    """A loss task's score is exp(expert loss - loss): constant per-window losses give a point interval; a
    task of each kind averages their normalized scores."""
    from mergesmith.bench.confidence import bootstrap_normalized, normalized_average

    losses = {"lm": torch.full((40,), 2.5, dtype=torch.float64), "cls": torch.ones(10, dtype=torch.bool)}
    kinds = {"lm": "loss", "cls": "accuracy"}
    finetuned = {"lm": 2.0, "cls": 1.0}
    expected = (math.exp(2.0 - 2.5) + 1.0) / 2
    assert normalized_average(losses, finetuned, kinds) == pytest.approx(expected)
    ci = bootstrap_normalized(losses, finetuned, kinds=kinds, resamples=200)
    assert ci.low == pytest.approx(expected) and ci.high == pytest.approx(expected)
