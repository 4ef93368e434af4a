"""The streaming engine on tiny Llama checkpoints: sharding, dtypes, tied embeddings, slices, atomicity, pickle."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from mergesmith import CheckpointError, MergeError, merge
from mergesmith.io.writer import parse_size
from tests.helpers import build_llama, load_tensors


def ta_recipe(models: dict[str, Path], **extra) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["a"]), "parameters": {"weight": 0.6}},
            {"model": str(models["b"]), "parameters": {"weight": 0.4}},
        ],
        **extra,
    }


def expected_ta(models: dict[str, Path], name: str) -> torch.Tensor:
    base, a, b = (load_tensors(models[k])[name].float() for k in ("base", "a", "b"))
    return base + (0.6 * (a - base) + 0.4 * (b - base))


def test_sharded_round_trip_equals_single_file(llamas, tmp_path):
    single = merge(ta_recipe(llamas), tmp_path / "single", progress=False)
    sharded = merge(ta_recipe(llamas), tmp_path / "sharded", shard_size="40KB", progress=False)
    assert single.shards == 1 and sharded.shards > 3
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {
        p.name for p in (tmp_path / "sharded").glob("model-*.safetensors")
    }
    one, many = load_tensors(tmp_path / "single"), load_tensors(tmp_path / "sharded")
    assert one.keys() == many.keys() == set(index["weight_map"])
    assert all(torch.equal(one[k], many[k]) for k in one)
    for name in one:
        assert torch.allclose(one[name], expected_ta(llamas, name), atol=1e-6)
    # the sharded folder is a valid HF model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_output_folder_contents(llamas, tmp_path):
    merge(ta_recipe(llamas, seed=5), tmp_path / "out", progress=False)
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "task_arithmetic" and manifest["seed"] == 5
    inputs = manifest["inputs"][str(llamas["a"])]
    assert str(llamas["a"] / "model.safetensors") in inputs and len(next(iter(inputs.values()))) == 64
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    # the card names the models, not their local paths
    assert front["base_model"] == ["base", "a", "b"] and "merge" in front["tags"]
    assert str(llamas["base"]) not in card  # names only, in the recipe too
    saved = (out / "mergesmith_recipe.yaml").read_text()
    assert str(llamas["base"]) in saved  # the saved recipe keeps the paths: it reruns the merge
    recipe = yaml.safe_load((out / "mergesmith_recipe.yaml").read_text())
    assert recipe["merge_method"] == "task_arithmetic"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_bf16_inputs_compute_in_fp32_and_keep_dtype(bf16_llamas, tmp_path):
    merge(ta_recipe(bf16_llamas), tmp_path / "out", progress=False)
    out = load_tensors(tmp_path / "out")
    name = "model.layers.1.mlp.up_proj.weight"
    assert out[name].dtype == torch.bfloat16
    # fp32 math, one rounding: every output is the exact result correctly rounded to bf16 (within half an ulp;
    # which side an exact tie lands on depends on fp32 summation order), which bf16 arithmetic would not give
    base, a, b = (load_tensors(bf16_llamas[k])[name].double() for k in ("base", "a", "b"))
    exact = base + 0.6 * (a - base) + 0.4 * (b - base)
    half_ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 8)
    assert bool(((out[name].double() - exact).abs() <= half_ulp * (1 + 1e-5)).all())
    in_bf16 = base.bfloat16() + (
        0.6 * (a.bfloat16() - base.bfloat16()) + 0.4 * (b.bfloat16() - base.bfloat16())
    )
    assert not bool(((in_bf16.double() - exact).abs() <= half_ulp * (1 + 1e-5)).all())
    merge(ta_recipe(bf16_llamas), tmp_path / "f32", dtype="float32", progress=False)
    assert load_tensors(tmp_path / "f32")[name].dtype == torch.float32
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    merge(ta_recipe(bf16_llamas, out_dtype="float16"), tmp_path / "f16", progress=False)
    assert load_tensors(tmp_path / "f16")[name].dtype == torch.float16


def test_tied_embeddings(tied_llamas, tmp_path):
    merge(ta_recipe(tied_llamas), tmp_path / "out", progress=False)
    out = load_tensors(tmp_path / "out")
    assert "lm_head.weight" not in out
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    name = "model.embed_tokens.weight"
    assert torch.allclose(model.model.embed_tokens.weight, expected_ta(tied_llamas, name), atol=1e-6)


def test_tied_expert_with_untied_base(tmp_path):
    base = build_llama(tmp_path / "base", 30)
    tied = build_llama(tmp_path / "tied", 31, tied=True)
    merge(
        {"merge_method": "linear", "models": [{"model": str(base)}, {"model": str(tied)}]},
        tmp_path / "out",
        progress=False,
    )
    out = load_tensors(tmp_path / "out")
    b, t = load_tensors(base), load_tensors(tied)
    # the tied model contributes its input embedding as its lm_head
    assert torch.allclose(out["lm_head.weight"], (b["lm_head.weight"] + t["model.embed_tokens.weight"]) / 2)


def test_passthrough_slices_stack_layers(llamas, tmp_path):
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(llamas["a"]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(llamas["b"]), "layer_range": [1, 4]}]},
        ],
    }
    merge(recipe, tmp_path / "out", progress=False)
    out = load_tensors(tmp_path / "out")
    a, b = load_tensors(llamas["a"]), load_tensors(llamas["b"])
    proj = "self_attn.q_proj.weight"
    assert torch.equal(out[f"model.layers.2.{proj}"], a[f"model.layers.2.{proj}"])
    assert torch.equal(out[f"model.layers.3.{proj}"], b[f"model.layers.1.{proj}"])
    assert torch.equal(out[f"model.layers.5.{proj}"], b[f"model.layers.3.{proj}"])
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.model.layers) == 6 and torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_slices_merge_with_gradient(llamas, tmp_path):
    recipe = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": str(llamas["a"]), "layer_range": [0, 4]},
                    {"model": str(llamas["b"]), "layer_range": [0, 4]},
                ]
            }
        ],
        "parameters": {"weight": 1.0},
    }
    recipe["slices"][0]["sources"][1]["parameters"] = {"weight": [0.0, 3.0]}  # t = layer / 3
    merge(recipe, tmp_path / "out", progress=False)
    out, a, b = (load_tensors(p) for p in (tmp_path / "out", llamas["a"], llamas["b"]))
    name = "model.layers.{}.mlp.down_proj.weight"
    for layer in range(4):
        w = float(layer)  # gradient 0 → 3 over 4 layers
        n = name.format(layer)
        assert torch.allclose(out[n], (a[n] + w * b[n]) / (1 + w), atol=1e-6)


def test_failure_mid_write_leaves_nothing(llamas, tmp_path):
    from mergesmith.methods import task_arithmetic

    calls = {"n": 0}
    original = task_arithmetic.TASK_ARITHMETIC.rule

    def flaky(base, experts, params, ctx):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("injected failure")
        return original(base, experts, params, ctx)

    object.__setattr__(task_arithmetic.TASK_ARITHMETIC, "rule", dataclasses.replace(original, fn=flaky))
    try:
        with pytest.raises(RuntimeError, match="injected"):
            merge(ta_recipe(llamas), tmp_path / "out", shard_size="40KB", threads=2, progress=False)
    finally:
        object.__setattr__(task_arithmetic.TASK_ARITHMETIC, "rule", original)
    assert list(tmp_path.iterdir()) == []  # neither the output nor the temporary folder
    # an existing output survives a failed --force merge untouched
    merge(ta_recipe(llamas), tmp_path / "out", progress=False)
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    object.__setattr__(task_arithmetic.TASK_ARITHMETIC, "rule", dataclasses.replace(original, fn=flaky))
    calls["n"] = 0
    try:
        with pytest.raises(RuntimeError):
            merge(ta_recipe(llamas), tmp_path / "out", force=True, progress=False)
    finally:
        object.__setattr__(task_arithmetic.TASK_ARITHMETIC, "rule", original)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_existing_output_refused_without_force(llamas, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(MergeError, match="--force"):
        merge(ta_recipe(llamas), tmp_path / "out", progress=False)
    merge(ta_recipe(llamas), tmp_path / "out", force=True, progress=False)
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_pickle_refused_without_flag(llamas, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(load_tensors(llamas["a"]), folder / "pytorch_model.bin")
    (folder / "config.json").write_text((llamas["a"] / "config.json").read_text())
    recipe = {"merge_method": "linear", "models": [{"model": str(llamas["b"])}, {"model": str(folder)}]}
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    merge(recipe, tmp_path / "out", allow_pickle=True, progress=False)
    out, a, b = (load_tensors(p) for p in (tmp_path / "out", llamas["a"], llamas["b"]))
    assert all(torch.allclose(out[k], (a[k] + b[k]) / 2) for k in out)


def test_malicious_pickle_is_blocked_even_with_flag(tmp_path, llamas):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("open('" + str(tmp_path / "pwned") + "', 'w').write('x')",))

    folder = tmp_path / "evil"
    folder.mkdir()
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    recipe = {"merge_method": "linear", "models": [{"model": str(llamas["a"])}, {"model": str(folder)}]}
    with pytest.raises(CheckpointError, match="refused or unreadable pickle"):
        merge(recipe, tmp_path / "out", allow_pickle=True, progress=False)
    assert not (tmp_path / "pwned").exists()


def test_threads_do_not_change_bytes(llamas, tmp_path):
    recipe = {**ta_recipe(llamas), "merge_method": "dare_ties", "parameters": {"density": 0.5}}
    merge(recipe, tmp_path / "one", threads=1, progress=False)
    merge(recipe, tmp_path / "four", threads=4, shard_size="5GB", progress=False)
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (
        tmp_path / "four" / "model.safetensors"
    ).read_bytes()


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1000") == 1000
    with pytest.raises(MergeError):
        parse_size("lots")
