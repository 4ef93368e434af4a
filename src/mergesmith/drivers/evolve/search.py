"""``mergesmith evolve``: CMA-ES over a search space of recipes (Akiba et al., "Evolutionary Optimization of Model
Merging Recipes", Nature Machine Intelligence 2025), one generation at a time.

For a genome x the fitness f(x) is the score of the model its recipe builds (merged in memory); CMA-ES samples a
generation x_1..x_λ ~ m + σ·N(0, C), ranks them by f and moves m, σ and C toward the better ones (pycma,
``sigma0`` = 1/6 and coordinates in [0, 1] as mergekit-evolve). The search folder OUT holds:

- ``search.yaml``: the search as run (paths resolved); ``history.json``: every generation's genomes, fitness
  and timings, written after each generation;
- ``best_recipe.yaml``: the best candidate as a plain recipe (``mergesmith merge`` runs it), ``model/``: that
  recipe merged through the normal atomic merge, ``convergence.png``: best and mean fitness per generation.

Resuming replays the recorded generations through the optimizer (ask, then tell the recorded fitness), which
restores its state exactly without pickling it: the sampler draws from its own saved numpy state, so a resumed
search asks the same genomes and ends with the same result as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from mergesmith.api.pipeline import merge
from mergesmith.drivers.evolve.candidates import candidate_recipe, make_space
from mergesmith.drivers.evolve.dataflow import DataflowSpace
from mergesmith.drivers.evolve.fitness import resolve_kind
from mergesmith.drivers.evolve.pool import LocalPool, RayPool
from mergesmith.errors import MergeError, RecipeError
from mergesmith.io.cache import write_json
from mergesmith.recipe.search import SearchSpec, load_search

log = logging.getLogger(__name__)

HISTORY, SPEC, RECIPE, MODEL, PLOT = (
    "history.json",
    "search.yaml",
    "best_recipe.yaml",
    "model",
    "convergence.png",
)
Evaluate = Callable[[list[list[float]], int], list[dict[str, Any]]]


@dataclass(frozen=True)
class EvolveResult:
    out: Path
    best_fitness: float
    best_recipe: dict[str, Any]
    evaluations: int
    generations: int
    seconds: float
    candidates_per_minute: float


def fingerprint(spec: SearchSpec) -> str:
    """What a resumed search must share with the stopped one: everything but the budget."""
    data = spec.model_dump(mode="json")
    data["optimizer"].pop("budget")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def cma_options(
    seed: int, popsize: int, bounds: tuple[float, float] | None, spread: np.ndarray | None
) -> dict[str, Any]:
    """pycma's options for :func:`run_cma`."""
    # pycma's seed 0 would be the clock
    options: dict[str, Any] = {"seed": seed + 1, "verbose": -9, "popsize": popsize}
    if bounds is not None:
        options["bounds"] = list(bounds)
    if spread is not None:
        options["CMA_stds"] = [float(v) for v in spread]
    return options


