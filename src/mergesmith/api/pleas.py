"""``mergesmith pleas A B OUT --budget 1.5 --data FILE``: PLeaS (Nasery et al., CVPR 2025) — permutation matching,
a partial merge to a width budget, then layerwise least squares.

1. Match B's units to A's (activation matching on the data, or weight matching) and read B in A's order.
2. Choose per-group ratios of separate units that meet ``budget`` (1.0: one model's size, every pair merged — Git
   Re-Basin; 2.0: the ensemble) and build the partial merge (:mod:`mergesmith.ops.partial_merge`).
3. Refit every linear layer to the permuted ensemble's activations in closed form
   (:mod:`mergesmith.fit.least_squares`); BatchNorm statistics are recomputed on the data (CNNs).

Which groups widen: every hidden group of the from-scratch MLP/ResNet format (per-group ratios, the budget met
greedily, the worst-matching groups widened first; a ResNet's stage streams and block interiors alike); for Hugging Face families only the FFN units, with one ratio for
all layers (a config has one ``intermediate_size``; widening the residual stream would change what RMSNorm and
LayerNorm average over, and heads would change the head count) — their heads and residual stream are merged as in
Git Re-Basin. The output is a model of the same family whose config holds the new widths.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergesmith.api.alignment import check_same_architecture, spec_for
from mergesmith.arch.permutation import PermutationSpec
from mergesmith.errors import CheckpointError, RecipeError
from mergesmith.fit.activations import unit_correlations
from mergesmith.fit.data import Encoded, encode
from mergesmith.fit.hf import load_as_saved, load_tokenizer, saved_class
from mergesmith.fit.least_squares import refit_layers
from mergesmith.fit.small_models import (
    MLP_TYPE,
    RESNET_TYPE,
    build,
    load_small_model,
    reset_batchnorm,
    save_small_model,
)
from mergesmith.io.models import open_model
from mergesmith.io.output import atomic_folder
from mergesmith.io.reader import Source, SourceTensors
from mergesmith.io.safetensors_io import SafetensorsFile
from mergesmith.io.writer import input_sha256
from mergesmith.ops.partial_merge import (
    UnitSplit,
    budget_of,
    matrix_costs,
    partial_merge,
    ratios_for_budget,
    split_units,
)
from mergesmith.ops.permute import group_cost, permute_state, solve_assignment, weight_matching
from mergesmith.recipe.data import DataSpec, read_examples

RECORD = "pleas.json"
FFN_SUFFIXES = (".mlp", ".intermediate")  # the FFN groups of the decoder and encoder specs
EXAMPLES, BATCH = 256, 8  # texts for a Hugging Face model
SMALL_EXAMPLES, SMALL_BATCH = 2048, 256  # inputs for a from-scratch MLP


@dataclass
class PleasResult:
    out_dir: Path
    budget: float
    ratios: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        widened = sum(1 for r in self.ratios.values() if r > 0)
        return (
            f"PLeaS at width budget {self.budget:.3f} ({widened} of {len(self.ratios)} groups widened) in "
            f"{self.seconds:.1f} s -> {self.out_dir}"
        )


def _batches(data: str | Path, source: Source) -> list[Encoded]:
    assert source.folder is not None
    examples = read_examples(DataSpec(path=str(data)), need_labels=False, where="--data")
    texts = examples.texts[:EXAMPLES]
    encoded = encode(load_tokenizer(source.folder), texts, [-1] * len(texts))
    return [encoded.batch(slice(i, i + BATCH)) for i in range(0, len(encoded), BATCH)]


def _match(
    spec: PermutationSpec,
    method: str,
    module_a: nn.Module,
    module_b: nn.Module,
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    batches: list[Any],
    seed: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Permutations, and per group the similarity of each matched pair (A's order)."""
    if method == "activation":
        costs = unit_correlations(spec, module_a, module_b, batches)
        perms = {g: solve_assignment(costs[g]) for g in spec.groups}
    else:
        perms, _ = weight_matching(spec, a, b, seed=seed)
        costs = {g: group_cost(g, spec, a, b, perms) for g in spec.groups}
    similarity = {g: costs[g][torch.arange(len(p)), p] for g, p in perms.items()}
    return perms, similarity


