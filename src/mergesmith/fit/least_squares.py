"""PLeaS's least-squares step: each linear (and convolution) layer of the partial merge refit to the permuted
ensemble.

For a linear layer ℓ, the two models' inputs X_A, X_B and outputs Y_A, Y_B on the data (B in A's unit order) are
arranged the way the partial merge arranges the layer's units (:mod:`mergesmith.ops.partial_merge`): merged units
take the mean (X_A + X_B)/2, separate units their own model's values, an unsplit axis the mean. Then

    W̃_ℓ = argmin ‖[X̃ 1] [W ; b]^⊤ − Ỹ‖²  (+ a tiny ridge for conditioning)

solved in closed form per row segment over the columns the block structure allows (S_A rows never read S_B
inputs and the reverse): exact for a linear layer, where PLeaS runs Adam for 400 steps on the same convex
objective. Layers are independent (inputs come from the ensemble, not from the merged model), so one pass over the
data accumulates every layer's X̃ᵀX̃ and X̃ᵀỸ (float64).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergesmith.arch.permutation import PermutationSpec
from mergesmith.fit.data import Encoded
from mergesmith.ops.partial_merge import UnitSplit
from mergesmith.ops.permute import block_index

RIDGE = 1e-6  # relative to the mean diagonal of X̃ᵀX̃: conditioning only


CONV_POSITIONS = 16  # output positions sampled per image for a convolution's least squares (seeded)


def _arrange(
    a: torch.Tensor, b: torch.Tensor, entry: Any, splits: Mapping[str, UnitSplit], spread: int = 1
) -> torch.Tensor:
    """(samples × features) of A and B as the partial merge lays the features out; ``spread`` features per
    channel (a convolution's unfolded kernel positions)."""
    if entry is None or entry.group not in splits:
        return (a + b) / 2
    split = splits[entry.group]
    block = entry.block * spread
    merged, separate = block_index(split.merged, block), block_index(split.separate, block)
    return torch.cat([(a[:, merged] + b[:, merged]) / 2, a[:, separate], b[:, separate]], 1)


def _segments(entry: Any, splits: Mapping[str, UnitSplit], spread: int = 1) -> tuple[int, int] | None:
    """(merged, separate) sizes of an axis the partial merge splits, else None."""
    if entry is None or entry.group not in splits:
        return None
    split = splits[entry.group]
    return len(split.merged) * entry.block * spread, len(split.separate) * entry.block * spread


def _conv_samples(
    conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A convolution as a linear map: the unfolded input patches (channel-major: channel c owns columns
    c·k² … (c+1)·k² − 1, as the flattened kernel) and the outputs, at the sampled output positions."""
    patches = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (B, C·k², L)
    outputs = y.flatten(2)  # (B, C', L)
    pick = lambda t: t[:, :, positions].permute(0, 2, 1).reshape(-1, t.shape[1]).double()  # noqa: E731
    return pick(patches), pick(outputs)


class _InputsOutputs:
    def __init__(self, module: nn.Module, layers: Iterable[str]):
        wanted = set(layers)
        self.seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = [
            m.register_forward_hook(self._hook(n)) for n, m in module.named_modules() if n in wanted
        ]

    def _hook(self, name: str) -> Any:
        def keep(_m: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.seen[name] = (inputs[0], output)

        return keep

    def take(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        seen, self.seen = self.seen, {}
        return seen

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _rows(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    flat = t.reshape(-1, t.shape[-1]).double()
    return flat[keep] if keep is not None and len(keep) == len(flat) else flat


def _run(module: nn.Module, batch: Encoded | torch.Tensor) -> torch.Tensor | None:
    with torch.inference_mode():
        if isinstance(batch, Encoded):
            module(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            return batch.attention_mask.reshape(-1).bool()
        module(batch)
        return None


def refit_layers(
    spec: PermutationSpec,
    splits: Mapping[str, UnitSplit],
    merged: Mapping[str, torch.Tensor],
    module_a: nn.Module,
    module_b_aligned: nn.Module,
    batches: Iterable[Encoded | torch.Tensor],
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The partial merge ``merged`` with every linear and (ungrouped) 2-D convolution layer the spec covers refit
    (module docstring; a convolution on ``CONV_POSITIONS`` seeded output positions per image); other tensors
    unchanged. ``module_b_aligned`` is B with its units already in A's order."""
    layers = {
        n: m
        for n, m in module_a.named_modules()
        if (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))
        and f"{n}.weight" in spec.axes
        and f"{n}.weight" in merged
    }
    rec_a, rec_b = _InputsOutputs(module_a, layers), _InputsOutputs(module_b_aligned, layers)
    grams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(seed)
    try:
        for batch in batches:
            keep = _run(module_a, batch)
            _run(module_b_aligned, batch)
            seen_a, seen_b = rec_a.take(), rec_b.take()
            for name, layer in layers.items():
                if name not in seen_a:
                    continue
                axes = spec.axes[f"{name}.weight"]
                (xa, ya), (xb, yb) = seen_a[name], seen_b[name]
                spread = 1
                if isinstance(layer, nn.Conv2d):
                    spread = layer.kernel_size[0] * layer.kernel_size[1]
                    length = ya.shape[2] * ya.shape[3]
                    positions = torch.randperm(length, generator=generator)[: min(CONV_POSITIONS, length)]
                    (xa, ya), (xb, yb) = (
                        _conv_samples(layer, xa, ya, positions),
                        _conv_samples(layer, xb, yb, positions),
                    )
                else:
                    xa, ya, xb, yb = (_rows(t, keep) for t in (xa, ya, xb, yb))
                x = _arrange(xa, xb, axes[1], splits, spread)
                y = _arrange(ya, yb, axes[0], splits)
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # the bias column
                gram, cross = grams.get(name, (0.0, 0.0))
                grams[name] = (gram + x.T @ x, cross + x.T @ y)  # type: ignore[assignment]
    finally:
        rec_a.remove()
        rec_b.remove()
    out = dict(merged)
    for name, (gram, cross) in grams.items():
        axes = spec.axes[f"{name}.weight"]
        weight = merged[f"{name}.weight"]
        has_bias = f"{name}.bias" in merged
        spread = weight[0, 0].numel() if weight.dim() == 4 else 1
        solution = _solve(
            gram, cross, _segments(axes[0], splits), _segments(axes[1], splits, spread), has_bias
        )
        out[f"{name}.weight"] = solution[:, :-1].reshape(weight.shape).to(weight.dtype)
        if has_bias:
            out[f"{name}.bias"] = solution[:, -1].to(merged[f"{name}.bias"].dtype)
    return out


def _solve(
    gram: torch.Tensor,
    cross: torch.Tensor,
    rows: tuple[int, int] | None,
    cols: tuple[int, int] | None,
    has_bias: bool,
) -> torch.Tensor:
    """[W | b] (out × in+1) by ridge least squares per row segment on its allowed columns; the bias column is
    allowed only when the layer has a bias."""
    n_in = gram.shape[0] - 1
    ridge = RIDGE * float(gram.diagonal().mean())
    bias = torch.tensor([n_in]) if has_bias else torch.tensor([], dtype=torch.long)
    if cols is None:
        allowed_a = allowed_b = torch.cat([torch.arange(n_in), bias])
    else:
        m, s = cols
        allowed_a = torch.cat([torch.arange(m + s), bias])  # merged and A's separate inputs
        allowed_b = torch.cat([torch.arange(m), torch.arange(m + s, m + 2 * s), bias])
    full = torch.cat([torch.arange(n_in), bias])
    out = torch.zeros(cross.shape[1], n_in + 1, dtype=torch.float64)
    if rows is None:
        segments = [(torch.arange(cross.shape[1]), full)]
    else:
        m, s = rows
        segments = [
            (torch.arange(m), full),
            (torch.arange(m, m + s), allowed_a),
            (torch.arange(m + s, m + 2 * s), allowed_b),
        ]
    for row_index, cols_index in segments:
        if len(row_index) == 0:
            continue
        g = gram[cols_index][:, cols_index] + ridge * torch.eye(len(cols_index), dtype=torch.float64)
        solution = torch.linalg.solve(g, cross[cols_index][:, row_index])  # (cols × rows)
        out[row_index.unsqueeze(1), cols_index.unsqueeze(0)] = solution.T
    return out
