"""The Python API: ``merge(recipe, out_dir)`` for checkpoints and ``merge_state_dicts(...)`` in memory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mergesmith import __version__
from mergesmith.checkpoint.reader import CheckpointSource, DictSource, Source
from mergesmith.checkpoint.writer import FolderWriter, input_sha256, parse_size
from mergesmith.engine import Plan, Planner, execute
from mergesmith.errors import MergeError, RecipeError
from mergesmith.output import OutputLock, PartialFolder, check_free_space, fingerprint
from mergesmith.recipe import Recipe, load_recipe

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "added_tokens.json",
    "spiece.model",
    "generation_config.json",
    "chat_template.jinja",
)
DEFAULT_SHARD_SIZE = 5 * 10**9


@dataclass
class MergeResult:
    out_dir: Path
    method: str
    tensors: int
    bytes: int
    shards: int
    seconds: float
    resumed_shards: int = 0

    def summary(self) -> str:
        return (
            f"merged {self.tensors} tensors ({self.bytes / 1e6:.1f} MB, {self.shards} shard"
            f"{'s' if self.shards != 1 else ''}) with {self.method} in {self.seconds:.1f} s "
            f"({self.bytes / 1e6 / max(self.seconds, 1e-9):.0f} MB/s) -> {self.out_dir}"
            + (f" (resumed: {self.resumed_shards} finished shards reused)" if self.resumed_shards else "")
        )


def merge_state_dicts(
    base: Mapping[str, torch.Tensor] | None,
    experts: Sequence[Mapping[str, torch.Tensor]],
    method: str,
    *,
    seed: int = 0,
    compat: str = "paper",
    threads: int = 1,
    tasks: Sequence[Any] | None = None,
    fitted: Any = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with the same engine and rules as checkpoint merges.

    Shared parameters are scalars (``lambda=0.5``); a per-model parameter is a scalar for every expert or a list
    with one value per expert (``weight=[1.0, 0.5]``). For methods that ignore the base (linear, karcher) the
    experts are all the models. Returns tensors in the reference model's dtype.

    Data-driven methods (Fisher, RegMean, AdaMerging, ...) need ``tasks`` (one :class:`mergesmith.learn.task.Task`
    per expert) to fit on, or a ``fitted`` result from :func:`fit_state_dicts` to replay.
    """
    plan = _plan_state_dicts(base, experts, method, seed, compat, params)
    if plan.method.fit is not None:
        if fitted is None:
            if tasks is None:
                raise RecipeError(f"method '{method}' learns from data: pass tasks=[...] (one per expert) or fitted=")
            fitted = _fit(plan, base, experts, tasks)
        plan.fitted = fitted
    out: dict[str, torch.Tensor] = {}
    execute(plan, out.__setitem__, threads=threads, progress=False)
    return {j.name: out[j.name] for j in plan.jobs}


def fit_state_dicts(
    base: Mapping[str, torch.Tensor] | None,
    experts: Sequence[Mapping[str, torch.Tensor]],
    method: str,
    tasks: Sequence[Any],
    *,
    seed: int = 0,
    compat: str = "paper",
    progress: bool = False,
    **params: Any,
) -> Any:
    """Run a data-driven method's fit (statistics, learned coefficients or masks) and return its FitResult,
    which ``merge_state_dicts(..., fitted=result)`` replays and ``result.save(path)`` stores."""
    plan = _plan_state_dicts(base, experts, method, seed, compat, params)
    if plan.method.fit is None:
        raise RecipeError(f"method '{method}' does not learn from data; merge it directly")
    return _fit(plan, base, experts, tasks, progress)