def _tensor_batches(data: str | Path) -> list[torch.Tensor]:
    """A small model's data: the ``inputs`` tensor of a safetensors file (examples first), in batches."""
    path = Path(data)
    if path.suffix != ".safetensors" or not path.is_file():
        raise RecipeError(f"{data}: a small model's data is a .safetensors file with an 'inputs' tensor")
    file = SafetensorsFile(path)
    try:
        if "inputs" not in file.keys():
            raise RecipeError(f"{data}: no 'inputs' tensor (the examples, first axis)")
        inputs = file.get("inputs").float()[:SMALL_EXAMPLES].clone()
    finally:
        file.close()
    return [inputs[i : i + SMALL_BATCH] for i in range(0, len(inputs), SMALL_BATCH)]


def _check_inputs(config: dict[str, Any], batches: list[torch.Tensor], data: str | Path) -> None:
    """Inputs a from-scratch model can take: an MLP's ``sizes[0]`` features, a ResNet's ``in_channels``."""
    shape = tuple(batches[0].shape[1:]) if batches else ()
    if config["model_type"] == MLP_TYPE:
        features = int(torch.Size(shape).numel()) if shape else 0
        if features != config["sizes"][0]:
            raise RecipeError(
                f"{data}: inputs of shape {list(shape)} ({features} features), the MLP takes {config['sizes'][0]}"
            )
    elif len(shape) != 3 or shape[0] != config["in_channels"]:
        raise RecipeError(
            f"{data}: inputs of shape {list(shape)}, the ResNet takes images of {config['in_channels']} channels "
            "(examples, channels, height, width)"
        )


