"""Encoders with task heads: linear probing, fine-tuning and evaluation for the text zoos.

A task model is a BERT-style encoder (MiniLM-L6 here) whose token states are mean-pooled over the attention mask
(how all-MiniLM-L6-v2 was trained) and fed to a linear head. Only encoders are merged; each task keeps its head.

Training recipe (LP-FT, Kumar et al., ICLR 2022): the head is first fit as a linear probe on the frozen base
encoder's pooled features, then frozen while the encoder is fine-tuned. Heads that live in the base's feature
space are the text analogue of the frozen zero-shot heads of the CLIP merging benchmarks; they make the
"zero-shot" row (base encoder + each task's head) a linear-probe baseline and keep task vectors comparable.
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

from mergesmith.fit.data import Encoded, mean_pool
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
    """Fine-tuning hyperparameters (documented in the README's zoo section)."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    bf16: bool = True
    seed: int = 0


def fine_tune(
    encoder,
    tasks: Sequence[tuple[str, Encoded, dict[str, torch.Tensor]]],
    config: TrainConfig,
    desc: str = "fine-tune",
) -> dict[str, float]:
    """Full fine-tuning of ``encoder`` with frozen heads on one task or, interleaved, several (multi-task).

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
    opt = torch.optim.AdamW(encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    encoder.train()
    start = time.perf_counter()
    loss_value = math.nan
    bar = tqdm(schedule, desc=desc, unit="step", leave=False, dynamic_ncols=True)
    for t, index in bar:
        _, data, head = tasks[t]
        batch = data.batch(index)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            loss = F.cross_entropy(logits(encoder, head, batch), batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.3f}")
    encoder.eval()
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
