"""The floating-point dtypes a merge reads and writes, by the names recipes and the command line use."""

from __future__ import annotations

import torch

DTYPE_BY_NAME: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
DTYPE_NAMES: tuple[str, ...] = tuple(DTYPE_BY_NAME)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``'bfloat16'`` (the spelling of config.json's ``torch_dtype``)."""
    return str(dtype).removeprefix("torch.")


def compute_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """Merge arithmetic is fp32, or fp64 when an input is fp64; the result is rounded once to the output dtype."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
