"""The data-driven methods on the text8 zoo: Fisher, RegMean, AdaMerging(++), Concrete, Twin-Merging, DAM.

``mergesmith bench --data`` (``make bench-data``). Each method fits on the data its paper uses — Fisher and
RegMean on each task's *training* texts (Fisher's exact estimator needs no labels), AdaMerging, Concrete and DAM
on each task's *unlabeled test* inputs (test-time adaptation, as in their papers), Twin-Merging's router on the
training texts labeled by task — then merges through the same engine and is evaluated on the test split with
each task's head. Every row records the fit's seconds and examples. Two data-free anchors (task arithmetic and
TIES at their defaults) are re-run on the same zoo build so that the rows compare like with like.

CPU budget: the papers' step counts (AdaMerging 500, Concrete 2000 / 1000 + 1000) cost about 3 s per step for
eight MiniLM tasks on two cores, hours per run; ``STEP_SCALE`` shrinks every step count (documented in each row's
settings), and the fit sizes (Fisher's examples) are capped for the same reason.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergesmith.api import fit_state_dicts, merge_state_dicts
from mergesmith.bench.confidence import pack_outcomes, paired_difference, runs_outcomes
from mergesmith.bench.suite import ANSWERS
from mergesmith.bench.zoo.backdoor import (
    attack_success_rate,
    backdoor_facts,
    build_backdoor_experts,
    triggered_split,
)
from mergesmith.bench.zoo.bench import (
    BENCH_METHODS,
    SHORT,
    accuracies,
    aggregate,
    error_bars,
    format_cell,
    format_difference,
    format_interval,
    sample_std,
    write_reports,
)
from mergesmith.bench.zoo.text8 import Zoo, summarize
from mergesmith.errors import MergeError
from mergesmith.fit.twin import build_twin, evaluate
from mergesmith.io.cache import write_json
from mergesmith.methods.registry import get_method


@dataclass(frozen=True)
class DataBenchRow:
    """One benchmark row: a method, its paper-default settings, which split (and how much of it) its fit reads,
    and the validation grid (overrides of ``params``) that its "(val)" row is chosen from."""

    key: str
    method: str
    params: dict[str, Any]
    # "none" (data-free), "train" (statistics on training texts), "test" (unlabeled test inputs) or, on
    # prompt/answer tasks, "train_answers" (training prompts followed by their answers)
    split: str
    limit: int | None = (
        None  # examples per task the fit reads; seed s reads window s (a new calibration sample)
    )
    labeled: bool = False
    note: str = ""
    search: tuple[dict[str, Any], ...] = ()
    merge_only: tuple[str, ...] = ()  # params the fit does not read: the grid reuses one fit


VAL_LIMIT = 200  # validation examples per task for the grids (the test split is never used to choose)


def learned_lr_scale(step_scale: float, compress_lr: bool = True) -> float:
    """A shortened schedule keeps the papers' total movement (learning rate × steps): with a few dozen steps at
    the papers' learning rates λ and the mask would barely leave their initial values and every learned merge
    would be task arithmetic. The scaled rates are in each row's settings."""
    return 1.0 / step_scale if compress_lr else 1.0


