"""Small models trained from scratch (MLPs and CIFAR-style ResNets): a folder format, building and loading.

A small model is a folder with two files:

* ``config.json`` — the architecture, one of::

      {"model_type": "mergesmith_mlp", "sizes": [784, 512, 512, 10]}
      {"model_type": "mergesmith_resnet", "in_channels": 1, "widths": [16, 32, 64], "blocks": [2, 2, 2],
       "num_classes": 10}

* ``model.safetensors`` — the weights (float32 as saved by :func:`save_small_model`), named as below.

``mergesmith_mlp``: the input is flattened (``sizes[0]`` features), then Linear layers ``layers.{i}.weight``
(``sizes[i+1] × sizes[i]``) and ``layers.{i}.bias`` with a ReLU between two layers and none after the last (it
gives the logits). ``mergesmith_resnet``: torchvision's ResNet naming with BasicBlocks, CIFAR-style — a 3×3
stride-1 stem ``conv1`` (no bias) and BatchNorm ``bn1`` (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``), then per stage ``s`` (from 1) ``blocks[s-1]`` blocks ``layer{s}.{b}`` of width
``widths[s-1]``, each ``conv1 → bn1 → ReLU → conv2 → bn2``, plus the shortcut, then ReLU; the first block of
every stage after the first has stride 2, and a block whose width or stride changes has a projection shortcut
``downsample.0`` (1×1 conv, no bias) and ``downsample.1`` (BatchNorm); then global average pooling and ``fc``
(``weight``, ``bias``). Widths are the channels themselves (a width multiplier k writes ``[16k, 32k, 64k]``). An
optional ``inner_widths`` (per stage, one width per block) sets each block's ``conv1`` output width (default: the
stage's width; a PLeaS merge writes it).

In Python::

    module = build(config)  # train it, then
    save_small_model(module, config, folder)
    module, config = load_small_model(folder)  # in eval mode (BatchNorm uses the running statistics)

Models take image batches ``(batch, channels, height, width)`` (an MLP also takes ``(batch, features)``) and
return logits ``(batch, classes)``. Their permutation specs live with the others (``mergesmith.arch.permutation``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergesmith.errors import CheckpointError
from mergesmith.io.safetensors_io import SafetensorsFile, save_file

MLP_TYPE = "mergesmith_mlp"
RESNET_TYPE = "mergesmith_resnet"
SMALL_TYPES = (MLP_TYPE, RESNET_TYPE)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class MLP(nn.Module):
    """Linear layers ``layers.{i}`` over the flattened input with ReLUs between them (none after the last)."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm, and a 1×1 projection shortcut where the width or stride changes."""

    def __init__(self, in_channels: int, channels: int, stride: int, inner: int | None = None):
        super().__init__()
        inner = inner or channels  # conv1's output width (PLeaS widens it on its own)
        self.conv1 = nn.Conv2d(in_channels, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3×3 stem, stages ``layer1…`` of BasicBlocks, global average pooling, ``fc``."""

    def __init__(
        self,
        in_channels: int,
        widths: list[int],
        blocks: list[int],
        num_classes: int,
        inner_widths: list[list[int]] | None = None,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        channels = widths[0]
        for s, (width, count) in enumerate(zip(widths, blocks), start=1):
            stage = []
            for b in range(count):
                inner = inner_widths[s - 1][b] if inner_widths is not None else width
                stage.append(BasicBlock(channels, width, 2 if s > 1 and b == 0 else 1, inner))
                channels = width
            self.add_module(f"layer{s}", nn.Sequential(*stage))
        self.stages = len(widths)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for s in range(1, self.stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(x.mean(dim=(2, 3)))


def _ints(config: Mapping[str, Any], key: str, single: bool = False) -> Any:
    """``config[key]`` checked to be a positive integer (``single``) or a non-empty list of them."""
    value = config.get(key)
    values = [value] if single else value
    if not (
        isinstance(values, list)
        and values
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    ):
        what = "a positive integer" if single else "a non-empty list of positive integers"
        raise CheckpointError(f"config.json: {key!r} must be {what} for model_type {config['model_type']!r}")
    return value


def build(config: Mapping[str, Any]) -> nn.Module:
    """A freshly initialized module (torch's default init) of the architecture ``config`` describes."""
    family = config.get("model_type")
    if family == MLP_TYPE:
        sizes = _ints(config, "sizes")
        if len(sizes) < 2:
            raise CheckpointError("config.json: 'sizes' needs at least the input and the output size")
        return MLP(list(sizes))
    if family == RESNET_TYPE:
        widths, blocks = _ints(config, "widths"), _ints(config, "blocks")
        if len(widths) != len(blocks):
            raise CheckpointError(
                f"config.json: 'widths' has {len(widths)} stages but 'blocks' has {len(blocks)}"
            )
        inner = config.get("inner_widths")
        if inner is not None and (
            not isinstance(inner, list)
            or [len(row) if isinstance(row, list) else -1 for row in inner] != list(blocks)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for row in inner for v in row)
        ):
            raise CheckpointError(
                "config.json: 'inner_widths' must list, per stage, one positive width per block (as 'blocks')"
            )
        return ResNet(
            _ints(config, "in_channels", single=True),
            list(widths),
            list(blocks),
            _ints(config, "num_classes", single=True),
            inner,
        )
    raise CheckpointError(
        f"config.json: model_type {family!r} is not a small model (supported: {', '.join(SMALL_TYPES)})"
    )


def _check_tensors(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], where: str, family: str
) -> None:
    """One-line error naming the first tensor (in module order, then extras) that the config does not predict."""
    for name, shape in expected.items():
        if name not in found:
            raise CheckpointError(f"{where}: tensor {name!r} is missing (the config's {family} has it)")
        if tuple(found[name]) != tuple(shape):
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {list(found[name])} but the config gives {list(shape)}"
            )
    for name in found:
        if name not in expected:
            raise CheckpointError(f"{where}: tensor {name!r} is not part of the config's {family}")


