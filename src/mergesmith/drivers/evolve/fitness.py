"""Fitness functions for ``mergesmith evolve``: a candidate model's weights in, one number out (higher is better).

A kind is a factory ``factory(settings, spec) -> score`` where ``score(state, config)`` rates a state dict; the
``config`` (a config.json dict) is given when the candidate's architecture differs from the sources' (a
data-flow path has its own layer count), else None and the weights run in a module loaded once.

Built-in kinds, each on local files:

- ``accuracy``: classification accuracy on a JSONL/CSV file (``data``; ``head``, ``pooling``, ``text_column``,
  ``label_column``, ``max_length``, ``limit``), the model being the search's base (or first) model folder or
  ``model``;
- ``perplexity``: the negative mean token loss on a text file (``data``, ``max_length``);
- ``exact_match``: greedy exact match on a JSONL of prompts and answers (``data``, ``prompt_column``,
  ``answer_column``, ``max_new_tokens``, ``limit``);
- ``lm_eval``: an lm-evaluation-harness task (``tasks``, ``include_path`` of local YAML + data files,
  ``metric`` like ``exact_match,normalized``, ``limit``, ``num_fewshot``), run by lm-eval's own HF model class.

``kind: package.module:function`` names any other factory by import path (the benchmark's ``text8`` and
``bench`` kinds are such paths, added by the CLI), so a Ray worker on another machine builds the same
evaluator from plain strings.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mergesmith.errors import RecipeError
from mergesmith.fit.evaluate import load_classification, load_exact_match, load_perplexity
from mergesmith.fit.hf import causal_lm_from_state, load_causal_lm, load_tokenizer
from mergesmith.recipe.search import FitnessSpec, SearchSpec

Score = Callable[[Mapping[str, torch.Tensor], "dict[str, Any] | None"], float]
Factory = Callable[[dict[str, Any], SearchSpec], Score]


def _model_folder(settings: dict[str, Any], spec: SearchSpec) -> str:
    return settings.pop("model", None) or spec.base_model or spec.models[0]


def _run(module: torch.nn.Module, state: Mapping[str, torch.Tensor], config: dict[str, Any] | None):
    """The module to score and the weights to run it with: the loaded module with ``state`` in place of its
    weights, or (a new architecture) a fresh module of ``config`` holding ``state``."""
    if config is None:
        return module, state
    return causal_lm_from_state(config, state), None


def accuracy(settings: dict[str, Any], spec: SearchSpec) -> Score:
    folder = _model_folder(settings, spec)
    data = settings.pop("data")
    task, model = load_classification(folder, data, **settings)

    def score(state: Mapping[str, torch.Tensor], config: dict[str, Any] | None) -> float:
        if config is not None:
            raise RecipeError("fitness kind 'accuracy' scores same-architecture merges; use a causal-LM kind")
        return task.evaluate(model, params=state)["accuracy"]

    return score


def perplexity(settings: dict[str, Any], spec: SearchSpec) -> Score:
    task, module = load_perplexity(_model_folder(settings, spec), settings.pop("data"), **settings)

    def score(state: Mapping[str, torch.Tensor], config: dict[str, Any] | None) -> float:
        model, params = _run(module, state, config)
        return -task.evaluate(model, params=params)["loss"]

    return score


def exact_match(settings: dict[str, Any], spec: SearchSpec) -> Score:
    task, module = load_exact_match(_model_folder(settings, spec), settings.pop("data"), **settings)

    def score(state: Mapping[str, torch.Tensor], config: dict[str, Any] | None) -> float:
        model, params = _run(module, state, config)
        return task.evaluate(model, params=params)["exact_match"]

    return score


def lm_eval(settings: dict[str, Any], spec: SearchSpec) -> Score:
    try:
        import lm_eval as harness
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise RecipeError(
            "fitness kind 'lm_eval' needs lm-evaluation-harness: pip install 'lm-eval>=0.4'"
        ) from None
    folder = Path(_model_folder(settings, spec))
    tasks = settings.get("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise RecipeError("fitness kind 'lm_eval' needs tasks: [task names]")
    include = settings.get("include_path")
    manager = TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise RecipeError(f"fitness lm_eval: no task '{unknown[0]}' (include_path: {include or 'none'})")
    module, tokenizer = load_causal_lm(folder), load_tokenizer(folder)
    metric = settings.get("metric")

    def score(state: Mapping[str, torch.Tensor], config: dict[str, Any] | None) -> float:
        if config is None:
            module.load_state_dict(dict(state), strict=False)
            model = module
        else:
            model = causal_lm_from_state(config, state)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.get("batch_size", 1))
        out = harness.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=settings.get("limit"),
            num_fewshot=settings.get("num_fewshot"),
            random_seed=spec.seed,
            numpy_random_seed=spec.seed,
            torch_random_seed=spec.seed,
            fewshot_random_seed=spec.seed,
            verbosity="ERROR",
        )
        values = []
        for task in tasks:
            # lm-eval names a score "metric,filter" ("acc,none"); a bare metric name means its unfiltered score
            metrics = {
                k: v
                for k, v in out["results"][task].items()
                if isinstance(v, (int, float)) and "," in k and "stderr" not in k
            }
            name = metric or next(iter(metrics), None)
            if name not in metrics and f"{name},none" in metrics:
                name = f"{name},none"
            if name not in metrics:
                raise RecipeError(
                    f"fitness lm_eval: task '{task}' has no metric '{name}' (it reports: {', '.join(metrics)})"
                )
            values.append(float(metrics[name]))
        return sum(values) / len(values)

    return score


KINDS: dict[str, str] = {
    "accuracy": f"{__name__}:accuracy",
    "perplexity": f"{__name__}:perplexity",
    "exact_match": f"{__name__}:exact_match",
    "lm_eval": f"{__name__}:lm_eval",
}


def resolve_kind(kind: str, extra: Mapping[str, str]) -> Factory:
    """The factory a kind names: a built-in, one the caller adds (``extra``: kind → import path), or an import
    path ``package.module:function`` itself."""
    path = {**KINDS, **extra}.get(kind, kind)
    if ":" not in path:
        known = ", ".join(sorted({**KINDS, **extra}))
        raise RecipeError(
            f"fitness: unknown evaluator kind '{kind}' (known: {known}; or package.module:function)"
        )
    module_name, _, name = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise RecipeError(f"fitness: cannot import evaluator '{path}' ({e})") from None
    return factory


class Fitness:
    """Every ``fitness:`` entry of a search, built once (in each worker); a candidate's fitness is their weighted
    mean. A non-finite score is an error that names the evaluator."""

    def __init__(self, spec: SearchSpec, extra_kinds: Mapping[str, str] | None = None):
        self.entries: list[tuple[FitnessSpec, Score]] = []
        for entry in spec.fitness:
            factory = resolve_kind(entry.kind, extra_kinds or {})
            try:
                score = factory(entry.settings(), spec)
            except TypeError as e:  # a setting the evaluator does not take
                raise RecipeError(f"fitness {entry.kind}: {e}") from None
            except KeyError as e:
                raise RecipeError(f"fitness {entry.kind}: missing setting {e}") from None
            self.entries.append((entry, score))

    def __call__(self, state: Mapping[str, torch.Tensor], config: dict[str, Any] | None = None) -> float:
        total = weight = 0.0
        for entry, score in self.entries:
            value = float(score(state, config))
            if not math.isfinite(value):
                raise RecipeError(
                    f"fitness {entry.kind} returned {value}; an evaluator must return a finite number"
                )
            total += entry.weight * value
            weight += entry.weight
        return total / weight