def pleas(
    model_a: str | Path,
    model_b: str | Path,
    out: str | Path,
    *,
    budget: float = 1.0,
    data: str | Path,
    method: str = "activation",
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> PleasResult:
    """Merge two models of one architecture and different initializations into a model of ``budget`` × the width
    (module docstring); ``data``: a .jsonl or .csv file of texts for the activations and the least squares."""
    started = time.perf_counter()
    if not 1.0 <= budget <= 2.0:
        raise RecipeError(
            f"--budget must be between 1.0 and 2.0 (one model's width … the ensemble), got {budget}"
        )
    if method not in ("activation", "weight"):
        raise RecipeError(f"--method must be activation or weight, got {method!r}")
    source_a, source_b = open_model(str(model_a)), open_model(str(model_b))
    check_same_architecture(source_a, source_b)
    spec = spec_for(source_a, residual=True)
    family = str(source_a.config.get("model_type"))
    small = family in (MLP_TYPE, RESNET_TYPE)
    groups = spec.groups if small else [g for g in spec.groups if g.endswith(FFN_SUFFIXES)]
    if not groups:
        raise CheckpointError(f"{source_a.label}: no FFN units to widen (PLeaS widens FFN layers)")
    assert source_a.folder is not None and source_b.folder is not None
    load = (lambda folder: load_small_model(folder)[0]) if small else load_as_saved
    module_a, module_b = load(source_a.folder), load(source_b.folder)
    a, b = dict(SourceTensors(source_a)), dict(SourceTensors(source_b))
    batches: list[Any] = _tensor_batches(data) if small else _batches(data, source_a)
    if small:
        _check_inputs(dict(source_a.config), batches, data)
    perms, similarity = _match(spec, method, module_a, module_b, a, b, batches, seed)
    b_aligned = permute_state(b, spec, perms)
    costs = matrix_costs(spec, {n: tuple(t.shape) for n, t in a.items() if n in spec.axes})
    if small:  # per-layer ratios: the groups whose pairs match worst widen first
        priority = {
            g: 1.0 - float(similarity[g].mean()) / max(1e-12, float(similarity[g].abs().max()))
            for g in groups
        }
        ratios = ratios_for_budget(groups, priority, costs, budget)
    else:  # one intermediate_size for every layer
        ratios = dict.fromkeys(groups, _uniform_ratio(groups, costs, budget))
    splits: dict[str, UnitSplit] = {g: split_units(similarity[g], r) for g, r in ratios.items() if r > 0}
    merged = partial_merge(spec, a, b_aligned, splits)
    module_b_aligned = load(source_b.folder)
    module_b_aligned.load_state_dict(b_aligned)
    merged = refit_layers(spec, splits, merged, module_a, module_b_aligned, batches, seed)
    achieved = budget_of(ratios, costs)
    record = {
        "method": "pleas",
        "matching": method,
        "budget": budget,
        "achieved_budget": achieved,
        "ratios": ratios,
        "widths": {
            g: {"before": spec.sizes[g], "after": splits[g].width if g in splits else spec.sizes[g]}
            for g in groups
        },
        "merged_as_git_rebasin": [g for g in spec.groups if g not in splits],
        "data": {"path": str(data), "examples": sum(len(x) for x in batches)},
        "inputs": {str(model_a): _hashes(source_a), str(model_b): _hashes(source_b)},
        "seed": seed,
    }
    if small:
        widths = {g: splits[g].width if g in splits else n for g, n in spec.sizes.items()}
        config = _small_config(dict(source_a.config), widths)
        _write_small(config, merged, Path(out), record, force, torch.cat(batches))
    else:
        width = next(iter(splits.values())).width if splits else spec.sizes[groups[0]]
        _write_hf(
            source_a, dict(source_a.config) | {"intermediate_size": width}, merged, Path(out), record, force
        )
    return PleasResult(Path(out), achieved, ratios, time.perf_counter() - started)


def _small_config(config: dict[str, Any], widths: dict[str, int]) -> dict[str, Any]:
    """The from-scratch config with the merged widths: an MLP's ``sizes``; a ResNet's stage ``widths`` (its
    streams) and per-block ``inner_widths``."""
    if config["model_type"] == MLP_TYPE:
        hidden = [widths.get(f"layers.{i}", n) for i, n in enumerate(config["sizes"][1:-1])]
        return config | {"sizes": [config["sizes"][0], *hidden, config["sizes"][-1]]}
    stages = range(1, len(config["widths"]) + 1)
    stream = [widths.get(f"stage{s}", config["widths"][s - 1]) for s in stages]
    inner = [[widths[f"layer{s}.{b}"] for b in range(config["blocks"][s - 1])] for s in stages]
    return config | {"widths": stream, "inner_widths": inner}


def _write_small(
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    out: Path,
    record: dict,
    force: bool,
    inputs: torch.Tensor,
) -> None:
    """The merged from-scratch model, its BatchNorm statistics recomputed on the data (a no-op for an MLP)."""
    module = build(config)
    module.load_state_dict(tensors)
    reset_batchnorm(module, inputs)
    with atomic_folder(out, force=force) as folder:
        save_small_model(module, config, folder)
        (folder / RECORD).write_text(json.dumps(record, indent=1) + "\n")


def _uniform_ratio(groups: list[str], costs: list[Any], budget: float) -> float:
    """The largest ratio on the 5 % grid that, given to every group, stays within the budget."""
    uniform = ratios_for_budget(groups, dict.fromkeys(groups, 1.0), costs, budget)
    return min(uniform.values())


def _hashes(source: Source) -> dict[str, str]:
    return {str(p): input_sha256(p) for p in source.files()}


def _write_hf(
    source: Source,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    out: Path,
    record: dict,
    force: bool,
) -> None:
    import transformers

    assert source.folder is not None
    hf_config = transformers.AutoConfig.for_model(**config)
    model_class = saved_class(config)
    auto = model_class is transformers.AutoModel  # the Auto classes build from a config; the others take it
    module = model_class.from_config(hf_config) if auto else model_class(hf_config)
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(hf_config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"{source.label}: the widened tensors do not fit the widened config ({(missing or unexpected)[0]})"
        )
    with atomic_folder(out, force=force) as folder:
        module.save_pretrained(folder)
        tokenizer = load_tokenizer(source.folder) if any(source.folder.glob("tokenizer*")) else None
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / RECORD).write_text(json.dumps(record, indent=1) + "\n")
