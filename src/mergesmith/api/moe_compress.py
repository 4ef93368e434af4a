"""``mergesmith moe compress MODEL OUT --rank R --remaining ρ``: MC-SMoE's compression of an MoE's experts.

Every expert matrix becomes low-rank + structured sparse (:mod:`mergesmith.fit.losparse`): pruned once by
magnitude, or, with ``--data FILE --steps N``, while the factors are fine-tuned by distillation from the
uncompressed model (MC-SMoE's recovery loss: KD at T = 2 with weight 0.2 plus next-token cross-entropy; AdamW,
lr 2e-4, β = (0.9, 0.98), ε = 1e-6, weight decay 0.01; only the experts' factors train). The output is the dense
reconstruction, an ordinary transformers MoE, with the factors in ``mergesmith_losparse.safetensors`` and the
parameter counts in the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save as safetensors_bytes

from mergesmith.api.moe_inspect import calibration_batches
from mergesmith.api.moe_merge import model_state, write_rewritten
from mergesmith.api.pipeline import MergeResult
from mergesmith.api.publish import OutputNotes, card_header, model_name
from mergesmith.errors import CheckpointError, RecipeError
from mergesmith.fit.evaluate import model_folder
from mergesmith.fit.hf import load_causal_lm
from mergesmith.fit.losparse import LoSparseConfig, bake, compress, expert_modules, stored_parameters
from mergesmith.version import __version__

FACTORS_FILE = "mergesmith_losparse.safetensors"


def compress_moe(
    model: str | Path,
    out: str | Path,
    *,
    rank: int = 32,
    remaining: float = 0.10,
    data: str | Path | None = None,
    steps: int = 0,
    lr: float = 2e-4,
    limit: int = 256,
    max_length: int = 256,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> MergeResult:
    """Write ``model`` with its experts compressed into ``out`` (the module docstring)."""
    if not 0.0 <= remaining <= 1.0:
        raise RecipeError(f"moe compress: --remaining must be in [0, 1], got {remaining}")
    if rank < 1:
        raise RecipeError(f"moe compress: --rank must be at least 1, got {rank}")
    if steps > 0 and data is None:
        raise RecipeError("moe compress: --steps fine-tunes on calibration texts; give --data FILE")
    folder = model_folder(model)
    module = load_causal_lm(folder)
    if not expert_modules(module):
        raise CheckpointError(f"{folder}: {type(module).__name__} has no fused experts to compress")
    dense = sum(
        getattr(m, t).numel() for _, m in expert_modules(module) for t in ("gate_up_proj", "down_proj")
    )
    batches = calibration_batches(folder, data, limit, max_length) if data is not None else None
    config = LoSparseConfig(rank=rank, remaining=remaining)
    torch.manual_seed(seed)
    try:
        targets, report = compress(module, config, batches, steps, lr)
    except ValueError as e:
        raise RecipeError(f"moe compress: {e}") from None
    stored = bake(targets, config.direction)
    model_config = json.loads((folder / "config.json").read_text())
    state = model_state(module, model_config)
    record: dict[str, Any] = {
        "rank": rank,
        "remaining": remaining,
        "direction": config.direction,
        "steps": steps,
        "lr": lr if steps else None,
        "data": str(data) if data is not None else None,
        "expert_parameters_dense": dense,
        "expert_parameters_stored": stored_parameters(stored),
        "final_loss": report.losses[-1] if report.losses else None,
        "seed": seed,
    }
    notes = _notes(folder, record, stored)
    return write_rewritten(folder, out, state, model_config, notes, seed, force, progress)


def _notes(folder: Path, record: dict[str, Any], stored: dict[str, torch.Tensor]) -> OutputNotes:
    name = model_name(str(folder))
    ratio = record["expert_parameters_stored"] / record["expert_parameters_dense"]
    card = (
        card_header([name], ["mergesmith", "moe", "losparse"], f"{name}, experts compressed")
        + f"Made with [mergesmith](https://pypi.org/project/mergesmith/) {__version__} `moe compress` (MC-SMoE's "
        f"low-rank + structured-sparse experts): the weights here are the dense reconstruction; the factors are in "
        f"`{FACTORS_FILE}` ({100 * ratio:.1f} % of the experts' parameters).\n\n```yaml\n"
        + yaml.safe_dump(record, sort_keys=False)
        + "```\n"
    )
    files: dict[str, str | bytes] = {FACTORS_FILE: safetensors_bytes(stored)}
    return OutputNotes("moe-compress", "moe_compress", record, files, card)