def _fit(plan: Plan, base: Mapping[str, torch.Tensor] | None, experts: Sequence[Mapping[str, torch.Tensor]],
         tasks: Sequence[Any], progress: bool = False) -> Any:
    """The one fit path (``merge``, ``merge_state_dicts``, ``fit_state_dicts``): the experts' mergeable parameters
    (the task model's, minus its head) in fp32, and the method's shared parameters as resolved for the plan."""
    from mergesmith.learn.task import FitInputs

    if len(tasks) != len(experts):
        raise RecipeError(f"method '{plan.method.name}' needs one task per expert: got {len(tasks)} for "
                          f"{len(experts)} experts")
    names = [n for n in tasks[0].model.merge_names() if n in experts[0]]
    first = next((j for j in plan.jobs if not j.copy), None)
    inputs = FitInputs(
        base={n: base[n].float() for n in names} if base is not None else None,
        experts=[{n: e[n].float() for n in names} for e in experts],
        tasks=list(tasks), params=dict(first.params) if first else {}, seed=plan.seed, progress=progress)
    return plan.method.fit(inputs)


def _plan_state_dicts(base: Mapping[str, torch.Tensor] | None, experts: Sequence[Mapping[str, torch.Tensor]],
                      method: str, seed: int, compat: str, params: dict[str, Any]) -> Plan:
    sources: dict[str, Source] = {}
    models = []
    base_key = None
    if base is not None:
        base_key = "base"
        sources[base_key] = DictSource(base, "base")
    per_model_names = _per_model_names(method)
    for i, sd in enumerate(experts):
        key = f"model_{i}"
        sources[key] = DictSource(sd, f"model {i}")
        settings = {}
        for name, value in params.items():
            if _is_per_model_list(name, value, per_model_names):
                if len(value) != len(experts):
                    raise RecipeError(
                        f"parameter '{name}' has {len(value)} values for {len(experts)} experts"
                    )
                settings[name] = value[i]
        models.append({"model": key, "parameters": settings})
    shared = {k: v for k, v in params.items() if not _is_per_model_list(k, v, per_model_names)}
    recipe = load_recipe(
        {
            "merge_method": method,
            "base_model": base_key,
            "models": models,
            "parameters": shared,
            "compat": compat,
            "seed": seed,
        }
    )
    return Planner(recipe, sources).plan()


def _is_per_model_list(name: str, value: Any, per_model_names: set[str]) -> bool:
    """A list for a per-model parameter holds one value per expert, unless it is a filter list (of dicts)."""
    return (
        name in per_model_names
        and isinstance(value, (list, tuple))
        and not all(isinstance(v, dict) for v in value)
    )


def _per_model_names(method: str) -> set[str]:
    from mergesmith.methods import get_method

    m = get_method(method)
    return {p.name for p in m.params if p.per_model}


def _open_sources(recipe: Recipe, allow_pickle: bool, where: str) -> dict[str, Source]:
    sources: dict[str, Source] = {}
    for path in recipe.model_paths():
        if not Path(path).exists():
            raise RecipeError(f"{where}: model path '{path}' does not exist")
        sources[path] = CheckpointSource(path, allow_pickle=allow_pickle)
    return sources


