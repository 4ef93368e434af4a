"""``mergesmith align REFERENCE MODEL OUT``: MODEL with its hidden units permuted into REFERENCE's order.

The output is MODEL's own function in REFERENCE's unit order (an HF folder of MODEL's config and tokenizer, its
outputs equal to MODEL's up to fp32 rounding), written by the merge pipeline as a passthrough of MODEL read
through its permutations — the same atomic output, manifest and model card as ``mergesmith merge`` — with every
permutation in ``alignment.json``. After it, averaging or task arithmetic between REFERENCE and OUT compares
like units (Git Re-Basin; :mod:`mergesmith.ops.permute`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergesmith.api.pipeline import MergeResult, merge


def align(
    reference: str | Path,
    model: str | Path,
    out: str | Path,
    *,
    method: str = "weight",
    data: str | Path | None = None,
    seed: int = 0,
    residual: bool = True,
    max_iter: int = 100,
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> MergeResult:
    """Write ``model`` aligned to ``reference`` into ``out`` (see the module docstring); ``method`` weight
    (data-free) or activation (on ``data``, a .jsonl or .csv file of texts)."""
    settings: dict[str, Any] = {"method": method, "reference": str(reference), "residual": residual}
    settings["max_iter"] = max_iter
    if data is not None:
        settings["data"] = {"path": str(data)}
    recipe = {
        "merge_method": "passthrough",
        "models": [{"model": str(model)}],
        "seed": seed,
        "align": settings,
    }
    return merge(recipe, out, force=force, allow_pickle=allow_pickle, progress=progress)
