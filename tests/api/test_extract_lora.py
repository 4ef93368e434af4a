"""``mergesmith extract-lora``: the adapter loads with PEFT, W_base + B A is the truncated SVD of each layer's
difference (its relative error equals the Eckart–Young bound), an exactly low-rank fine-tune comes back exactly,
``--energy`` picks per-layer ranks, and mergesmith's own LoRA reader gives PEFT's merged weights."""

from __future__ import annotations

import json

import pytest
import torch

from mergesmith import merge
from mergesmith.api.extract_lora import extract_lora
from mergesmith.cli import main
from mergesmith.errors import RecipeError
from tests.helpers import build_llama, load_tensors


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base and a fine-tune whose q/v/embedding differences are exactly rank 2 and whose up_proj's is full rank;
    one norm differs too."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("extract")
    base = build_llama(root / "base", 0)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj", "v_proj", "embed_tokens")):
                u = torch.randn(p.shape[0], 2, generator=g)
                v = torch.randn(2, p.shape[1], generator=g)
                p.add_(0.01 * u @ v)
            elif "up_proj" in name:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
            elif name == "model.norm.weight":
                p.add_(0.1)
    model.save_pretrained(root / "tuned")
    return root


def test_extracted_adapter_is_the_truncated_svd_and_loads_with_peft(pair, tmp_path, capsys):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    code = main(
        ["extract-lora", str(pair / "base"), str(pair / "tuned"), str(tmp_path / "lora"), "--rank", "2"]
    )
    assert code == 0 and "LoRA layers (rank 2–2)" in capsys.readouterr().out
    report = json.loads((tmp_path / "lora" / "extraction.json").read_text())
    base, tuned = load_tensors(pair / "base"), load_tensors(pair / "tuned")
    for module, layer in report["layers"].items():
        assert layer["relative_error"] == pytest.approx(layer["bound"], abs=1e-4), module
        if any(k in module for k in ("q_proj", "v_proj", "embed_tokens")):
            assert layer["relative_error"] < 1e-4  # exactly rank 2: recovered
        else:
            assert layer["relative_error"] > 0.5  # full-rank noise: most of it is beyond rank 2
    assert set(report["left_out"]) == {"model.norm.weight"}

    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(pair / "base"), tmp_path / "lora")
    merged = {k: v.detach() for k, v in peft.merge_and_unload().state_dict().items()}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(merged[name], tuned[name], atol=1e-5, rtol=0)
    up = "model.layers.1.mlp.up_proj.weight"
    delta = tuned[up] - base[up]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    torch.testing.assert_close(merged[up], base[up] + (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=0)

    # mergesmith reads the adapter as PEFT merges it
    merge(
        {"merge_method": "linear", "models": [f"{pair / 'base'}+{tmp_path / 'lora'}"]},
        tmp_path / "ours",
        progress=False,
    )
    ours = load_tensors(tmp_path / "ours")
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, merged[name], atol=1e-5, rtol=0)


def test_energy_picks_ranks_per_layer(pair, tmp_path):
    report = extract_lora(
        str(pair / "base"), str(pair / "tuned"), tmp_path / "e", rank=8, energy=0.99, progress=False
    )
    ranks = {m: v["rank"] for m, v in report.layers.items()}
    assert all(ranks[m] == 2 for m in ranks if "q_proj" in m)  # rank-2 differences keep all energy at k = 2
    assert all(ranks[m] == 8 for m in ranks if "up_proj" in m)  # full-rank noise hits the cap
    config = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    # PEFT honours the per-layer ranks and alphas: its merge equals mergesmith's reading of the adapter
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(pair / "base"), tmp_path / "e")
    merged = peft.merge_and_unload().state_dict()
    merge(
        {"merge_method": "linear", "models": [f"{pair / 'base'}+{tmp_path / 'e'}"]},
        tmp_path / "ours",
        progress=False,
    )
    for name, tensor in load_tensors(tmp_path / "ours").items():
        torch.testing.assert_close(tensor, merged[name].detach(), atol=1e-5, rtol=0)
    with pytest.raises(RecipeError, match="--energy must be in"):
        extract_lora(str(pair / "base"), str(pair / "tuned"), tmp_path / "bad", energy=1.5)
    assert not (tmp_path / "bad").exists()
