"""What mergesmith knows about model families, in one place: layer indices, renumbering, layer counts, tied
embeddings."""

from __future__ import annotations

import pytest

from mergesmith.arch.embeddings import is_input_side, tied_source, ties_embeddings
from mergesmith.arch.layers import layer_index, num_layers, renumber, with_num_layers


@pytest.mark.parametrize(
    "name, index",
    [
        ("model.layers.7.mlp.up_proj.weight", 7),  # Llama, Mistral, Qwen2
        ("bert.encoder.layer.11.output.dense.weight", 11),  # BERT
        ("transformer.h.0.attn.c_attn.weight", 0),  # GPT-2
        ("blocks.3.norm1.weight", 3),  # ViT-style
        ("model.embed_tokens.weight", None),
        ("model.layers_norm.weight", None),
        ("model.layers.7", None),  # no tensor inside a layer
    ],
)
def test_layer_index(name, index):
    assert layer_index(name) == index


def test_renumber_changes_only_the_layer_number():
    assert renumber("model.layers.7.mlp.layers.2.w", 1) == "model.layers.1.mlp.layers.2.w"
    assert renumber("transformer.h.10.ln_1.bias", 3) == "transformer.h.3.ln_1.bias"
    assert layer_index(renumber("bert.encoder.layer.4.attention.self.query.weight", 0)) == 0


def test_num_layers_from_config_else_names():
    assert num_layers({"num_hidden_layers": 12}, []) == 12
    assert num_layers({"n_layer": 6}, []) == 6
    assert num_layers({}, ["model.layers.0.w", "model.layers.4.w", "lm_head.weight"]) == 5
    assert num_layers({}, ["lm_head.weight"]) == 0


def test_stacked_config_follows_the_layer_order():
    config = {"num_hidden_layers": 3, "layer_types": ["a", "b", "c"], "hidden_size": 8}
    out = with_num_layers(config, 4, [0, 1, 1, 2])
    assert out == {"num_hidden_layers": 4, "layer_types": ["a", "b", "b", "c"], "hidden_size": 8}
    assert config["num_hidden_layers"] == 3  # not modified in place


def test_tied_embeddings():
    stored = {"model.embed_tokens.weight", "transformer.wte.weight"}
    assert ties_embeddings({"tie_word_embeddings": True}) and not ties_embeddings({})
    assert tied_source("lm_head.weight", stored.__contains__) == "model.embed_tokens.weight"
    assert tied_source("model.norm.weight", stored.__contains__) is None
    assert tied_source("lm_head.weight", set().__contains__) is None
    assert is_input_side("transformer.wpe.weight") and not is_input_side("lm_head.weight")
