"""End to end through the command line on tiny Llama checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import yaml


def mergesmith(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mergesmith", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_merge_loads_in_transformers(llamas, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(llamas["base"]),
                "models": [{"model": str(llamas[k]), "parameters": {"weight": 1.0}} for k in ("a", "b", "c")],
                "parameters": {"density": 0.3, "lambda": 1.0},
                "dtype": "bfloat16",
            }
        )
    )
    out = tmp_path / "merged"
    proc = mergesmith("merge", str(recipe), str(out), "--shard-size", "60KB", "--seed", "3", "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("merged ") and "ties" in proc.stdout
    assert (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert torch.isfinite(logits.float()).all()
    # refused without --force, replaced with it
    again = mergesmith("merge", str(recipe), str(out))
    assert again.returncode == 2 and "--force" in again.stderr
    assert (
        mergesmith("merge", str(recipe), str(out), "--force", "--quiet", "--dtype", "float32").returncode == 0
    )
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32


def test_cli_methods_lists_every_method_with_parameters():
    from mergesmith.methods import all_methods

    listing = mergesmith("methods")
    assert listing.returncode == 0
    for method in all_methods():
        assert method.name in listing.stdout
    ties = mergesmith("methods", "ties")
    assert "density (float, per model) = 0.2 (compat mergekit: 1.0)" in ties.stdout
    assert "Yadav et al." in ties.stdout
    unknown = mergesmith("methods", "tie")
    assert unknown.returncode == 2 and "did you mean 'ties'" in unknown.stderr
