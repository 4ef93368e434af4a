"""Execution: a :class:`~mergesmith.engine.plan.Plan`'s rules run on a bounded thread pool, each result handed to a
sink (the sharded safetensors writer, or a dict).

Memory is bounded by the work units in flight (2 × threads), each holding one tensor (or row block) per input
model plus its output: never the model. Methods with whole-model statistics get them from passes over the same
jobs before the merge pass (their :class:`~mergesmith.methods.base.ModelStats` hook).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import torch
from tqdm.auto import tqdm

from mergesmith.dtypes import compute_dtype
from mergesmith.engine.device import CPU
from mergesmith.engine.plan import Job, Plan
from mergesmith.errors import CheckpointError
from mergesmith.io.reader import Source
from mergesmith.ops.stream import TensorContext, TensorInputs

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
    return (
        mallopt is not None
        and bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES))
        and bool(mallopt(m_trim_threshold, TRIM_BYTES))
    )


def _all_finite(tensor: torch.Tensor) -> bool:
    # A NaN or Inf anywhere makes the fp32 sum non-finite, and a vectorised sum is ~10× cheaper than isfinite()
    # on bf16; only a non-finite sum (or a sum that overflowed) pays for the exact elementwise check.
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


def _view(
    source: Source, name: str, rows: tuple[int, int] | None = None, device: torch.device = CPU
) -> torch.Tensor:
    tensor = source.get(name)
    tensor = (
        tensor if rows is None else tensor[rows[0] : rows[1]]
    )  # a view of the mapped file: only these rows
    return tensor.to(device)  # as stored (bf16 crosses the bus at half the bytes of fp32); a no-op on the CPU


def _checked(tensor: torch.Tensor, source: Source, name: str, check_finite: bool) -> torch.Tensor:
    if check_finite and tensor.is_floating_point() and not _all_finite(tensor):
        raise CheckpointError(
            f"{source.label}: tensor '{name}' contains NaN or Inf; repair the checkpoint, or pass --allow-nonfinite "
            "to merge it anyway"
        )
    return tensor


def _read(
    source: Source,
    name: str,
    check_finite: bool,
    rows: tuple[int, int] | None = None,
    device: torch.device = CPU,
) -> torch.Tensor:
    return _checked(_view(source, name, rows, device), source, name, check_finite)


def _load(
    job: Job, check_finite: bool = True, rows: tuple[int, int] | None = None, device: torch.device = CPU
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    inputs = ([job.base] if job.base else []) + job.experts
    raw = [_view(src, name, rows, device) for src, name in inputs]
    dtype = compute_dtype(raw)
    # checked after the conversion: a sum over the fp32 copy, hot in cache, is ~5× cheaper than over the bf16 view
    loaded = [
        _checked(t.to(dtype), src, name, check_finite) for t, (src, name) in zip(raw, inputs, strict=True)
    ]
    return (loaded[0] if job.base else None), loaded[1 if job.base else 0 :]


def parts_of(plan: Plan, job: Job) -> list[tuple[int, int] | None]:
    """Row blocks of at most PART_ELEMENTS elements for a large tensor of an elementwise rule, else [None]."""
    numel = int(torch.Size(job.shape).numel())
    if job.copy or numel <= PART_ELEMENTS or not job.shape or not plan.method.rule.blockwise(job.params):
        return [None]
    rows = job.shape[0]
    per_row = numel // rows
    step = max(1, PART_ELEMENTS // per_row)
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def stream_inputs(plan: Plan) -> Callable[[], Iterator[TensorInputs]]:
    """A pass over every merged tensor's inputs, for a ``ModelStats`` hook (large tensors of elementwise methods arrive in
    row blocks, several items with the same name)."""

    def one_pass() -> Iterator[TensorInputs]:
        for job in plan.jobs:
            if job.copy:
                continue
            for rows in parts_of(plan, job):
                base, experts = _load(job, not plan.allow_nonfinite, rows, plan.device)
                yield TensorInputs(job.name, base, experts, job.params, rows)

    return one_pass


def _tensor_stream(
    plan: Plan, job: Job, parts: list[tuple[int, int] | None], checked: list[bool]
) -> Callable[[], Iterator[TensorInputs]]:
    """The passes of a ``TensorStats`` hook over one tensor. Only the first checks the inputs for NaN/Inf (the check reads
    every input, and the later passes and the merge read the same bytes); ``checked[0]`` is set once a whole pass
    has checked them."""

    def one_pass() -> Iterator[TensorInputs]:
        check = not checked[0] and not plan.allow_nonfinite
        for rows in parts:
            base, experts = _load(job, check, rows, plan.device)
            yield TensorInputs(job.name, base, experts, job.params, rows)
        checked[0] = True

    return one_pass


def run_job(
    plan: Plan,
    job: Job,
    state: Any,
    rows: tuple[int, int] | None = None,
    tensor_state: Any = None,
    checked: bool = False,
) -> torch.Tensor:
    """The merged tensor (or the block ``rows`` of it), in the output dtype, on the CPU (the rule runs on
    ``plan.device``)."""
    if job.copy:
        src, name = job.base or job.experts[0]
        return src.get(name).to(
            job.dtype
        )  # integer buffers keep their dtype; a copied task head follows --dtype
    if plan.method.rule.reads == "first":  # the first model's tensor as stored (no other input is read)
        src, name = job.experts[0]
        experts, base = [_read(src, name, not plan.allow_nonfinite, device=plan.device)], None
    else:
        base, experts = _load(job, not (plan.allow_nonfinite or checked), rows, plan.device)
    ctx = TensorContext(
        name=job.name,
        seed=plan.seed,
        state=state,
        layer=job.layer,
        fitted=plan.fitted,
        rows=rows,
        tensor_state=tensor_state,
    )
    out = plan.method.rule(base, experts, job.params, ctx)
    expected = job.shape if rows is None else (rows[1] - rows[0], *job.shape[1:])
    if tuple(out.shape) != tuple(expected):
        raise AssertionError(
            f"{plan.method.name} returned shape {list(out.shape)} for '{job.name}' {list(expected)}"
        )
    return out.to(job.dtype).to(CPU)  # cast on the device: a bf16 output crosses the bus at half the bytes


class DeviceTensors(Mapping[str, torch.Tensor]):
    """A fit's tensors as the rules see them on another device: each moved when a rule reads it, so a fit as large
    as the model (Fisher) is never on the device whole."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], device: torch.device):
        self.tensors, self.device = tensors, device

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key].to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def on_device(plan: Plan) -> Plan:
    """``plan`` with its fit's tensors read onto ``plan.device`` (the plan itself when that is the CPU)."""
    if plan.device == CPU or plan.fitted is None:
        return plan
    fitted = dataclasses.replace(plan.fitted, tensors=DeviceTensors(plan.fitted.tensors, plan.device))
    return dataclasses.replace(plan, fitted=fitted)


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
                self.pending[name] = (torch.empty(job.shape, dtype=job.dtype, device=CPU), [job.shape[0]])
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
    """Whether the tensor is merged after a ``TensorStats`` pass over its blocks (one unit of work)."""
    stats = plan.method.tensor_stats
    return stats is not None and not job.copy and plan.method.rule.reads == "all" and stats.needed(job.params)


def _indivisible(plan: Plan, job: Job) -> bool:
    """A large tensor merged as one unit of work: per-tensor statistics, or a rule that needs the whole tensor."""
    if job.copy or int(torch.Size(job.shape).numel()) <= PART_ELEMENTS:
        return False
    return _uses_tensor_stats(plan, job) or parts_of(plan, job) == [None]


def output_specs(plan: Plan) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The output tensors in the order the engine merges them, which is also their order in the shards: the
    shard's sha256 then advances while the merge runs (see ``unit_order``)."""
    return [(j.name, j.dtype, j.shape) for j in unit_order(plan, plan.jobs)]


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
    plan = on_device(plan)
    state = None
    if plan.method.model_stats is not None:
        first = next((j for j in plan.jobs if not j.copy), None)
        if first is not None:
            state = plan.method.model_stats(stream_inputs(plan), first.params, plan.seed)
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
        assert plan.method.tensor_stats is not None
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
        with (
            _torch_threads(1),
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mergesmith") as pool,
        ):
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
