"""What a per-tensor rule and a statistics pass see of one tensor: its context (name, seed, the method's
statistics, the fit's result, the row block) and its inputs, streamed one tensor (or row block) at a time."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TensorContext:
    """What a rule may know about the tensor it merges besides the values."""

    name: str
    seed: int = 0
    state: Any = None  # what the method's prepare() returned
    fitted: Any = (
        None  # a data-driven method's FitResult (mergesmith.fit.task): statistics, masks, coefficients
    )
    rows: tuple[int, int] | None = None  # the row block being merged (elementwise methods, large tensors)
    tensor_state: Any = None  # what the method's tensor_stats() returned for this tensor
    layer: int | None = None
    num_layers: int | None = None

    def generator(self, salt: str = "") -> torch.Generator:
        """A generator seeded from (seed, tensor name, salt): random rules are reproducible and independent
        of the order (or thread) in which tensors are merged."""
        gen = torch.Generator()
        gen.manual_seed(self.seed_for(salt))
        return gen

    def seed_for(self, salt: str = "") -> int:
        """The 63-bit seed of (seed, tensor name, salt, row block) that ``generator`` uses."""
        block = f"\0rows{self.rows[0]}" if self.rows is not None else ""  # each row block draws its own bits
        digest = hashlib.sha256(f"{self.seed}\0{self.name}\0{salt}{block}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class TensorInputs:
    """One tensor's inputs as streamed to ``prepare``: fp32 values and the resolved parameters."""

    name: str
    base: torch.Tensor | None
    experts: list[torch.Tensor]
    params: dict[str, Any]
    rows: tuple[int, int] | None = (
        None  # the row block, when a large tensor of an elementwise method is split
    )


# A pass over the model: calling it yields each mergeable tensor's inputs once.
TensorStream = Callable[[], Iterator[TensorInputs]]
Rule = Callable[[torch.Tensor | None, list[torch.Tensor], dict[str, Any], TensorContext], torch.Tensor]