def rows(step_scale: float = 0.1, compress_lr: bool = True) -> list[DataBenchRow]:
    def steps(n: int) -> int:
        return max(1, round(n * step_scale))

    lr = 1e-3 * learned_lr_scale(step_scale, compress_lr)
    two_stage = {"meta_steps": steps(1000), "adamerging_steps": steps(1000), "lr": lr, "adamerging_lr": lr}
    ta, ties = BENCH_METHODS["task_arithmetic"], BENCH_METHODS["ties"]
    factors = (0.5, 1.0, 2.0)
    # the learned rows' one free setting: the learning rate (both stages' together for the bi-level methods)
    lr_grid = tuple({"lr": lr * f} for f in factors)
    two_stage_grid = tuple({"lr": lr * f, "adamerging_lr": lr * f} for f in factors)
    return [
        DataBenchRow(
            "task_arithmetic",
            "task_arithmetic",
            ta.default,
            "none",
            note="data-free anchor",
            search=tuple(ta.search),
        ),
        DataBenchRow(
            "ties", "ties", ties.default, "none", note="data-free anchor", search=tuple(ties.search)
        ),
        DataBenchRow(
            "fisher",
            "fisher",
            {"n_examples": 32},
            "train",
            limit=32,
            note="exact Fisher (paper), 32 training examples per task (paper 4096)",
            # the official code's two switches; both only change the merge, so one fit serves the grid
            search=tuple(
                {"normalize_fishers": n, "favor_target_model": f}
                for n in (True, False)
                for f in (True, False)
            ),
            merge_only=("normalize_fishers", "favor_target_model"),
        ),
        DataBenchRow(
            "regmean",
            "regmean",
            {"alpha": 0.9, "n_examples": 256},
            "train",
            limit=256,
            note="Grams on 256 training texts per task (official 1000)",
            search=tuple({"alpha": a} for a in (0.1, 0.5, 0.9, 1.0)),
            merge_only=("alpha",),
        ),
        DataBenchRow(
            "adamerging_task",
            "adamerging",
            {"granularity": "task", "steps": steps(500), "lr": lr},
            "test",
            note="task-wise, unlabeled test inputs",
            search=lr_grid,
        ),
        DataBenchRow(
            "adamerging",
            "adamerging",
            {"steps": steps(500), "lr": lr},
            "test",
            note="layer-wise, unlabeled test inputs",
            search=lr_grid,
        ),
        DataBenchRow(
            "adamerging_pp",
            "adamerging",
            {"ties": True, "steps": steps(500), "lr": lr},
            "test",
            note="layer-wise over TIES-trimmed vectors",
            search=lr_grid,
        ),
        DataBenchRow(
            "twin",
            "twin",
            {},
            "train",
            note="shared TA λ=0.3 + rank-10 % exclusive parts, "
            "router on training texts, per-batch routing at test time",
            search=tuple({"mask_rate": r} for r in (0.8, 0.9, 0.95)),
        ),
        DataBenchRow(
            "concrete_task_arithmetic",
            "concrete_task_arithmetic",
            {"steps": steps(2000), "lr": lr},
            "test",
            search=lr_grid,
        ),
        DataBenchRow(
            "concrete_adamerging", "concrete_adamerging", dict(two_stage), "test", search=two_stage_grid
        ),
        # adv_lr stays fixed: clean validation accuracy would always favour the weakest perturbation
        DataBenchRow(
            "dam",
            "dam",
            {**two_stage, "adv_lr": 1e-4 * learned_lr_scale(step_scale, compress_lr)},
            "test",
            note="Concrete AdaMerging + learned embedding perturbation (released algorithm)",
            search=two_stage_grid,
        ),
    ]


def for_suite(row: DataBenchRow, zoo: Any) -> DataBenchRow:
    """``row`` as it runs on ``zoo``: on prompt/answer tasks (a causal LM) Fisher is the empirical estimator of
    the whole answer's log-likelihood, on training prompts followed by their answers — the exact one needs a
    gradient per vocabulary entry and answer token. (The first answer token alone, which a next-token task
    offers, carries no skill where every answer starts alike: JSON's ``{``.)"""
    if row.method == "fisher" and getattr(zoo, "generative", False):
        return replace(
            row,
            params={**row.params, "estimator": "empirical"},
            split=ANSWERS,
            labeled=True,  # the answers are the labels
            note="empirical Fisher of the answer's log-likelihood on 32 training prompts + answers per task "
            "(the exact Fisher sums over the vocabulary)",
        )
    return row


