"""``merge(recipe, out_dir)``: a checkpoint merge as a short pipeline of named steps.

    resolve   the recipe, the options and the sources, once; a data-driven method's tasks (or its saved fit)
    plan      the planner's jobs: one per output tensor, names, shapes and parameters checked (before a long fit)
    fit       run (or replay, or resume) the method's fit, when it has one; save it in the output at once
    execute   the engine merges every tensor into the sharded writer while the inputs are hashed
    publish   config, tokenizer, recipe, manifest and model card, then one rename into place

The output is built in a hidden sibling ``.NAME.partial`` folder and renamed into place at the end. An error
removes it; a kill leaves it for ``resume=True``, which reuses the shards it finished after checking their sha256.
``out_dir`` itself never exists half-written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergesmith.api.alignment import align_sources, write_alignment
from mergesmith.api.publish import OutputNotes, chat_template_for, tokenizer_folder, write_metadata
from mergesmith.api.state_dicts import run_fit
from mergesmith.api.tasks import FitSetup, prepare_fit
from mergesmith.api.vocabulary import reindexed_sources
from mergesmith.dtypes import DTYPE_NAMES
from mergesmith.engine.device import CPU, resolve_device
from mergesmith.engine.effective import effective_recipe
from mergesmith.engine.execute import execute, output_specs
from mergesmith.engine.plan import Plan, Planner
from mergesmith.errors import MergeError, RecipeError
from mergesmith.fit.task import FIT_FILE, FitResult
from mergesmith.io.models import open_model
from mergesmith.io.output import OutputLock, PartialFolder, check_free_space, fingerprint
from mergesmith.io.reader import Source, SourceTensors, close_sources
from mergesmith.io.writer import FolderWriter, input_sha256, parse_size
from mergesmith.methods.base import MergeMethod
from mergesmith.methods.registry import get_method
from mergesmith.recipe.schema import Recipe, load_recipe
from mergesmith.version import __version__

DEFAULT_SHARD_SIZE = 5 * 10**9
log = logging.getLogger("mergesmith")


@dataclass
class MergeResult:
    out_dir: Path
    method: str
    tensors: int
    bytes: int
    shards: int
    seconds: float
    resumed_shards: int = 0
    notices: tuple[str, ...] = ()

    def summary(self) -> str:
        return (
            f"merged {self.tensors} tensors ({self.bytes / 1e6:.1f} MB, {self.shards} shard"
            f"{'s' if self.shards != 1 else ''}) with {self.method} in {self.seconds:.1f} s "
            f"({self.bytes / 1e6 / max(self.seconds, 1e-9):.0f} MB/s) -> {self.out_dir}"
            + (f" (resumed: {self.resumed_shards} finished shards reused)" if self.resumed_shards else "")
        )


@dataclass
class Resolved:
    """Everything a merge needs, resolved once: the recipe with the call's overrides, its method and model paths,
    the output options, the opened sources and (for a data-driven method) its tasks or saved fit."""

    recipe: Recipe
    method: MergeMethod
    model_paths: list[str]
    out: Path
    out_dtype: str | None
    shard_size: int
    threads: int
    allow_nonfinite: bool
    resume: bool
    progress: bool
    sources: dict[str, Source]
    setup: FitSetup | None = None
    notices: tuple[str, ...] = ()
    tokenizer: Path | None = None  # tokenizer_source's folder (None: the config model's own)
    chat_template: str | None = None  # the recipe's chat_template, resolved
    vocabulary_tokenizer: Any = None  # the merged vocabulary's tokenizer (union, a tokenizer: block)
    device: torch.device = CPU  # where the rules run
    alignment: dict[str, Any] | None = None  # align: the permutations found (written as alignment.json)
    notes: OutputNotes | None = None  # a tool's own account of the output (mergesmith moe)

    def input_files(self) -> list[Path]:
        """The files a resume's fingerprint covers: every weight file, and the data or fit files."""
        return [f for src in self.sources.values() for f in src.files()] + (
            self.setup.files if self.setup else []
        )


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
    transform_sources: Callable[[dict[str, Source]], dict[str, Source]] | None = None,
    device: str | None = None,
    notes: OutputNotes | None = None,
    method: MergeMethod | None = None,
) -> MergeResult:
    """Merge the checkpoints a recipe names into ``out_dir`` (an HF model folder), atomically.

    A data-driven method (Fisher, RegMean, AdaMerging, ...) first fits on each model's ``data:`` (see
    :mod:`mergesmith.api.tasks` for how the models and their heads are loaded; the fit holds whole models in
    memory, the merge itself still streams), or replays ``fitted:``. The fit is saved as
    ``mergesmith_fit.safetensors`` in the output and summarised under ``fit`` in ``manifest.json``.

    ``transform_sources`` (for tools built on the merge, e.g. ``tokensurgeon``) wraps the opened sources before
    anything is checked or planned, so that some tensors are read as the tool computes them.

    ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``auto``) is where the per-tensor rules run (see
    :mod:`mergesmith.engine.device`); the default is the CPU. ``notes`` replace the recipe file, the manifest's
    method and the model card with a tool's own (:class:`mergesmith.api.publish.OutputNotes`). ``method`` runs a
    driver's own per-tensor rule (not in the registry; continual merging's steps) for the recipe's method.
    """
    start = time.perf_counter()
    with resolve(
        recipe,
        out_dir,
        force=force,
        shard_size=shard_size,
        threads=threads,
        allow_pickle=allow_pickle,
        allow_nonfinite=allow_nonfinite,
        resume=resume,
        seed=seed,
        dtype=dtype,
        compat=compat,
        progress=progress,
        transform_sources=transform_sources,
        device=device,
        method=method,
    ) as job:
        job.notes = notes
        plan = plan_merge(job)
        job.out.parent.mkdir(parents=True, exist_ok=True)  # every check has passed: the merge writes now
        with OutputLock(job.out):
            key = fingerprint(
                job.recipe.to_yaml(),
                {
                    "dtype": job.out_dtype,
                    "shard_size": job.shard_size,
                    "version": __version__,
                    "device": str(job.device),  # another device rounds differently: no mixed shards
                    # a tool's settings (an MoE's gates and experts) decide the tensors too
                    "notes": job.notes.record if job.notes is not None else None,
                },
                job.input_files(),
            )
            partial = PartialFolder(job.out, key, job.resume)
            try:
                try:
                    fit_report = fit(job, plan, partial.path)
                    writer = FolderWriter(
                        partial.path, output_specs(plan), job.shard_size, partial.finished, partial.shard_done
                    )
                    hashes = write_tensors(job, plan, writer)
                    publish(job, plan, partial, hashes, fit_report, time.perf_counter() - start)
                except OSError as e:  # disk full, file too large, I/O error: one line, then clean up
                    raise MergeError(
                        f"{job.out}: writing the output failed ({e.strerror}); nothing was written"
                    ) from None
            except (KeyboardInterrupt, SystemExit):
                raise  # interrupted or killed: the partial folder stays for --resume
            except BaseException:
                partial.discard()
                raise
    return MergeResult(
        job.out,
        job.recipe.merge_method,
        len(plan.jobs),
        sum(j.nbytes for j in plan.jobs),
        len(writer.file_names),
        time.perf_counter() - start,
        partial.resumed_from,
        job.notices,
    )


