"""Embeddings and tied weights: where an untied-looking ``lm_head.weight`` lives in a tied checkpoint, and which
tensors outside the layers belong to the input side (kept from the first slice when layers are stacked)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# The input embedding of the families whose output head may be tied to it (Llama/Mistral/Qwen, GPT-2, bare models).
TIED_INPUT_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight")
INPUT_SIDE_MARKERS = ("embed", "wte", "wpe")


def ties_embeddings(config: dict[str, Any]) -> bool:
    """Whether config.json says the output head shares the input embedding (then only the embedding is stored)."""
    return bool(config.get("tie_word_embeddings", False))


def is_tied_output(tensor_name: str) -> bool:
    """Whether the tensor is an output head that a tied checkpoint stores as its input embedding."""
    return tensor_name.endswith("lm_head.weight")


def tied_source(tensor_name: str, has: Callable[[str], bool]) -> str | None:
    """The name a tied checkpoint stores ``tensor_name`` under (its input embedding), or None."""
    if not is_tied_output(tensor_name):
        return None
    return next((c for c in TIED_INPUT_EMBEDDINGS if has(c)), None)


def is_input_side(tensor_name: str) -> bool:
    """Token and position embeddings (outside the layers, before them)."""
    return any(marker in tensor_name for marker in INPUT_SIDE_MARKERS)