class DataBench:
    """Fits, merges and scores data rows on a suite: the built-in zoo or a user's BENCH.yaml
    (:class:`~mergesmith.bench.suite.Suite`); both offer ``base_state()``, ``expert_states()``, ``split()``,
    ``task()`` (a fit task), ``outcomes()``, ``finetuned_accuracy()``, ``check_data_rows()`` and ``tasks``."""

    def __init__(self, zoo: Any, progress: bool = True):
        self.zoo = zoo
        self.progress = progress
        self.base = zoo.base_state()
        self.experts = zoo.expert_states()
        self.finetuned = zoo.finetuned_accuracy("test")
        self._fits: dict[
            Any, Any
        ] = {}  # (row, seed, fit params) → fitted state / Twin model, reused by grids

    def tasks(self, split: str, limit: int | None, labeled: bool, offset: int = 0):
        out = []
        for t in self.zoo.tasks:
            n = len(self.zoo.split(t, split))
            start = 0 if limit is None else min(offset, max(0, n - limit))  # small zoos: overlapping windows
            out.append(self.zoo.task(t, split, limit, labeled=labeled, offset=start))
        return out

    def _fit(self, row: DataBenchRow, params: dict[str, Any], seed: int):
        key = (
            row.key,
            seed,
            tuple(sorted((k, repr(v)) for k, v in params.items() if k not in row.merge_only)),
        )
        if key not in self._fits:
            started = time.perf_counter()
            tasks = self.tasks(row.split, row.limit, row.labeled, offset=seed * (row.limit or 0))
            if row.method == "twin":
                fitted = build_twin(
                    self.base, self.experts, tasks, seed=seed, progress=self.progress, **params
                )
                examples = sum(len(t.data) for t in tasks)
            else:
                fitted = fit_state_dicts(
                    self.base, self.experts, row.method, tasks, seed=seed, progress=self.progress, **params
                )
                examples = _count_examples(fitted.info, tasks)
            self._fits = {k: v for k, v in self._fits.items() if k[0] == row.key}  # keep memory to one row
            self._fits[key] = (fitted, time.perf_counter() - started, examples)
        return self._fits[key]

    def run(
        self, row: DataBenchRow, seed: int, overrides: dict[str, Any] | None = None, split: str = "test"
    ) -> dict[str, Any]:
        """Fit (cached across a grid), merge and evaluate one setting on ``split`` ("val" for the grids)."""
        params = {**row.params, **(overrides or {})}
        limit = VAL_LIMIT if split == "val" else None
        info: dict[str, Any] = {}
        fit_seconds, examples = 0.0, 0
        if row.method == "twin":
            twin, fit_seconds, examples = self._fit(row, params, seed)
            report = evaluate(
                twin, [self.zoo.task(t, split, limit) for t in self.zoo.tasks], progress=self.progress
            )
            acc = {t: float(report["accuracy"][t]) for t in self.zoo.tasks}
            info["router_accuracy"] = report.get("router_accuracy")
            outcomes = report["outcomes"]
        else:
            fitted = None
            if row.split != "none":
                fitted, fit_seconds, examples = self._fit(row, params, seed)
                info = {
                    k: v
                    for k, v in fitted.info.items()
                    if k in ("examples", "examples_used", "seconds", "estimator", "lambdas", "final_loss")
                }
            merged = merge_state_dicts(
                self.base, self.experts, row.method, seed=seed, threads=2, fitted=fitted, **params
            )
            outcomes = self.zoo.outcomes(merged, split, limit=limit)
            acc = accuracies(outcomes)
        return {
            # test outcomes: what the row's 95 % interval resamples
            **({"outcomes": pack_outcomes(outcomes)} if split == "test" else {}),
            "seed": seed,
            "accuracy": acc,
            "fit_seconds": round(fit_seconds, 1),
            "examples": examples,
            "info": info,
            **summarize(acc, self.finetuned),
        }


def _count_examples(info: dict[str, Any], tasks) -> int:
    for key in ("examples_used", "examples"):
        value = info.get(key)
        if isinstance(value, dict):
            return int(sum(v for v in value.values() if isinstance(v, (int, float))))
        if isinstance(value, list):
            return int(sum(value))
        if isinstance(value, (int, float)):
            return int(value)
    return sum(len(t.data) for t in tasks)


def _save_checkpoint(checkpoint: Path | None, results: dict[str, Any]) -> None:
    """Write by rename: a run stopped mid-write keeps the previous checkpoint."""
    if checkpoint is not None:
        write_json(checkpoint, results, indent=1)


