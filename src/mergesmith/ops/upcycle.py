"""Dense decoders → one mixture-of-experts checkpoint, read tensor by tensor (what ``mergesmith moe`` streams).

:class:`UpcycledSource` is a virtual checkpoint in an MoE family's layout (:mod:`mergesmith.arch.moe`): each
expert tensor is built when the engine asks for it, from the experts' dense FFN weights of that layer only, so
memory holds one output tensor at a time. Per expert (mergekit-moe's ``noise_and_scale``):

    W_e = (W + σ_e · N(0, 1)) · (ρ_e if W is down_proj else 1)

with σ_e its ``noise_scale`` and ρ_e its ``residual_scale`` (what the expert adds to the residual stream), in the
source dtype, then cast to the output dtype. The noise is drawn from a generator seeded by the seed, the expert's
index and the tensor's name: the same for any order of reading (mergekit draws from the global generator in its
own writing order, so its noisy experts are not reproduced bit for bit; without noise they are).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergesmith.arch import moe as layout
from mergesmith.arch.layers import num_layers
from mergesmith.errors import CheckpointError
from mergesmith.io.reader import Source


@dataclass(frozen=True)
class ExpertSource:
    """One expert: the dense model its FFN comes from and its ``noise_scale`` / ``residual_scale``."""

    source: Source
    noise_scale: float | None = None
    residual_scale: float | None = None


def expert_tensor(
    expert: ExpertSource, name: str, index: int, seed: int, shared: bool = False
) -> torch.Tensor:
    """The expert's dense tensor ``name`` with its noise and residual scale (the module docstring's equation)."""
    tensor = expert.source.get(name)
    if expert.noise_scale is not None:
        key = f"{seed}:{'shared' if shared else 'expert'}:{index}:{name}".encode()
        generator = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.dtype)
        tensor = tensor + noise * expert.noise_scale
    if expert.residual_scale is not None and name.endswith("down_proj.weight"):
        tensor = tensor * expert.residual_scale
    return tensor


class UpcycledSource(Source):
    """The MoE checkpoint of ``family`` made of ``base`` (every tensor outside the FFN), ``experts`` (one routed
    expert each, in order), ``shared`` (Qwen2-MoE's shared expert) and the router rows ``routers`` ``[L, E, H]``
    (``shared_routers`` ``[L, S, H]``); tensors in ``dtype`` (None: as stored)."""

    def __init__(
        self,
        base: Source,
        experts: Sequence[ExpertSource],
        family: str,
        config: dict[str, Any],
        routers: torch.Tensor,
        shared: Sequence[ExpertSource] = (),
        shared_routers: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ):
        self.base, self.experts, self.shared = base, list(experts), list(shared)
        self.family, self.config, self.dtype, self.seed = family, config, dtype, seed
        self.routers, self.shared_routers = routers, shared_routers
        self.label = f"MoE of {base.label}"
        self.folder = base.folder
        self.layers = num_layers(base.config, base.keys())
        check_experts(base, [e.source for e in self.experts + self.shared], self.layers)
        self._plan: dict[str, Any] = {}
        for name in base.keys():
            if not layout.is_dense_ffn(name):
                self._plan[name] = ("base", name)
        if family == "qwen2_moe":
            self._zero_biases()
        for layer in range(self.layers):
            self._plan_layer(layer)

    # -- the layout ------------------------------------------------------------------------------------------

    def _plan_layer(self, layer: int) -> None:
        self._plan[layout.router(layer)] = ("router", layer)
        if self.family == "qwen2_moe":
            for e in range(len(self.experts)):
                for part in layout.FFN:
                    self._plan[layout.expert_ffn(layer, e, part)] = (
                        "expert",
                        e,
                        layout.dense_ffn(layer, part),
                    )
            for part in layout.FFN:
                self._plan[layout.shared_ffn(layer, part)] = ("shared", 0, layout.dense_ffn(layer, part))
            self._plan[layout.shared_router(layer)] = ("shared_router", layer)
        else:
            gate_up, down = layout.fused_experts(layer)
            self._plan[gate_up] = ("gate_up", layer)
            self._plan[down] = ("down", layer)

    def _zero_biases(self) -> None:
        """Qwen2-MoE has q/k/v biases: zeros where the base has none (head_dim = hidden / heads, as mergekit)."""
        config = self.base.config
        head_dim = int(config["hidden_size"]) // int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
        for layer in range(num_layers(config, self.base.keys())):
            for part, heads in (("q", config["num_attention_heads"]), ("k", kv_heads), ("v", kv_heads)):
                name = f"model.layers.{layer}.self_attn.{part}_proj.bias"
                if not self.base.has(name):
                    self._plan[name] = ("zeros", int(heads) * head_dim)

    # -- Source ----------------------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._plan)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        entry = self._plan[name]
        kind = entry[0]
        if kind == "base":
            dtype, shape = self.base.info(name)
            return (self.dtype or dtype) if dtype.is_floating_point else dtype, shape
        if kind == "zeros":
            return self.dtype or torch.float32, (entry[1],)
        if kind in ("router", "shared_router"):
            table = self.routers if kind == "router" else self.shared_routers
            assert table is not None
            return self.dtype or table.dtype, tuple(table[entry[1]].shape)
        count = len(self.experts)
        if kind in ("expert", "shared"):
            dtype, shape = self.experts[0].source.info(entry[2])
            return self.dtype or dtype, shape
        dtype, gate = self.experts[0].source.info(layout.dense_ffn(entry[1], "gate_proj"))
        if kind == "gate_up":
            return self.dtype or dtype, (count, 2 * gate[0], gate[1])
        return self.dtype or dtype, (count, gate[1], gate[0])

    def get(self, name: str) -> torch.Tensor:
        entry = self._plan[name]
        kind = entry[0]
        if kind == "base":
            tensor = self.base.get(name)
            return tensor.to(self.dtype) if self.dtype and tensor.dtype.is_floating_point else tensor
        if kind == "zeros":
            return torch.zeros(entry[1], dtype=self.dtype or torch.float32)
        if kind in ("router", "shared_router"):
            table = self.routers if kind == "router" else self.shared_routers
            assert table is not None
            return self._cast(table[entry[1]].contiguous())
        if kind in ("expert", "shared"):
            experts = self.experts if kind == "expert" else self.shared
            return self._cast(
                expert_tensor(experts[entry[1]], entry[2], entry[1], self.seed, kind == "shared")
            )
        layer = entry[1]
        parts = ("gate_proj", "up_proj") if kind == "gate_up" else ("down_proj",)
        rows = [
            torch.cat([expert_tensor(e, layout.dense_ffn(layer, p), i, self.seed) for p in parts])
            for i, e in enumerate(self.experts)
        ]
        return self._cast(torch.stack(rows))

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype) if self.dtype is not None else tensor

    def files(self) -> list[Path]:
        sources = [self.base] + [e.source for e in self.experts + self.shared]
        seen: dict[Path, None] = {}
        for source in sources:
            for path in source.files():
                seen.setdefault(path, None)
        return list(seen)


def check_experts(base: Source, experts: Sequence[Source], layers: int) -> None:
    """Every expert has the base's layer count and, in every layer, an FFN of the base's shapes: else one line
    naming the expert and the tensor."""
    for expert in experts:
        theirs = num_layers(expert.config, expert.keys())
        if theirs != layers:
            raise CheckpointError(
                f"{expert.label}: {theirs} layers, the base has {layers}; experts must be fine-tunes of one "
                "architecture"
            )
        for layer in range(layers):
            for part in layout.FFN:
                name = layout.dense_ffn(layer, part)
                if not expert.has(name):
                    raise CheckpointError(
                        f"{expert.label}: no tensor {name}; an expert must be a dense decoder"
                    )
                shape = expert.info(name)[1]
                wanted = base.info(name)[1] if base.has(name) else shape
                if shape != wanted:
                    raise CheckpointError(
                        f"{expert.label}: {name} is {list(shape)}, the base's is {list(wanted)}; experts must "
                        "have the base's shapes"
                    )
