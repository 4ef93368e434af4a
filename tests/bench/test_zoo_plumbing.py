"""The zoo pipeline end to end on a tiny random BERT and fixture tasks: splits, probes, fine-tuning, evaluation
arithmetic, the bench and its reports. No package is fetched."""

from __future__ import annotations

import json

import pytest
import torch

from mergesmith.bench.zoo.text8 import Zoo, ZooConfig, build_zoo, normalized_accuracy, summarize
from tests.bench.zoo_fixtures import fixture_task


@pytest.fixture(scope="module")
def zoo(tiny_zoo):
    return tiny_zoo


def test_zoo_layout_and_manifest(zoo):
    m = zoo.manifest
    assert m["tasks"] == ["a", "b"] and m["multitask"]
    for task in ("a", "b"):
        assert (zoo.encoder_path(task) / "model.safetensors").exists()
        sizes = {s: m["data"][task][s]["n"] for s in ("train", "val", "test")}
        assert sizes == {"train": 40, "val": 20, "test": 20}
        lines = (zoo.root / "data" / task / "test.jsonl").read_text().splitlines()
        assert len(lines) == 20 and {json.loads(x)["label"] for x in lines} == {0, 1}  # stratified
        for kind in ("zeroshot", "finetuned", "multitask"):
            assert 0.0 <= m["accuracy"][kind][task]["test"] <= 1.0
    # every folder has the same tensor names (the merge inputs must line up)
    names = set(zoo.state_dict(zoo.base))
    assert names == set(zoo.state_dict(zoo.encoder_path("a"))) == set(zoo.state_dict(zoo.multitask_path))


def test_evaluation_reproduces_manifest(zoo):
    acc = zoo.evaluate(zoo.encoder_path("a"), "test", tasks=["a"])
    assert acc["a"] == pytest.approx(zoo.manifest["accuracy"]["finetuned"]["a"]["test"])
    zeroshot = zoo.evaluate(zoo.state_dict(zoo.base), "test")
    assert zeroshot == pytest.approx({t: zoo.manifest["accuracy"]["zeroshot"][t]["test"] for t in zoo.tasks})


def test_rebuild_is_deterministic(zoo, tmp_path):
    config = ZooConfig(**zoo.manifest["config"])
    again = build_zoo(
        tasks=["a", "b"],
        cache=tmp_path,
        config=config,
        loader=fixture_task,
        base_model=zoo.base,
        multitask=False,
    )
    a1, a2 = zoo.state_dict(zoo.encoder_path("b")), Zoo(again).state_dict(Zoo(again).encoder_path("b"))
    assert all(torch.equal(a1[k], a2[k]) for k in a1)


def test_normalized_accuracy_arithmetic():
    acc, ft = {"a": 0.45, "b": 0.8}, {"a": 0.9, "b": 0.8}
    assert normalized_accuracy(acc, ft) == {"a": 0.5, "b": 1.0}
    assert summarize(acc, ft) == {"average": pytest.approx(0.625), "normalized": pytest.approx(0.75)}


def test_bench_and_reports(zoo, tmp_path, monkeypatch):
    from mergesmith.bench.zoo import bench

    monkeypatch.setitem(
        bench.BENCH_METHODS,
        "task_arithmetic",
        bench.BenchMethod("task_arithmetic", {"lambda": 0.3}, bench.grid(**{"lambda": (0.3, 1.0)})),
    )
    results = bench.run_bench(
        zoo, methods=["linear", "task_arithmetic", "dare_linear"], seeds=2, progress=False
    )
    ta = results["methods"]["task_arithmetic"]
    assert [g["params"] for g in ta["grid"]] == [{"lambda": 0.3}, {"lambda": 1.0}]
    best = max(ta["grid"], key=lambda g: g["val_average"])["params"]
    assert ta["best"]["params"] == best
    assert (
        len(results["methods"]["dare_linear"]["best"]["runs"]) == 2
    )  # random: one run per seed at the chosen
    assert len(results["methods"]["dare_linear"]["default"]["runs"]) == 1
    assert len(results["methods"]["linear"]["default"]["runs"]) == 1
    row = ta["default"]
    assert row["average"] == pytest.approx(sum(row["accuracy"].values()) / 2)
    paths = bench.write_reports(results, tmp_path, "tiny")
    table = paths["md"].read_text()
    assert "fine-tuned" in table and "`task_arithmetic`" in table and "norm. avg" in table
    assert paths["png"].stat().st_size > 1000
    assert json.loads(paths["json"].read_text())["tasks"] == ["a", "b"]


def test_combine_runs_in_method_order():
    from mergesmith.bench.zoo.bench import combine

    base = {"tasks": ["a"], "config": {"n": 1}, "reference": {}, "seconds": 1.0}
    part1 = {**base, "methods": {"tsv": {"x": 1}}}
    part2 = {**base, "methods": {"linear": {"x": 2}}, "seconds": 2.0}
    joined = combine([part1, part2])
    assert list(joined["methods"]) == ["linear", "tsv"] and joined["seconds"] == 3.0
    with pytest.raises(ValueError):
        combine([part1, {**part2, "tasks": ["b"]}])
