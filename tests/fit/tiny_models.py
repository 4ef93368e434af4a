"""Tiny random Hugging Face models and data files for the evaluator's tests (no download: configs, random
init, a tokenizer trained here).

Eight architectures: four encoders (BERT, RoBERTa, MPNet, DeBERTa-v2) and four decoders (GPT-2, Llama,
Mistral, Qwen2), hidden size 16, one layer. The tokenizer is a byte-level BPE (the GPT-2 / Qwen2 kind:
transformers rebuilds Qwen2's tokenizer from its vocabulary and merges, so it must be one) whose 30 words are
single tokens, about 100 tokens in all. Each architecture gets a sequence-classification folder (3 classes)
and each decoder also a causal-LM folder; every folder holds the tokenizer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

ENCODERS = ("bert", "roberta", "mpnet", "deberta-v2")
DECODERS = ("gpt2", "llama", "mistral", "qwen2")
ARCHS = ENCODERS + DECODERS
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
PAD, UNK, CLS, SEP, EOS = range(len(SPECIALS))
WORDS = [c + v for c in "bdgklmnprs" for v in "aeo"]  # 30 words: ba be bo da ...
CLASSES = 3
VOCAB_SIZE = 96  # the tokenizer has 88 tokens (the other embedding rows are never used)
HIDDEN = 16


def build_tokenizer(folder: Path, with_cls: bool) -> Any:
    """A byte-level BPE tokenizer in which every word of ``WORDS`` (with or without a leading space) and the
    newline are one token each, saved into ``folder``. Encoders' add ``[CLS] ... [SEP]``; decoders' add
    nothing. Pads on the right with ``[PAD]``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator([*WORDS, " ".join(WORDS), "\n"], trainer)
    if with_cls:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="[EOS]",
        bos_token="[EOS]",
    )
    fast.model_input_names = ["input_ids", "attention_mask"]
    fast.save_pretrained(folder)
    return fast


def config(arch: str, num_labels: int = CLASSES) -> Any:
    """A tiny config of ``arch`` with the tokenizer's special ids (decoders get a pad_token_id for
    classifiers)."""
    import transformers as tf

    common: dict[str, Any] = {"vocab_size": VOCAB_SIZE, "pad_token_id": PAD, "num_labels": num_labels}
    if arch == "gpt2":
        return tf.GPT2Config(
            n_embd=HIDDEN, n_layer=1, n_head=2, n_positions=64, bos_token_id=EOS, eos_token_id=EOS, **common
        )
    if arch in DECODERS:
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[arch]
        return cls(
            hidden_size=HIDDEN,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            bos_token_id=EOS,
            eos_token_id=EOS,
            tie_word_embeddings=False,
            **common,
        )
    sizes: dict[str, Any] = {
        "hidden_size": HIDDEN,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 80,
    }
    if arch == "bert":
        return tf.BertConfig(**sizes, **common)
    if arch == "roberta":
        return tf.RobertaConfig(**sizes, bos_token_id=CLS, eos_token_id=SEP, **common)
    if arch == "mpnet":
        return tf.MPNetConfig(**sizes, bos_token_id=CLS, eos_token_id=SEP, **common)
    if arch == "deberta-v2":
        return tf.DebertaV2Config(
            **sizes,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
            max_relative_positions=32,
            **common,
        )
    raise KeyError(arch)


def build_classifier(folder: Path, arch: str, seed: int) -> Path:
    """An ``AutoModelForSequenceClassification`` of ``arch`` (random init from ``seed`` and the architecture)
    with the tokenizer."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed * 100 + ARCHS.index(arch))
    AutoModelForSequenceClassification.from_config(config(arch)).save_pretrained(folder)
    build_tokenizer(folder, with_cls=arch in ENCODERS)
    return folder


def build_causal_lm(folder: Path, arch: str, seed: int) -> Path:
    """An ``AutoModelForCausalLM`` of decoder ``arch`` (random init from ``seed`` and the architecture;
    weights scaled up so that greedy continuations vary with the prompt) with the tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed * 100 + ARCHS.index(arch))
    model = AutoModelForCausalLM.from_config(config(arch))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    model.save_pretrained(folder)
    build_tokenizer(folder, with_cls=False)
    return folder


def linear_head(seed: int, classes: int = CLASSES, width: int = HIDDEN) -> dict[str, torch.Tensor]:
    """A random linear head ``{weight, bias}`` over pooled states."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, width, generator=g)
    return {"weight": weight, "bias": torch.randn(classes, generator=g) * 0.1}


def sentences(n: int, seed: int, low: int = 1, high: int = 12) -> list[str]:
    """``n`` random sentences of ``low``..``high`` words (varied lengths, so batches carry padding)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(n)]


def write_classification(path: Path, n: int = 24, seed: int = 0) -> Path:
    """A JSONL file of ``{"text", "label"}`` with random labels in 0..CLASSES-1."""
    rng = random.Random(seed + 1)
    rows = [{"text": t, "label": rng.randrange(CLASSES)} for t in sentences(n, seed)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_text(path: Path, lines: int = 30, seed: int = 0) -> Path:
    """A plain text file of random sentences, one per line."""
    path.write_text("\n".join(sentences(lines, seed, 3, 15)) + "\n")
    return path


def write_prompts(path: Path, n: int = 10, seed: int = 0, answers: list[str] | None = None) -> Path:
    """A JSONL file of ``{"prompt", "answer"}``; the answers are random words unless given."""
    prompts = sentences(n, seed, 2, 8)
    rng = random.Random(seed + 1)
    answers = answers if answers is not None else [rng.choice(WORDS) for _ in prompts]
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers)))
    return path