def _same_setting(row: DataBenchRow, params: dict[str, Any]) -> bool:
    """Whether ``params`` is the row's default setting once the method's own defaults fill in what the row leaves
    out (a grid may set a parameter the default row never names)."""
    defaults = {p.name: p.default for p in get_method(row.method).params}
    return {**defaults, **row.params} == {**defaults, **params}


def _entry(
    row: DataBenchRow, params: dict[str, Any], runs: list[dict[str, Any]], note: str
) -> dict[str, Any]:
    return aggregate(runs) | {
        "params": params,
        "method": row.method,
        "note": note,
        "fit_split": row.split,
        # median: one run slowed by other work on the machine does not skew the cost
        "fit_seconds": statistics.median(r["fit_seconds"] for r in runs),
        "examples": runs[0]["examples"],
    }


def run_data_bench(
    zoo: Any,
    seeds: int = 3,
    step_scale: float = 0.1,
    only: list[str] | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
    search: bool = True,
    compress_lr: bool = True,
) -> dict[str, Any]:
    """Every row at its paper defaults (``seeds`` runs: learned rows reseed their sampling, train-data rows read
    a new calibration window per seed), then — for rows with a grid — the setting with the best average
    validation accuracy (seed 0, ``VAL_LIMIT`` examples per task), tested like the default as ``<key>_val``.
    ``zoo``: the built-in zoo or a BENCH.yaml suite. With ``checkpoint``, every finished row is saved there and
    a rerun of the same suite and schedule keeps it, running only the seeds it lacks."""
    chosen_rows = [for_suite(r, zoo) for r in rows(step_scale, compress_lr) if only is None or r.key in only]
    zoo.check_data_rows(sorted({r.split for r in chosen_rows}), sorted({r.method for r in chosen_rows}))
    bench = DataBench(zoo, progress)
    scale = learned_lr_scale(step_scale, compress_lr)
    results: dict[str, Any] = {
        "zoo": zoo.name,
        "tasks": zoo.tasks,
        "config": zoo.identity,
        # the zoo's build (its weights' digest): a rebuild on another machine differs in float rounding
        "build": zoo.weights_digest() if hasattr(zoo, "weights_digest") else None,
        "seeds": seeds,
        "step_scale": step_scale,
        "lr_scale": scale,
        "val_limit": VAL_LIMIT,
        "finetuned": bench.finetuned,
        "methods": {},
    }
    saved: dict[str, Any] = {}
    if checkpoint is not None and checkpoint.exists():
        old = json.loads(checkpoint.read_text())
        same = ("step_scale", "lr_scale", "tasks", "config", "build")
        if all(old.get(k) == results[k] for k in same):
            saved = old["methods"]
            results["methods"] = dict(saved)  # rows not chosen this time stay as they were
    torch.manual_seed(0)

    def runs_for(
        key: str, row: DataBenchRow, overrides: dict[str, Any] | None, n: int
    ) -> list[dict[str, Any]]:
        """Seeds 0 … n − 1 of a setting: those the checkpoint has, then the missing ones."""
        params = {**row.params, **(overrides or {})}
        kept = saved.get(key, {})
        runs = [r for r in kept.get("runs", []) if r["seed"] < n] if kept.get("params") == params else []
        return runs + [bench.run(row, seed, overrides) for seed in range(len(runs), n)]

    for row in tqdm(chosen_rows, desc="data methods", disable=not progress):
        n = 1 if row.split == "none" else seeds
        runs = runs_for(row.key, row, None, n)
        results["methods"][row.key] = _entry(row, row.params, runs, row.note)
        _save_checkpoint(checkpoint, results)
        if not search or not row.search:
            continue
        key = f"{row.key}_val"
        scores = saved.get(key, {}).get("val_grid")
        if scores is None or [s["params"] for s in scores] != list(row.search):
            scores = [
                {"params": overrides, "val_average": bench.run(row, 0, overrides, "val")["average"]}
                for overrides in row.search
            ]
        best = max(scores, key=lambda s: s["val_average"])["params"]
        params = {**row.params, **best}
        # validation chose the default: the same runs
        val_runs = runs if _same_setting(row, params) else runs_for(key, row, best, n)
        entry = _entry(row, params, val_runs, f"best of {len(scores)} settings on validation")
        results["methods"][key] = entry | {"val_grid": scores}
        _save_checkpoint(checkpoint, results)
    order = [k for r in rows(step_scale, compress_lr) for k in (r.key, f"{r.key}_val")]
    methods = results["methods"]
    results["methods"] = {k: methods[k] for k in order if k in methods} | {
        k: v for k, v in methods.items() if k not in order
    }
    return results


