"""The local cache folder: ``$MERGESMITH_CACHE`` if set, else ``~/.cache/mergesmith``.

It holds the input-hash cache of the manifest (``input-sha256.json``) and named data folders such as a benchmark's
zoos (``zoos/<name>``): a recipe's ``data: {zoo: NAME, task: …}`` reads ``zoos/<name>/data/<task>/<split>.jsonl``.
The library only knows this layout; what builds a zoo is the benchmark's business.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def cache_dir() -> Path:
    """The cache folder; not created here."""
    env = os.environ.get("MERGESMITH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mergesmith"


def zoo_dir(name: str, quick: bool = False, cache: Path | None = None) -> Path:
    """The folder of a named zoo (``<cache>/zoos/<name>``, ``<name>-quick`` for its quick build)."""
    return Path(cache or cache_dir()) / "zoos" / (f"{name}-quick" if quick else name)


def keyed_json(path: Path, key: Any, compute: Callable[[], T], field: str = "value") -> T:
    """A JSON value kept in ``path`` under ``key``: read when the file was written with the same key, else
    ``compute()``d and written as ``{"key": key, field: value}`` (by rename: an interrupted write leaves no half
    file). ``key`` is what the value depends on: a changed setting or input recomputes it."""
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved[field]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, field: value}) + "\n")
    tmp.replace(path)
    return value