@contextlib.contextmanager
def resolve(
    recipe: str | Path | dict[str, Any] | Recipe,
    out_dir: str | Path,
    *,
    force: bool,
    shard_size: str | int,
    threads: int | None,
    allow_pickle: bool,
    allow_nonfinite: bool,
    resume: bool,
    seed: int | None,
    dtype: str | None,
    compat: str | None,
    progress: bool,
    transform_sources: Callable[[dict[str, Source]], dict[str, Source]] | None = None,
    device: str | None = None,
    method: MergeMethod | None = None,
) -> Iterator[Resolved]:
    """Step 1: the recipe with the call's overrides, the output checks, the opened sources (closed when the block
    ends) and a data-driven method's tasks, all checked before anything is written."""
    where = str(recipe) if isinstance(recipe, (str, Path)) else "recipe"
    parsed = load_recipe(recipe)
    updates: dict[str, Any] = {}
    if seed is not None:
        updates["seed"] = seed
    if compat is not None:
        updates["compat"] = compat
    if updates:
        parsed = parsed.model_copy(update=updates)
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise RecipeError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}; got '{dtype}'")
    compute_device = resolve_device(device)  # before anything is opened: a wrong device is the first error
    method = method or get_method(parsed.merge_method)
    parsed, notices = effective_recipe(parsed, method, where)
    for line in notices:
        log.warning("notice: %s", line)
    paths = parsed.model_paths()
    size = parse_size(shard_size)
    out = Path(out_dir)
    _check_output(out, paths, force)
    sources = _open_sources(paths, allow_pickle, where)
    try:
        if transform_sources is not None:  # tools built on merge (tokensurgeon) replace some tensors as read
            sources = transform_sources(sources)
        alignment = None
        if parsed.align is not None:  # models of different inits: read through their permutations
            sources, alignment = align_sources(parsed, sources, progress)
        tokenizer = tokenizer_folder(parsed, sources)  # checked now, not after the merge
        template = chat_template_for(parsed, sources, tokenizer)
        sources, vocabulary = reindexed_sources(parsed, sources)  # a merged vocabulary: rows re-indexed
        setup = prepare_fit(parsed, method, sources) if method.fit is not None else None
        yield Resolved(
            parsed,
            method,
            paths,
            out,
            dtype or parsed.out_dtype or parsed.dtype,
            size,
            threads or min(4, os.cpu_count() or 1),
            allow_nonfinite,
            resume,
            progress,
            sources,
            setup,
            tuple(notices),
            tokenizer,
            template,
            vocabulary.tokenizer if vocabulary is not None else None,
            compute_device,
            alignment,
        )
    finally:
        close_sources(sources.values())


