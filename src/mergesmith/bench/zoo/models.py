"""Encoders with task heads: linear probing, fine-tuning and evaluation for the text zoos.

A task model is a BERT-style encoder (MiniLM-L6 here) whose token states are mean-pooled over the attention mask
(how all-MiniLM-L6-v2 was trained) and fed to a linear head. Only encoders are merged; each task keeps its head.

Three ways to get a task's head (``ZooConfig.protocol``, measured in docs/design.md):

- ``joint`` (v2, the default): standard fine-tuning. The head starts random (BERT's N(0, 0.02) init) and trains
  with the encoder (at ``head_lr``); the zero-shot row is the base encoder with each task's fine-tuned head, as in
  the RoBERTa/GLUE merging benchmarks (Twin-Merging, FusionBench).
- ``descriptions``: CLIP-style frozen heads, one row per class: the base encoder's normalized embedding of a short
  description of the class, times a logit scale (:func:`description_head`); the encoder is fine-tuned under them.
- ``lpft`` (v1): LP-FT (Kumar et al., ICLR 2022): a linear probe fit on the base's features, then frozen while
  the encoder is fine-tuned. The base with the probe is already the best linear readout of the base, so the
  zero-shot row sat at 94 % of fine-tuned: too close to rank merges.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mergesmith.errors import MergeError
from mergesmith.fit.data import Encoded, encode, mean_pool
from mergesmith.fit.evaluate import ClassificationTask
from mergesmith.fit.task import TaskModel


def pooled(encoder, data: Encoded, batch_size: int = 128, bf16: bool = True) -> torch.Tensor:
    """Mean-pooled features of every example (no gradients), fp32. Examples are batched in order of length so
    that batches carry little padding; the result is in the original order."""
    outs = []
    order = torch.argsort(data.attention_mask.sum(1), stable=True)
    encoder.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(data), batch_size):
            b = data.batch(order[start : start + batch_size])
            hidden = encoder(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
            outs.append(mean_pool(hidden.float(), b.attention_mask))
    if not outs:
        return torch.zeros(0, encoder.config.hidden_size)
    features = torch.empty(len(data), outs[0].shape[1])
    features[order] = torch.cat(outs)
    return features


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    seed: int,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
) -> dict[str, torch.Tensor]:
    """Multinomial logistic regression on fixed features, full-batch Adam. Returns {'weight', 'bias'}."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(features), labels).backward()
        opt.step()
    return {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()}


def random_head(dim: int, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """A freshly initialized linear head: BERT's classifier init, weight ~ N(0, 0.02), bias 0."""
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(num_classes, dim, generator=g) * 0.02, "bias": torch.zeros(num_classes)}


def description_head(
    encoder,
    tokenizer,
    descriptions: Sequence[str],
    features: torch.Tensor,
    scale: float = 20.0,
    bf16: bool = True,
) -> dict[str, torch.Tensor]:
    """CLIP-style zero-shot head: row c is the unit-length pooled embedding of class c's description, scaled so
    that an average-norm example's logits are ``scale`` × cosine similarity (20: the scale of
    sentence-transformers' contrastive loss, which trained MiniLM). ``features`` are the training examples'
    pooled features (their mean norm sets the scale)."""
    data = encode(tokenizer, list(descriptions), [0] * len(descriptions))
    rows = F.normalize(pooled(encoder, data, bf16=bf16), dim=-1)
    similarity = rows @ rows.T - 2 * torch.eye(len(rows))
    if len(rows) > 1 and float(similarity.max()) > 0.9999:
        i, j = divmod(int(similarity.argmax()), len(rows))
        raise MergeError(
            f"class descriptions {descriptions[i]!r} and {descriptions[j]!r} embed identically (the tokenizer may "
            "not know their words); write distinct descriptions, or use protocol joint or lpft"
        )
    mean_norm = float(features.norm(dim=-1).mean())
    return {"weight": rows * (scale / mean_norm), "bias": torch.zeros(len(descriptions))}


