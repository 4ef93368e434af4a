"""The tasks of a recipe's data-driven merge: one shared module loaded from the base folder, each model's head and
examples, or an earlier fit to replay.

Two forms of task head, chosen by the recipe:

- ``head: PATH`` on every model: a safetensors ``{weight, bias}`` linear head over mean-pooled encoder states (the
  text8 zoo's form). The shared module is ``AutoModel`` of the base folder (without BERT's pooler, as the zoo's
  encoders are saved).
- no ``head:``: the checkpoints are sequence classifiers and each model's own classifier is its head. The shared
  module is ``AutoModelForSequenceClassification`` of the base folder. Its **classifier parameters are those outside
  the backbone** (names not under the model's ``base_model_prefix``: ``classifier.*`` for BERT, ``score.weight``
  for Llama); they are read from each expert's checkpoint (as loading each expert with
  ``AutoModelForSequenceClassification`` would, without loading its backbone twice) into
  ``TaskModel.own_head_params``. Heads are never merged: the output keeps the reference model's classifier (the
  base's, or the first model's for methods that ignore the base; none if it has none), so the output has the
  reference's tensor set; the other models' classifiers may differ in shape.

Every other tensor name must be the same in the base and the experts, as for any merge. The fit holds the shared
module and the experts' fp32 parameters in memory (the statistics pass needs whole models); the final merge still
streams tensor by tensor.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergesmith.engine.plan import assign_roles
from mergesmith.errors import CheckpointError, MergeError, RecipeError
from mergesmith.fit.data import Encoded, encode_examples
from mergesmith.fit.evaluate import load_head, padded_tokenizer
from mergesmith.fit.hf import classifier_names, load_classifier, load_encoder
from mergesmith.fit.task import FIT_FILE, FitResult, Task, TaskModel
from mergesmith.io.hub import resolve_model
from mergesmith.io.reader import Source
from mergesmith.methods.base import DataNeed, MergeMethod
from mergesmith.recipe.data import DataSpec, Examples, read_examples
from mergesmith.recipe.schema import ModelEntry, Recipe


@dataclass
class FitSetup:
    """What ``merge`` needs for a data-driven method: the experts' tasks to fit on, or a fit to replay."""

    base_path: str | None
    expert_paths: list[str]
    task_heads: frozenset[str] = frozenset()
    tasks: list[Task] | None = None
    replay: FitResult | None = None
    replayed_from: str | None = None
    data: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # per model: file, sha256, examples, label ids
    files: list[Path] = field(default_factory=list)  # data or fit files (part of the resume fingerprint)


def prepare_fit(recipe: Recipe, method: MergeMethod, sources: dict[str, Source]) -> FitSetup:
    """Check the recipe's data, heads and folders for ``method`` and build its tasks (or load the fit to replay).

    Data files are read and checked before any model is loaded, so a data mistake fails fast."""
    if recipe.slices:
        raise RecipeError(
            f"method '{method.name}' learns from data over whole models; `slices:` is not supported"
        )
    base_path, roles = assign_roles(
        method, recipe.base_model, [(m.model, {"entry": m}) for m in recipe.models]
    )
    entries: list[ModelEntry] = [settings["entry"] for _, settings in roles]
    method.check_expert_count(len(entries))
    with_head = [e for e in entries if e.head is not None]
    if with_head and len(with_head) != len(entries):
        bare = next(e for e in entries if e.head is None)
        raise RecipeError(
            f"model '{bare.model}' has no head: but model '{with_head[0].model}' has one; give every "
            "model a head: or none (then each checkpoint's own classifier is its head)"
        )
    module_path = recipe.base_model or entries[0].model  # also for methods that do not merge with the base
    setup = FitSetup(base_path, [e.model for e in entries])
    if recipe.fitted is not None:
        setup.replay = FitResult.load(recipe.fitted)
        setup.replayed_from = recipe.fitted
        fit_file = Path(recipe.fitted)
        setup.files = [fit_file / FIT_FILE if fit_file.is_dir() else fit_file]
        if not with_head:  # the heads are recognised from the architecture alone (no weights are loaded)
            with contextlib.suppress(Exception):
                setup.task_heads = classifier_names(load_classifier(_folder(sources, module_path), meta=True))
        return setup

    examples = _read_data(recipe, method, entries)
    setup.data = {e.model: ex.report() for e, (ex, _) in zip(entries, examples)}
    setup.files = sorted({ex.file for ex, _ in examples})
    folder = _folder(sources, module_path)
    # padded on the right (encoded batches are trimmed on the right); no pad token: the end-of-text token pads
    tokenizer = padded_tokenizer(
        resolve_model(recipe.tokenizer_source) if recipe.tokenizer_source else folder
    )
    encoded: dict[tuple[int, int], Encoded] = {}  # models sharing the recipe's data: encoded once
    datasets = []
    for ex, spec in examples:
        key = (id(ex), spec.max_length)
        if key not in encoded:
            encoded[key] = encode_examples(ex, tokenizer, spec.max_length)
        datasets.append(encoded[key])

    if with_head:
        module = load_encoder(folder)
        models = [TaskModel(module, head=_load_head(e, module)) for e in entries]
    else:
        module = load_classifier(folder)
        setup.task_heads = classifier_names(module)
        models = [
            TaskModel(
                module,
                head_names=setup.task_heads,
                own_head_params=_own_head(e.model, sources[e.model], setup.task_heads, method),
            )
            for e in entries
        ]
    _check_names_match(module, models[0], sources[entries[0].model], folder)
    setup.tasks = [
        Task(e.model, model, data, labeled=ex.labels is not None)
        for e, model, data, (ex, _) in zip(entries, models, datasets, examples)
    ]
    for task, (ex, _) in zip(setup.tasks, examples):
        _check_label_range(task, ex, sources[task.name])
    return setup