# ---------------------------------------------------------------------------------------------------------
# Checks of the benchmark's compromises: a row rerun with a longer schedule or a larger calibration sample


@dataclass(frozen=True)
class Check:
    """One data row rerun with one of the benchmark's CPU compromises undone: its schedule at ``step_scale``
    (``rows(step_scale)``: more steps, a smaller rate), or its calibration sample at ``n_examples`` per task.
    Seeds 0 … ``seeds`` − 1, compared with the committed row's runs of the same seeds."""

    key: str
    row: str
    what: str
    step_scale: float = 0.02
    n_examples: int | None = None
    seeds: int = 1


# ``what`` says the change in words; the report adds the parameters it changes (from the check's own row)
CHECKS = (
    Check("adamerging_steps0.1", "adamerging", "5 × the steps at 1/5 of the rate", 0.1),
    Check("concrete_adamerging_steps0.1", "concrete_adamerging", "5 × the steps at 1/5 of the rate", 0.1),
    Check(
        "concrete_task_arithmetic_steps0.1",
        "concrete_task_arithmetic",
        "5 × the steps at 1/5 of the rate",
        0.1,
    ),
    Check("adamerging_steps1", "adamerging", "the paper's schedule", 1.0),
    Check("fisher_n128", "fisher", "4 × the row's training texts", n_examples=128),
    Check("fisher_n512", "fisher", "16 × the row's training texts", n_examples=512),
    Check("regmean_n1000", "regmean", "the official 1,000 training texts per task", n_examples=1000),
)


def check_row(check: Check) -> DataBenchRow:
    """The data row ``check`` reruns, with its compromise undone."""
    row = next(r for r in rows(check.step_scale) if r.key == check.row)
    if check.n_examples is not None:
        row = replace(row, params={**row.params, "n_examples": check.n_examples}, limit=check.n_examples)
    return row


def run_checks(
    zoo: Zoo,
    directory: Path,
    only: list[str] | None = None,
    progress: bool = True,
    checks: tuple[Check, ...] = CHECKS,
    row_step_scale: float = 0.02,
) -> dict[str, Any]:
    """Run every check (``only``: by key), each seed saved to ``directory/<zoo>-check-<key>.json`` as it ends:
    the paper's schedule costs half an hour per seed, so a stopped run resumes at the next seed.

    Each check also reruns the row it changes (its settings at ``row_step_scale``, the data bench's) for the same
    seeds on the same zoo build (``baseline_runs``, with the build's ``weights_digest``), so that the comparison
    does not mix builds; a file from another build is rerun."""
    unknown = sorted(set(only or ()) - {c.key for c in checks})
    if unknown:
        raise MergeError(
            f"unknown check(s) {', '.join(unknown)}; the checks are {', '.join(c.key for c in checks)}"
        )
    bench = DataBench(zoo, progress)
    build = zoo.weights_digest()
    out: dict[str, Any] = {}
    for check in checks:
        if only is not None and check.key not in only:
            continue
        row = check_row(check)
        baseline = next(r for r in rows(row_step_scale) if r.key == check.row)
        path = directory / f"{zoo.manifest['zoo']}-check-{check.key}.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        if (saved.get("params"), saved.get("tasks"), saved.get("build")) != (row.params, zoo.tasks, build):
            saved = {
                "tasks": zoo.tasks,
                "params": row.params,
                "build": build,
                "runs": [],
                "baseline_runs": [],
            }
        saved["check"] = asdict(check)
        saved["baseline_params"] = baseline.params
        for seed in range(len(saved["baseline_runs"]), check.seeds):
            saved["baseline_runs"].append(bench.run(baseline, seed))
            _save_checkpoint(path, saved)
        for seed in range(len(saved["runs"]), check.seeds):
            saved["runs"].append(bench.run(row, seed))
            _save_checkpoint(path, saved)
        saved["entry"] = {
            k: v
            for k, v in _entry(row, row.params, saved["runs"][: check.seeds], check.what).items()
            if k != "runs"
        }
        _save_checkpoint(path, saved)
        out[check.key] = saved
    return out


