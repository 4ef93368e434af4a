"""Tokenizer merging: ``tokenizer_source: union`` and the ``tokenizer:`` block re-index every model's embedding and
LM head to the merged vocabulary (mergekit's rules for tokens a model lacks), giving mergekit's tensors; the output
tokenizer holds every model's tokens, loads, and generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergesmith import merge
from tests.helpers import load_tensors, run_mergekit

SHARED = ["alpha", "beta", "gamma", "delta", "merge", "model", "token"]


def build(folder: Path, words: list[str], seed: int, hidden: int = 16) -> None:
    """A tiny Llama whose embedding has exactly its BPE tokenizer's rows (``hidden`` wide)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([*words, " ".join(words)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vocab")
    build(root / "base", SHARED, 0)
    build(root / "a", [*SHARED, "zebra", "quartz"], 1)
    build(root / "b", [*SHARED, "quartz", "walrus", "<|tool|>"], 2)
    return root


def recipe(root: Path, **extra) -> dict:
    return {
        "merge_method": "linear",
        "base_model": str(root / "base"),
        "models": [
            {"model": str(root / m), "parameters": {"weight": w}}
            for m, w in (("base", 0.5), ("a", 0.3), ("b", 0.2))
        ],
        "dtype": "float32",
        **extra,
    }


@pytest.mark.parametrize(
    "extra",
    [
        {"tokenizer_source": "union"},
        {"tokenizer": {"source": "union", "pad_to_multiple_of": 8}},
        {"tokenizer": {"source": "base", "tokens": {"alpha": {"source": "REF_A", "force": True}}}},
        {"tokenizer": {"source": "union", "tokens": {"walrus": {"source": {"kind": "zero"}}}}},
    ],
    ids=["union", "padded", "forced", "zero"],
)
def test_same_rows_and_vocabulary_as_mergekit(vocab_models, tmp_path, extra):
    """Token for token: mergekit orders a union's new tokens by hash iteration (it varies between runs), mergesmith
    by each model's token ids, so rows are compared through each output's own tokenizer."""
    from transformers import AutoTokenizer

    extra = _resolve_refs(extra, vocab_models)
    want = run_mergekit({**recipe(vocab_models), **extra}, tmp_path / "mergekit", copy_tokenizer=True)
    merge({**recipe(vocab_models), **extra, "compat": "mergekit"}, tmp_path / "ours", progress=False)
    got = load_tensors(tmp_path / "ours")
    ours = AutoTokenizer.from_pretrained(tmp_path / "ours").get_vocab()
    theirs = AutoTokenizer.from_pretrained(tmp_path / "mergekit").get_vocab()
    assert ours.keys() == theirs.keys()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape, name
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            for token, index in ours.items():
                torch.testing.assert_close(got[name][index], want[name][theirs[token]], msg=f"{name} {token}")
            real = len(ours)
            torch.testing.assert_close(got[name][real:], want[name][real:], msg=f"{name} padding")
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    if extra.get("tokenizer_source") == "union" or extra.get("tokenizer", {}).get("source") == "union":
        assert {"zebra", "quartz", "walrus"} <= {t.lstrip("Ġ") for t in ours}


def _resolve_refs(extra: dict, root: Path) -> dict:
    import json

    return json.loads(json.dumps(extra).replace("REF_A", str(root / "a")))


def test_union_output_generates(vocab_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merge(recipe(vocab_models, tokenizer_source="union"), tmp_path / "out", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = tokenizer(
        "walrus zebra quartz", return_tensors="pt"
    ).input_ids  # tokens of a and b, not of the base
    assert int(ids.max()) < model.config.vocab_size
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
