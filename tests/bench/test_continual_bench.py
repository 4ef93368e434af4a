"""The continual benchmark on the tiny two-task text zoo: curves over orders, the α ablation, resuming, the
report, and one add's peak memory measured in a fresh process."""

from __future__ import annotations

import pytest

from mergesmith.api import merge_state_dicts
from mergesmith.bench.zoo import continual_bench
from mergesmith.bench.zoo.continual_bench import (
    ContinualBenchConfig,
    interval,
    run_continual_bench,
    task_orders,
)
from mergesmith.bench.zoo.text8 import normalized_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_orders_are_seeded_permutations_and_the_interval_is_a_t_interval():
    orders = task_orders(["a", "b", "c"], 4, 0)
    assert orders == task_orders(["a", "b", "c"], 4, 0) and all(sorted(o) == ["a", "b", "c"] for o in orders)
    ci = interval([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["high"] - 2.0 == pytest.approx(4.302653 * 1.0 / 3**0.5, rel=1e-5)


def test_the_bench_scores_every_arrival_and_resumes(tiny_zoo, tmp_path, monkeypatch):
    zoo = tiny_zoo
    config = ContinualBenchConfig(orders=2, alphas=(0.5, 0.9), eval_limit=10)
    results = run_continual_bench(zoo.root, tmp_path, config, progress=False)
    assert set(results["summary"]) == {"opcm", "task_arithmetic", "ties", "average"}
    for by_kind in results["summary"].values():
        assert len(by_kind["seen"]) == len(by_kind["all"]) == 2
    opcm_first = [run[0] for run in results["curves"]["opcm"]["seen"]]
    assert all(v == pytest.approx(1.0) for v in opcm_first)  # one model: its own expert, normalized 1
    assert set(results["alpha_ablation"]) == {"0.5", "0.9"}
    # the offline ceiling is merged on this zoo: task arithmetic at λ 0.3 equals a direct merge's evaluation
    offline = results["offline"]
    assert set(offline) == {"task_arithmetic", "ties", "tsv"}
    direct = merge_state_dicts(zoo.base_state(), zoo.expert_states(), "task_arithmetic", **{"lambda": 0.3})
    accuracy = normalized_accuracy(zoo.evaluate(direct), zoo.finetuned_accuracy())
    assert offline["task_arithmetic"]["normalized"] == pytest.approx(sum(accuracy.values()) / len(accuracy))
    assert all(r["ci"]["low"] <= r["normalized"] <= r["ci"]["high"] for r in offline.values())
    assert (tmp_path / "continual.md").read_text().startswith("# Continual merging")
    assert (tmp_path / "continual.png").stat().st_size > 0
    monkeypatch.setattr(continual_bench, "add_model", lambda *a: pytest.fail("a finished add ran again"))
    again = run_continual_bench(zoo.root, tmp_path, config, progress=False)
    assert again["summary"] == results["summary"]


def test_each_adds_time_and_peak_memory_are_measured_in_its_own_process(tmp_path):
    results = continual_bench.run_memory_bench(tmp_path / "models", tmp_path / "out", "tiny", 1)
    assert [row["models"] for row in results["adds"]] == [1]
    assert all(row["peak_rss_mib"] > 50 and row["seconds"] > 0 for row in results["adds"])
    assert (
        (tmp_path / "out" / "continual-memory-tiny.md")
        .read_text()
        .startswith("# Continual merging: OPCM adds")
    )
