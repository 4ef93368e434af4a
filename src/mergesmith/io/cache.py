"""The local cache folder: ``$MERGESMITH_CACHE`` if set, else ``~/.cache/mergesmith``.

It holds the input-hash cache of the manifest (``input-sha256.json``) and named data folders such as a benchmark's
zoos (``zoos/<name>``): a recipe's ``data: {zoo: NAME, task: …}`` reads ``zoos/<name>/data/<task>/<split>.jsonl``.
The library only knows this layout; what builds a zoo is the benchmark's business. Also the two ways results are
kept on disk: a JSON file written by rename (:func:`write_json`) and a value cached under the key it depends on
(:func:`keyed_json`).
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


def write_json(path: Path, value: Any, indent: int | None = None) -> None:
    """``value`` as JSON in ``path``, written by rename: a run stopped mid-write keeps the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=indent) + "\n")
    tmp.replace(path)


def keyed_json(path: Path, key: Any, compute: Callable[[], T], field: str = "value") -> T:
    """A JSON value kept in ``path`` under ``key``: read when the file was written with the same key, else
    ``compute()``d and written as ``{"key": key, field: value}`` (:func:`write_json`). ``key`` is what the value
    depends on: a changed setting or input recomputes it. It is compared as JSON reads it back (a tuple in it is
    the list the file holds)."""
    key = json.loads(json.dumps(key))
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved[field]
    value = compute()
    write_json(path, {"key": key, field: value})
    return value
