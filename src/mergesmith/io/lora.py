"""LoRA adapters as checkpoints: ``BASE+ADAPTER`` (mergekit's syntax) or a PEFT adapter folder given as a model,
applied tensor by tensor while the merge streams.

A PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) holds, per adapted layer, A (r × in)
and B (out × r). Reading a weight W of an adapted layer gives

    W' = W + s · B A,   s = α / r   (rsLoRA, ``use_rslora``: s = α / √r),

with α from ``alpha_pattern`` when a pattern matches the layer, else ``lora_alpha``, and r = A's rank; for an
embedding (``lora_embedding_A`` r × vocab, ``lora_embedding_B`` dim × r) the product is transposed, and for
``fan_in_fan_out`` layers (GPT-2's Conv1D) too. Full tensors the adapter saves (``modules_to_save``, trained
biases) replace the base's. This is PEFT's ``merge_and_unload``, one tensor at a time: the whole model is never in
memory. DoRA (``use_dora``) and non-LoRA adapters are refused in one line.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergesmith.errors import CheckpointError
from mergesmith.io.reader import Source, WrappedSource
from mergesmith.io.safetensors_io import SafetensorsFile

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
CACHED_TENSORS = 4  # patched tensors kept for the row blocks of one tensor read by several threads


def is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class Patch:
    """How one base tensor changes: replaced by the adapter's ``full`` tensor, and/or + scale · B A
    (``transpose``: its transpose)."""

    a: str | None
    b: str | None
    scale: float
    transpose: bool = False
    full: str | None = None


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the module's name (or the
    end of it, after a dot)."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


class Adapter:
    """A PEFT LoRA adapter folder, read lazily: which base tensors it patches and how."""

    def __init__(self, folder: Path):
        self.folder = folder
        try:
            self.config = json.loads((folder / ADAPTER_CONFIG).read_text())
        except (OSError, json.JSONDecodeError):
            raise CheckpointError(f"{folder / ADAPTER_CONFIG}: not a readable adapter config") from None
        kind = str(self.config.get("peft_type", "LORA")).upper()
        if kind != "LORA":
            raise CheckpointError(f"{folder}: a {kind} adapter; only LoRA adapters can be applied")
        if self.config.get("use_dora"):
            raise CheckpointError(
                f"{folder}: a DoRA adapter (use_dora); its magnitude vectors are not applied here — merge it "
                "with PEFT's merge_and_unload first"
            )
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(
                f"{folder}: no {ADAPTER_WEIGHTS} (a pickled adapter_model.bin is not read; save it with safetensors)"
            )
        self.file = SafetensorsFile(weights)
        self.patches = self._patches()

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def _patches(self) -> dict[str, Patch]:
        groups: dict[str, dict[str, str]] = {}
        full: dict[str, str] = {}
        for key in self.file.keys():
            name = key.removeprefix(PEFT_PREFIX)
            match = re.fullmatch(
                r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight|(.+)\.(lora_embedding_[AB])(?:\.[^.]+)?", name
            )
            if match is None:
                # modules_to_save, trained biases, a saved (e.g. resized) embedding's base layer: the adapter's
                # full tensor replaces the base's (and a LoRA delta of the same layer is added to it)
                full[name.replace(".base_layer.", ".")] = key
                continue
            module = match[1] or match[3]
            part = match[2] or match[4]
            groups.setdefault(module, {})[part[-1]] = key
        alpha = float(self.config.get("lora_alpha", self.config.get("r", 8)))
        rslora = bool(self.config.get("use_rslora", False))
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        patches = {name: Patch(None, None, 0.0, full=key) for name, key in full.items()}
        for module, parts in groups.items():
            if set(parts) != {"A", "B"}:
                raise CheckpointError(f"{self.folder}: layer '{module}' has lora_A or lora_B but not both")
            rank = int(self.file.info(parts["A"])[1][0])
            module_alpha = float(_pattern_value(self.config.get("alpha_pattern") or {}, module, alpha))
            scale = module_alpha / (math.sqrt(rank) if rslora else rank)
            embedding = "lora_embedding" in parts["A"]
            name = f"{module}.weight"
            transpose = embedding or fan_in_fan_out
            patches[name] = Patch(parts["A"], parts["B"], scale, transpose, full.get(name))
        return patches

    def delta(self, patch: Patch) -> torch.Tensor:
        assert patch.a is not None and patch.b is not None
        a = self.file.get(patch.a).float()
        b = self.file.get(patch.b).float()
        product = (b @ a) * patch.scale
        return product.T if patch.transpose else product

    def delta_shape(self, patch: Patch) -> tuple[int, ...]:
        assert patch.a is not None and patch.b is not None
        rows, cols = self.file.info(patch.b)[1][0], self.file.info(patch.a)[1][1]
        return (cols, rows) if patch.transpose else (rows, cols)

    def close(self) -> None:
        self.file.close()


class LoraSource(WrappedSource):
    """A base checkpoint with a LoRA adapter applied as each tensor is read (the base's config and tokenizer)."""

    def __init__(self, base: Source, adapter: Adapter, label: str):
        super().__init__(base, label=label)
        self.base = base
        self.adapter = adapter
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._check()

    def _check(self) -> None:
        """Every patched tensor exists in the base with the patch's shape (else: not this adapter's base)."""
        for name, patch in self.adapter.patches.items():
            if not self.base.has(name):
                raise CheckpointError(
                    f"{self.label}: the adapter patches '{name}', which {self.base.label} does not have; is "
                    f"{self.base.label} the adapter's base ({self.adapter.base_model or 'not recorded'})?"
                )
            shape = tuple(self.base.info(name)[1])
            want = (
                tuple(self.adapter.file.info(patch.full)[1])
                if patch.a is None
                else self.adapter.delta_shape(patch)
            )
            if want != shape:
                raise CheckpointError(
                    f"{self.label}: the adapter's '{name}' is {list(want)} but {self.base.label}'s is "
                    f"{list(shape)}; is {self.base.label} the adapter's base "
                    f"({self.adapter.base_model or 'not recorded'})?"
                )

    def get(self, name: str) -> torch.Tensor:
        patch = self.adapter.patches.get(name)
        if patch is None:
            return self.base.get(name)
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
        weight = self.base.get(name)
        if patch.full is not None:
            weight = self.adapter.file.get(patch.full).to(weight.dtype)
        patched = weight if patch.a is None else (weight.float() + self.adapter.delta(patch)).to(weight.dtype)
        with self._lock:
            self._cache[name] = patched
            while len(self._cache) > CACHED_TENSORS:
                self._cache.popitem(last=False)
        return patched

    def files(self) -> list[Path]:
        return [
            *self.base.files(),
            self.adapter.folder / ADAPTER_CONFIG,
            self.adapter.folder / ADAPTER_WEIGHTS,
        ]

    def close(self) -> None:
        self.adapter.close()
        super().close()
