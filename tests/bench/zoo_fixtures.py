"""A tiny random BERT and separable fixture tasks: the zoo pipeline and the data-driven methods run on these
in the tests (no package is fetched)."""

from __future__ import annotations

import torch

from mergesmith.bench.zoo.text8_data import TaskData

WORDS = ["apple", "banana", "cherry", "river", "mountain", "forest", "red", "blue", "green", "fast", "slow"]


def tiny_bert(path):
    from transformers import BertConfig, BertModel, BertTokenizer

    path.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        )
    ).save_pretrained(path)
    return path


def fixture_task(name: str) -> TaskData:
    """Fruit vs landscape words (task 'a') or colour vs speed words (task 'b'): separable, so accuracy is high."""
    groups = {"a": (WORDS[0:3], WORDS[3:6]), "b": (WORDS[6:9], WORDS[9:11])}[name]
    texts, labels = [], []
    for i in range(120):
        label, n = i % 2, i // 2
        pool, words = groups[label], []
        for _ in range(6):  # the digits of n in base len(pool): every text is distinct
            words.append(pool[n % len(pool)])
            n //= len(pool)
        texts.append(" ".join(words))
        labels.append(label)
    return TaskData(name, texts, labels, ["x", "y"], "fixture")


def build_tiny_zoo(root):
    """A two-task zoo ('a', 'b') on a tiny random BERT: 40/20/20 examples per task, one epoch, seconds. LP-FT heads:
    the fixture's class names ("x", "y") are not in the tiny vocabulary, so description heads would be degenerate."""
    from mergesmith.bench.zoo.text8 import Zoo, ZooConfig, build_zoo

    config = ZooConfig(
        n_train=40,
        n_val=20,
        n_test=20,
        epochs=1,
        batch_size=8,
        lr=1e-3,
        probe_steps=50,
        bf16=False,
        protocol="lpft",
    )
    path = build_zoo(
        tasks=["a", "b"],
        cache=root,
        config=config,
        loader=fixture_task,
        base_model=tiny_bert(root / "tiny-bert"),
    )
    return Zoo(path)
