"""LoRA adapters as merge inputs: ``BASE+ADAPTER`` and a PEFT adapter folder, applied tensor by tensor, give the
same merge as PEFT's ``merge_and_unload`` model (plain LoRA, rsLoRA with an alpha pattern, an embedding adapter and
``modules_to_save``); an adapter of another base, a DoRA adapter and a folder that is no adapter are one-line
errors that write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergesmith import merge
from mergesmith.errors import CheckpointError
from tests.helpers import build_llama, load_tensors

VARIANTS = {
    "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "rslora": {
        "r": 4,
        "lora_alpha": 16,
        "use_rslora": True,
        "target_modules": ["q_proj", "k_proj", "gate_proj"],
        "alpha_pattern": {"gate_proj": 4},
    },
    "embedding": {
        "r": 2,
        "lora_alpha": 2,
        "target_modules": ["embed_tokens", "o_proj"],
        "modules_to_save": ["lm_head"],
    },
}


def make_adapter(base: Path, out: Path, settings: dict, seed: int) -> tuple[Path, Path]:
    """A PEFT adapter of ``base`` with random A and B (PEFT starts B at 0), and PEFT's merged model of it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(out / "adapter")
    peft_model.merge_and_unload().save_pretrained(out / "peft-merged")
    return out / "adapter", out / "peft-merged"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    base = build_llama(root / "base", 0)
    build_llama(root / "other", 1, base)
    return root


def same(a: Path, b: Path) -> None:
    x, y = load_tensors(a), load_tensors(b)
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapter_merge_equals_merging_the_peft_merged_model(models, tmp_path, variant):
    adapter, merged = make_adapter(models / "base", tmp_path, VARIANTS[variant], seed=len(variant))
    base, other = str(models / "base"), str(models / "other")

    def recipe(model: str) -> dict:
        return {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "parameters": {"lambda": 0.7},
            "models": [{"model": model}, {"model": other}],
        }

    merge(recipe(str(merged)), tmp_path / "reference", progress=False)
    merge(recipe(f"{base}+{adapter}"), tmp_path / "plus", progress=False)
    same(tmp_path / "reference", tmp_path / "plus")
    # the adapter folder alone: its config names the base
    merge(recipe(str(adapter)), tmp_path / "folder", progress=False)
    same(tmp_path / "reference", tmp_path / "folder")


def test_bad_adapters_are_one_line_errors(models, tmp_path):
    adapter, _ = make_adapter(models / "base", tmp_path, VARIANTS["lora"], seed=3)
    wide = build_llama(tmp_path / "wide", 0, layers=2)  # another base: 2 layers
    cases = [
        (f"{wide}+{adapter}", "the adapter patches 'model.layers.2.*', which .*wide does not have"),
        (f"{models / 'base'}+{models / 'other'}", "not a PEFT adapter folder"),
    ]
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "use_dora": True}))
    cases.append((str(dora), "a DoRA adapter"))
    for i, (model, message) in enumerate(cases):
        recipe = {"merge_method": "linear", "models": [{"model": model}, {"model": str(models / "other")}]}
        with pytest.raises(CheckpointError, match=message):
            merge(recipe, tmp_path / f"out{i}", progress=False)
        assert not (tmp_path / f"out{i}").exists()
