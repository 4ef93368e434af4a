"""The from-scratch zoo's bert family (issue #18): a tiny pair of BERT classifiers pretrained by masked-LM from two
seeds and fine-tuned on fortune topics, built end to end from hand-made Debian fortune files (nothing is
downloaded): folders that transformers loads, two different initializations, test texts kept out of the
pretraining corpus, a deterministic tokenizer, stage reuse and resuming with bit-identical weights, and the
alignment benchmark's row for the pair (paths, barriers, accuracy, PLeaS widening the FFN)."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from mergesmith.bench.zoo import align_bench, scratch, scratch_text
from mergesmith.bench.zoo import text8_data as t8
from mergesmith.bench.zoo.scratch import ScratchZoo, ScratchZooConfig, build_scratch_zoo, evaluate
from mergesmith.bench.zoo.scratch_text import TextConfig
from mergesmith.errors import MergeError
from mergesmith.fit.data import Encoded

# one width, both settings: two masked-LM encoders and four classifiers in a few seconds on one core
TINY_BERT = ScratchZooConfig(
    datasets=(),
    widths={"bert": (1,)},
    epochs={"bert": 3},
    text=TextConfig(
        n_train=80,
        n_test=40,
        vocab_size=160,
        max_length=32,
        mlm_steps=12,
        mlm_batch=8,
        fine_tune_batch=16,
    ),
)

TOPIC_WORDS = {
    "computers": "kernel compiler program bug unix software byte debugger keyboard linux code server",
    "politics": "senator vote election government president law party congress tax campaign democracy minister",
    "science": "atom physics experiment theory chemist laboratory molecule gravity telescope biology hypothesis",
    "men-women": "husband wife marriage love woman man romance wedding girlfriend boyfriend kiss divorce",
}
COMMON = ["the", "a", "is", "of", "and", "to", "never", "always", "every", "when", "you", "my", "it", "that"]


def fortune(rng: random.Random, words: list[str]) -> str:
    picks = [
        rng.choice(words) if rng.random() < 0.5 else rng.choice(COMMON) for _ in range(rng.randint(8, 14))
    ]
    return " ".join(picks).capitalize() + "."


def write_fortune_file(path: Path, entries: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n%\n".join(entries) + "\n")


def fake_fortunes(cache: Path) -> Path:
    """A mergesmith cache whose ``debs/`` holds unpacked ``fortunes`` (four topic files and one other) and
    ``fortunes-min`` (one file), as :func:`~mergesmith.bench.zoo.cache.fetch_deb` leaves them."""
    rng = random.Random(0)
    every = [w for words in TOPIC_WORDS.values() for w in words.split()]
    for package in scratch_text.FORTUNE_PACKAGES:
        (cache / "debs" / package).mkdir(parents=True)
        (cache / "debs" / package / ".unpacked").write_text("fake\n")
    games = cache / "debs" / "fortunes" / "root" / t8.FORTUNE_DIR
    for topic, words in TOPIC_WORDS.items():
        write_fortune_file(games / topic, [fortune(rng, words.split()) for _ in range(40)])
    write_fortune_file(games / "cookie", [fortune(rng, every) for _ in range(60)])
    write_fortune_file(games / "ascii-art", ["(skipped: not prose) " * 3])
    minimal = cache / "debs" / "fortunes-min" / "root" / t8.FORTUNE_DIR / "fortunes"
    write_fortune_file(minimal, [fortune(rng, every) for _ in range(20)])
    return cache


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return fake_fortunes(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, cache) -> ScratchZoo:
    root = tmp_path_factory.mktemp("bert-zoo")
    return ScratchZoo(build_scratch_zoo(root=root, config=TINY_BERT, progress=False, text_cache=cache))


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and data


def test_wordpiece_vocab_merges_the_most_frequent_pair_first_ties_by_text():
    vocab = scratch_text.wordpiece_vocab({"low": 5, "lower": 2, "newest": 6, "widest": 3}, 19)
    assert vocab[:5] == list(scratch_text.SPECIALS)
    assert vocab[5:16] == sorted(["l", "n", "w", "##o", "##w", "##e", "##r", "##s", "##t", "##i", "##d"])
    # ##e ##s and ##s ##t both occur 9 times: the tie goes to the smaller text; then ##es ##t (9); then l ##o
    # and ##o ##w (7 each): "##o" sorts before "l"
    assert vocab[16:] == ["##es", "##est", "##ow"]
    assert scratch_text.wordpiece_vocab({"low": 5, "lower": 2, "newest": 6, "widest": 3}, 100)[-1] != "##ow"


def test_the_tokenizer_is_deterministic_and_bert_shaped(tmp_path):
    texts = [fortune(random.Random(i), TOPIC_WORDS["science"].split()) for i in range(50)]
    first, second = (scratch_text.train_tokenizer(texts, 80, 32) for _ in range(2))
    assert first.get_vocab() == second.get_vocab() and len(first) == 80
    for i, tok in enumerate((first, second)):
        tok.save_pretrained(tmp_path / str(i))
    assert (tmp_path / "0" / "tokenizer.json").read_bytes() == (
        tmp_path / "1" / "tokenizer.json"
    ).read_bytes()
    ids = first("The Atom.")["input_ids"]
    assert ids[0] == scratch_text.CLS and ids[-1] == scratch_text.SEP
    assert first.decode(ids, skip_special_tokens=True) == "the atom."  # lowercased, pieces joined
    assert first.convert_ids_to_tokens(first("Atom!")["input_ids"])[1:-1] == ["atom", "[UNK]"]  # never seen


def test_the_text_data_keeps_test_texts_out_of_the_corpus(zoo):
    data = zoo.text_data("fortune_topic")
    train, _ = data.texts("train")
    test, test_labels = data.texts("test")
    corpus, _ = data.texts("corpus")
    assert (len(train), len(test)) == (80, 40) and data.label_names == list(t8.FORTUNE_TOPICS)
    assert sorted(test_labels) == sorted([0, 1, 2, 3] * 10)
    assert not set(test) & set(corpus) and set(train) <= set(corpus)
    assert "(skipped: not prose)" not in " ".join(corpus)  # ascii-art is not prose
    assert len(corpus) == 160 + 60 + 20 - 40  # every fortune, less the test texts
    batches = data.batches("train", 32, limit=70)
    assert [len(b) for b in batches] == [32, 32, 6] and all(isinstance(b, Encoded) for b in batches)
    assert batches[0].input_ids.shape[1] <= data.max_length == 32
    with pytest.raises(MergeError, match="fortune_topic is the zoo's text task"):
        zoo.data("fortune_topic")
    with pytest.raises(MergeError, match="no text task 'austen'"):
        zoo.text_data("austen")


# ---------------------------------------------------------------------------------------------------------
# The models


def test_the_pairs_load_with_transformers_and_differ(zoo):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pairs = zoo.pairs()
    assert [(p.dataset, p.family, p.width, p.setting) for p in pairs] == [
        ("fortune_topic", "bert", 1, "same"),
        ("fortune_topic", "bert", 1, "split"),
    ]
    test = zoo.text_data("fortune_topic").encoded("test")
    for pair in pairs:
        assert pair.is_text and pair.num_classes == 4
        assert pair.classes("a") == ((0, 1, 2, 3) if pair.setting == "same" else (0, 1))
        states = []
        for side in ("a", "b"):
            folder = getattr(pair, side)
            module = AutoModelForSequenceClassification.from_pretrained(folder).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder)
            config = module.config
            assert type(module).__name__ == "BertForSequenceClassification" and config.num_labels == 4
            assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 256, 2)
            # 64 positions (what align and pleas tokenize to) though training cut texts at 32 tokens
            assert (config.num_attention_heads, config.max_position_embeddings) == (2, 64)
            assert tokenizer.get_vocab() == zoo.text_data("fortune_topic").tokenizer().get_vocab()
            record = zoo.record(folder)
            assert record["test_accuracy"] == pytest.approx(evaluate(module, test)["accuracy"])
            assert record["classes"] == list(pair.classes(side)) and record["seed"] == (
                0 if side == "a" else 1
            )
            assert record["train_examples"] == (80 if pair.setting == "same" else 40)
            assert len(record["test_accuracy_per_class"]) == 4
            states.append(module.state_dict())
        a, b = states
        assert not any(torch.equal(a[k], b[k]) for k in a if k.endswith("weight"))  # two initializations
    for seed in (0, 1):
        mlm = zoo.record(zoo.root / f"models/fortune_topic/bert-w1/mlm/seed{seed}")
        assert mlm["training"]["steps"] == 12 and mlm["seed"] == seed
        assert 0 < mlm["test_mlm_loss"] < 2 * torch.log(torch.tensor(160.0)).item()


def test_a_second_build_reuses_every_stage(zoo, cache, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage was built again")

    for module, name in (
        (scratch, "train_model"),
        (scratch_text, "pretrain_mlm"),
        (scratch_text, "prepare_text"),
    ):
        monkeypatch.setattr(module, name, no_training)
    build_scratch_zoo(root=zoo.root, config=TINY_BERT, progress=False, text_cache=cache)
    built = ScratchZoo(zoo.root).manifest["build"]
    assert (built["trained"], built["reused"]) == (0, 4)
    assert built["pretraining"] == {"trained": 0, "reused": 2}


def test_an_interrupted_build_resumes_with_bit_identical_weights(zoo, cache, tmp_path, monkeypatch):
    """Killed during the second encoder's pretraining, resumed, then compared byte for byte with the fixture's
    (the same stamps); more fine-tuning epochs later retrain the classifiers and keep the encoders."""
    pretrain, calls = scratch_text.pretrain_mlm, []

    def killed_after_one(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return pretrain(*args, **kwargs)

    monkeypatch.setattr(scratch_text, "pretrain_mlm", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        build_scratch_zoo(root=tmp_path, config=TINY_BERT, progress=False, text_cache=cache)
    mlm = tmp_path / "models/fortune_topic/bert-w1/mlm"
    assert (mlm / "seed0/model.safetensors").exists() and not (mlm / "seed1").exists()
    assert not list(mlm.glob(".seed1*")) and not (tmp_path / "manifest.json").exists()
    monkeypatch.setattr(scratch_text, "pretrain_mlm", pretrain)
    fresh = ScratchZoo(build_scratch_zoo(root=tmp_path, config=TINY_BERT, progress=False, text_cache=cache))
    assert fresh.manifest["build"]["pretraining"] == {"trained": 1, "reused": 1}
    for pair, old in zip(fresh.pairs(), zoo.pairs()):
        for side in ("a", "b"):
            assert fresh.record(getattr(pair, side))["stamp"] == zoo.record(getattr(old, side))["stamp"]
            assert (getattr(pair, side) / "model.safetensors").read_bytes() == (
                getattr(old, side) / "model.safetensors"
            ).read_bytes()
    longer = dataclasses.replace(TINY_BERT, epochs={"bert": 4}, settings=("same",))
    shutil.rmtree(tmp_path / "models/fortune_topic/bert-w1/split")
    built = ScratchZoo(build_scratch_zoo(root=tmp_path, config=longer, progress=False, text_cache=cache))
    assert built.manifest["build"]["pretraining"] == {"trained": 0, "reused": 2}
    assert (built.manifest["build"]["trained"], built.record(built.pairs()[0].a)["training"]["epochs"]) == (
        2,
        4,
    )


def test_text_config_mistakes_are_one_line(tmp_path):
    for change, message in (
        ({"task": "poems"}, "unknown text task 'poems'"),
        ({"mlm_steps": 0}, "text.mlm_steps must be a positive integer"),
        ({"max_length": 4}, "text.max_length must be between 8 and 512"),
        ({"vocab_size": 3}, "text.vocab_size must exceed 5"),
    ):
        config = dataclasses.replace(TINY_BERT, text=dataclasses.replace(TINY_BERT.text, **change))
        with pytest.raises(MergeError, match=message):
            build_scratch_zoo(root=tmp_path, config=config)
    assert ScratchZooConfig.from_dict(json.loads(json.dumps(TINY_BERT.to_dict()))) == TINY_BERT


# ---------------------------------------------------------------------------------------------------------
# The benchmark


def test_the_benchmark_row_of_the_bert_pair(zoo, tmp_path):
    (pair, _split) = zoo.pairs()
    row = align_bench.run_pair(zoo, pair, progress=False)
    assert (row["pair"], row["family"]) == ("fortune_topic/bert-w1/same", "bert")
    for matching in align_bench.MATCHINGS:
        path = row["paths"][matching]
        assert [p["lambda"] for p in path["points"]] == list(align_bench.LAMBDAS)
        assert path["loss_barrier"] >= 0 and path["accuracy_barrier"] >= 0
    # the ends of every path are the two models (permuting B keeps its function)
    for side, end in (("a", 0), ("b", -1)):
        record = zoo.record(getattr(pair, side))
        for matching in align_bench.MATCHINGS:
            point = row["paths"][matching]["points"][end]
            assert point["accuracy"] == pytest.approx(record["test_accuracy"])
            assert point["loss"] == pytest.approx(record["test_loss"], abs=1e-4)
        assert row["accuracy"][f"model_{side}"]["estimate"] == pytest.approx(record["test_accuracy"])
    assert set(row["accuracy"]) == {
        "naive",
        "weight",
        "activation",
        "model_a",
        "model_b",
        "ensemble",
        *(f"pleas@{b}" for b in align_bench.BUDGETS),
    }
    assert all(v["low"] <= v["estimate"] <= v["high"] for v in row["accuracy"].values())
    # PLeaS widens only a Hugging Face model's FFN: 2.0 doubles intermediate_size (heads and stream merged)
    assert row["pleas"]["1.0"]["intermediate_size"] == 256
    assert row["pleas"]["2.0"]["intermediate_size"] == 512
    assert row["pleas"]["1.5"]["achieved_budget"] <= 1.5 + 1e-9
    assert 0 <= row["diagnostics_mean"]["relative_distance"] <= 1.0 + 1e-9
    assert any(name.startswith("bert.encoder.layer.0.intermediate") for name in row["diagnostics"])
    assert json.loads(json.dumps(row)) == row  # JSON-ready
