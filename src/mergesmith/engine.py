"""The streaming engine: recipe + sources → plan (one job per output tensor) → rules run on a bounded thread
pool → a sink (sharded safetensors, or a dict).

Memory is bounded by the jobs in flight (2 × threads), each holding one tensor per input model plus its output:
never the model. Methods that need a statistic of the whole model get it from ``prepare`` passes over the same
jobs before the merge pass.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from mergesmith.checkpoint.reader import Source
from mergesmith.errors import CheckpointError, RecipeError
from mergesmith.methods.base import (
    BasePolicy,
    MergeMethod,
    TensorContext,
    TensorInputs,
    get_method,
    resolve_method_params,
)
from mergesmith.recipe import Recipe, layer_index, resolve_settings

DTYPE_BY_NAME = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class Job:
    """One output tensor: where its inputs come from and the resolved parameters of its rule."""

    name: str
    dtype: torch.dtype  # output dtype
    shape: tuple[int, ...]
    base: tuple[Source, str] | None
    experts: list[tuple[Source, str]]
    params: dict[str, Any]
    layer: int | None = None
    copy: bool = False  # not merged (integer buffers): copied from the first input

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(torch.Size(self.shape).numel())


@dataclass
class Plan:
    method: MergeMethod
    jobs: list[Job]
    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    config_source: Source | None = None
    allow_nonfinite: bool = False
    fitted: Any = None  # a data-driven method's FitResult, handed to every rule as ctx.fitted

    def specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """The output tensors in the order the engine merges them, which is also their order in the shards: the
        shard's sha256 then advances while the merge runs (see ``unit_order``)."""
        return [(j.name, j.dtype, j.shape) for j in unit_order(self, self.jobs)]


def natural_key(name: str) -> list[Any]:
    """Sort ``layers.10`` after ``layers.9``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def num_layers_of(source: Source) -> int:
    for key in NUM_LAYERS_KEYS:
        value = source.config.get(key)
        if isinstance(value, int):
            return value
    indices = [i for i in (layer_index(n) for n in source.keys()) if i is not None]
    return max(indices) + 1 if indices else 0


def _lookup(source: Source, name: str) -> tuple[Source, str]:
    """Where to read ``name`` in ``source``: itself, or the input embedding for a tied ``lm_head``."""
    if source.has(name):
        return source, name
    if name.endswith("lm_head.weight") and source.tied_embeddings:
        for candidate in ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight"):
            if source.has(candidate):
                return source, candidate
    raise CheckpointError(
        f"tensor '{name}' is missing from {source.label}; the models do not share an architecture"
    )


def _check_same(name: str, reference: tuple[Source, str], other: tuple[Source, str]) -> None:
    ref_shape = reference[0].info(reference[1])[1]
    shape = other[0].info(other[1])[1]
    if ref_shape != shape:
        raise CheckpointError(
            f"tensor '{name}': shape {list(ref_shape)} in {reference[0].label} but {list(shape)} in "
            f"{other[0].label}; these models cannot be merged tensor by tensor"
        )


def _assign_roles(
    method: MergeMethod, base_path: str | None, entries: list[tuple[str, dict[str, Any]]]
) -> tuple[str | None, list[tuple[str, dict[str, Any]]]]:
    """Split (model, settings) entries into the method's base and experts."""
    if method.base is BasePolicy.IGNORED:
        return None, entries
    if method.base is BasePolicy.REQUIRED and not base_path:
        raise RecipeError(
            f"method '{method.name}' needs base_model (the model the task vectors are taken from)"
        )
    experts = [e for e in entries if e[0] != base_path]
    return base_path, experts


