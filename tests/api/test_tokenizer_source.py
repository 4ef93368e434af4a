"""``tokenizer_source``: base, a model folder or a Hub id, checked before the merge: the output's tokenizer files
are written and load; a source without a tokenizer and a vocabulary larger than the merged embeddings are one-line
errors that leave nothing behind (``union``: tests/api/test_vocabulary.py)."""

from __future__ import annotations

import pytest
import torch

from mergesmith import merge
from mergesmith.errors import RecipeError
from tests.fit.tiny_models import build_tokenizer, config


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("tok-llamas")
    for seed, name in enumerate(("base", "a", "b")):
        torch.manual_seed(seed)
        LlamaForCausalLM(config("llama")).save_pretrained(root / name)  # 96 embedding rows
    build_tokenizer(root / "base", with_cls=False)  # 88 tokens
    build_tokenizer(root / "tok", with_cls=False)
    return root


def recipe(root, **extra) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / "a")}, {"model": str(root / "b")}],
        **extra,
    }


@pytest.mark.parametrize("source", ["base", "tok"])
def test_output_tokenizer_loads_and_generates(with_tokenizer, tmp_path, source):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = source if source == "base" else str(with_tokenizer / source)
    merge(recipe(with_tokenizer, tokenizer_source=spec), tmp_path / "out", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = tokenizer("alpha beta", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_bad_tokenizer_sources_are_one_line_errors(with_tokenizer, llamas, tmp_path):
    cases = [
        (recipe(with_tokenizer, tokenizer_source=str(with_tokenizer / "a")), "no tokenizer files there"),
        # 88 tokens over the 64-row embeddings of the small llamas
        (
            {
                "merge_method": "linear",
                "models": [{"model": str(llamas["a"])}, {"model": str(llamas["b"])}],
                "tokenizer_source": str(with_tokenizer / "tok"),
            },
            "88 tokens, but the merged embeddings have 64 rows",
        ),
    ]
    for i, (bad, message) in enumerate(cases):
        with pytest.raises(RecipeError, match=message):
            merge(bad, tmp_path / f"out{i}", progress=False)
        assert not (tmp_path / f"out{i}").exists()
