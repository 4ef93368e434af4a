"""The alignment benchmark on the tiny digits zoo: every row's pieces, the path's ends, PLeaS at 2× = the
ensemble, the reports, and a rerun that reuses finished pairs."""

from __future__ import annotations

import json

import pytest
import torch

from mergesmith.bench.zoo import align_bench
from mergesmith.bench.zoo.scratch import ScratchZoo, build_scratch_zoo, evaluate
from mergesmith.fit.small_models import load_small_model
from tests.bench.test_scratch_zoo import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    zoo = ScratchZoo(build_scratch_zoo(root=root / "zoo", config=TINY, progress=False))
    out = root / "results"
    return zoo, out, align_bench.run_align_bench(out=out, progress=False, zoo=zoo, name="align-test")


def test_every_pair_has_its_paths_barriers_and_rows(results):
    zoo, _out, found = results
    assert len(found["rows"]) == len(zoo.pairs()) == 4
    for row, pair in zip(found["rows"], zoo.pairs()):
        data = zoo.data(pair.dataset)
        for side, folder in (("model_a", pair.a), ("model_b", pair.b)):
            direct = evaluate(load_small_model(folder)[0], data["test_inputs"], data["test_labels"])
            assert row["accuracy"][side]["estimate"] == pytest.approx(float(direct["correct"].float().mean()))
        for matching in align_bench.MATCHINGS:
            path = row["paths"][matching]
            assert [p["lambda"] for p in path["points"]] == list(align_bench.LAMBDAS)
            assert path["loss_barrier"] >= 0 and path["accuracy_barrier"] >= 0
        acc = row["accuracy"]
        assert all(v["low"] <= v["estimate"] <= v["high"] for v in acc.values())
        config = load_small_model(pair.a)[1]
        if pair.family == "mlp":  # least squares reproduces the ensemble when every unit is kept
            assert abs(acc["pleas@2.0"]["estimate"] - acc["ensemble"]["estimate"]) <= 0.01
            assert row["pleas"]["1.0"]["sizes"] == config["sizes"]
        else:  # BatchNorm statistics recomputed: close to the ensemble, not equal
            assert row["pleas"]["2.0"]["widths"] == [2 * w for w in config["widths"]]
            assert row["pleas"]["1.0"]["widths"] == config["widths"]
        assert 0 <= row["diagnostics_mean"]["relative_distance"] <= 1.0 + 1e-9


def test_reports_and_a_rerun_reuses_every_pair(results, monkeypatch):
    zoo, out, found = results
    assert json.loads((out / "align-test.json").read_text())["rows"] == json.loads(json.dumps(found["rows"]))
    table = (out / "align-test.md").read_text()
    assert "Barriers" in table and "pleas@1.5" in table and (out / "align-test.png").stat().st_size > 0

    def no_run(*args, **kwargs):
        raise AssertionError("a finished pair ran again")

    monkeypatch.setattr(align_bench, "run_pair", no_run)
    again = align_bench.run_align_bench(out=out, progress=False, zoo=zoo, name="align-test")
    assert again["rows"] == found["rows"]


def test_the_speed_table_times_weight_matching_on_a_pair_of_inits(tmp_path):
    from mergesmith.bench.zoo import align_speed

    tiny = align_speed.SMOLLM2_135M | {"vocab_size": 64, "hidden_size": 24, "num_hidden_layers": 2}
    tiny |= {"num_attention_heads": 3, "intermediate_size": 32}
    row = align_speed.time_pair("tiny", tiny)
    assert row["sweeps"] >= 2 and row["seconds"] >= 0 and row["groups"] == 1 + 2 * 2
    state = align_speed.random_state(tiny, 0)
    assert row["parameters"] == sum(v.numel() for k, v in state.items() if k != "lm_head.weight")  # tied


def test_the_path_scores_a_seeded_subset_and_the_merged_rows_every_example(results, monkeypatch):
    zoo, _out, _found = results
    pair = next(p for p in zoo.pairs() if p.family == "mlp")
    monkeypatch.setattr(align_bench, "PATH_EXAMPLES", 100)
    subset = align_bench.path_subset(400)
    assert (
        len(subset) == 100
        and torch.equal(subset, align_bench.path_subset(400))
        and bool((subset.diff() > 0).all())
    )
    row = align_bench.run_pair(zoo, pair, progress=False)
    data = zoo.data(pair.dataset)
    module_a, module_b = load_small_model(pair.a)[0], load_small_model(pair.b)[0]
    on_subset = evaluate(module_a, data["test_inputs"][subset], data["test_labels"][subset])
    start = row["paths"]["naive"]["points"][0]
    assert row["path_test_examples"] == 100 and start["accuracy"] == pytest.approx(on_subset["accuracy"])
    average = {k: (v + module_b.state_dict()[k]) / 2 for k, v in module_a.state_dict().items()}
    module_a.load_state_dict(average)
    merged = evaluate(module_a, data["test_inputs"], data["test_labels"])  # an MLP: no BatchNorm to reset
    assert row["accuracy"]["naive"]["estimate"] == pytest.approx(merged["accuracy"])


def test_width_trends_rank_the_barrier_against_width():
    def row(width, barrier):
        paths = {m: {"loss_barrier": barrier} for m in align_bench.MATCHINGS}
        return {"dataset": "d", "family": "mlp", "setting": "same", "width": width, "paths": paths}

    trends = align_bench.width_trends(
        [row(4, 0.1), row(1, 0.5), row(2, 0.3), {**row(1, 0.2), "family": "resnet"}]
    )
    assert list(trends) == ["d/mlp/same"]  # one width only: no trend
    weight = trends["d/mlp/same"]["weight"]
    assert trends["d/mlp/same"]["widths"] == [1, 2, 4] and weight["loss_barrier"] == [0.5, 0.3, 0.1]
    assert weight["falls"] and weight["spearman"] == pytest.approx(-1.0)
