"""The output side: sharded safetensors with an HF index, written into a folder whose layout is planned up front."""

from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path

import torch

from mergesmith.checkpoint.safetensors_io import ShardWriter, element_size
from mergesmith.errors import RecipeError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "KI": 2**10,
    "MI": 2**20,
    "GI": 2**30,
    "TI": 2**40,
}


def parse_size(text: str | int) -> int:
    """``2GB`` → 2·10⁹ bytes, ``500MiB`` → 500·2²⁰, ``123`` → 123 (HF's convention: GB is decimal)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise RecipeError(f"shard size '{text}' is not a size (examples: 2GB, 500MB, 1GiB, 1000000)")
    unit = (m.group(2) or "").upper().rstrip("B")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise RecipeError(f"shard size '{text}' must be positive")
    return size


class FolderWriter:
    """Assigns planned tensors to shards (in plan order, a new shard when the next tensor would overflow) and
    writes each tensor at its offset as it arrives. Thread-safe."""

    def __init__(self, folder: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], shard_size: int):
        self.folder = Path(folder)
        groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        used = 0
        for spec in specs:
            nbytes = math.prod(spec[2]) * element_size(spec[1])
            if groups[-1] and used + nbytes > shard_size:
                groups.append([])
                used = 0
            groups[-1].append(spec)
            used += nbytes
        count = len(groups)
        self.file_names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self.total_size = sum(math.prod(s[2]) * element_size(s[1]) for s in specs)
        self.shards: list[ShardWriter] = []
        self.shard_of: dict[str, ShardWriter] = {}
        self.weight_map: dict[str, str] = {}
        self._lock = threading.Lock()
        try:
            for file_name, group in zip(self.file_names, groups):
                shard = ShardWriter(self.folder / file_name, group, {"format": "pt"})
                self.shards.append(shard)
                for name, _, _ in group:
                    self.shard_of[name] = shard
                    self.weight_map[name] = file_name
        except BaseException:
            self.close()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.shard_of[name].write(name, tensor)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(self.weight_map.items())),
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
