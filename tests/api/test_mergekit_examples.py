"""mergekit's six example recipes (``examples/*.yml`` of its repository: linear, bio-merge, gradient-slerp,
orcamini-platy-44layer, ties, mega), each as written except that the Hub ids point at tiny local Llamas and layer
ranges are scaled to their 4 layers. Under ``--compat mergekit`` each gives mergekit's tensors: the linear,
SLERP and passthrough examples as written (mergekit computes in their float16, mergesmith in fp32 with one rounding:
equal to float16 rounding); the two TIES examples with ``dtype: float32``, because mergekit *trims in float16*, so
its top-k picks other elements wherever float16 rounding ties magnitudes (about 0.2 % of the elements here, each
off by a whole task-vector entry) — the dtype difference the README's "Paper vs mergekit" names. ``ties.yml`` names
``ranked_ties``, which mergekit 0.1.5 does not have either: a one-line error in both."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from mergesmith import merge
from mergesmith.api.multi import run_multi
from mergesmith.errors import RecipeError
from tests.helpers import load_tensors, run_mergekit

pytest.importorskip("mergekit")


def examples(m: dict[str, Path]) -> dict[str, dict]:
    base, a, b, c = (str(m[k]) for k in ("base", "a", "b", "c"))
    return {
        "linear": {
            "models": [
                {"model": a, "parameters": {"weight": 1.0}},
                {"model": b, "parameters": {"weight": 0.3}},
                {"model": c, "parameters": {"weight": 0.5}},
            ],
            "merge_method": "linear",
            "dtype": "float16",
        },
        "bio-merge": {
            "models": [
                {"model": a, "parameters": {"density": 0.5, "weight": 0.5}},
                {"model": b, "parameters": {"density": 0.5, "weight": 0.5}},
            ],
            "merge_method": "ties",
            "base_model": base,
            "parameters": {"normalize": False, "int8_mask": True},
            "dtype": "float16",
        },
        "gradient-slerp": {
            "slices": [
                {"sources": [{"model": a, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4]}]}
            ],
            "merge_method": "slerp",
            "base_model": a,
            "parameters": {
                "t": [
                    {"pattern": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"pattern": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "float16",
        },
        "orcamini-platy-44layer": {
            "slices": [
                {"sources": [{"model": a, "layer_range": [0, 3]}]},
                {"sources": [{"model": b, "layer_range": [1, 4]}]},
            ],
            "merge_method": "passthrough",
            "dtype": "float16",
        },
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        # float16 outputs: mergekit rounds inside its arithmetic, mergesmith once at the end
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=4e-3, atol=2e-4, msg=name)


@pytest.mark.parametrize("name", ["linear", "bio-merge", "gradient-slerp", "orcamini-platy-44layer"])
def test_example_gives_mergekits_tensors(name, llamas, tmp_path):
    recipe = examples(llamas)[name]
    if recipe["merge_method"] == "ties":
        recipe["dtype"] = "float32"  # mergekit trims in the recipe's dtype (see the module docstring)
    want = run_mergekit(recipe, tmp_path / "mergekit")
    merge({**recipe, "compat": "mergekit"}, tmp_path / "mergesmith", progress=False)
    assert_same(load_tensors(tmp_path / "mergesmith"), want)


def test_pattern_is_read_as_a_filter_by_default(llamas, tmp_path, caplog):
    """gradient-slerp.yml writes pattern:, which mergekit ignores (every tensor gets the first gradient); by
    default mergesmith reads it as the filter it means, and says so."""
    caplog.set_level(logging.WARNING, logger="mergesmith")
    merge(examples(llamas)["gradient-slerp"], tmp_path / "paper", progress=False)
    assert any("pattern 'self_attn' is read as filter:" in r.getMessage() for r in caplog.records)
    merge({**examples(llamas)["gradient-slerp"], "compat": "mergekit"}, tmp_path / "mk", progress=False)
    paper, mk = load_tensors(tmp_path / "paper"), load_tensors(tmp_path / "mk")
    mlp = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(paper[mlp], mk[mlp])  # the mlp gradient applies to mlp tensors only by default
    attn = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(paper[attn], mk[attn])  # the first entry's gradient, in both


def test_ranked_ties_is_unknown_to_both(llamas, tmp_path):
    recipe = {
        "models": [
            {"model": str(llamas["a"]), "parameters": {"density": [0.8, 0.3, 0.1], "weight": [1.0, 0.8, 0.5]}}
        ],
        "merge_method": "ranked_ties",
        "base_model": str(llamas["base"]),
        "parameters": None,
        "dtype": "bfloat16",
    }
    with pytest.raises(RecipeError, match="ranked_ties"):
        merge(recipe, tmp_path / "out", progress=False)
    with pytest.raises(Exception):  # noqa: B017 (mergekit's own error type)
        run_mergekit(recipe, tmp_path / "mergekit")


def test_mega_multi_document_file(llamas, tmp_path, monkeypatch):
    """mega.yml: a slerp written to out_path, then a TIES merge that reads it by that path."""
    monkeypatch.chdir(tmp_path)
    base, a, b, c = (str(llamas[k]) for k in ("base", "a", "b", "c"))
    first = {
        "slices": [{"sources": [{"model": a, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4]}]}],
        "merge_method": "slerp",
        "base_model": a,
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
        "dtype": "float32",  # read by the TIES merge below: float16 rounding would move its top-k
    }
    second = {
        "models": [
            {"model": "./models/gradient-slerp", "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
            {
                "model": c,
                "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]},
            },
        ],
        "merge_method": "ties",
        "base_model": base,
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32",  # a TIES merge: mergekit trims in the recipe's dtype (see the module docstring)
    }
    docs = [
        {**first, "out_path": "./models/gradient-slerp"},
        {**second, "out_path": "./models/gradient-slerp-ties"},
    ]
    (tmp_path / "mega.yml").write_text(yaml.safe_dump_all(docs))
    run_multi(
        tmp_path / "mega.yml", tmp_path / "work", compat="mergekit", progress=False, report=lambda _: None
    )
    ours = load_tensors(tmp_path / "models" / "gradient-slerp-ties")
    run_mergekit(first, tmp_path / "mk" / "gradient-slerp")
    theirs = run_mergekit(
        {
            **second,
            "models": [
                {**second["models"][0], "model": str(tmp_path / "mk" / "gradient-slerp")},
                second["models"][1],
            ],
        },
        tmp_path / "mk" / "gradient-slerp-ties",
    )
    assert_same(ours, theirs)