def logits(encoder, head: dict[str, torch.Tensor], batch: Encoded) -> torch.Tensor:
    hidden = encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return F.linear(mean_pool(hidden, batch.attention_mask).float(), head["weight"], head["bias"])


def accuracy(
    encoder, head: dict[str, torch.Tensor], data: Encoded, batch_size: int = 128, bf16: bool = True
) -> float:
    """Accuracy of ``encoder`` with a linear ``head`` over mean-pooled states: the evaluator's classification
    task (length-sorted batches; bf16 autocast of the encoder with ``bf16``)."""
    model = TaskModel(encoder, head, autocast=torch.bfloat16 if bf16 else None)
    return ClassificationTask(data).evaluate(model, batch_size=batch_size)["accuracy"]


@dataclass
class TrainConfig:
    """Fine-tuning hyperparameters (documented in docs/benchmark.md)."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    bf16: bool = True
    seed: int = 0
    head_lr: float | None = None  # None: heads frozen; else heads train with the encoder at this rate


def fine_tune(
    encoder,
    tasks: Sequence[tuple[str, Encoded, dict[str, torch.Tensor]]],
    config: TrainConfig,
    desc: str = "fine-tune",
) -> dict[str, float]:
    """Full fine-tuning of ``encoder`` on one task or, interleaved, several (multi-task). Heads are frozen, or with
    ``config.head_lr`` trained too (updated in place in the given dicts).

    Each step takes one batch of one task; with several tasks, the order of (task, batch) pairs is a seeded
    shuffle of every task's batches, so all tasks are seen equally per epoch. Returns timing and the last loss.
    """
    g = torch.Generator().manual_seed(config.seed)
    schedule: list[tuple[int, torch.Tensor]] = []
    for _ in range(config.epochs):
        epoch = []
        for t, (_, data, _) in enumerate(tasks):
            order = torch.randperm(len(data), generator=g)
            epoch += [(t, order[i : i + config.batch_size]) for i in range(0, len(data), config.batch_size)]
        perm = torch.randperm(len(epoch), generator=g)
        schedule += [epoch[int(i)] for i in perm]
    total = len(schedule)
    warmup = max(1, int(config.warmup * total))
    groups: list[dict] = [{"params": list(encoder.parameters())}]
    trained_heads: list[dict[str, torch.Tensor]] = [head for _, _, head in tasks]
    if config.head_lr is not None:
        trained_heads = [
            {k: torch.nn.Parameter(v.clone()) for k, v in head.items()} for head in trained_heads
        ]
        groups.append({"params": [p for h in trained_heads for p in h.values()], "lr": config.head_lr})
    opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    encoder.train()
    start = time.perf_counter()
    loss_value = math.nan
    bar = tqdm(schedule, desc=desc, unit="step", leave=False, dynamic_ncols=True)
    for t, index in bar:
        _, data, _ = tasks[t]
        head = trained_heads[t]
        batch = data.batch(index)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            loss = F.cross_entropy(logits(encoder, head, batch), batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.3f}")
    encoder.eval()
    if config.head_lr is not None:
        for (_, _, head), trained in zip(tasks, trained_heads):
            head.update({k: v.detach().clone() for k, v in trained.items()})
    return {"steps": total, "seconds": time.perf_counter() - start, "final_loss": loss_value}


def load_encoder(path: str | Path, state_dict: dict[str, torch.Tensor] | None = None):
    """An encoder from an HF folder, optionally with other weights (a merge) loaded into it."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
    if state_dict is not None:
        missing, unexpected = encoder.load_state_dict(state_dict, strict=False)
        real_missing = [k for k in missing if "position_ids" not in k]
        if real_missing or unexpected:
            raise ValueError(
                f"weights do not fit the encoder: missing {real_missing[:3]}, unexpected {unexpected[:3]}"
            )
    encoder.eval()
    return encoder


def encoder_state(encoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan
