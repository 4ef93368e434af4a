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
    best = max(ta["grid"], key=lambda g: g["val_score"])["params"]
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
    # every row has its 95 % interval around its estimate, and a paired difference with TA (not TA's own row)
    for row in (ta["default"], results["methods"]["linear"]["default"], results["reference"]["zeroshot"]):
        ci = row["ci"]
        assert ci["low"] <= row["normalized"] <= ci["high"] and ci["estimate"] == pytest.approx(
            row["normalized"]
        )
    assert "vs_task_arithmetic" not in ta["default"]
    diff = results["methods"]["linear"]["default"]["vs_task_arithmetic"]
    assert diff["estimate"] == pytest.approx(
        results["methods"]["linear"]["default"]["normalized"] - ta["default"]["normalized"]
    )
    assert f"{100 * ta['default']['ci']['low']:.1f}" in table
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


@pytest.mark.parametrize("protocol", ["joint", "descriptions", "lpft"])
def test_head_protocols(protocol, tmp_path, monkeypatch):
    """joint: the head trains with the encoder (zero-shot = the base with the trained head; the multi-task
    model keeps its own heads); descriptions: frozen rows of unit class-description embeddings × a scale;
    lpft: a frozen probe. Each manifest's zero-shot accuracy is what the evaluator measures."""
    from safetensors.torch import load_file

    from mergesmith.bench.zoo import text8_data
    from tests.bench.zoo_fixtures import tiny_bert

    monkeypatch.setattr(
        text8_data,
        "CLASS_DESCRIPTIONS",
        {"a": ("apple banana cherry", "river mountain forest"), "b": ("red blue green", "fast slow")},
    )
    config = ZooConfig(
        n_train=40, n_val=20, n_test=20, epochs=1, batch_size=8, lr=1e-3, head_lr=1e-2, probe_steps=20,
        bf16=False, protocol=protocol,
    )  # fmt: skip
    zoo = Zoo(
        build_zoo(
            tasks=["a", "b"],
            cache=tmp_path,
            config=config,
            loader=fixture_task,
            base_model=tiny_bert(tmp_path / "bert"),
        )
    )
    head = zoo.head("a")
    zeroshot = zoo.evaluate(zoo.base, "test")
    assert zeroshot == pytest.approx({t: zoo.manifest["accuracy"]["zeroshot"][t]["test"] for t in zoo.tasks})
    mt_heads = zoo.multitask_heads()
    if protocol == "joint":
        initial = load_file(zoo.root / "tasks" / "a" / "head-init.safetensors")
        assert float(initial["weight"].std()) == pytest.approx(0.02, rel=0.5)
        assert not torch.equal(initial["weight"], head["weight"])  # trained with the encoder
        assert not torch.equal(mt_heads["a"]["weight"], head["weight"])  # the multi-task model's own
    else:
        assert all(torch.equal(mt_heads[t]["weight"], zoo.head(t)["weight"]) for t in zoo.tasks)  # frozen
    if protocol == "descriptions":
        norms = head["weight"].norm(dim=1)
        assert torch.allclose(norms, norms[0].expand_as(norms)) and torch.equal(head["bias"], torch.zeros(2))
    mt = zoo.evaluate(zoo.multitask_path, "test", heads=mt_heads)
    assert mt == pytest.approx({t: zoo.manifest["accuracy"]["multitask"][t]["test"] for t in zoo.tasks})


def test_reference_outcomes_are_cached_and_match_the_manifest(zoo):
    first = zoo.reference_outcomes()
    assert (zoo.root / "reference-outcomes.json").exists()
    again = zoo.reference_outcomes()
    for name, rows in first.items():
        assert all(torch.equal(rows[t], again[name][t]) for t in rows)
        for t in zoo.tasks:
            assert float(rows[t].float().mean()) == pytest.approx(zoo.manifest["accuracy"][name][t]["test"])


def test_description_heads_must_differ(tmp_path):
    """Descriptions the tokenizer cannot tell apart (here: words outside the tiny vocabulary, all [UNK]) would
    give a head whose classes always tie: a one-line error instead."""
    from mergesmith.bench.zoo.models import description_head, load_encoder
    from mergesmith.errors import MergeError
    from tests.bench.zoo_fixtures import tiny_bert

    folder = tiny_bert(tmp_path / "bert")
    from transformers import AutoTokenizer

    encoder, tokenizer = load_encoder(folder), AutoTokenizer.from_pretrained(folder)
    features = torch.ones(4, encoder.config.hidden_size)
    with pytest.raises(MergeError, match="embed identically"):
        description_head(encoder, tokenizer, ["x", "y"], features, bf16=False)
    head = description_head(encoder, tokenizer, ["apple banana", "river forest"], features, bf16=False)
    assert head["weight"].shape == (2, encoder.config.hidden_size)
