"""The evolve benchmark's budget rule: the best candidate within a budget is the best of the whole generations
that fit in it (the same search stopped earlier)."""

from __future__ import annotations

from mergesmith.bench.zoo.evolve_bench import best_within


def test_best_within_a_budget_reads_whole_generations_only():
    history = [
        {"generation": 0, "results": [{"fitness": 0.1}, {"fitness": 0.3}, {"fitness": None}]},
        {"generation": 1, "results": [{"fitness": 0.2}, {"fitness": 0.5}, {"fitness": 0.4}]},
        {"generation": 2, "results": [{"fitness": 0.9}, {"fitness": 0.0}, {"fitness": 0.1}]},
    ]
    assert best_within(history, 5) == (0, 1, 0.3, 3)  # generation 1 does not fit in 5
    assert best_within(history, 6) == (1, 1, 0.5, 6)
    assert best_within(history, 100) == (2, 0, 0.9, 9)
