"""The demo's building blocks at a tiny scale: data, tokenizer, training, saved folders, merges, evaluation.

The full demo (python -m mergesmith.bench.llama_demo) takes minutes; this runs the same code with a 1-layer model and a
handful of steps.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mergesmith.bench import llama_demo as demo

TINY = demo.DemoConfig(
    hidden=32,
    layers=1,
    heads=2,
    vocab=300,
    seq_len=32,
    batch=2,
    base_steps=3,
    expert_steps=2,
    python_chars=60_000,
    eval_blocks=4,
)


@pytest.fixture(scope="module")
def corpora() -> dict[str, tuple[list[str], list[str]]]:
    return demo.load_corpora(TINY)


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpora) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("demo")
    return out, demo.build_models(out, TINY, corpora=corpora)


def test_corpora_split_deterministically(corpora):
    assert set(corpora) == {"python", "prose"}
    for train, held in corpora.values():
        assert train and held
        assert not set(train) & set(held)
    assert demo.load_corpora(TINY) == corpora
    python_train = "".join(corpora["python"][0])
    assert "def " in python_train and "import " in python_train
    assert all(demo.is_prose(p) for p in corpora["prose"][0])


def test_split_documents_holds_out_a_fraction():
    docs = [f"doc {i}" for i in range(100)]
    train, held = demo.split_documents(docs, 0.1, seed=0)
    assert len(held) == 10 and len(train) == 90
    assert sorted(train + held, key=docs.index) == docs
    assert demo.split_documents(docs, 0.1, seed=0) == (train, held)
    assert demo.split_documents(docs, 0.1, seed=1) != (train, held)


def test_saved_models_load_with_transformers(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folders = built
    assert set(folders) == {"base", "python", "prose"}
    text = "def f(x):\n    return x ** 2  # squared\n\nThe Licensee shall not — ever — sublicense.\n"
    for role, folder in folders.items():
        assert (folder / "model.safetensors").exists()
        assert demo.is_complete(folder, TINY, role)
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.num_hidden_layers == 1 and not model.config.tie_word_embeddings
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert len(tokenizer) == model.config.vocab_size <= TINY.vocab


def test_experts_differ_from_base_but_keep_vocab_layers(built):
    from transformers import AutoModelForCausalLM

    _, folders = built
    states = {r: AutoModelForCausalLM.from_pretrained(f).state_dict() for r, f in folders.items()}
    for role in ("python", "prose"):
        for name, tensor in states[role].items():
            same = torch.equal(tensor, states["base"][name])
            if "embed_tokens" in name or "lm_head" in name:
                assert same, name
            elif name.endswith("proj.weight"):
                assert not same, name


def test_models_are_reused_unless_rebuild(built, corpora):
    out, folders = built
    stamp = (folders["python"] / "model.safetensors").stat().st_mtime_ns
    assert demo.build_models(out, TINY, corpora=corpora) == folders
    assert (folders["python"] / "model.safetensors").stat().st_mtime_ns == stamp
    assert not demo.is_complete(folders["base"], replace(TINY, base_steps=4), "base")


def test_merges_and_evaluation(built, corpora):
    out, folders = built
    merged = demo.run_merges(out, demo.DEFAULT_RECIPE)
    assert set(merged) == {"linear", "task_arithmetic", "ties"}
    results = demo.evaluate({**folders, **merged}, corpora, TINY)
    for losses in results.values():
        assert set(losses) == {"python", "prose"}
        assert all(math.isfinite(v) and 0 < v < 10 for v in losses.values())
    table = demo.format_table(results)
    assert "ties" in table and "python ppl" in table


def test_recipes_follow_the_output_folder(tmp_path):
    recipes = demo.demo_recipes(demo.DEFAULT_RECIPE, tmp_path / "elsewhere")
    ties = recipes["ties"]
    assert isinstance(ties, dict) and ties["merge_method"] == "ties"
    assert ties["base_model"] == str(tmp_path / "elsewhere" / "models" / "base")
    assert [m["model"] for m in ties["models"]] == [
        str(tmp_path / "elsewhere" / "models" / role) for role in ("python", "prose")
    ]
    assert demo.demo_recipes(demo.DEFAULT_RECIPE, demo.DEFAULT_OUT)["ties"] == demo.DEFAULT_RECIPE


def test_heldout_loss_of_a_random_model_is_near_uniform():
    tokenizer = demo.train_tokenizer(["hello world, hello there. " * 20, "def f():\n    pass\n" * 20], 300)
    model = demo.make_model(TINY, tokenizer)
    blocks = torch.randint(0, len(tokenizer), (3, TINY.seq_len))
    loss = demo.heldout_loss(model, blocks)
    assert math.isfinite(loss) and abs(loss - math.log(len(tokenizer))) < 0.5