class Planner:
    """Turns a recipe and opened sources into a Plan, validating names, shapes and parameters."""

    def __init__(self, recipe: Recipe, sources: dict[str, Source], out_dtype: str | None = None,
                 task_heads: frozenset[str] = frozenset()):
        self.recipe = recipe
        self.sources = sources
        self.method = get_method(recipe.merge_method)
        self.out_dtype = DTYPE_BY_NAME[out_dtype] if out_dtype else None
        # Task-specific heads (each expert's classifier, seen by a data-driven fit): never merged. The output keeps
        # the reference model's (the base, else the first model) when it has one; the others may differ in shape.
        self.task_heads = task_heads

    def _job(
        self,
        out_name: str,
        reference: tuple[Source, str],
        base: tuple[Source, str] | None,
        experts: list[tuple[Source, str]],
        shared: dict[str, Any],
        per_model: list[dict[str, Any]],
        t: float,
        layer: int | None,
    ) -> Job:
        for other in ([base] if base else []) + experts:
            _check_same(out_name, reference, other)
        dtype, shape = reference[0].info(reference[1])
        if not dtype.is_floating_point:
            return Job(out_name, dtype, shape, base, experts or [reference], {}, layer, copy=True)
        params = resolve_method_params(
            self.method,
            resolve_settings(shared, reference[1], t),
            [resolve_settings(settings, name, t) for (_, name), settings in zip(experts, per_model)],
            compat=self.recipe.compat,
            where=f"tensor '{out_name}'",
        )
        return Job(out_name, self.out_dtype or dtype, shape, base, experts, params, layer)

    def plan(self) -> Plan:
        recipe = self.recipe
        jobs = self._plan_slices() if recipe.slices else self._plan_whole()
        jobs.sort(key=lambda j: natural_key(j.name))
        first = self._config_source()
        config = dict(first.config)
        if recipe.slices:
            total = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in recipe.slices)
            old = num_layers_of(first)
            for key in NUM_LAYERS_KEYS:
                if key in config:
                    config[key] = total
            if isinstance(config.get("layer_types"), list) and len(config["layer_types"]) == old:
                config["layer_types"] = [
                    first.config["layer_types"][s.sources[0].layer_range[0] + i]
                    for s in recipe.slices
                    for i in range(s.sources[0].layer_range[1] - s.sources[0].layer_range[0])
                ]
        return Plan(self.method, jobs, recipe.seed, config, first)

    def _config_source(self) -> Source:
        recipe = self.recipe
        if recipe.base_model:
            return self.sources[recipe.base_model]
        if recipe.models:
            return self.sources[recipe.models[0].model]
        return self.sources[recipe.slices[0].sources[0].model]  # type: ignore[index]

    def _plan_whole(self) -> list[Job]:
        recipe, method = self.recipe, self.method
        if not recipe.models:
            raise RecipeError("the recipe lists no models (add `models:` or `slices:`)")
        base_path, experts = _assign_roles(
            method, recipe.base_model, [(m.model, m.parameters) for m in recipe.models]
        )
        method.check_expert_count(len(experts))
        base = self.sources[base_path] if base_path else None
        expert_sources = [self.sources[p] for p, _ in experts]
        reference = base or expert_sources[0]
        names = reference.keys()
        self._check_names(reference, [s for s in ([base] if base else []) + expert_sources])
        n_layers = num_layers_of(reference)
        jobs = []
        for name in names:
            layer = layer_index(name)
            if name in self.task_heads:
                dtype, shape = reference.info(name)
                jobs.append(Job(name, self.out_dtype or dtype, shape, (reference, name), [], {}, layer, copy=True))
                continue
            t = self._t(layer, n_layers)
            jobs.append(
                self._job(
                    name,
                    (reference, name),
                    (base, name) if base else None,
                    [_lookup(s, name) for s in expert_sources],
                    recipe.parameters,
                    [settings for _, settings in experts],
                    t,
                    layer,
                )
            )
        return jobs

    @staticmethod
    def _t(layer: int | None, n_layers: int) -> float:
        if layer is None:
            return 0.0
        return layer / (n_layers - 1) if n_layers > 1 else 1.0

    def _check_names(self, reference: Source, others: list[Source]) -> None:
        ref = set(reference.keys()) - self.task_heads
        for other in others:
            if other is reference:
                continue
            names = set(other.keys()) - self.task_heads
            missing = sorted(ref - names, key=natural_key)
            missing = [n for n in missing if not (n.endswith("lm_head.weight") and other.tied_embeddings)]
            extra = sorted(names - ref, key=natural_key)
            extra = [n for n in extra if not (n.endswith("lm_head.weight") and reference.tied_embeddings)]
            if missing:
                raise CheckpointError(
                    f"tensor '{missing[0]}' is in {reference.label} but not in {other.label} "
                    f"({len(missing)} missing); the models do not share an architecture"
                )
            if extra:
                raise CheckpointError(
                    f"tensor '{extra[0]}' is in {other.label} but not in {reference.label} "
                    f"({len(extra)} extra); the models do not share an architecture"
                )

    def _plan_slices(self) -> list[Job]:
        recipe, method = self.recipe, self.method
        assert recipe.slices is not None
        jobs: list[Job] = []
        out_layer = 0
        for k, slc in enumerate(recipe.slices):
            lengths = {s.layer_range[1] - s.layer_range[0] for s in slc.sources}
            if len(lengths) != 1:
                raise RecipeError(
                    f"slices[{k}]: every source must have the same number of layers, got {sorted(lengths)}"
                )
            for src in slc.sources:
                available = num_layers_of(self.sources[src.model])
                if src.layer_range[1] > available:
                    raise RecipeError(
                        f"slices[{k}]: layer_range {list(src.layer_range)} of {src.model} is out of bounds "
                        f"(it has {available} layers)"
                    )
            base_path, experts = _assign_roles(
                method, recipe.base_model, [(s.model, s.parameters) for s in slc.sources]
            )
            method.check_expert_count(len(experts))
            shared = {**recipe.parameters, **slc.parameters}
            count = lengths.pop()
            base_src = next((s for s in slc.sources if s.model == base_path), None)
            if base_path and base_src is None:
                raise RecipeError(f"slices[{k}]: base_model {base_path} is not among the slice's sources")
            expert_srcs = [next(s for s in slc.sources if s.model == p) for p, _ in experts]
            for i in range(count):
                t = i / (count - 1) if count > 1 else 1.0
                reference_src = base_src or expert_srcs[0]
                reference = self.sources[reference_src.model]
                in_layer = reference_src.layer_range[0] + i
                for name in reference.keys():
                    if layer_index(name) != in_layer:
                        continue
                    out_name = _renumber(name, out_layer + i)

                    def locate(src, name=name, i=i):
                        source_name = _renumber(name, src.layer_range[0] + i)
                        return _lookup(self.sources[src.model], source_name)

                    jobs.append(
                        self._job(
                            out_name,
                            (reference, name),
                            locate(base_src) if base_src else None,
                            [locate(s) for s in expert_srcs],
                            shared,
                            [settings for _, settings in experts],
                            t,
                            out_layer + i,
                        )
                    )
            out_layer += count
        # tensors outside the layers: embeddings from the first slice's sources, the rest from the last's
        first, last = recipe.slices[0], recipe.slices[-1]
        for name in self.sources[first.sources[0].model].keys():
            if layer_index(name) is not None:
                continue
            slc = first if ("embed" in name or "wte" in name or "wpe" in name) else last
            base_path, experts = _assign_roles(
                method, recipe.base_model, [(s.model, s.parameters) for s in slc.sources]
            )
            base = self.sources[base_path] if base_path else None
            expert_sources = [self.sources[p] for p, _ in experts]
            reference = base or expert_sources[0]
            jobs.append(
                self._job(
                    name,
                    _lookup(reference, name),
                    (base, name) if base else None,
                    [_lookup(s, name) for s in expert_sources],
                    {**recipe.parameters, **slc.parameters},
                    [settings for _, settings in experts],
                    0.0,
                    None,
                )
            )
        return jobs


