"""Recovery fine-tuning by distillation, as MC-SMoE recovers its merged and compressed models: the student
(the smaller model) learns the teacher's (the original's) next-token distributions on calibration text,

    L = λ_kd · T² · KL(softmax(z_teacher / T) ‖ softmax(z_student / T)) + CE(z_student, next token),

over the real tokens, T = 2 and λ_kd = 0.2 (the official recipe), AdamW with β = (0.9, 0.98), ε = 1e-6, weight
decay 0.01, lr 2e-4; only the parameters given train.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mergesmith.fit.data import Encoded


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 2.0,
    kd_weight: float = 0.2,
) -> torch.Tensor:
    """The module docstring's loss for one batch (logits ``[B, T, V]``, predicting ``ids[:, 1:]``)."""
    keep = mask[:, 1:].reshape(-1).bool()
    s = student[:, :-1].reshape(-1, student.shape[-1])[keep].float()
    t = teacher[:, :-1].reshape(-1, teacher.shape[-1])[keep].float()
    kd = F.kl_div(
        F.log_softmax(s / temperature, -1),
        F.log_softmax(t / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )
    return kd_weight * temperature**2 * kd + F.cross_entropy(s, ids[:, 1:].reshape(-1)[keep])


def teacher_logits(model: nn.Module, batches: Sequence[Encoded]) -> list[torch.Tensor]:
    """The teacher's logits on every batch (computed once, before the student changes)."""
    with torch.no_grad():
        return [
            model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.detach() for b in batches
        ]


def distill(
    student: nn.Module,
    batches: Sequence[Encoded],
    teacher: Sequence[torch.Tensor],
    steps: int,
    trainable: Sequence[nn.Parameter],
    lr: float = 2e-4,
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """``steps`` updates of ``trainable`` (every other parameter frozen meanwhile) on the batches in turn; returns
    the losses. ``after_step(step)`` runs after each update (1-based), with the gradients still there."""
    if not batches:
        raise ValueError("distillation needs calibration batches")
    keep = {id(p) for p in trainable}
    frozen = [p for p in student.parameters() if id(p) not in keep and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    # a model loaded for inference comes frozen (``load_causal_lm``): a parameter asked to train must get gradients
    was_frozen = [p for p in trainable if not p.requires_grad]
    for p in was_frozen:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    losses = []
    student.train()
    try:
        for step in range(1, steps + 1):
            batch, target = batches[(step - 1) % len(batches)], teacher[(step - 1) % len(batches)]
            logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = kd_loss(logits, target, batch.input_ids, batch.attention_mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if after_step is not None:
                after_step(step)
    finally:
        student.eval()
        for p in frozen:
            p.requires_grad_(True)
        for p in was_frozen:
            p.requires_grad_(False)
    return losses
