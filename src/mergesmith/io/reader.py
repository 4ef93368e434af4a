"""Lazy readers over checkpoints: an HF folder (single or sharded safetensors, or pickled ``.bin`` when allowed),
a single ``.safetensors`` file, or an in-memory state dict. Tensors are read one at a time, memory-mapped."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from mergesmith.errors import CheckpointError
from mergesmith.io.safetensors_io import SafetensorsFile

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"


class Source:
    """What the engine reads: tensor names, shapes, dtypes, values; plus the HF config when there is one."""

    label: str = "<model>"
    config: dict[str, Any] = {}
    folder: Path | None = None

    def keys(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def files(self) -> list[Path]:
        return []

    def has(self, name: str) -> bool:
        return name in self._key_set()

    def _key_set(self) -> set[str]:
        cached = getattr(self, "_keys_cache", None)
        if cached is None:
            cached = set(self.keys())
            self._keys_cache = cached
        return cached


class DictSource(Source):
    """An in-memory state dict (``merge_state_dicts``)."""

    def __init__(
        self, tensors: Mapping[str, torch.Tensor], label: str = "<state dict>", config: dict | None = None
    ):
        self.tensors = dict(tensors)
        self.label = label
        self.config = dict(config or {})  # a checkpoint's config.json, when the tensors are read from one

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self.tensors[name]
        return t.dtype, tuple(t.shape)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class CheckpointSource(Source):
    """A checkpoint on disk. ``path`` is an HF model folder or a single ``.safetensors`` / ``.bin`` file."""

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        self.path = Path(path)
        self.label = str(path)
        self.allow_pickle = allow_pickle
        self.config = {}
        self.folder = None
        self._files: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        self._index_file: Path | None = None
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or folder; check the model path in the recipe")
        if self.path.is_dir():
            self.folder = self.path
            self._open_folder()
        elif self.path.suffix == ".safetensors":
            self._open_safetensors([self.path])
        elif self.path.suffix in (".bin", ".pt", ".pth"):
            self._open_pickles([self.path])
        else:
            raise CheckpointError(f"{self.path}: not a model folder, .safetensors or .bin file")

    # -- opening -------------------------------------------------------------------------------------------
    def _open_folder(self) -> None:
        config_path = self.path / "config.json"
        if config_path.exists():
            try:
                self.config = json.loads(config_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{config_path}: not valid JSON") from None
        if (self.path / SAFE_INDEX).exists():
            self._open_safetensors(self._read_index(self.path / SAFE_INDEX))
        elif (self.path / SAFE_SINGLE).exists():
            self._open_safetensors([self.path / SAFE_SINGLE])
        elif (self.path / PICKLE_INDEX).exists() or (self.path / PICKLE_SINGLE).exists():
            index = self.path / PICKLE_INDEX
            self._open_pickles(self._read_index(index) if index.exists() else [self.path / PICKLE_SINGLE])
        else:
            loose = sorted(self.path.glob("*.safetensors"))
            if not loose:
                raise CheckpointError(
                    f"{self.path}: no model.safetensors, sharded index or pytorch_model.bin in this folder"
                )
            self._open_safetensors(loose)

    def _read_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map' object)") from None
        self._index_file = index
        shards = []
        for name, shard in weight_map.items():
            shard_path = self.path / shard
            if not shard_path.exists():
                raise CheckpointError(f"{index}: tensor '{name}' points to missing shard '{shard}'")
            self._where[name] = shard_path
            if shard_path not in shards:
                shards.append(shard_path)
        self._indexed = dict(self._where)
        return shards

    def _open_safetensors(self, paths: list[Path]) -> None:
        indexed = getattr(self, "_indexed", None)
        for p in paths:
            f = SafetensorsFile(p)
            self._files[p] = f
            for name in f.keys():
                if indexed is None:
                    if name in self._where and self._where[name] != p:
                        raise CheckpointError(f"{self.path}: tensor '{name}' appears in two files ({p.name})")
                    self._where[name] = p
        if indexed is not None:
            for name, p in indexed.items():
                if name not in self._files[p].entries:
                    raise CheckpointError(
                        f"{self._index_file}: tensor '{name}' is listed in shard '{p.name}' but not stored there"
                    )

    def _open_pickles(self, paths: list[Path]) -> None:
        if not self.allow_pickle:
            raise CheckpointError(
                f"{paths[0]}: pickled weights can run code when loaded; convert them to safetensors or pass "
                "--allow-pickle (loaded with weights_only=True)"
            )
        for p in paths:
            try:
                state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointError(f"{p}: refused or unreadable pickle ({first[:200]})") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{p}: not a flat state dict of tensors")
            self._files[p] = state
            for name in state:
                self._where[name] = p

    # -- access --------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        f = self._files[self._where[name]]
        if isinstance(f, SafetensorsFile):
            return f.info(name)
        t = f[name]
        return t.dtype, tuple(t.shape)

    def get(self, name: str) -> torch.Tensor:
        f = self._files[self._where[name]]
        return f.get(name) if isinstance(f, SafetensorsFile) else f[name]

    def files(self) -> list[Path]:
        out = []
        if self.folder is not None and (self.folder / "config.json").exists():
            out.append(self.folder / "config.json")
        if self._index_file is not None:
            out.append(self._index_file)
        return out + list(self._files)

    def close(self) -> None:
        for f in self._files.values():
            if isinstance(f, SafetensorsFile):
                f.close()


class WrappedSource(Source):
    """A source that reads as another (``inner``) except where a subclass overrides ``info`` / ``get``: LoRA on
    read, re-indexed vocabularies, tokensurgeon. ``config`` replaces the inner config when given."""

    def __init__(self, inner: Source, label: str | None = None, config: dict[str, Any] | None = None):
        self.inner = inner
        self.label = label if label is not None else inner.label
        self.config = config if config is not None else inner.config
        self.folder = inner.folder

    def keys(self) -> list[str]:
        return self.inner.keys()

    def has(self, name: str) -> bool:
        return self.inner.has(name)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.inner.info(name)

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(name)

    def files(self) -> list[Path]:
        return self.inner.files()

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


class SourceTensors(Mapping[str, torch.Tensor]):
    """A checkpoint seen as a read-only state dict; tensors are read (memory-mapped) when asked for."""

    def __init__(self, source: Source):
        self.source = source

    def __getitem__(self, name: str) -> torch.Tensor:
        if not self.source.has(name):
            raise KeyError(name)
        return self.source.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.source.has(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.source.keys())

    def __len__(self) -> int:
        return len(self.source.keys())


def close_sources(sources: Iterable[Source]) -> None:
    """Close every source that holds open files (memory maps); a failure to close one does not stop the others."""
    for source in sources:
        close = getattr(source, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()