def _renumber(name: str, new_index: int) -> str:
    return re.sub(
        r"((?:^|\.)(?:layers|layer|h|blocks|block)\.)(\d+)(\.)",
        lambda m: f"{m.group(1)}{new_index}{m.group(3)}",
        name,
        count=1,
    )


# ---------------------------------------------------------------------------------------------------------
# Execution
#
# Big tensors of elementwise methods (linear, task arithmetic, TIES, DARE: the output at a position depends only
# on the inputs at that position, plus whole-model or per-tensor statistics) are merged in row blocks of at most
# PART_ELEMENTS elements: memory is bounded by a few blocks whatever the model size, and the blocks of one large
# tensor (an embedding) spread over the threads. Other methods (SVD, norms, sorts of a whole tensor) see whole
# tensors. A block's temporaries (a dozen fp32 arrays for TIES/DARE) must fit the shared L3 cache with one block
# per thread: measured on 3×542M bf16 with 2 threads, 2¹⁹ elements (2 MB per fp32 array) merged 15–20 % faster
# than 2²⁰ for linear, TA, TIES and DARE alike; 2¹⁸ was slower again (per-operation overhead).

PART_ELEMENTS = 1 << 19

# glibc serves every allocation above a dynamic threshold with a fresh mmap and returns it to the kernel on free,
# so each block's temporaries (a few MB) page-fault in anew: up to 4× the arithmetic itself in a task-arithmetic
# block. Raising the thresholds lets freed blocks be reused; what stays cached is bounded by TRIM_BYTES per arena.
MMAP_THRESHOLD_BYTES = 64 << 20
TRIM_BYTES = 256 << 20


