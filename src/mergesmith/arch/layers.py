"""Transformer layers in tensor names and configs: ``model.layers.7.mlp…`` is layer 7 of ``num_hidden_layers``."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

# The layer containers of the Hugging Face families: Llama/Mistral/Qwen `layers`, BERT `layer`, GPT-2 `h`,
# vision and others `blocks` / `block`.
LAYER_PATTERN = re.compile(r"((?:^|\.)(?:layers|layer|h|blocks|block)\.)(\d+)(\.)")
NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_index(tensor_name: str) -> int | None:
    """The transformer-layer number in a tensor name (``model.layers.7.mlp...`` → 7), or None."""
    m = LAYER_PATTERN.search(tensor_name)
    return int(m.group(2)) if m else None


def renumber(tensor_name: str, new_index: int) -> str:
    """The same tensor in layer ``new_index`` (``model.layers.7.mlp.w`` → ``model.layers.2.mlp.w``)."""
    return LAYER_PATTERN.sub(lambda m: f"{m.group(1)}{new_index}{m.group(3)}", tensor_name, count=1)


def num_layers(config: dict[str, Any], tensor_names: Iterable[str]) -> int:
    """The layer count from config.json, else one more than the highest layer index among the tensor names."""
    for key in NUM_LAYERS_KEYS:
        value = config.get(key)
        if isinstance(value, int):
            return value
    indices = [i for i in (layer_index(n) for n in tensor_names) if i is not None]
    return max(indices) + 1 if indices else 0


def with_num_layers(
    config: dict[str, Any], total: int, layer_order: list[int], layer_types: list[Any] | None = None
) -> dict[str, Any]:
    """``config`` for a model of ``total`` layers built from the source layers ``layer_order`` (layer stacking):
    the layer count and a per-layer ``layer_types`` list follow (``layer_types``: each output layer's own, from
    the model it comes from, where known; else the entry of ``config`` at its source index)."""
    out = dict(config)
    old = num_layers(config, ())
    for key in NUM_LAYERS_KEYS:
        if key in out:
            out[key] = total
    if isinstance(out.get("layer_types"), list) and len(out["layer_types"]) == old:
        own = layer_types or [None] * len(layer_order)
        out["layer_types"] = [
            t if t is not None else config["layer_types"][i] for t, i in zip(own, layer_order, strict=True)
        ]
    return out
