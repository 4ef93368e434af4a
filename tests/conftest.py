"""Shared fixtures: tiny Llama checkpoints built locally with random init (no downloads)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the tests never write into the user's cache (input hashes, zoos)
os.environ.setdefault("MERGESMITH_CACHE", tempfile.mkdtemp(prefix="mergesmith-test-cache-"))


def build_llama(path: Path, seed: int, base: Path | None = None, scale: float = 0.02, *, layers: int = 4,
                tied: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny LlamaForCausalLM saved as safetensors. With ``base``, a 'fine-tune': base + seeded noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                         max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    if base is not None:
        reference = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        model.load_state_dict(reference.state_dict())
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * scale)
    model.to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llamas(tmp_path_factory) -> dict[str, Path]:
    """base + three fine-tunes (float32, untied, 4 layers)."""
    root = tmp_path_factory.mktemp("llamas")
    base = build_llama(root / "base", 0)
    return {"base": base, **{name: build_llama(root / name, seed, base) for name, seed in
                              (("a", 1), ("b", 2), ("c", 3))}}


@pytest.fixture(scope="session")
def tied_llamas(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tied")
    base = build_llama(root / "base", 10, tied=True)
    return {"base": base, "a": build_llama(root / "a", 11, base, tied=True),
            "b": build_llama(root / "b", 12, base, tied=True)}


@pytest.fixture(scope="session")
def bf16_llamas(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bf16")
    base = build_llama(root / "base", 20, dtype=torch.bfloat16)
    return {"base": base, "a": build_llama(root / "a", 21, base, dtype=torch.bfloat16),
            "b": build_llama(root / "b", 22, base, dtype=torch.bfloat16)}


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output folder (single or sharded), via the reference safetensors library."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_method(name: str, base: dict, experts: list[dict], shared: dict | None = None,
               per_model: list[dict] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Run one method over dicts of tensors as the engine does: ``prepare`` over a stream, then the rule."""
    from mergesmith.methods import get_method
    from mergesmith.methods.base import resolve_method_params
    from mergesmith.ops.stream import TensorContext, TensorInputs

    method = get_method(name)
    params = resolve_method_params(method, shared or {}, per_model or [{} for _ in experts])

    def stream():
        for key in base:
            yield TensorInputs(key, base[key], [e[key] for e in experts], params)

    state = method.model_stats(stream, params, seed) if method.model_stats else None
    return {key: method.rule(base[key], [e[key] for e in experts], params,
                             TensorContext(key, seed=seed, state=state)) for key in base}


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """A two-task text zoo on a tiny random BERT (tests/zoo_fixtures.py): base, experts, heads, splits."""
    from zoo_fixtures import build_tiny_zoo

    return build_tiny_zoo(tmp_path_factory.mktemp("zoo"))