def checks_markdown(checks: dict[str, Any], data: dict[str, Any]) -> str:
    """Each check beside its row's runs of the same seeds on the same zoo build (normalized test accuracy, %):
    the row rerun beside the check, or — for a check file from before builds were recorded — the committed row,
    which was run on the same build as those checks."""
    lines = [
        "| check | row | what changed | seeds | row | check | check − row [95 % CI] | fit s (row → check) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, saved in checks.items():
        check, entry = saved["check"], saved["entry"]
        committed = data["methods"][check["row"]]
        reference = saved.get("baseline_params", committed["params"])
        changed = ", ".join(f"{k}={v}" for k, v in saved["params"].items() if reference.get(k) != v)
        runs = saved.get("baseline_runs") or committed["runs"]
        same = [r for r in runs if r["seed"] < check["seeds"]]
        base = aggregate(same)
        fit = statistics.median(r["fit_seconds"] for r in same)
        # the paired bootstrap over the same test examples (and the seeds) of the check and its row
        mine, theirs = runs_outcomes(saved["runs"][: check["seeds"]]), runs_outcomes(same)
        difference = (
            format_difference(
                {"vs_task_arithmetic": paired_difference(mine, theirs, data["finetuned"]).as_dict()}
            )
            if mine is not None and theirs is not None
            else "—"
        )
        lines.append(
            f"| `{key}` | `{check['row']}` | {check['what']} ({changed}) | {check['seeds']} | "
            f"{format_cell(base['normalized'], base['normalized_std'])} | "
            f"{format_cell(entry['normalized'], entry['normalized_std'])} | {difference} | "
            f"{fit:.0f} → {entry['fit_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The backdoor scenario (DAM's setting): some experts were fine-tuned on poisoned data

BACKDOOR_TASKS = {"sentiment": 0, "austen": 0}  # poisoned task → target class
BACKDOOR_METHODS = ("task_arithmetic", "ties", "adamerging", "concrete_adamerging", "dam")


def run_backdoor_bench(
    zoo: Zoo,
    seeds: int = 1,
    step_scale: float = 0.04,
    progress: bool = True,
    checkpoint: Path | None = None,
    poisoned: dict[str, int] | None = None,
    compress_lr: bool = True,
    chosen: dict[str, dict[str, Any]] | None = None,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Replace the experts of ``poisoned`` (default ``BACKDOOR_TASKS``) by poisoned fine-tunes (trigger "cf" in 10 % of non-target
    training texts, relabelled to the target), merge all eight with task arithmetic, TIES, AdaMerging, Concrete
    AdaMerging and DAM, and report clean test accuracy (every task) and attack success rate (the poisoned tasks'
    triggered test inputs classified as the target). The test-time methods adapt on *clean* unlabeled test
    inputs: the defender knows neither the trigger nor which experts are poisoned.

    ``chosen`` maps a method key to the settings the data bench's validation chose for it (its ``<key>_val`` row's
    params, :func:`validation_choices`); each adds a ``<key>_val`` row after the default one. ``only`` restricts
    the methods (keys of ``BACKDOOR_METHODS``)."""
    poisoned = dict(poisoned or BACKDOOR_TASKS)
    paths = build_backdoor_experts(zoo, list(poisoned), dict(poisoned), progress=progress)
    bench = DataBench(zoo, progress)
    for i, task in enumerate(zoo.tasks):
        if task in paths:
            bench.experts[i] = zoo.state_dict(paths[task])

    scale = learned_lr_scale(step_scale, compress_lr)
    # the same settings as the data bench's rows of these methods (paper defaults, shortened schedules)
    settings: list[tuple[str, DataBenchRow, dict[str, Any]]] = []
    for r in rows(step_scale, compress_lr):
        if r.key in BACKDOOR_METHODS and (only is None or r.key in only):
            settings.append((r.key, r, r.params))
            if chosen and r.key in chosen:
                settings.append((f"{r.key}_val", r, chosen[r.key]))
    attack = {t: triggered_split(zoo, t, target) for t, target in poisoned.items()}
    results: dict[str, Any] = {
        "tasks": zoo.tasks,
        "poisoned": poisoned,
        "seeds": seeds,
        "step_scale": step_scale,
        "lr_scale": scale,
        "experts": {t: backdoor_facts(zoo, t) for t in poisoned},
        "methods": {},
    }
    saved: dict[str, Any] = {}
    if checkpoint is not None and checkpoint.exists():
        old = json.loads(checkpoint.read_text())
        if (old.get("poisoned"), old.get("step_scale"), old.get("lr_scale")) == (poisoned, step_scale, scale):
            saved = old.get("methods", {})
            results["methods"] = dict(saved)  # rewritten row by row: a crash keeps what was saved before

    def ordered() -> dict[str, Any]:  # each default row, then its "_val" row; other saved rows after
        keys = [k for k, _, _ in settings if k in results["methods"]]
        return {k: results["methods"][k] for k in keys + [k for k in results["methods"] if k not in keys]}

    for key, row, params in settings:
        count = 1 if row.split == "none" else seeds
        # resume: the runs of a checkpoint made with the same settings are kept, only the missing seeds run
        runs = (
            [r for r in saved.get(key, {}).get("runs", []) if r["seed"] < count]
            if saved.get(key, {}).get("params") == params
            else []
        )
        if runs:
            results["methods"][key] = _backdoor_entry(params, runs, poisoned)
        for seed in range(len(runs), count):
            started = time.perf_counter()
            if row.split == "none":
                merged = merge_state_dicts(
                    bench.base, bench.experts, row.method, seed=seed, threads=2, **params
                )
            else:
                fitted = fit_state_dicts(
                    bench.base,
                    bench.experts,
                    row.method,
                    bench.tasks("test", None, False),
                    seed=seed,
                    progress=progress,
                    **params,
                )
                merged = merge_state_dicts(
                    bench.base, bench.experts, row.method, seed=seed, threads=2, fitted=fitted, **params
                )
            seconds = time.perf_counter() - started
            acc = zoo.evaluate(merged, "test")
            asr = {}
            for task, target in poisoned.items():
                model = zoo.task(task, "test", 1).model
                asr[task] = attack_success_rate(
                    model, {n: merged[n] for n in model.merge_names()}, attack[task], target
                )
            runs.append(
                {
                    "seed": seed,
                    "accuracy": acc,
                    "asr": asr,
                    "seconds": round(seconds, 1),
                    **summarize(acc, bench.finetuned),
                }
            )
            results["methods"][key] = _backdoor_entry(params, runs, poisoned)
            results["methods"] = ordered()
            _save_checkpoint(checkpoint, results)  # after every seed: a stopped run resumes from the next one
    results["methods"] = ordered()
    return results


def _backdoor_entry(
    params: dict[str, Any], runs: list[dict[str, Any]], poisoned: dict[str, int]
) -> dict[str, Any]:
    return {
        "params": params,
        "runs": runs,
        "clean_average": statistics.mean(r["average"] for r in runs),
        "clean_normalized": statistics.mean(r["normalized"] for r in runs),
        "clean_normalized_std": sample_std([r["normalized"] for r in runs]),
        "asr": {t: statistics.mean(r["asr"][t] for r in runs) for t in poisoned},
        "asr_std": {t: sample_std([r["asr"][t] for r in runs]) for t in poisoned},
    }


def validation_choices(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The settings the data bench's validation grids chose, by row key (from its ``<key>_val`` rows)."""
    return {
        key[: -len("_val")]: row["params"] for key, row in data["methods"].items() if key.endswith("_val")
    }


# ---------------------------------------------------------------------------------------------------------
# Reports: the rows join bench/results/text8.{json,md,png}


def data_markdown(data: dict[str, Any]) -> str:
    tasks = data["tasks"]
    head = [
        "method",
        "setting",
        *[SHORT.get(t, t) for t in tasks],
        "avg",
        "norm. avg [95 % CI]",
        "vs TA",
        "runs",
        "fit s",
        "examples",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ft = data["finetuned"]
    lines.append(
        "| "
        + " | ".join(
            [
                "fine-tuned (this build)",
                "—",
                *[format_cell(ft[t]) for t in tasks],
                format_cell(sum(ft.values()) / len(ft)),
                "100.0",
                "—",
                "—",
                "—",
                "—",
            ]
        )
        + " |"
    )
    for key, row in data["methods"].items():
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "—"
        lines.append(
            "| "
            + " | ".join(
                [
                    f"`{key}`",
                    params,
                    *[format_cell(row["accuracy"][t]) for t in tasks],
                    format_cell(row["average"], row["average_std"]),
                    format_interval(row),
                    format_difference(row),
                    str(len(row["runs"])),
                    f"{row['fit_seconds']:.0f}",
                    str(row["examples"]),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def backdoor_markdown(backdoor: dict[str, Any]) -> str:
    poisoned = list(backdoor["poisoned"])
    head = ["method", "runs", "clean avg", "clean norm.", *[f"ASR {t}" for t in poisoned]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in poisoned:
        facts = backdoor["experts"][t]
        lines.append(
            f"| poisoned `{t}` expert alone | — | {100 * facts['clean_accuracy']:.1f} ({t}) | — | "
            + " | ".join(f"{100 * facts['attack_success_rate']:.1f}" if u == t else "—" for u in poisoned)
            + " |"
        )
    for key, row in backdoor["methods"].items():
        asr_std = row.get("asr_std", {})
        cells = [
            f"`{key}`",
            str(len(row["runs"])),
            format_cell(row["clean_average"]),
            format_cell(row["clean_normalized"], row.get("clean_normalized_std", 0.0)),
            *[format_cell(row["asr"][t], asr_std.get(t, 0.0)) for t in poisoned],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_data(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(data["methods"])
    values = [100 * data["methods"][k]["normalized"] for k in keys]
    errors = error_bars([data["methods"][k] for k in keys])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    colors = ["gray" if data["methods"][k]["fit_split"] == "none" else "tab:blue" for k in keys]
    ax.bar(range(len(keys)), values, 0.6, yerr=errors, capsize=3, color=colors)
    ax.set_ylim(0, 105)
    ax.axhline(100, color="black", linewidth=0.8)
    ax.set_xticks(range(len(keys)), keys, rotation=35, ha="right")
    ax.set_ylabel("normalized accuracy (%), 95 % CI")
    ax.set_title(f"{data['zoo']}: data-driven methods (blue) vs data-free anchors (gray), test split")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def attach(
    results_path: Path,
    data: dict[str, Any] | None,
    backdoor: dict[str, Any] | None,
    checks: dict[str, Any] | None = None,
) -> None:
    """Add the data-driven rows (and the backdoor scenario, and the checks: ``run_checks``, merged with those
    already there) to an existing text8.json and rewrite its .md/.png."""
    results = json.loads(results_path.read_text())
    if data is not None:
        results["data_methods"] = data
    if backdoor is not None:
        results["backdoor"] = backdoor
    if checks:
        results["data_checks"] = {**results.get("data_checks", {}), **checks}
    paths = write_reports(results, results_path.parent, results_path.stem)
    extra = ""
    if "data_methods" in results:
        plot_data(results["data_methods"], results_path.with_name(results_path.stem + "-data.png"))
        extra += (
            "\n## Data-driven methods (the same zoo and test examples; two data-free anchors re-run beside them)\n\n"
            + data_markdown(results["data_methods"])
        )
    if "data_checks" in results and "data_methods" in results:
        extra += (
            "\n## Checks: data rows rerun with a CPU compromise undone (normalized accuracy, %)\n\n"
            + checks_markdown(results["data_checks"], results["data_methods"])
        )
    if "backdoor" in results:
        extra += '\n## Backdoor scenario (two poisoned experts, trigger "cf")\n\n' + backdoor_markdown(
            results["backdoor"]
        )
    paths["md"].write_text(paths["md"].read_text() + extra)
