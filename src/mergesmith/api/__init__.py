"""The Python API: ``merge(recipe, out_dir)`` for checkpoints (:mod:`~mergesmith.api.pipeline`) and
``merge_state_dicts`` / ``fit_state_dicts`` in memory (:mod:`~mergesmith.api.state_dicts`)."""

from __future__ import annotations

from mergesmith.api.pipeline import MergeResult, merge
from mergesmith.api.state_dicts import fit_state_dicts, merge_state_dicts

__all__ = ["MergeResult", "fit_state_dicts", "merge", "merge_state_dicts"]