def _read_data(
    recipe: Recipe, method: MergeMethod, entries: list[ModelEntry]
) -> list[tuple[Examples, DataSpec]]:
    cache: dict[tuple[str, bool], Examples] = {}  # the recipe's data, read once for every model that uses it
    out = []
    for entry in entries:
        spec = entry.data or recipe.data
        if spec is None:
            raise RecipeError(
                f"model '{entry.model}': method '{method.name}' needs data: add `data:` to this model "
                "or to the recipe"
            )
        need = method.fit.data if method.fit is not None else DataNeed.UNLABELED
        if need is DataNeed.LABELED and spec.labeled is False:
            raise RecipeError(
                f"model '{entry.model}': method '{method.name}' needs labeled data; remove `labeled: false`"
            )
        need_labels = spec.labeled if spec.labeled is not None else need is DataNeed.LABELED
        key = (spec.model_dump_json(), need_labels)
        if key not in cache:
            cache[key] = read_examples(spec, need_labels, f"model '{entry.model}'")
        out.append((cache[key], spec))
    return out


def _folder(sources: dict[str, Source], path: str) -> Path:
    folder = sources[path].folder
    if folder is None:
        raise CheckpointError(
            f"{path}: a data-driven merge runs the model, so it needs an HF model folder "
            "(config.json, tokenizer), not a single weights file"
        )
    return folder


def _load_head(entry: ModelEntry, module: nn.Module) -> dict[str, torch.Tensor]:
    """The model's ``head:`` file, read by the evaluator's loader; errors name the model too."""
    try:
        return load_head(str(entry.head), getattr(module.config, "hidden_size", None))
    except MergeError as e:
        raise type(e)(f"model '{entry.model}': head {e}") from None


def _own_head(
    model: str, source: Source, names: frozenset[str], method: MergeMethod
) -> dict[str, torch.Tensor]:
    missing = sorted(n for n in names if not source.has(n))
    if missing or not names:
        raise CheckpointError(
            f"model '{model}': no classifier tensor '{missing[0] if missing else 'classifier'}'; method "
            f"'{method.name}' runs each model with its task head: use sequence-classification checkpoints or give "
            "every model a head: (a safetensors linear head over mean-pooled states)"
        )
    return {n: source.get(n).float() for n in names}


def _check_names_match(module: nn.Module, model: TaskModel, source: Source, folder: Path) -> None:
    if not any(source.has(n) for n in model.merge_names()):
        raise CheckpointError(
            f"{source.label}: none of its tensor names match the {type(module).__name__} loaded from {folder} "
            f"(e.g. '{model.merge_names()[0]}'); the checkpoints and the model class do not fit together"
        )


def _check_label_range(task: Task, examples: Examples, source: Source) -> None:
    if examples.labels is None:
        return
    if task.model.head is not None:
        classes = task.model.head["weight"].shape[0]
    else:  # a sequence classifier's config says how many classes it has
        id2label = source.config.get("id2label")
        classes = len(id2label) if isinstance(id2label, dict) else source.config.get("num_labels")
    top = max(examples.labels)
    if isinstance(classes, int) and top >= classes:
        label = examples.label_names[top] if examples.label_names else top
        raise RecipeError(
            f"model '{task.name}': {examples.file} has label {label!r} (class id {top}) but the "
            f"model's head has {classes} classes"
        )