@functools.cache
def keep_freed_blocks() -> bool:
    """Tell glibc's malloc to reuse freed block buffers instead of unmapping them (once; False off glibc)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt = getattr(libc, "mallopt", None)
    return mallopt is not None and bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(m_trim_threshold, TRIM_BYTES))


def _compute_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _all_finite(tensor: torch.Tensor) -> bool:
    # A NaN or Inf anywhere makes the fp32 sum non-finite, and a vectorised sum is ~10× cheaper than isfinite()
    # on bf16; only a non-finite sum (or a sum that overflowed) pays for the exact elementwise check.
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


def _view(source: Source, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    tensor = source.get(name)
    return tensor if rows is None else tensor[rows[0] : rows[1]]  # a view of the mapped file: only these rows


def _checked(tensor: torch.Tensor, source: Source, name: str, check_finite: bool) -> torch.Tensor:
    if check_finite and tensor.is_floating_point() and not _all_finite(tensor):
        raise CheckpointError(
            f"{source.label}: tensor '{name}' contains NaN or Inf; repair the checkpoint, or pass --allow-nonfinite "
            "to merge it anyway"
        )
    return tensor


def _read(source: Source, name: str, check_finite: bool, rows: tuple[int, int] | None = None) -> torch.Tensor:
    return _checked(_view(source, name, rows), source, name, check_finite)


def _load(job: Job, check_finite: bool = True, rows: tuple[int, int] | None = None
          ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    inputs = ([job.base] if job.base else []) + job.experts
    raw = [_view(src, name, rows) for src, name in inputs]
    dtype = _compute_dtype(raw)
    # checked after the conversion: a sum over the fp32 copy, hot in cache, is ~5× cheaper than over the bf16 view
    loaded = [_checked(t.to(dtype), src, name, check_finite) for t, (src, name) in zip(raw, inputs, strict=True)]
    return (loaded[0] if job.base else None), loaded[1 if job.base else 0 :]


def _elementwise(plan: Plan, job: Job) -> bool:
    flag = plan.method.elementwise
    return bool(flag(job.params) if callable(flag) else flag)


def parts_of(plan: Plan, job: Job) -> list[tuple[int, int] | None]:
    """Row blocks of at most PART_ELEMENTS elements for a large tensor of an elementwise rule, else [None]."""
    numel = int(torch.Size(job.shape).numel())
    if job.copy or plan.method.structural or numel <= PART_ELEMENTS or not job.shape or not _elementwise(plan, job):
        return [None]
    rows = job.shape[0]
    per_row = numel // rows
    step = max(1, PART_ELEMENTS // per_row)
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def stream_inputs(plan: Plan) -> Callable[[], Iterator[TensorInputs]]:
    """A pass over every merged tensor's inputs, for ``prepare`` (large tensors of elementwise methods arrive in
    row blocks, several items with the same name)."""

    def one_pass() -> Iterator[TensorInputs]:
        for job in plan.jobs:
            if job.copy:
                continue
            for rows in parts_of(plan, job):
                base, experts = _load(job, not plan.allow_nonfinite, rows)
                yield TensorInputs(job.name, base, experts, job.params, rows)

    return one_pass


def _tensor_stream(plan: Plan, job: Job, parts: list[tuple[int, int] | None],
                   checked: list[bool]) -> Callable[[], Iterator[TensorInputs]]:
    """The passes of ``tensor_stats`` over one tensor. Only the first checks the inputs for NaN/Inf (the check reads
    every input, and the later passes and the merge read the same bytes); ``checked[0]`` is set once a whole pass
    has checked them."""

    def one_pass() -> Iterator[TensorInputs]:
        check = not checked[0] and not plan.allow_nonfinite
        for rows in parts:
            base, experts = _load(job, check, rows)
            yield TensorInputs(job.name, base, experts, job.params, rows)
        checked[0] = True

    return one_pass


def run_job(plan: Plan, job: Job, state: Any, rows: tuple[int, int] | None = None,
            tensor_state: Any = None, checked: bool = False) -> torch.Tensor:
    """The merged tensor (or the block ``rows`` of it), in the output dtype."""
    if job.copy:
        src, name = job.base or job.experts[0]
        return src.get(name).to(job.dtype)  # integer buffers keep their dtype; a copied task head follows --dtype
    if plan.method.structural:
        src, name = job.experts[0]
        raw = _read(src, name, not plan.allow_nonfinite)
        experts = [raw if job.params.get("scale", [1.0])[0] == 1.0 else raw.to(_compute_dtype([raw]))]
        base = None
    else:
        base, experts = _load(job, not (plan.allow_nonfinite or checked), rows)
    ctx = TensorContext(name=job.name, seed=plan.seed, state=state, layer=job.layer, fitted=plan.fitted,
                        rows=rows, tensor_state=tensor_state)
    out = plan.method.rule(base, experts, job.params, ctx)
    expected = job.shape if rows is None else (rows[1] - rows[0], *job.shape[1:])
    if tuple(out.shape) != tuple(expected):
        raise AssertionError(
            f"{plan.method.name} returned shape {list(out.shape)} for '{job.name}' {list(expected)}"
        )
    return out.to(job.dtype)


class _Assembler:
    """Collects the row blocks of a tensor for a ``write`` that takes whole tensors (in-memory merges)."""

    def __init__(self, plan: Plan, write: Callable[[str, torch.Tensor], None]):
        self.write = write
        self.jobs = {j.name: j for j in plan.jobs}
        self.pending: dict[str, tuple[torch.Tensor, list[int]]] = {}
        self.lock = threading.Lock()

    def __call__(self, name: str, first_row: int, block: torch.Tensor) -> None:
        job = self.jobs[name]
        with self.lock:
            if name not in self.pending:
                self.pending[name] = (torch.empty(job.shape, dtype=job.dtype), [job.shape[0]])
            full, left = self.pending[name]
        full[first_row : first_row + block.shape[0]] = block
        with self.lock:
            left[0] -= block.shape[0]
            done = left[0] == 0
            if done:
                del self.pending[name]
        if done:
            self.write(name, full)


def execute(
    plan: Plan,
    write: Callable[[str, torch.Tensor], None],
    threads: int = 1,
    progress: bool = True,
    only: set[str] | None = None,
    write_rows: Callable[[str, int, torch.Tensor], None] | None = None,
) -> None:
    """Run every job (or those named in ``only``: a resume). ``write(name, tensor)`` receives each whole result,
    from worker threads; blocks of large tensors go to ``write_rows(name, first_row, block)`` when given (the
    folder writer puts them straight into the file), else they are assembled for ``write``.

    Work units — a whole tensor, one row block, or a tensor with per-tensor statistics and its blocks — run on
    ``threads`` workers with at most 2 × threads units in flight, so memory is bounded by a few blocks.
    """
    keep_freed_blocks()
    with _no_cyclic_gc():
        _execute(plan, write, threads, progress, only, write_rows)


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    # Every block allocates a few tensors, so Python's cyclic collector runs all the time, and its full passes walk
    # every object torch and transformers created at import while holding the GIL: it stalled the workers a fifth
    # of a DARE merge. Tensors are freed by reference counting; the few cycles wait until the end.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _uses_tensor_stats(plan: Plan, job: Job) -> bool:
    """Whether the tensor is merged after a ``tensor_stats`` pass over its blocks (one unit of work)."""
    return (plan.method.tensor_stats is not None and not job.copy and not plan.method.structural
            and plan.method.uses_tensor_stats(job.params))


def _indivisible(plan: Plan, job: Job) -> bool:
    """A large tensor merged as one unit of work: per-tensor statistics, or a rule that needs the whole tensor."""
    if job.copy or int(torch.Size(job.shape).numel()) <= PART_ELEMENTS:
        return False
    return _uses_tensor_stats(plan, job) or parts_of(plan, job) == [None]


def unit_order(plan: Plan, jobs: list[Job]) -> list[Job]:
    """Large indivisible tensors first, largest first (such a unit must not be the straggler that leaves the other
    threads idle at the end), then everything else in plan order (row blocks spread over the threads anyway).
    The output shards are laid out in this order, so the bytes become final roughly front to back and the shard's
    digest follows the merge. It does not depend on the thread count: outputs stay byte-identical."""
    big, rest = [], []
    for job in jobs:
        (big if _indivisible(plan, job) else rest).append(job)
    return sorted(big, key=lambda j: -j.nbytes) + rest


def _execute(
    plan: Plan,
    write: Callable[[str, torch.Tensor], None],
    threads: int,
    progress: bool,
    only: set[str] | None,
    write_rows: Callable[[str, int, torch.Tensor], None] | None,
) -> None:
    state = None
    if plan.method.prepare is not None:
        first = next((j for j in plan.jobs if not j.copy), None)
        if first is not None:
            state = plan.method.prepare(stream_inputs(plan), first.params, plan.seed)
    jobs = [j for j in plan.jobs if only is None or j.name in only]
    put_rows = write_rows or _Assembler(plan, write)

    def whole(job: Job) -> int:
        write(job.name, run_job(plan, job, state))
        return job.nbytes

    def block(job: Job, rows: tuple[int, int], tensor_state: Any = None, checked: bool = False) -> int:
        put_rows(job.name, rows[0], run_job(plan, job, state, rows, tensor_state, checked))
        return job.nbytes * (rows[1] - rows[0]) // job.shape[0]

    def with_stats(job: Job, parts: list[tuple[int, int] | None]) -> int:
        # per-tensor statistics (a per-tensor top-k threshold, a norm) need every block before any is merged
        ctx = TensorContext(name=job.name, seed=plan.seed, state=state, layer=job.layer, fitted=plan.fitted)
        checked = [False]
        tensor_state = plan.method.tensor_stats(_tensor_stream(plan, job, parts, checked), job.params, ctx)
        if parts == [None]:
            write(job.name, run_job(plan, job, state, None, tensor_state, checked[0]))
            return job.nbytes
        return sum(block(job, rows, tensor_state, checked[0]) for rows in parts if rows is not None)

    units: list[Callable[[], int]] = []
    for job in unit_order(plan, jobs):
        parts = parts_of(plan, job)
        if _uses_tensor_stats(plan, job):
            units.append(lambda job=job, parts=parts: with_stats(job, parts))
        elif parts == [None]:
            units.append(lambda job=job: whole(job))
        else:
            units += [lambda job=job, rows=rows: block(job, rows) for rows in parts]

    bar = tqdm(
        total=sum(j.nbytes for j in jobs),
        unit="B",
        unit_scale=True,
        desc=f"merge ({plan.method.name})",
        disable=not progress,
        dynamic_ncols=True,
        leave=False,
    )
    done = 0

    def finished(nbytes: int) -> None:
        nonlocal done
        done += 1
        bar.update(nbytes)
        bar.set_postfix_str(f"{done}/{len(units)} blocks", refresh=False)

    try:
        if threads <= 1:
            for unit in units:
                finished(unit())
            return
        with _torch_threads(1), ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mergesmith") as pool:
            # one torch thread per worker: the workers are the parallelism (no oversubscribed cores)
            pending: set[Future[int]] = set()
            for unit in units:
                if len(pending) >= 2 * threads:  # bound the units in flight
                    complete, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in complete:
                        finished(f.result())
                pending.add(pool.submit(unit))
            for f in pending:
                finished(f.result())
    finally:
        bar.close()


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