def _check_output(out: Path, recipe: Recipe, force: bool) -> None:
    resolved = out.resolve()
    for path in recipe.model_paths():
        model = Path(path).resolve()
        if resolved == model or model in resolved.parents:
            raise MergeError(
                f"{out}: the output folder is inside input model {path}; choose another location"
            )
    if out.exists():
        if not out.is_dir():
            raise MergeError(f"{out}: exists and is not a folder; choose another output path")
        if any(out.iterdir()) and not force:
            raise MergeError(f"{out}: output folder exists and is not empty; pass --force to replace it")
    parent = resolved.parent
    if not parent.exists():
        raise MergeError(f"{out}: parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise MergeError(f"{out}: cannot write in {parent} (permission denied)")


def merge(
    recipe: str | Path | dict[str, Any] | Recipe,
    out_dir: str | Path,
    *,
    force: bool = False,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    threads: int | None = None,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    resume: bool = False,
    seed: int | None = None,
    dtype: str | None = None,
    compat: str | None = None,
    progress: bool = True,
) -> MergeResult:
    """Merge the checkpoints a recipe names into ``out_dir`` (an HF model folder), atomically.

    The output is built in a hidden sibling ``.NAME.partial`` folder and renamed into place at the end. An error
    removes it; a kill leaves it for ``resume=True``, which reuses the shards it finished after checking their
    sha256. ``out_dir`` itself never exists half-written.

    A data-driven method (Fisher, RegMean, AdaMerging, ...) first fits on each model's ``data:`` (see
    :mod:`mergesmith.learn.recipe_tasks` for how the models and their heads are loaded; the fit holds whole models
    in memory, the merge itself still streams), or replays ``fitted:``. The fit is saved as
    ``mergesmith_fit.safetensors`` in the output and summarised under ``fit`` in ``manifest.json``.
    """
    start = time.perf_counter()
    where = str(recipe) if isinstance(recipe, (str, Path)) else "recipe"
    recipe = load_recipe(recipe)
    updates: dict[str, Any] = {}
    if seed is not None:
        updates["seed"] = seed
    if compat is not None:
        updates["compat"] = compat
    if updates:
        recipe = recipe.model_copy(update=updates)
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16", "float64"):
        raise RecipeError(f"--dtype must be one of float32, float16, bfloat16, float64; got '{dtype}'")
    out_dtype = dtype or recipe.out_dtype or recipe.dtype
    size = parse_size(shard_size)
    out = Path(out_dir)
    _check_output(out, recipe, force)
    sources = _open_sources(recipe, allow_pickle, where)
    try:
        setup = _prepare_fit(recipe, sources)
        plan = Planner(recipe, sources, out_dtype, setup.task_heads if setup else frozenset()).plan()
        plan.allow_nonfinite = allow_nonfinite
        threads = threads or min(4, os.cpu_count() or 1)
        input_files = [f for src in sources.values() for f in src.files()] + (setup.files if setup else [])
        with OutputLock(out):
            key = fingerprint(recipe.to_yaml(), {"dtype": out_dtype, "shard_size": size, "version": __version__},
                              input_files)
            partial = PartialFolder(out, key, resume)
            try:
                try:
                    fit_report = _fit_recipe(plan, setup, sources, partial.path, progress) if setup else None
                    if fit_report is not None and recipe.merge_method == "adamerging":
                        # learned coefficients replay as a plain task_arithmetic recipe (AdaMerging++ cannot)
                        from mergesmith.learn.adamerging import write_learned_recipe

                        learned = write_learned_recipe(plan.fitted, recipe, partial.path)
                        if learned is not None:
                            fit_report["learned_recipe"] = learned.name
                    writer = FolderWriter(partial.path, plan.specs(), size, partial.finished, partial.shard_done)
                    output_hashes, input_hashes = _write_all(plan, writer, sources, threads, progress)
                    writer.write_index()
                    _write_metadata(partial.path, recipe, plan, input_hashes, output_hashes,
                                    time.perf_counter() - start, partial.resumed_from, fit_report)
                    partial.publish(out)
                except OSError as e:  # disk full, file too large, I/O error: one line, then clean up
                    raise MergeError(f"{out}: writing the output failed ({e.strerror}); nothing was written") from None
            except (KeyboardInterrupt, SystemExit):
                raise  # interrupted or killed: the partial folder stays for --resume
            except BaseException:
                partial.discard()
                raise
    finally:
        for src in sources.values():
            with contextlib.suppress(Exception):
                src.close()  # type: ignore[attr-defined]
    return MergeResult(out, recipe.merge_method, len(plan.jobs), sum(j.nbytes for j in plan.jobs),
                       len(writer.file_names), time.perf_counter() - start, partial.resumed_from)


def _prepare_fit(recipe: Recipe, sources: dict[str, Source]) -> Any:
    """A data-driven method's tasks (or the fit to replay), checked before anything is written; else None."""
    from mergesmith.methods import get_method

    method = get_method(recipe.merge_method)
    if method.fit is None:
        return None
    from mergesmith.learn.recipe_tasks import prepare_fit

    return prepare_fit(recipe, method, sources)


def _fit_recipe(plan: Plan, setup: Any, sources: dict[str, Source], folder: Path, progress: bool) -> dict[str, Any]:
    """Run (or replay) the fit, set ``plan.fitted`` and save the result in the output ``folder`` at once, so that a
    resumed merge reuses it. Returns what the manifest records about the fit."""
    from mergesmith.learn.recipe_tasks import SourceTensors
    from mergesmith.learn.task import FIT_FILE, FitResult

    started = time.perf_counter()
    report: dict[str, Any] = {"file": FIT_FILE}
    if setup.replay is not None:
        fitted, report["replayed_from"] = setup.replay, setup.replayed_from
    elif (folder / FIT_FILE).exists():  # a resumed merge: the fit of the interrupted run (same inputs)
        fitted, report["resumed"] = FitResult.load(folder / FIT_FILE), True
    else:
        base = SourceTensors(sources[setup.base_path]) if setup.base_path else None
        experts = [SourceTensors(sources[p]) for p in setup.expert_paths]
        fitted = _fit(plan, base, experts, setup.tasks, progress)
    if not (folder / FIT_FILE).exists():
        fitted.save(folder / FIT_FILE)
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["examples"] = {name: d["examples"] for name, d in setup.data.items()}
    report["data"] = setup.data
    report["info"] = fitted.info
    plan.fitted = fitted
    return report


def _write_all(plan: Plan, writer: FolderWriter, sources: dict[str, Source], threads: int,
               progress: bool) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Merge every tensor still to do into the writer while the input files are hashed for the manifest."""
    todo = writer.pending()
    try:  # the writer's shard files are open: a refusal must close them too (else their space stays in use)
        check_free_space(writer.folder, sum(j.nbytes for j in plan.jobs if j.name in todo))
    except BaseException:
        writer.close()
        raise
    with ThreadPoolExecutor(max_workers=1) as hasher:
        hashes = hasher.submit(lambda: {label: {str(p): input_sha256(p) for p in src.files()}
                                        for label, src in sources.items()})
        try:
            execute(plan, writer.write, threads=threads, progress=progress, only=todo, write_rows=writer.write_rows)
            output_hashes = writer.finalize()
        finally:
            writer.close()
        return output_hashes, hashes.result()


def _write_metadata(
    folder: Path,
    recipe: Recipe,
    plan: Plan,
    input_hashes: dict[str, dict[str, str]],
    output_hashes: dict[str, str],
    seconds: float,
    resumed_shards: int,
    fit: dict[str, Any] | None = None,
) -> None:
    config_src = plan.config_source
    if plan.config:
        config = dict(plan.config)
        dtypes = {j.dtype for j in plan.jobs if j.dtype.is_floating_point}
        if len(dtypes) == 1:
            name = str(dtypes.pop()).removeprefix("torch.")
            for key in ("torch_dtype", "dtype"):
                if key in config or key == "dtype":
                    config[key] = name
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_dir = (
        Path(recipe.tokenizer_source)
        if recipe.tokenizer_source
        else (config_src.folder if config_src is not None else None)
    )
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copyfile(tokenizer_dir / name, folder / name)
    (folder / "mergesmith_recipe.yaml").write_text(recipe.to_yaml())
    manifest = {
        "mergesmith_version": __version__,
        "method": recipe.merge_method,
        "compat": recipe.compat,
        "seed": recipe.seed,
        "wall_time_s": round(seconds, 3),
        "inputs": input_hashes,
        "output_sha256": output_hashes,
        "resumed_shards": resumed_shards,
        "torch_version": torch.__version__,
    }
    if fit is not None:
        manifest["fit"] = fit
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (folder / "README.md").write_text(_model_card(recipe))


def _model_card(recipe: Recipe) -> str:
    from mergesmith.methods import get_method

    method = get_method(recipe.merge_method)
    front = {
        "base_model": recipe.model_paths(),
        "library_name": "transformers",
        "tags": ["merge", "mergesmith", recipe.merge_method],
    }
    return (
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n"
        f"# {recipe.name or 'Merged model'}\n\n"
        f"Merged with [mergesmith](https://pypi.org/project/mergesmith/) {__version__} using **{method.name}** "
        f"({method.summary}; {method.paper}).\n\n"
        "## Models\n\n"
        + "".join(f"- {p}\n" for p in recipe.model_paths())
        + "\n## Recipe\n\n```yaml\n"
        + recipe.to_yaml()
        + "```\n"
    )
