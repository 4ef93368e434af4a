"""`compat: mergekit` gives the same tensors as mergekit itself (run in-process on the same tiny checkpoints).

Random methods are compared at density 1 (no drop), where both are deterministic; their drop/rescale rules are
tested on their own in the method tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergesmith import merge
from tests.helpers import load_tensors, run_mergekit

mergekit = pytest.importorskip("mergekit")


def recipes(m: dict[str, Path]) -> dict[str, dict]:
    base, a, b, c = (str(m[k]) for k in ("base", "a", "b", "c"))
    graded = {"weight": [{"filter": "self_attn", "value": [0.2, 0.9]}, {"value": 0.6}]}
    two = [
        {"model": a, "parameters": {"weight": 1.0, "density": 0.4}},
        {"model": b, "parameters": {"weight": 0.5, "density": [0.2, 0.9]}},
    ]
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": a, "parameters": graded},
                {"model": b, "parameters": {"weight": 0.3}},
                {"model": c, "parameters": {"weight": 0.1}},
            ],
        },
        "linear_unnormalized": {
            "merge_method": "linear",
            "parameters": {"normalize": False},
            "models": [
                {"model": a, "parameters": {"weight": 0.7}},
                {"model": b, "parameters": {"weight": 0.2}},
            ],
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "parameters": {"lambda": 0.7},
            "models": [{"model": a, "parameters": graded}, {"model": b, "parameters": {"weight": 0.4}}],
        },
        "ties": {"merge_method": "ties", "base_model": base, "parameters": {"lambda": 1.2}, "models": two},
        "ties_sum": {
            "merge_method": "ties",
            "base_model": base,
            "parameters": {"normalize": False},
            "models": [*two, {"model": c, "parameters": {"weight": 0.3, "density": 0.7}}],
        },
        "dare_linear": {
            "merge_method": "dare_linear",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.5}},
                {"model": b, "parameters": {"weight": 0.5}},
            ],
        },
        "dare_ties": {
            "merge_method": "dare_ties",
            "base_model": base,
            "parameters": {"lambda": 0.9},
            "models": [
                {"model": a, "parameters": {"weight": 0.6}},
                {"model": b, "parameters": {"weight": 0.7}},
            ],
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "base_model": base,
            "parameters": {"gamma": 0.05},
            "models": two,
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "base_model": base,
            "parameters": {"gamma": 0.02},
            "models": two,
        },
        "della_linear": {
            "merge_method": "della_linear",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.5}},
                {"model": b, "parameters": {"weight": 0.8}},
            ],
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": a,
            "parameters": {"t": [0.0, 0.3, 0.9]},
            "models": [{"model": a}, {"model": b}],
        },
        "nuslerp": {
            "merge_method": "nuslerp",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.3}},
                {"model": b, "parameters": {"weight": 0.6}},
            ],
        },
        "nuslerp_nobase": {
            "merge_method": "nuslerp",
            "parameters": {"nuslerp_flatten": False},
            "models": [
                {"model": a, "parameters": {"weight": 1.0}},
                {"model": b, "parameters": {"weight": 2.0}},
            ],
        },
        "karcher": {"merge_method": "karcher", "models": [{"model": a}, {"model": b}, {"model": c}]},
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": a}, {"model": b}, {"model": c}],
        },
        "sce": {
            "merge_method": "sce",
            "base_model": base,
            # the extra keys a published sce recipe carries: mergekit ignores them, so do we (with a notice)
            "parameters": {"select_topk": 0.3, "normalize": True, "int8_mask": True},
            "models": [{"model": a}, {"model": b}, {"model": c}],
        },
        "sce_all": {
            "merge_method": "sce",
            "base_model": base,
            "models": [{"model": a}, {"model": b}],
        },
        "multislerp": {
            "merge_method": "multislerp",
            "models": [
                {"model": a, "parameters": {"weight": 0.5}},
                {"model": b, "parameters": {"weight": 0.3}},
                {"model": c, "parameters": {"weight": 0.2}},
            ],
        },
        "multislerp_base": {
            "merge_method": "multislerp",
            "base_model": base,
            "parameters": {"normalize_weights": False},
            "models": [
                {"model": a, "parameters": {"weight": 0.6}},
                {"model": b, "parameters": {"weight": [0.2, 0.7]}},
            ],
        },
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": base,
            "parameters": {"t": [0.001, 0.05]},
            "models": [{"model": base}, {"model": a}],
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": base,
            "models": [{"model": base}, {"model": a}],
        },
        "passthrough_slices": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": a, "layer_range": [0, 2]}]},
                {"sources": [{"model": b, "layer_range": [1, 4]}]},
            ],
        },
    }


CASES = [
    "linear",
    "linear_unnormalized",
    "task_arithmetic",
    "ties",
    "ties_sum",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della_linear",
    "slerp",
    "nuslerp",
    "nuslerp_nobase",
    "karcher",
    "model_stock",
    "sce",
    "sce_all",
    "multislerp",
    "multislerp_base",
    "nearswap",
    "arcee_fusion",
    "passthrough_slices",
]


@pytest.mark.parametrize("case", CASES)
def test_same_tensors_as_mergekit(case, llamas, tmp_path):
    recipe = {**recipes(llamas)[case], "dtype": "float32"}
    expected = run_mergekit(recipe, tmp_path / "mergekit")
    merge({**recipe, "compat": "mergekit"}, tmp_path / "mergesmith", progress=False)
    got = load_tensors(tmp_path / "mergesmith")
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.allclose(got[name], expected[name], rtol=1e-5, atol=1e-6), (
            f"{case} {name}: max diff {(got[name] - expected[name]).abs().max().item():.3g}"
        )


def test_paper_defaults_differ_from_mergekit(llamas, tmp_path):
    """The same recipe without compat uses the paper's TIES (global trim, K = 20 %), which mergekit does not."""
    recipe = {
        "merge_method": "ties",
        "base_model": str(llamas["base"]),
        "dtype": "float32",
        "models": [{"model": str(llamas["a"])}, {"model": str(llamas["b"])}],
    }
    merge(recipe, tmp_path / "paper", progress=False)
    merge({**recipe, "compat": "mergekit"}, tmp_path / "mk", progress=False)
    paper, mk = load_tensors(tmp_path / "paper"), load_tensors(tmp_path / "mk")
    assert any(not torch.allclose(paper[k], mk[k]) for k in paper)
