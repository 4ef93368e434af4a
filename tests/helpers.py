"""Helpers the tests share: tiny checkpoints built locally, output readers, a method run outside the engine.

(Fixtures live in ``conftest.py``, which pytest loads itself; tests import helpers from here, never from conftest.)
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from mergesmith.arch.permutation import PermutationSpec
from mergesmith.ops.permute import invert, permute_state, random_permutations, weight_matching


def build_llama(
    path: Path,
    seed: int,
    base: Path | None = None,
    scale: float = 0.02,
    *,
    layers: int = 4,
    tied: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A tiny LlamaForCausalLM saved as safetensors. With ``base``, a 'fine-tune': base + seeded noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        max_position_embeddings=64,
    )
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


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output folder (single or sharded), via the reference safetensors library."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_method(
    name: str,
    base: dict,
    experts: list[dict],
    shared: dict | None = None,
    per_model: list[dict] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
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
    return {
        key: method.rule(
            base[key], [e[key] for e in experts], params, TensorContext(key, seed=seed, state=state)
        )
        for key in base
    }


def run_mergekit(recipe: dict, out: Path, copy_tokenizer: bool = False) -> dict[str, torch.Tensor]:
    """mergekit itself (in-process) on a recipe dict; its output's tensors."""
    import copy

    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(copy.deepcopy(recipe))
    run_merge(
        config,
        str(out),
        MergeOptions(quiet=True, copy_tokenizer=copy_tokenizer, write_model_card=False, random_seed=0),
    )
    return load_tensors(out)


TINY_DECODER = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def tiny_decoder(model_type: str, seed: int = 0, **config) -> torch.nn.Module:
    """A randomly initialized causal LM of ``model_type`` (llama, mistral, qwen2, qwen3): 2 layers, hidden 32,
    4 query heads over 2 key/value heads (GQA), FFN 48, vocabulary 64; ``config`` overrides any of these."""
    config_class = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[model_type]
    settings = {**TINY_DECODER, **config}
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config_class(**settings)).eval()


def assert_weight_matching_undoes_a_shuffle(
    spec: PermutationSpec, reference: dict[str, torch.Tensor]
) -> None:
    """Weight matching of a randomly permuted copy of ``reference`` finds the shuffle's inverse for every group,
    brings every tensor back bit for bit, and stops after a sweep that gains nothing."""
    perms = random_permutations(spec, seed=11)
    shuffled = permute_state(reference, spec, perms)
    found, report = weight_matching(spec, reference, shuffled, seed=0)
    for group in spec.groups:  # π(shuffled) = reference: the inverse of the shuffle, unit for unit
        assert torch.equal(found[group], invert(perms[group])), group
    back = permute_state(shuffled, spec, found)
    assert all(torch.equal(back[k], reference[k]) for k in reference)
    assert report.gains[-1] == 0.0 and report.sweeps >= 2