def run_cma(
    x0: np.ndarray,
    sigma0: float,
    seed: int,
    popsize: int,
    generations: int,
    evaluate: Evaluate,
    recorded: list[dict[str, Any]],
    save: Callable[[list[dict[str, Any]]], None],
    bounds: tuple[float, float] | None = (0.0, 1.0),
    spread: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """CMA-ES for ``generations`` generations of ``popsize`` candidates, maximizing the fitness ``evaluate``
    returns for a generation (``[{"fitness": float | None, ...}]``; None ranks last). The ``recorded`` generations
    are replayed, not evaluated; ``save`` receives the history after every generation. ``bounds``: each
    coordinate's box (pycma's boundary transformation), None for an unbounded genome (a data-flow space);
    ``spread``: per-coordinate multipliers of ``sigma0`` (None: σ0 on every coordinate)."""
    import cma

    outer = np.random.get_state()
    es = cma.CMAEvolutionStrategy(list(map(float, x0)), sigma0, cma_options(seed, popsize, bounds, spread))
    sampler = np.random.get_state()  # pycma draws from numpy's global generator: keep its own state apart
    np.random.set_state(outer)
    history = list(recorded)
    for g in range(generations):
        outer = np.random.get_state()
        np.random.set_state(sampler)
        asked = es.ask()
        sampler = np.random.get_state()
        np.random.set_state(outer)
        genomes = [[float(v) for v in x] for x in asked]
        if g < len(recorded):
            if recorded[g]["genomes"] != genomes:
                raise MergeError(
                    f"history.json: generation {g} was asked for other genomes; the folder holds another search"
                )
            results = recorded[g]["results"]
        else:
            started = time.perf_counter()
            results = evaluate(genomes, g)
            history.append(_generation(g, genomes, results, time.perf_counter() - started))
            save(history)
        es.tell(asked, _losses(results))
    return history


def _losses(results: list[dict[str, Any]]) -> list[float]:
    """CMA-ES minimizes: the negated fitness; a candidate without a model ranks below the generation's worst."""
    values = [r["fitness"] for r in results if r["fitness"] is not None]
    worst = -min(values) + 1.0 if values else 1.0
    return [-r["fitness"] if r["fitness"] is not None else worst for r in results]


def _generation(
    g: int, genomes: list[list[float]], results: list[dict[str, Any]], seconds: float
) -> dict[str, Any]:
    values = [r["fitness"] for r in results if r["fitness"] is not None]
    return {
        "generation": g,
        "genomes": genomes,
        "results": results,
        "best": max(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
        "seconds": round(seconds, 3),
    }


def best_candidate(history: list[dict[str, Any]]) -> tuple[int, int, float]:
    """(generation, index, fitness) of the best candidate so far; the earliest among equals."""
    best = (-1, -1, -math.inf)
    for gen in history:
        for i, r in enumerate(gen["results"]):
            if r["fitness"] is not None and r["fitness"] > best[2]:
                best = (gen["generation"], i, r["fitness"])
    if best[0] < 0:
        raise MergeError("no candidate of the search gave a model; widen the search space")
    return best


def _read_history(out: Path, spec: SearchSpec, resume: bool) -> list[dict[str, Any]]:
    path = out / HISTORY
    if not path.exists():
        # a folder holding only search.yaml is a search stopped before its first generation was saved
        if out.exists() and any(p.name != SPEC for p in out.iterdir()):
            raise MergeError(f"{out}: exists and is not a search folder; choose another output folder")
        return []
    if not resume:
        raise MergeError(
            f"{out}: holds a search already; pass --resume to continue it, or choose another folder"
        )
    saved = json.loads(path.read_text())
    if saved.get("fingerprint") != fingerprint(spec):
        raise MergeError(
            f"{out}: the search there has other settings than this SEARCH.yaml (only optimizer.budget may change "
            "on --resume); choose another folder"
        )
    return saved["generations"]


def draw_convergence(ax: Any, history: list[dict[str, Any]], label: str = "") -> None:
    """Best-so-far (line), generation best (dots) and generation mean (dashed) fitness per generation on ``ax``
    (a matplotlib axis), their labels prefixed by ``label``."""
    gens = [g["generation"] + 1 for g in history]
    best = [g["best"] if g["best"] is not None else math.nan for g in history]
    mean = [g["mean"] if g["mean"] is not None else math.nan for g in history]
    so_far = np.fmax.accumulate(np.asarray(best, dtype=float))
    (line,) = ax.plot(gens, so_far, label=f"{label}best so far", linewidth=2)
    ax.plot(gens, best, "o", color=line.get_color(), label=f"{label}generation best", markersize=4)
    ax.plot(gens, mean, "--", color=line.get_color(), label=f"{label}generation mean")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness")
    ax.xaxis.get_major_locator().set_params(integer=True)


def plot_convergence(history: list[dict[str, Any]], path: Path, title: str) -> bool:
    """:func:`draw_convergence` as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6))
    draw_convergence(ax, history)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def evolve(
    search: str | Path | dict[str, Any] | SearchSpec,
    out: str | Path,
    *,
    resume: bool = False,
    budget: int | None = None,
    workers: int = 2,
    threads: int = 1,
    ray: bool = True,
    address: str | None = None,
    extra_kinds: Mapping[str, str] | None = None,
    progress: bool = True,
    write_model: bool = True,
) -> EvolveResult:
    """Run (or, with ``resume``, continue) the search and write its folder ``out`` (see the module docstring).

    ``ray=False`` scores candidates in this process; else on ``workers`` Ray actors with ``threads`` torch threads
    each, on a local cluster or the one at ``address``. ``extra_kinds`` adds fitness kinds (kind → import path).
    """
    spec = search if isinstance(search, SearchSpec) else load_search(search)
    if budget is not None:
        spec = spec.model_copy(update={"optimizer": spec.optimizer.model_copy(update={"budget": budget})})
    out = Path(out)
    recorded = _read_history(out, spec, resume)
    space = make_space(spec)  # checks the space before a worker starts
    popsize = spec.optimizer.popsize or _default_popsize(space.size)
    generations_total = spec.optimizer.budget // popsize
    if generations_total < 1:
        raise RecipeError(
            f"optimizer.budget {spec.optimizer.budget} is less than one generation ({popsize} candidates); "
            "raise the budget"
        )
    for entry in spec.fitness:  # an unknown kind fails here, in one line, before a worker starts
        resolve_kind(entry.kind, extra_kinds or {})
    started = time.perf_counter()
    # the evaluators are built (models read, fitness checked) before anything is written
    pool = (
        RayPool(spec, extra_kinds, threads, workers, address)
        if ray
        else LocalPool(spec, extra_kinds, threads)
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / SPEC).write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    except BaseException:
        pool.close()
        raise

    def evaluate(genomes: list[list[float]], g: int) -> list[dict[str, Any]]:
        bar = tqdm(total=len(genomes), desc=f"generation {g + 1}/{generations_total}", disable=not progress)
        best = [-math.inf]

        def done(_: int, result: dict[str, Any]) -> None:
            if result["fitness"] is not None:
                best[0] = max(best[0], result["fitness"])
            bar.set_postfix(best=f"{best[0]:.4f}")
            bar.update()

        try:
            return pool.map(genomes, done)
        finally:
            bar.close()

    def save(history: list[dict[str, Any]]) -> None:
        write_json(out / HISTORY, {"fingerprint": fingerprint(spec), "generations": history}, indent=1)

    # path genomes: signed indicators and log-scales, unbounded, with their own initial spread
    path = isinstance(space, DataflowSpace)
    bounds = None if path else (0.0, 1.0)
    spread = space.initial_spread(spec.optimizer.sigma0) if path else None
    try:
        history = run_cma(
            space.initial(),
            spec.optimizer.sigma0,
            spec.seed,
            popsize,
            generations_total,
            evaluate,
            recorded,
            save,
            bounds,
            spread,
        )
    finally:
        pool.close()
    seconds = time.perf_counter() - started
    g, i, value = best_candidate(history)
    recipe = candidate_recipe(space, spec, np.asarray(history[g]["genomes"][i]))
    (out / RECIPE).write_text(yaml.safe_dump(recipe, sort_keys=False))
    evaluated = sum(len(gen["results"]) for gen in history)
    eval_seconds = sum(gen["seconds"] for gen in history)
    summary = {
        "fingerprint": fingerprint(spec),
        "generations": history,
        "best": {"generation": g, "index": i, "fitness": value, "recipe": RECIPE},
        "evaluations": evaluated,
        "candidates_per_minute": round(60 * evaluated / eval_seconds, 3) if eval_seconds else None,
        "workers": pool.workers,
    }
    write_json(out / HISTORY, summary, indent=1)
    plot_convergence(history, out / PLOT, f"{spec.space} search: {spec.merge_method or 'layer path'}")
    if write_model:
        merge(recipe, out / MODEL, force=True, progress=progress)
    return EvolveResult(
        out, value, recipe, evaluated, len(history), seconds, summary["candidates_per_minute"] or 0.0
    )


def _default_popsize(n: int) -> int:
    """pycma's default population size, 4 + ⌊3 ln n⌋."""
    return 4 + int(3 * math.log(n))
