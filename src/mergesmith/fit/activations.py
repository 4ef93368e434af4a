"""Activation matching (Git Re-Basin, Ainsworth et al., ICLR 2023, §3.1): units paired by how their activations
correlate on data.

For each permutation group, the activations are the inputs of the linear layers that read the group's units
(weights with the group on their input axis: an FFN's ``down_proj``, attention's ``o_proj``, and for the residual
stream every projection reading it — each distinct per-token input once). With z the per-dimension standardized
activations over the data's tokens (padding excluded),

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


def capture_points(spec: PermutationSpec, module: nn.Module) -> dict[str, tuple[str, int]]:
    """Linear layer name → (group, block) for every 2-D weight whose input axis (1) a group moves."""
    linears = {name for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    out = {}
    for tensor, axes in spec.axes.items():
        layer = tensor.removesuffix(".weight")
        if tensor.endswith(".weight") and len(axes) == 2 and axes[1] is not None and layer in linears:
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


def _run(module: nn.Module, recorder: _Inputs, batch: Encoded) -> dict[str, list[torch.Tensor]]:
    with torch.inference_mode():
        module(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    keep = batch.attention_mask.reshape(-1).bool()
    shape = tuple(batch.attention_mask.shape)
    # per-token inputs only (a head on one token per example, RoBERTa's classifier, is left out)
    return {
        g: [t.reshape(-1, t.shape[-1])[keep].double() for t in ts if tuple(t.shape[:2]) == shape]
        for g, ts in recorder.take().items()
    }


def unit_correlations(
    spec: PermutationSpec, module_a: nn.Module, module_b: nn.Module, batches: Iterable[Encoded]
) -> dict[str, torch.Tensor]:
    """Per group, the (units × units) sum of correlations C of the module docstring (float64)."""
    batches = list(batches)
    points = capture_points(spec, module_a)
    blocks = {group: block for group, block in points.values()}
    rec_a, rec_b = _Inputs(module_a, points), _Inputs(module_b, points)
    try:
        moments: dict[str, list[list[torch.Tensor]]] = {}  # group → per point: [Σa, Σa², Σb, Σb²]
        count = 0
        for batch in batches:
            acts_a, acts_b = _run(module_a, rec_a, batch), _run(module_b, rec_b, batch)
            count += int(batch.attention_mask.sum())
            for group, tensors in acts_a.items():
                if not tensors:
                    continue
                stats = moments.setdefault(group, [[0.0, 0.0, 0.0, 0.0] for _ in tensors])  # type: ignore[misc]
                for k, (a, b) in enumerate(zip(tensors, acts_b[group])):
                    s = stats[k]
                    stats[k] = [
                        s[0] + a.sum(0),
                        s[1] + a.square().sum(0),
                        s[2] + b.sum(0),
                        s[3] + b.square().sum(0),
                    ]
        scales = {
            group: [
                (sa / count, _std(saa, sa, count), sb / count, _std(sbb, sb, count))
                for sa, saa, sb, sbb in stats
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
                for (mean_a, std_a, mean_b, std_b), a, b in zip(scales[group], tensors, acts_b[group]):
                    za = (
                        ((a - mean_a) / std_a).reshape(-1, n, block).permute(2, 0, 1)
                    )  # (block, tokens, units)
                    zb = ((b - mean_b) / std_b).reshape(-1, n, block).permute(2, 0, 1)
                    costs[group] += torch.einsum("dti,dtj->ij", za, zb) / count
    finally:
        rec_a.remove()
        rec_b.remove()
    return costs


def _std(sum_sq: torch.Tensor, total: torch.Tensor, count: int) -> torch.Tensor:
    mean = total / count
    return (sum_sq / count - mean.square()).clamp(min=0).sqrt() + EPS
