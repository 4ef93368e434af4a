"""The speed benchmark's harness on a tiny Llama: checkpoints, recipes, whole-process measurement, floors, the
comparison with mergekit and the report (the timings themselves are not tested)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mergesmith.bench import speed


def test_speed_harness_end_to_end(tmp_path):
    args = argparse.Namespace(
        sizes="tiny",
        methods="linear,ties,ties_paper",
        runs=1,
        runs_by_size="",
        work=tmp_path / "work",
        out=tmp_path / "speed",
        no_mergekit=False,
        baseline=None,
    )
    results = speed.run_benchmark(args)
    tiny = results["sizes"]["tiny"]
    assert tiny["parameters"] == speed.parameter_count("tiny")
    linear = tiny["methods"]["linear"]
    assert set(linear["tools"]) == {"mergesmith", "mergekit", "io", "naive"}
    for tool in linear["tools"].values():
        assert tool["median_seconds"] > 0 and tool["peak_rss_mb"] >= tool["peak_anon_mb"] > 0
    # linear: mergesmith, mergekit and the naive loop compute the same weighted mean (to bf16 rounding)
    assert (
        linear["compare"]["beyond_one_bf16_ulp"] == 0 and linear["compare_naive"]["beyond_one_bf16_ulp"] == 0
    )
    assert "mergekit" not in tiny["methods"]["ties_paper"]["tools"]  # the paper's TIES has no mergekit twin
    speed.write_reports(results, args.out)
    table = (tmp_path / "speed.md").read_text()
    assert "| tiny | linear |" in table and "I/O floor" in table


def test_a_baseline_checkout_runs_beside_this_one(tmp_path):
    """``--baseline SRC`` runs another checkout's mergesmith on the same recipes, alternately, and reports the
    speed-up and the largest difference of the outputs (here the same source: no difference)."""
    src = Path(__file__).resolve().parents[2] / "src"
    args = argparse.Namespace(
        sizes="tiny",
        methods="ties",
        runs=1,
        runs_by_size="",
        work=tmp_path / "work",
        out=tmp_path / "speed",
        no_mergekit=True,
        baseline=src,
    )
    results = speed.run_benchmark(args)
    entry = results["sizes"]["tiny"]["methods"]["ties"]
    assert (
        set(entry["tools"]) == {"mergesmith", "baseline"} and entry["compare_baseline"]["max_abs_diff"] == 0
    )
    assert results["baseline"]["src"] == str(src)
    assert "| tiny | ties | 1 |" in speed.markdown(results).split("Against the baseline")[1]


def test_checkpoints_are_llamas_with_the_planned_sizes(tmp_path):
    from transformers import AutoConfig

    base = speed.make_checkpoint(tmp_path / "base", "tiny", 0)
    expert = speed.make_checkpoint(tmp_path / "ft", "tiny", 1, base)
    from mergesmith.io.reader import CheckpointSource

    a, b = CheckpointSource(base), CheckpointSource(expert)
    assert sum(a.get(n).numel() for n in a.keys()) == speed.parameter_count("tiny")
    assert AutoConfig.from_pretrained(base).model_type == "llama"
    delta = (
        b.get("model.layers.0.mlp.up_proj.weight").float()
        - a.get("model.layers.0.mlp.up_proj.weight").float()
    )
    assert 0 < float(delta.std()) < 0.01 and a.get("model.norm.weight").dtype == torch.bfloat16
