"""A recipe's ``align:``: every model's units permuted into the reference's order before the per-tensor method.

Weight matching reads the two models' tensors through their sources as it needs them (memory-mapped, one
tensor at a time per cost matrix), and the merge then reads the aligned model through a
:class:`~mergesmith.ops.permute.PermutedSource`, so alignment adds no full copy of any model to the merge's memory.
The permutations are written beside the output (``alignment.json``) and summarised in its manifest.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergesmith.api.publish import reference_model
from mergesmith.arch.permutation import PermutationSpec, permutation_spec
from mergesmith.errors import CheckpointError, RecipeError
from mergesmith.fit.activations import unit_correlations
from mergesmith.fit.data import Encoded, encode
from mergesmith.fit.hf import load_as_saved, load_tokenizer
from mergesmith.io.reader import Source, SourceTensors
from mergesmith.ops.permute import PermutedSource, permute_tensor, solve_assignment, weight_matching
from mergesmith.recipe.data import DataSpec, read_examples
from mergesmith.recipe.schema import Recipe

ALIGNMENT_FILE = "alignment.json"
log = logging.getLogger("mergesmith")


def check_same_architecture(reference: Source, model: Source) -> None:
    """Two models that can be aligned: the same family and the same tensors of the same shapes (one-line errors
    that name the first difference)."""
    ref_type, model_type = reference.config.get("model_type"), model.config.get("model_type")
    if ref_type != model_type:
        raise CheckpointError(f"{model.label}: model_type {model_type!r}, but the reference is {ref_type!r}")
    missing = sorted(set(reference.keys()) ^ set(model.keys()))
    if missing:
        raise CheckpointError(
            f"{model.label}: tensor {missing[0]!r} is in only one of it and the reference {reference.label}"
        )
    for name in reference.keys():
        ref_shape, shape = tuple(reference.info(name)[1]), tuple(model.info(name)[1])
        if ref_shape != shape:
            raise CheckpointError(
                f"{model.label}: tensor {name!r} has shape {list(shape)}, the reference {list(ref_shape)} "
                "(different widths cannot be aligned)"
            )


def spec_for(source: Source, residual: bool) -> PermutationSpec:
    shapes = {name: tuple(source.info(name)[1]) for name in source.keys()}
    try:
        return permutation_spec(source.config, shapes, residual)
    except CheckpointError as e:
        raise CheckpointError(f"{source.label}: {e}") from None


def distance(
    spec: PermutationSpec, a: SourceTensors, b: SourceTensors, perms: dict[str, torch.Tensor]
) -> float:
    """‖θ_A − π(θ_B)‖ over the tensors the spec covers (float64)."""
    total = 0.0
    for name in spec.axes:
        diff = a[name].double() - permute_tensor(b[name], spec.axes[name], perms).double()
        total += float(diff.square().sum())
    return math.sqrt(total)


def align_sources(
    recipe: Recipe, sources: dict[str, Source], progress: bool = True
) -> tuple[dict[str, Source], dict[str, Any]]:
    """Every model of the recipe except the reference read through its permutation into the reference's order;
    returns the new sources and the record (per model: permutations, sweeps, distances before and after)."""
    settings = recipe.align
    assert settings is not None
    reference_path = settings.reference or reference_model(recipe)
    if reference_path is None:
        raise RecipeError("align: the recipe has no models to align")
    reference = sources[reference_path]
    spec = spec_for(reference, settings.residual)
    out = dict(sources)
    record: dict[str, Any] = {
        "method": settings.method,
        "reference": reference_path,
        "residual": settings.residual,
        "seed": recipe.seed,
        "groups": {g: spec.sizes[g] for g in spec.groups},
        "models": {},
    }
    ref_tensors = SourceTensors(reference)
    batches = _activation_batches(settings.data, reference) if settings.method == "activation" else None
    for path, source in sources.items():
        if path == reference_path:
            continue
        check_same_architecture(reference, source)
        started = time.perf_counter()
        if batches is not None:
            perms, sweeps, gain = _activation_matching(spec, reference, source, batches)
        else:
            with tqdm(
                desc=f"align {Path(path).name}", unit="sweep", disable=not progress, leave=False
            ) as bar:
                perms, report = weight_matching(
                    spec,
                    ref_tensors,
                    SourceTensors(source),
                    seed=recipe.seed,
                    max_iter=settings.max_iter,
                    on_sweep=lambda _sweep, _gain, bar=bar: bar.update(1),
                )
            sweeps, gain = report.sweeps, sum(report.gains)
        seconds = time.perf_counter() - started
        before = distance(spec, ref_tensors, SourceTensors(source), {})
        after = distance(spec, ref_tensors, SourceTensors(source), perms)
        moved = sum(int((p != torch.arange(len(p))).sum()) for p in perms.values())
        record["models"][path] = {
            "sweeps": sweeps,
            "objective_gain": gain,
            "distance_before": before,
            "distance_after": after,
            "units_moved": moved,
            "seconds": round(seconds, 3),
            "permutations": {g: perms[g].tolist() for g in spec.groups},
        }
        log.info(
            "aligned %s to %s: %d sweeps, distance %.4g -> %.4g",
            path,
            reference_path,
            sweeps,
            before,
            after,
        )
        out[path] = PermutedSource(source, spec, perms)
    return out, record


ACTIVATION_EXAMPLES = 256  # the examples activation matching runs when data: sets no limit
ACTIVATION_BATCH = 8


def _activation_batches(data: DataSpec | None, reference: Source) -> list[Encoded]:
    """The data's first examples (``limit``, else 256), tokenized by the reference's tokenizer, in batches."""
    assert data is not None and reference.folder is not None
    examples = read_examples(data, need_labels=False, where="align.data")
    texts = examples.texts[: data.limit or ACTIVATION_EXAMPLES]
    encoded = encode(load_tokenizer(reference.folder), texts, [-1] * len(texts), data.max_length)
    return [encoded.batch(slice(i, i + ACTIVATION_BATCH)) for i in range(0, len(encoded), ACTIVATION_BATCH)]


def _activation_matching(
    spec: PermutationSpec, reference: Source, model: Source, batches: list[Encoded]
) -> tuple[dict[str, torch.Tensor], int, float]:
    """Each group's assignment on the correlation of the two models' activations (one pass; no sweeps)."""
    assert reference.folder is not None and model.folder is not None
    costs = unit_correlations(spec, load_as_saved(reference.folder), load_as_saved(model.folder), batches)
    missing = sorted(set(spec.groups) - set(costs))
    if missing:
        raise CheckpointError(f"{model.label}: no activation reads group {missing[0]!r}; use method: weight")
    perms = {g: solve_assignment(costs[g]) for g in spec.groups}
    gain = sum(
        float(costs[g][torch.arange(len(p)), p].sum() - costs[g].diagonal().sum()) for g, p in perms.items()
    )
    return perms, 1, gain


def write_alignment(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    """``alignment.json`` (every permutation) in ``folder``; returns the manifest's summary (no permutations)."""
    (folder / ALIGNMENT_FILE).write_text(json.dumps(record) + "\n")
    summary = {k: v for k, v in record.items() if k != "models"}
    summary["file"] = ALIGNMENT_FILE
    summary["models"] = {
        path: {k: v for k, v in info.items() if k != "permutations"}
        for path, info in record["models"].items()
    }
    return summary
