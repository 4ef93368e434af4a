"""Where candidates are scored: in this process, or on Ray actors (a local cluster by default, or one joined by
``address``). Each actor reads the models once; an actor that dies mid-evaluation is restarted (reading them
again) and its evaluation retried, so the search goes on; an evaluator's own error stops the search."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from mergesmith import errors
from mergesmith.drivers.evolve.candidates import Evaluator
from mergesmith.errors import MergeError, RecipeError
from mergesmith.recipe.search import SearchSpec

Done = Callable[[int, dict[str, Any]], None]
# the last line of a worker's traceback when one of mergesmith's errors stopped it
_RAISED = re.compile(r"^mergesmith\.errors\.(\w+): (.+)$", re.MULTILINE)


def _worker_error(message: str) -> MergeError:
    """The one-line error for a Ray worker that could not start: the mergesmith error it raised (Ray passes it on
    only as text, inside the creation task's traceback), else the worker's last line."""
    raised = _RAISED.findall(message)
    if raised:
        name, text = raised[-1]
        kind = getattr(errors, name, MergeError)
        return kind(text) if isinstance(kind, type) and issubclass(kind, MergeError) else MergeError(text)
    lines = [line for line in message.splitlines() if line.strip()]
    return MergeError(f"a Ray worker could not start ({lines[-1].strip() if lines else 'no message'})")


class LocalPool:
    """One evaluator in this process."""

    workers = 1

    def __init__(self, spec: SearchSpec, extra_kinds: Mapping[str, str] | None, threads: int):
        self.threads_before = torch.get_num_threads()  # the evaluator sets this process's: restored on close
        try:
            self.evaluator = Evaluator(spec, extra_kinds, threads)
        except BaseException:
            torch.set_num_threads(self.threads_before)
            raise

    def map(self, genomes: list[list[float]], done: Done) -> list[dict[str, Any]]:
        results = []
        for i, x in enumerate(genomes):
            results.append(self.evaluator.score(x))
            done(i, results[-1])
        return results

    def close(self) -> None:
        torch.set_num_threads(self.threads_before)


class RayPool:
    """``workers`` Ray actors, each an :class:`Evaluator` with ``threads`` torch threads (one CPU each)."""

    def __init__(
        self,
        spec: SearchSpec,
        extra_kinds: Mapping[str, str] | None,
        threads: int,
        workers: int,
        address: str | None = None,
    ):
        try:
            import ray
        except ImportError:
            raise MergeError(
                "evaluations on Ray need the ray package: pip install 'mergesmith[evolve]' (or pass --no-ray)"
            ) from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            if address is None:
                # a local cluster's workers are this process's children: they import what this process can
                os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
                ray.init(num_cpus=workers * threads, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        remote = ray.remote(num_cpus=threads, max_restarts=-1, max_task_retries=-1)(Evaluator)
        self.workers = workers
        self.actors = [remote.remote(spec, dict(extra_kinds or {}), threads) for _ in range(workers)]
        try:  # every evaluator built (models read, fitness checked) before the search writes anything
            ray.get([actor.ready.remote() for actor in self.actors])
        except ray.exceptions.RayActorError as e:
            self.close()
            raise _worker_error(str(e)) from None

    def map(self, genomes: list[list[float]], done: Done) -> list[dict[str, Any]]:
        """Score every genome, each on the next free actor; results in the genomes' order."""
        ray = self.ray
        results: list[dict[str, Any] | None] = [None] * len(genomes)
        waiting: dict[Any, tuple[int, Any]] = {}
        free = list(self.actors)
        todo = list(range(len(genomes)))
        while todo or waiting:
            while todo and free:
                i, actor = todo.pop(0), free.pop(0)
                waiting[actor.score.remote(genomes[i])] = (i, actor)
            ready, _ = ray.wait(list(waiting), num_returns=1)
            i, actor = waiting.pop(ready[0])
            try:
                results[i] = ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:  # the evaluator's own error, raised in the worker
                cause = e.cause if isinstance(e.cause, Exception) else None
                if isinstance(cause, (RecipeError, MergeError)):
                    raise type(cause)(str(cause)) from None
                raise MergeError(
                    f"candidate {i}: the evaluation failed in a Ray worker ({str(e).splitlines()[0]})"
                ) from None
            free.append(actor)
            done(i, results[i])  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()
