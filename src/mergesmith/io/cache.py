"""The local cache folder: ``$MERGESMITH_CACHE`` if set, else ``~/.cache/mergesmith``.

It holds the input-hash cache of the manifest (``input-sha256.json``) and named data folders such as a benchmark's
zoos (``zoos/<name>``): a recipe's ``data: {zoo: NAME, task: …}`` reads ``zoos/<name>/data/<task>/<split>.jsonl``.
The library only knows this layout; what builds a zoo is the benchmark's business.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder; not created here."""
    env = os.environ.get("MERGESMITH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mergesmith"


def zoo_dir(name: str, quick: bool = False, cache: Path | None = None) -> Path:
    """The folder of a named zoo (``<cache>/zoos/<name>``, ``<name>-quick`` for its quick build)."""
    return Path(cache or cache_dir()) / "zoos" / (f"{name}-quick" if quick else name)
