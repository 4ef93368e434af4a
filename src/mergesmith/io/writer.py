"""The output side: sharded safetensors with an HF index, written into a folder whose layout is planned up front."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from mergesmith.errors import RecipeError
from mergesmith.io.cache import cache_dir
from mergesmith.io.safetensors_io import ShardWriter, element_size

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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def input_sha256(path: Path) -> str:
    """sha256 of an input file for the manifest, remembered across merges by (device, inode, size, mtime in ns).

    Hashing every input costs about 1 s per GB — as much as a whole linear merge — and the same checkpoints are
    merged again and again (a grid of recipes), so the digest is cached like git's index caches file stats: a file
    rewritten in place changes its mtime and is hashed again. The cache is ``<cache>/input-sha256.json``
    (``$MERGESMITH_CACHE``, else ``~/.cache/mergesmith``); an unwritable cache only costs the re-hash.
    """
    st = os.stat(path)
    key = str(Path(path).resolve())
    stamp = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
    store = cache_dir() / "input-sha256.json"
    with _HASH_LOCK:
        try:
            cached = json.loads(store.read_text())
        except (OSError, ValueError):
            cached = {}
        entry = cached.get(key)
        if isinstance(entry, dict) and entry.get("stat") == stamp:
            return str(entry["sha256"])
    digest = sha256_file(path)
    with _HASH_LOCK, contextlib.suppress(OSError):
        try:
            cached = json.loads(store.read_text())
        except (OSError, ValueError):
            cached = {}
        cached[key] = {"stat": stamp, "sha256": digest}
        if len(cached) > 10000:  # keep the most recent entries
            cached = dict(list(cached.items())[-10000:])
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f"{store.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(cached))
        os.replace(tmp, store)
    return digest


_HASH_LOCK = threading.Lock()


def plan_shards(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], shard_size: int) -> dict[str, list]:
    """File name → the specs it holds, in plan order; a new shard when the next tensor would overflow."""
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
    names = (
        ["model.safetensors"]
        if count == 1
        else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    )
    return dict(zip(names, groups))


class FolderWriter:
    """Writes planned tensors into their shards as they arrive (any order, any thread).

    When the last tensor of a shard arrives the shard is synced to disk, hashed, and reported to ``on_done``
    (the resume journal). Shards listed in ``finished`` (verified by the caller) are not rewritten: their
    tensors are not expected.
    """

    def __init__(
        self,
        folder: Path,
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
        shard_size: int,
        finished: dict[str, str] | None = None,
        on_done: Callable[[str, str], None] | None = None,
    ):
        self.folder = Path(folder)
        layout = plan_shards(specs, shard_size)
        self.file_names = list(layout)
        self.total_size = sum(math.prod(s[2]) * element_size(s[1]) for s in specs)
        self.weight_map = {name: file for file, group in layout.items() for name, _, _ in group}
        self.hashes: dict[str, str] = dict(finished or {})
        self.on_done = on_done
        self.shards: dict[str, ShardWriter] = {}
        self._lock = threading.Lock()
        self._left: dict[
            str, int
        ] = {}  # bytes of each tensor still to be written (it may come in row blocks)
        try:
            for file_name, group in layout.items():
                if file_name not in self.hashes:
                    self.shards[file_name] = ShardWriter(self.folder / file_name, group, {"format": "pt"})
        except BaseException:
            self.close()
            raise

    def pending(self) -> set[str]:
        """Tensor names still to be written (those of unfinished shards)."""
        return {name for name, file in self.weight_map.items() if file not in self.hashes}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.write_rows(name, 0, tensor)

    def write_rows(self, name: str, first_row: int, block: torch.Tensor) -> None:
        """Write rows ``first_row…`` of tensor ``name`` (the whole tensor when they are all of it)."""
        file_name = self.weight_map[name]
        shard = self.shards[file_name]
        written = shard.write(name, block, first_row)
        with self._lock:
            left = self._left.get(name, shard.offsets[name][1]) - written
            self._left[name] = left
            if left == 0:
                shard.remaining.discard(name)
            complete = not shard.remaining and file_name not in self.hashes
            if complete:
                self.hashes[file_name] = ""  # claimed: only one thread finishes a shard
        if complete:
            shard.close()
            digest = shard.sha256() or sha256_file(shard.path)
            with self._lock:
                self.hashes[file_name] = digest
                if self.on_done is not None:
                    self.on_done(file_name, digest)

    def finalize(self) -> dict[str, str]:
        """After every tensor was written: hash any shard not reported yet (an empty model's only shard)."""
        for file_name, shard in self.shards.items():
            if not self.hashes.get(file_name):
                shard.close()
                self.hashes[file_name] = sha256_file(shard.path)
        return {f: self.hashes[f] for f in self.file_names}

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()

    def write_index(self) -> None:
        if len(self.file_names) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(self.weight_map.items())),
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
