"""Activation matching (Git Re-Basin, Ainsworth et al., ICLR 2023, §3.1): units paired by how their activations
correlate on data.

For each permutation group, the activations are the inputs of the linear and 2-D convolution layers that read the
group's units (weights with the group on their input axis: an FFN's ``down_proj``, attention's ``o_proj``, an MLP's
next layer, a ResNet block's ``conv2``, and for a residual stream every projection or convolution reading it — each
distinct input once: a *point*). A point's samples are the data's tokens for a transformer (padding excluded; run
on :class:`Encoded` batches), every spatial position of every image for a convolution (channels as features), and
every example for a linear layer of a small model (run on plain tensor batches: ``module(x)``). With z the
per-dimension standardized activations over a point's samples t,

    C[i, j] = Σ_points Σ_{d < block} mean_t z^A_{t, i·block+d} · z^B_{t, j·block+d}

(a sum of Pearson correlations), and each group's permutation is the assignment maximizing Σ_i C[i, π(i)] —
groups are independent here, unlike weight matching. Two passes over the data: the means and deviations, then the
correlations, so memory holds one batch's activations, never all of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from mergesmith.arch.permutation import PermutationSpec
from mergesmith.fit.data import Encoded

EPS = 1e-8
# tokenized text for a transformer; an image (or feature) batch for a small model
Batch = Encoded | torch.Tensor


def capture_points(spec: PermutationSpec, module: nn.Module) -> dict[str, tuple[str, int]]:
    """Layer name → (group, block) for every linear layer (2-D weight) or 2-D convolution (4-D weight) whose
    input axis (1) a group moves."""
    ndims = {
        name: 2 if isinstance(m, nn.Linear) else 4
        for name, m in module.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    }
    out = {}
    for tensor, axes in spec.axes.items():
        layer = tensor.removesuffix(".weight")
        if tensor.endswith(".weight") and len(axes) == ndims.get(layer) and axes[1] is not None:
            out[layer] = (axes[1].group, axes[1].block)
    return out


class _Inputs:
    """Forward hooks that keep, per group, each distinct input tensor of the capture points (in module order)."""

    def __init__(self, module: nn.Module, points: Mapping[str, tuple[str, int]]):
        self.seen: dict[str, list[torch.Tensor]] = {}
        self.handles = [
            m.register_forward_hook(self._hook(points[name][0]))
            for name, m in module.named_modules()
            if name in points
        ]

    def _hook(self, group: str) -> Any:
        def keep(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
            tensors = self.seen.setdefault(group, [])
            if not any(inputs[0] is t for t in tensors):
                tensors.append(inputs[0])

        return keep

    def take(self) -> dict[str, list[torch.Tensor]]:
        seen, self.seen = self.seen, {}
        return seen

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _samples(t: torch.Tensor, batch: Batch) -> torch.Tensor | None:
    """A captured input as (samples, features) in float64, or None where it has no per-sample rows to use."""
    if isinstance(batch, Encoded):
        # per-token inputs only (a head on one token per example, RoBERTa's classifier, is left out)
        if t.dim() == 3 and tuple(t.shape[:2]) == tuple(batch.attention_mask.shape):
            return t.reshape(-1, t.shape[-1])[batch.attention_mask.reshape(-1).bool()].double()
        return None
    if t.dim() == 4:  # a convolution's (batch, channels, height, width): every position is a sample
        return t.movedim(1, -1).reshape(-1, t.shape[1]).double()
    if t.dim() == 2:  # a small model's linear layer (an MLP's, or the head on pooled features): every example
        return t.double()
    return None


def _run(module: nn.Module, recorder: _Inputs, batch: Batch) -> dict[str, list[torch.Tensor]]:
    with torch.inference_mode():
        if isinstance(batch, Encoded):
            module(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        else:
            module(batch)
    out: dict[str, list[torch.Tensor]] = {}
    for group, tensors in recorder.take().items():
        out[group] = [rows for t in tensors if (rows := _samples(t, batch)) is not None]
    return out


def unit_correlations(
    spec: PermutationSpec, module_a: nn.Module, module_b: nn.Module, batches: Iterable[Batch]
) -> dict[str, torch.Tensor]:
    """Per group, the (units × units) correlations C of the module docstring divided by the number of terms — each
    pair's mean correlation over the capture points and block dimensions (float64). ``batches`` are
    :class:`Encoded` (a transformer, called with ``input_ids`` and ``attention_mask``) or tensors (a small model
    called as ``module(x)``); both models see the same batches."""
    batches = list(batches)
    points = capture_points(spec, module_a)
    blocks = {group: block for group, block in points.values()}
    rec_a, rec_b = _Inputs(module_a, points), _Inputs(module_b, points)
    try:
        # group → per point: [Σa, Σa², Σb, Σb², samples] (points differ in samples: a ResNet's stages and its
        # pooled head see different numbers of positions)
        moments: dict[str, list[list[Any]]] = {}
        for batch in batches:
            acts_a, acts_b = _run(module_a, rec_a, batch), _run(module_b, rec_b, batch)
            for group, tensors in acts_a.items():
                if not tensors:
                    continue
                stats = moments.setdefault(group, [[0.0, 0.0, 0.0, 0.0, 0] for _ in tensors])
                for k, (a, b) in enumerate(zip(tensors, acts_b[group])):
                    s = stats[k]
                    stats[k] = [
                        s[0] + a.sum(0),
                        s[1] + a.square().sum(0),
                        s[2] + b.sum(0),
                        s[3] + b.square().sum(0),
                        s[4] + len(a),
                    ]
        scales = {
            group: [
                (sa / count, _std(saa, sa, count), sb / count, _std(sbb, sb, count), count)
                for sa, saa, sb, sbb, count in stats
            ]
            for group, stats in moments.items()
        }
        costs = {g: torch.zeros(spec.sizes[g], spec.sizes[g], dtype=torch.float64) for g in moments}
        for batch in batches:
            acts_a, acts_b = _run(module_a, rec_a, batch), _run(module_b, rec_b, batch)
            for group, tensors in acts_a.items():
                if group not in costs:
                    continue
                n, block = spec.sizes[group], blocks[group]
                for (mean_a, std_a, mean_b, std_b, count), a, b in zip(scales[group], tensors, acts_b[group]):
                    za = (
                        ((a - mean_a) / std_a).reshape(-1, n, block).permute(2, 0, 1)
                    )  # (block, samples, units)
                    zb = ((b - mean_b) / std_b).reshape(-1, n, block).permute(2, 0, 1)
                    costs[group] += torch.einsum("dti,dtj->ij", za, zb) / count
    finally:
        rec_a.remove()
        rec_b.remove()
    # the mean correlation per pair, in [-1, 1] (the assignment is the same; PLeaS compares groups with it)
    return {g: c / (len(scales[g]) * blocks[g]) for g, c in costs.items()}


def _std(sum_sq: torch.Tensor, total: torch.Tensor, count: int) -> torch.Tensor:
    mean = total / count
    return (sum_sq / count - mean.square()).clamp(min=0).sqrt() + EPS
