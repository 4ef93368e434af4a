"""Every user mistake gives a one-line error naming the key, tensor or file, and the CLI shows no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mergesmith import CheckpointError, RecipeError, load_recipe, merge
from mergesmith.io.safetensors_io import save_file
from mergesmith.methods.base import MergeMethod, Param, resolve_method_params
from mergesmith.recipe import load_recipe as parse
from mergesmith.recipe.settings import evaluate_setting


def run_merge(recipe: dict, out: Path) -> None:
    merge(recipe, out, progress=False)


def expect(recipe: dict, tmp_path: Path, error: type, pattern: str) -> str:
    with pytest.raises(error, match=pattern) as info:
        run_merge(recipe, tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message
    assert not (tmp_path / "out").exists()
    return message


def test_unknown_method_suggests(llamas, tmp_path):
    recipe = {
        "merge_method": "tie",
        "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas["a"])}],
    }
    msg = expect(recipe, tmp_path, RecipeError, "unknown merge_method 'tie'")
    assert "did you mean 'ties'" in msg


def test_unknown_parameter_suggests(llamas, tmp_path):
    recipe = {
        "merge_method": "ties",
        "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas["a"]), "parameters": {"densty": 0.5}}],
    }
    msg = expect(recipe, tmp_path, RecipeError, "unknown parameter 'densty'")
    assert "did you mean 'density'" in msg


def test_missing_required_parameter():
    method = MergeMethod(
        name="needs_t",
        rule=lambda *a: None,
        summary="",
        paper="",
        params=(Param("t", float, help="interpolation"),),
    )
    with pytest.raises(RecipeError, match="missing required parameter 't'"):
        resolve_method_params(method, {}, [{}])
    assert resolve_method_params(method, {"t": "0.5"}, [{}])["t"] == 0.5


def test_parameter_type_and_range(llamas, tmp_path):
    recipe = {
        "merge_method": "ties",
        "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas["a"]), "parameters": {"density": 1.5}}],
    }
    expect(recipe, tmp_path, RecipeError, "'density' must be <= 1.0")
    recipe["models"][0]["parameters"] = {"density": "abc"}
    expect(recipe, tmp_path, RecipeError, "'density' must be float")
    recipe["models"][0]["parameters"] = {"density": {"nested": 1}}
    expect(recipe, tmp_path, RecipeError, "parameter 'density'")


def test_base_required_but_absent(llamas, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "models": [{"model": str(llamas["a"])}]}
    expect(recipe, tmp_path, RecipeError, "needs base_model")


def test_missing_model_path(tmp_path, llamas):
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(llamas["a"])}, {"model": "/nonexistent/model"}],
    }
    expect(recipe, tmp_path, RecipeError, "'/nonexistent/model' does not exist")


def _mutated_copy(src: Path, dst: Path, mutate) -> Path:
    from tests.helpers import load_tensors

    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_tensors(src)
    mutate(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_tensor_names_differ(llamas, tmp_path):
    odd = _mutated_copy(llamas["a"], tmp_path / "odd", lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    recipe = {"merge_method": "linear", "models": [{"model": str(llamas["b"])}, {"model": str(odd)}]}
    expect(
        recipe, tmp_path, CheckpointError, "tensor 'model.layers.2.mlp.up_proj.weight' is in .* but not in"
    )


def test_tensor_shapes_differ(llamas, tmp_path):
    def widen(t):
        t["model.norm.weight"] = torch.ones(40)

    odd = _mutated_copy(llamas["a"], tmp_path / "odd", widen)
    recipe = {"merge_method": "linear", "models": [{"model": str(llamas["b"])}, {"model": str(odd)}]}
    msg = expect(recipe, tmp_path, CheckpointError, "tensor 'model.norm.weight': shape \\[32\\]")
    assert "[40]" in msg


def test_layer_range_out_of_bounds(llamas, tmp_path):
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(llamas["a"]), "layer_range": [2, 9]}]}],
    }
    expect(recipe, tmp_path, RecipeError, "layer_range \\[2, 9\\] .* out of bounds \\(it has 4 layers\\)")
    recipe["slices"][0]["sources"][0]["layer_range"] = [3, 1]
    expect(recipe, tmp_path, RecipeError, "layer_range")


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML \\(line"):
        load_recipe(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(bad)
    bad.write_text("merge_method: linear\nmodles: []\n")
    with pytest.raises(RecipeError, match="unknown key 'modles'"):
        load_recipe(bad)


def test_output_inside_input_refused(llamas, tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": str(llamas["a"])}, {"model": str(llamas["b"])}]}
    with pytest.raises(Exception, match="inside input model"):
        merge(recipe, llamas["a"] / "merged", progress=False)
    assert not (llamas["a"] / "merged").exists()


def test_gradient_and_filter_resolution():
    recipe = parse(
        {
            "merge_method": "linear",
            "parameters": {
                "weight": [
                    {"filter": "self_attn", "value": [0.0, 1.0]},
                    {"filter": "mlp", "value": 0.25},
                    {"value": 9.0},
                ]
            },
        }
    )
    setting = recipe.parameters["weight"]
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate_setting(setting, "model.layers.3.mlp.up_proj.weight", 1.0) == 0.25
    assert evaluate_setting(setting, "lm_head.weight", 0.0) == 9.0
    assert evaluate_setting([0.0, 1.0, 4.0], "x", 0.75) == 2.5  # between entries 1 and 2


def test_cli_error_is_one_line_without_traceback(llamas, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(llamas["base"]),
                "models": [{"model": str(llamas["a"]), "parameters": {"densty": 0.5}}],
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mergesmith", "merge", str(recipe), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "densty" in proc.stderr
    assert not (tmp_path / "out").exists()