def save_small_model(module: nn.Module, config: Mapping[str, Any], folder: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``folder`` (created if needed; files overwritten).
    The module's tensors must be those ``config`` describes (else a one-line error and nothing written)."""
    folder = Path(folder)
    state = {name: t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
    with torch.device("meta"):  # shapes only: no memory, no init
        expected = {name: tuple(t.shape) for name, t in build(config).state_dict().items()}
    _check_tensors(
        expected, {n: tuple(t.shape) for n, t in state.items()}, "module", str(config["model_type"])
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2) + "\n")
    save_file(state, folder / WEIGHTS_FILE)
    return folder


def load_small_model(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The module (in eval mode) and config of a small-model folder. A missing or unreadable file, an unknown
    model_type, or weights that do not match the config (the first such tensor named) is a one-line error."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(
                f"{path}: not found (a small model folder holds {CONFIG_FILE} and {WEIGHTS_FILE})"
            )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: not readable JSON ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: not a JSON object")
    try:
        module = build(config)
    except CheckpointError as e:  # build's messages start with "config.json:": say which one
        raise CheckpointError(f"{folder}/{e}") from None
    weights = SafetensorsFile(weights_path)
    try:
        found = {name: weights.info(name)[1] for name in weights.keys()}
        expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
        _check_tensors(expected, found, str(weights_path), str(config["model_type"]))
        # load_state_dict copies out of the memory map, so the file can be closed afterwards
        module.load_state_dict({name: weights.get(name) for name in found})
    finally:
        weights.close()
    return module.eval(), config


def reset_batchnorm(module: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> None:
    """Recompute every BatchNorm's running mean and variance on ``inputs``: the statistics are reset, then one
    pass in batches with the BatchNorms in training mode and cumulative averaging (momentum None: the running
    values become the plain average of the batches' mean and unbiased variance), the rest of the module in eval
    mode. The module ends in eval mode with its BatchNorms' momentum as before. A no-op without BatchNorm (what a
    merged model needs before it is evaluated: REPAIR's "reset")."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    module.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                module(inputs[start : start + batch_size])
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        module.eval()
