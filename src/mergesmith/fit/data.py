"""Examples as the networks see them: tokenized batches (:class:`Encoded`), pooling over tokens, and seeded
samples. Reading and checking a recipe's data files is :mod:`mergesmith.recipe.data`; this module tokenizes them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergesmith.recipe.data import MAX_LENGTH, DataSpec, Examples, read_examples


@dataclass
class Encoded:
    """A tokenized split: input ids and attention mask (padded to the longest example), and labels: one per
    example (a class, or a causal LM's first answer token), or one per position (``encode_answers``: the next
    token where it belongs to the answer, -1 elsewhere)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor | slice) -> Encoded:
        mask = self.attention_mask[index]
        width = int(mask.sum(1).max()) if len(mask) else 1  # trim padding to this batch's longest example
        labels = self.labels[index]
        if labels.dim() == 2:  # per-position targets are trimmed with their positions
            labels = labels[:, :width]
        return Encoded(self.input_ids[index][:, :width], mask[:, :width], labels)


def encode(
    tokenizer: Any, texts: Sequence[str], labels: Sequence[int], max_length: int = MAX_LENGTH
) -> Encoded:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor(list(labels), dtype=torch.long))


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], answers: Sequence[str] | None, max_length: int = MAX_LENGTH
) -> Encoded:
    """Prompts for a causal LM's next-token fit: right-padded ids (a longer prompt keeps its last ``max_length``
    tokens, the ones next to the answer) and, as the label, the first token of `` answer`` — the token the model
    should generate first (-1 without answers). Prompts get the tokenizer's default special tokens, as exact
    match encodes them."""
    ids = [tokenizer(p)["input_ids"][-max_length:] for p in prompts]
    labels = (
        [tokens[0] for tokens in answer_tokens(tokenizer, answers)]
        if answers is not None
        else [-1] * len(ids)
    )
    input_ids, mask = right_pad(ids, tokenizer)
    return Encoded(input_ids, mask, torch.tensor(labels, dtype=torch.long))


def encode_answers(
    tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], max_length: int = MAX_LENGTH
) -> Encoded:
    """Prompt + answer sequences for a causal LM's labeled fits (the empirical Fisher of the whole answer): each
    prompt (its last ``max_length`` tokens, as :func:`encode_prompts`) followed by `` answer``'s tokens, right
    padded, and per-position targets: ``labels[n, j]`` is the token at j + 1 where that token belongs to the
    answer, -1 elsewhere — so Σ_j log softmax(logits[n, j])[labels[n, j]] is log p(answer | prompt)."""
    rows, targets = [], []
    for prompt, answer in zip(prompts, answer_tokens(tokenizer, answers), strict=True):
        ids = tokenizer(prompt)["input_ids"][-max_length:]
        rows.append(ids + answer)
        targets.append([-1] * (len(ids) - 1) + answer + [-1])
    input_ids, mask = right_pad(rows, tokenizer)
    labels = torch.full_like(input_ids, -1)
    for row, target in enumerate(targets):
        labels[row, : len(target)] = torch.tensor(target, dtype=torch.long)
    return Encoded(input_ids, mask, labels)


def answer_tokens(tokenizer: Any, answers: Sequence[str]) -> list[list[int]]:
    """`` answer``'s tokens (no special tokens): what the model generates after the prompt."""
    return [tokenizer(" " + a.strip(), add_special_tokens=False)["input_ids"] for a in answers]


def pad_id(tokenizer: Any) -> int:
    """The token that pads a batch: the tokenizer's pad token, else its end of sequence, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def right_pad(rows: Sequence[Sequence[int]], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded to the longest (the tokenizer's pad token, else its end of sequence) and their
    attention mask."""
    width = max((len(r) for r in rows), default=1)
    input_ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, tokens in enumerate(rows):
        input_ids[row, : len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return input_ids, mask


def encode_examples(examples: Examples, tokenizer: Any, max_length: int = MAX_LENGTH) -> Encoded:
    labels = examples.labels if examples.labels is not None else [-1] * len(examples.texts)
    return encode(tokenizer, examples.texts, labels, max_length)


def load_examples(spec: DataSpec, tokenizer: Any, need_labels: bool, where: str = "") -> Encoded:
    """``spec``'s examples tokenized (padded to the longest, cut at ``max_length``); labels -1 when not needed."""
    return encode_examples(read_examples(spec, need_labels, where), tokenizer, spec.max_length)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of the token states over the attention mask, (batch, d)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def sample_examples(data: Encoded, n_examples: int, seed: int) -> Encoded:
    """``n_examples`` examples drawn without replacement with a seeded permutation (all of them, in a seeded
    order, when fewer are given), trimmed to the longest one."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.batch(order[: min(n_examples, len(data))])