def plan_merge(job: Resolved) -> Plan:
    """Step 2 (before the fit, so that a recipe mistake fails before a long fit): one job per output tensor."""
    heads = job.setup.task_heads if job.setup else frozenset()
    plan = Planner(job.recipe, job.sources, job.out_dtype, heads, job.method).plan()
    plan.allow_nonfinite = job.allow_nonfinite
    plan.device = job.device
    return plan


def fit(job: Resolved, plan: Plan, folder: Path) -> dict[str, Any] | None:
    """Step 3: run (or replay) the method's fit, set ``plan.fitted`` and save the result in the output ``folder`` at
    once, so that a resumed merge reuses it; then the method's extra artifacts. Returns what the manifest records
    about the fit (None for a method without one)."""
    setup = job.setup
    if setup is None:
        return None
    started = time.perf_counter()
    report: dict[str, Any] = {"file": FIT_FILE}
    if setup.replay is not None:
        fitted, report["replayed_from"] = setup.replay, setup.replayed_from
    elif (folder / FIT_FILE).exists():  # a resumed merge: the fit of the interrupted run (same inputs)
        fitted, report["resumed"] = FitResult.load(folder / FIT_FILE), True
    else:
        assert setup.tasks is not None
        base = SourceTensors(job.sources[setup.base_path]) if setup.base_path else None
        experts = [SourceTensors(job.sources[p]) for p in setup.expert_paths]
        fitted = run_fit(plan, base, experts, setup.tasks, job.progress)
    if not (folder / FIT_FILE).exists():
        fitted.save(folder / FIT_FILE)
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["examples"] = {name: d["examples"] for name, d in setup.data.items()}
    report["data"] = setup.data
    report["info"] = fitted.info
    plan.fitted = fitted
    if job.method.artifacts is not None:
        report.update(job.method.artifacts(fitted, job.recipe, folder))
    return report


def write_tensors(
    job: Resolved, plan: Plan, writer: FolderWriter
) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Step 4: merge every tensor still to do into the writer while the input files are hashed for the manifest;
    then the shards' index. Returns the output and input sha256."""
    todo = writer.pending()
    try:  # the writer's shard files are open: a refusal must close them too (else their space stays in use)
        check_free_space(writer.folder, sum(j.nbytes for j in plan.jobs if j.name in todo))
    except BaseException:
        writer.close()
        raise
    with ThreadPoolExecutor(max_workers=1) as hasher:
        hashes = hasher.submit(
            lambda: {
                label: {str(p): input_sha256(p) for p in src.files()} for label, src in job.sources.items()
            }
        )
        try:
            execute(
                plan,
                writer.write,
                threads=job.threads,
                progress=job.progress,
                only=todo,
                write_rows=writer.write_rows,
            )
            output_hashes = writer.finalize()
        finally:
            writer.close()
        writer.write_index()
        return output_hashes, hashes.result()


def publish(
    job: Resolved,
    plan: Plan,
    partial: PartialFolder,
    hashes: tuple[dict[str, str], dict[str, dict[str, str]]],
    fit_report: dict[str, Any] | None,
    seconds: float,
) -> None:
    """Step 5: every non-weight file (config, tokenizer, recipe, manifest, model card), then the one rename that
    makes the output appear."""
    output_hashes, input_hashes = hashes
    write_metadata(
        partial.path,
        job.recipe,
        job.model_paths,
        plan,
        input_hashes,
        output_hashes,
        seconds,
        partial.resumed_from,
        fit_report,
        job.notices,
        job.tokenizer,
        job.chat_template,
        job.vocabulary_tokenizer,
        write_alignment(partial.path, job.alignment) if job.alignment is not None else None,
        job.notes,
    )
    partial.publish(job.out)


def _open_sources(paths: list[str], allow_pickle: bool, where: str) -> dict[str, Source]:
    sources: dict[str, Source] = {}
    try:
        for path in paths:  # a folder or file, a Hub id, BASE+ADAPTER or an adapter folder
            try:
                sources[path] = open_model(path, allow_pickle)
            except RecipeError as e:  # a wrong model string: name the recipe it is in
                raise RecipeError(f"{where}: {e}") from None
    except BaseException:
        close_sources(sources.values())
        raise
    return sources


def _check_output(out: Path, model_paths: list[str], force: bool) -> None:
    resolved = out.resolve()
    for path in model_paths:
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
    while not parent.exists():  # created when the merge starts writing (as mergekit does)
        parent = parent.parent
    if not parent.is_dir():
        raise MergeError(f"{out}: {parent} is not a folder; choose another output path")
    if not os.access(parent, os.W_OK):
        raise MergeError(f"{out}: cannot write in {parent} (permission denied)")
