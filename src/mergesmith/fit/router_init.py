"""Router rows for an MoE made of dense experts, from prompts (mergekit-moe's gate modes, computed as it does).

For expert e with positive prompts P_e and negative prompts N_e, per layer ℓ:

    g_e^ℓ = normalize(v^ℓ(P_e)),   then, with negative prompts,   g_e^ℓ = normalize(g_e^ℓ − v^ℓ(N_e))

where ``normalize(x) = x / max(‖x‖₂, 1e-8)`` and v^ℓ(prompts) is, by ``gate_mode``:

- ``hidden`` / ``hidden_last``: the base model's hidden state entering layer ℓ at each prompt's last token, averaged
  over the prompts; ``hidden_avg``: averaged over every position (padding included, as mergekit does) and the
  prompts. The base runs in ``bfloat16`` as mergekit loads it (``hidden_dtype: float32`` runs it in fp32).
- ``cheap_embed``: the normalised sum of the prompts' token embeddings (every real token of every prompt), the same
  row for every layer; fp32.
- ``random``: N(0, 1); ``uniform_random``: U(−1/√H, 1/√H) as ``torch.nn.Linear`` initialises, both drawn as one
  ``[L, E, H]`` tensor from a generator seeded with ``seed`` (mergekit with ``--random-seed seed`` draws the same).

Prompts are tokenized as mergekit does: the BOS token's text prepended, no other special tokens, left padding
with the BOS token (EOS when there is none) as padding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")


def prompt_batch(tokenizer: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """mergekit's ``tokenize_prompts``: BOS text + prompt, left-padded, no added special tokens."""
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    bos = tokenizer.bos_token or ""
    return dict(
        tokenizer([bos + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    )


def cheap_embedding(embed: torch.Tensor, batch: Mapping[str, torch.Tensor], layers: int) -> torch.Tensor:
    """``[layers, H]``: the normalised sum of the prompts' token embeddings (padding masked), one row per layer.
    A row lookup is the one-hot product mergekit computes, exactly (one-hot entries are 0 and 1)."""
    h = embed.float()[batch["input_ids"]]
    summed = (h * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)


def hidden_states(module: nn.Module, batch: Mapping[str, torch.Tensor], average: bool) -> torch.Tensor:
    """``[layers, H]``: the hidden state entering each layer (the last token's, or the mean over positions),
    averaged over the prompts, in the module's dtype."""
    with torch.no_grad():
        out = module(**batch, output_hidden_states=True, return_dict=True)
    states = torch.stack(out.hidden_states[:-1])  # [layers, prompts, positions, H]
    states = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
    return states.sum(dim=1) / states.shape[1]


def gate_vectors(
    mode: str,
    prompts: Sequence[tuple[Sequence[str], Sequence[str]]],
    layers: int,
    hidden: int,
    *,
    tokenizer: Any = None,
    embed: torch.Tensor | None = None,
    module: nn.Module | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """``[layers, len(prompts), hidden]``: one router row per (positive, negative) prompt pair and layer (the
    module docstring). ``cheap_embed`` needs ``tokenizer`` and ``embed``; the hidden modes ``tokenizer`` and
    ``module`` (the base, in the dtype to run it in)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (layers, len(prompts), hidden)
    if mode == "random":
        return torch.randn(shape, generator=generator)
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand(shape, generator=generator) * 2 * scale - scale

    def vector(texts: Sequence[str]) -> torch.Tensor:
        batch = prompt_batch(tokenizer, texts)
        if mode == "cheap_embed":
            assert embed is not None
            return cheap_embedding(embed, batch, layers)
        assert module is not None
        return hidden_states(module, batch, average=mode == "hidden_avg")

    rows = []
    for positive, negative in prompts:
        row = vector(positive)
        if negative:
            row -= vector(negative)
        row /= row.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        rows.append(row)
    return torch.stack(rows, dim=0).permute(1, 0, 2)
