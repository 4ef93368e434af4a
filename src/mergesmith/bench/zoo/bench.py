"""``mergesmith bench``: every data-free method on a zoo, at the paper's defaults and at the best validation setting.

Protocol (as the papers do): each method's hyperparameters are searched on the *validation* split over the small
grid below; the setting with the best average validation accuracy is then evaluated once on the *test* split.
The paper-default setting is also evaluated on test. Methods with random drops (DARE, DELLA) are run with
``seeds`` seeds at the chosen setting (the grid search and the default row use seed 0) and reported as
mean ± standard deviation.
Two-model methods (slerp, nuslerp) and passthrough do not apply to eight experts.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergesmith.api import merge_state_dicts
from mergesmith.bench.confidence import bootstrap_normalized, pack_outcomes, paired_difference, runs_outcomes
from mergesmith.bench.zoo.models import mean
from mergesmith.bench.zoo.text8 import summarize
from mergesmith.errors import MergeError
from mergesmith.io.cache import write_json
from mergesmith.methods.registry import get_method


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


@dataclass(frozen=True)
class BenchMethod:
    """A row's settings: the method, its paper default and its validation grid. A community recipe is a row
    of its own (``key``), optionally under mergekit's semantics (``compat``) and over some tasks' experts only
    (``models``; for SLERP the first is mergekit's ``base_model`` endpoint, the second the model it moves to)."""

    method: str
    default: dict[str, Any]
    search: list[dict[str, Any]]
    note: str = ""
    key: str | None = None
    compat: str = "paper"
    models: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return self.key or self.method


LAMBDAS = (0.1, 0.3, 0.5, 0.7, 1.0)

# Grids are small on purpose: the committed run has to fit a 2-core machine (each TIES-family merge of eight
# MiniLM experts streams the model three times). Each grid brackets the paper default.
BENCH_METHODS: dict[str, BenchMethod] = {
    m.method: m
    for m in [
        BenchMethod("linear", {}, [{}], "uniform soup; no hyperparameter"),
        BenchMethod(
            "task_arithmetic",
            {"lambda": 0.3},
            grid(**{"lambda": LAMBDAS}),
            "λ = 0.3: the 8-task default of the TA/AdaMerging/FusionBench code",
        ),
        BenchMethod(
            "ties",
            {"density": 0.2, "lambda": 1.0},
            grid(density=(0.1, 0.2), **{"lambda": (1.0, 1.6)}),
            "paper: K = 20 %, dis-mean, λ = 1 (no-validation default); global trim",
        ),
        BenchMethod(
            "dare_linear",
            {"density": 0.9, "lambda": 0.3},
            grid(density=(0.1, 0.5), **{"lambda": (0.3, 0.5)}),
            "DARE + TA; default drop p = 0.1 (official script) with TA's λ = 0.3",
        ),
        BenchMethod(
            "dare_ties",
            {"density": 0.9, "lambda": 1.0},
            grid(density=(0.1, 0.5), **{"lambda": (1.0, 1.5)}),
            "DARE + TIES sign election, dis-mean",
        ),
        BenchMethod(
            "breadcrumbs",
            {"density": 0.15, "gamma": 0.01, "lambda": 0.3},
            grid(density=(0.15,), **{"lambda": (0.5, 1.0)}),
            "mid band of |τ| (top γ = 1 % cut), summed",
        ),
        BenchMethod(
            "breadcrumbs_ties",
            {"density": 0.15, "gamma": 0.01, "lambda": 1.0},
            grid(density=(0.15,), **{"lambda": (1.5, 2.0)}),
        ),
        BenchMethod(
            "della",
            {"density": 0.7, "epsilon": 0.15, "lambda": 1.0},
            grid(density=(0.3,), **{"lambda": (1.0, 1.5)}),
            "MagPrune + 1/p rescale + TIES election",
        ),
        BenchMethod(
            "della_linear",
            {"density": 0.7, "epsilon": 0.15, "lambda": 0.3},
            grid(density=(0.3,), **{"lambda": (0.3, 0.5)}),
        ),
        BenchMethod(
            "pcb",
            {"ratio": 0.1, "lambda": 1.0},
            grid(ratio=(0.1, 0.2), **{"lambda": (1.0, 1.5)}),
            "official code: global over the model",
        ),
        BenchMethod(
            "consensus",
            {"k": 2, "lambda": 0.3},
            grid(k=(1, 2), **{"lambda": (0.3, 0.5)}),
            "TALL masks (λ_t = 0.6) over TA, consensus k = 2",
        ),
        BenchMethod("tsv", {"alpha": 1.0}, grid(alpha=(0.5, 1.0, 2.0)), "TSV-M"),
        BenchMethod("model_stock", {}, [{}], "no hyperparameter (meant for fine-tunes of one task)"),
        BenchMethod("karcher", {}, [{}], "no hyperparameter"),
    ]
}

# The recipes mergekit users publish, as rows beside the papers' (the LLM benchmark runs them): mergekit's
# semantics (compat), the settings seen in its examples and model cards, no validation grid.
COMMUNITY_ROWS: dict[str, BenchMethod] = {
    m.name: m
    for m in [
        BenchMethod(
            "dare_ties",
            {"density": 0.5, "weight": 0.5},
            [],
            "mergekit: density 0.5, weight 0.5 per model (the most common DARE-TIES recipe)",
            key="dare_ties@mergekit",
            compat="mergekit",
        ),
        BenchMethod(
            "ties",
            {"density": 0.5, "weight": 0.5},
            [],
            "mergekit: density 0.5, weight 0.5 per model",
            key="ties@mergekit",
            compat="mergekit",
        ),
        BenchMethod(
            "task_arithmetic",
            {"weight": 0.5},
            [],
            "mergekit: weight 0.5 per model",
            key="task_arithmetic@mergekit",
            compat="mergekit",
        ),
        BenchMethod(
            "slerp",
            {"t": 0.5},
            [],
            "mergekit: SLERP t = 0.5 between the arithmetic and python_output experts (the others' skills are not merged)",
            key="slerp(arithmetic,python_output)",
            compat="mergekit",
            models=("arithmetic", "python_output"),
        ),
    ]
}


def row_spec(name: str) -> BenchMethod:
    """A row by name: a method's paper row, else a community recipe (looked up when asked, so that a changed
    registry entry is seen)."""
    return BENCH_METHODS[name] if name in BENCH_METHODS else COMMUNITY_ROWS[name]


ROWS: dict[str, BenchMethod] = BENCH_METHODS | COMMUNITY_ROWS  # every row name (for checks and ordering)


class Bench:
    """Merges and scores on a suite: the built-in zoo (:class:`~mergesmith.bench.zoo.text8.Zoo`) or a user's
    BENCH.yaml (:class:`~mergesmith.bench.suite.Suite`); both offer ``base_state()``, ``expert_states()``,
    ``outcomes(state, split, limit)``, ``reference_outcomes()``, ``tasks``, ``kinds``, ``name`` and ``identity``."""

    def __init__(self, zoo: Any, val_limit: int | None = None, progress: bool = True):
        self.zoo = zoo
        self.val_limit = val_limit
        self.progress = progress
        self.kinds = zoo.kinds
        self.base_state = zoo.base_state()
        self.expert_states = zoo.expert_states()
        self.reference = reference_rows(zoo, progress)
        self.finetuned = self.reference["finetuned"]["accuracy"]

    def merged(
        self, row: BenchMethod | str, params: dict[str, Any], seed: int = 0
    ) -> dict[str, torch.Tensor]:
        row = row if isinstance(row, BenchMethod) else BenchMethod(row, params, [])
        base = self.base_state if get_method(row.method).base.value != "ignored" else None
        experts = self.expert_states
        if row.models is not None:
            missing = [m for m in row.models if m not in self.zoo.tasks]
            if missing:
                raise MergeError(
                    f"row '{row.name}' merges task '{missing[0]}', which this suite does not have"
                )
            experts = [self.expert_states[self.zoo.tasks.index(m)] for m in row.models]
            if row.method == "slerp":  # mergekit's SLERP: base_model is the first endpoint
                base, experts = experts[0], experts[1:]
        return merge_state_dicts(base, experts, row.method, seed=seed, compat=row.compat, threads=2, **params)

    def val_score(self, row: BenchMethod | str, params: dict[str, Any]) -> float:
        """The normalized average on the validation split (normalized by the experts' test scores: a fixed
        weight per task, so it ranks settings as the test table does)."""
        outcomes = self.zoo.outcomes(self.merged(row, params), "val", limit=self.val_limit)
        return summarize(accuracies(outcomes), self.finetuned, self.kinds)["normalized"]

    def test_row(self, row: BenchMethod | str, params: dict[str, Any], seeds: int) -> dict[str, Any]:
        runs = []
        for seed in range(seeds):
            started = time.perf_counter()
            state = self.merged(row, params, seed)
            merge_seconds = time.perf_counter() - started
            outcomes = self.zoo.outcomes(state, "test")
            acc = accuracies(outcomes)
            runs.append(
                {
                    "seed": seed,
                    "accuracy": acc,
                    "outcomes": pack_outcomes(outcomes),
                    "merge_seconds": round(merge_seconds, 2),
                    **summarize(acc, self.finetuned, self.kinds),
                }
            )
        return aggregate(runs) | {"params": params}

    def single_expert_row(self, method: str, params: dict[str, Any], seeds: int) -> dict[str, Any]:
        """Each task scored by ``method`` applied to its own expert alone (base + that expert's delta): what
        DARE's single-model claim is about (drop 90 % of a fine-tune's delta and keep its skill)."""
        own = getattr(self.zoo, "task_outcomes", None)
        runs = []
        for seed in range(seeds):
            outcomes = {}
            for t, expert in zip(self.zoo.tasks, self.expert_states, strict=True):
                state = merge_state_dicts(self.base_state, [expert], method, seed=seed, threads=2, **params)
                outcomes[t] = own(t, state, "test") if own else self.zoo.outcomes(state, "test")[t]
            acc = accuracies(outcomes)
            runs.append(
                {
                    "seed": seed,
                    "accuracy": acc,
                    "outcomes": pack_outcomes(outcomes),
                    **summarize(acc, self.finetuned, self.kinds),
                }
            )
        return aggregate(runs) | {"params": params, "single_expert": True}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    tasks = list(runs[0]["accuracy"])
    row: dict[str, Any] = {"accuracy": {t: mean(r["accuracy"][t] for r in runs) for t in tasks}, "runs": runs}
    for key in ("average", "normalized"):
        values = [r[key] for r in runs]
        row[key] = mean(values)
        row[f"{key}_std"] = sample_std(values)
    return row


def sample_std(values: list[float]) -> float:
    """The spread reported as ± over seeds (0 for a single run)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def accuracies(outcomes: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each task's value: the mean of its per-example outcomes (accuracy, or a loss task's mean loss)."""
    return {t: float(o.double().mean()) for t, o in outcomes.items()}


def reference_rows(zoo: Any, progress: bool = False) -> dict[str, dict[str, Any]]:
    """Zero-shot, fine-tuned and multi-task rows, each with its test outcomes (for the intervals)."""
    outcomes = zoo.reference_outcomes(progress)
    kinds = zoo.kinds
    finetuned = accuracies(outcomes["finetuned"])
    rows = {}
    for name, per_task in outcomes.items():
        acc = accuracies(per_task)
        run = {"seed": 0, "accuracy": acc, "outcomes": pack_outcomes(per_task)}
        rows[name] = {
            "accuracy": acc,
            **summarize(acc, finetuned, kinds),
            "average_std": 0.0,
            "normalized_std": 0.0,
            "runs": [run],
        }
    return rows


def method_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every row of a results dict that has runs: reference rows, each data-free method's default and best row,
    and the data-driven rows, as (label, row)."""
    rows = [(name, row) for name, row in results.get("reference", {}).items()]
    for method, entry in results.get("methods", {}).items():
        rows.append((f"{method}:default", entry["default"]))
        if entry["best"] is not entry["default"]:
            rows.append((f"{method}:best", entry["best"]))
    for key, row in results.get("data_methods", {}).get("methods", {}).items():
        rows.append((f"data:{key}", row))
    return rows


def add_intervals(results: dict[str, Any]) -> None:
    """Give every row with per-example outcomes its 95 % bootstrap interval (``ci``) and its paired
    difference with task arithmetic at its paper default (``vs_task_arithmetic``), in place."""
    reference = results.get("reference", {}).get("finetuned")
    if reference is None:
        return
    finetuned = reference["accuracy"]
    kinds = results.get("kinds")
    anchor_entry = results.get("methods", {}).get("task_arithmetic")
    anchor = runs_outcomes(anchor_entry["default"]["runs"]) if anchor_entry else None
    for _, row in method_rows(results):
        outcomes = runs_outcomes(row.get("runs", []))
        if outcomes is None or set(outcomes) != set(finetuned):
            continue
        row["ci"] = bootstrap_normalized(outcomes, finetuned, kinds=kinds).as_dict()
        if anchor is not None and row is not anchor_entry["default"]:
            row["vs_task_arithmetic"] = paired_difference(outcomes, anchor, finetuned, kinds=kinds).as_dict()


def run_bench(
    zoo: Any,
    methods: Sequence[str] | None = None,
    seeds: int = 3,
    val_limit: int | None = None,
    progress: bool = True,
    search: bool = True,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """Grid-search each method on validation, then test the paper default and the best setting.
    ``search=False`` tests the paper defaults only (the demo). With ``checkpoint``, each finished method is saved
    there, and a rerun of the same suite and settings resumes at the first unfinished one."""
    bench = Bench(zoo, val_limit, progress)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "zoo": zoo.name,
        "tasks": zoo.tasks,
        "kinds": zoo.kinds,
        "heads": getattr(zoo, "heads", True),  # the built-in zoo classifies with heads
        "seeds": seeds,
        "val_limit": val_limit,
        "search": search,
        "config": zoo.identity,
        "reference": bench.reference,
        "methods": {},
    }
    if checkpoint is not None and checkpoint.exists():
        saved = json.loads(checkpoint.read_text())
        same = ("tasks", "seeds", "val_limit", "search", "config")
        if all(saved.get(k) == results[k] for k in same):
            results["methods"] = saved.get("methods", {})
    chosen = [row_spec(m) for m in (methods or BENCH_METHODS)]
    todo = [spec for spec in chosen if spec.name not in results["methods"]]
    # the bar counts validation settings when searching, else the rows tested (the demo's only long step)
    total = sum(len(m.search) for m in todo) if search else len(todo)
    desc, unit = ("validation grid", "setting") if search else ("test rows", "row")
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress)
    for spec in todo:
        method_start = time.perf_counter()
        scores = []
        for params in spec.search if search else []:
            scores.append({"params": params, "val_score": bench.val_score(spec, params)})
            bar.update(1)
            bar.set_postfix_str(spec.name)
        best = (
            max(scores, key=lambda s: s["val_score"])
            if scores
            else {"params": spec.default, "val_score": None}
        )
        entry = {
            "note": spec.note,
            "grid": scores,
            # random methods: all seeds at the chosen setting, one (seed 0) at the default
            "default": bench.test_row(spec, spec.default, 1),
            "best": None,
            "best_val_score": best["val_score"],
            "seconds": 0.0,
        }
        random = get_method(spec.method).random
        if search and (random or best["params"] != spec.default):
            entry["best"] = bench.test_row(spec, best["params"], seeds if random else 1)
        else:  # the default won (or no search): same setting, same numbers
            entry["best"] = entry["default"]
        entry["seconds"] = round(time.perf_counter() - method_start, 1)
        if not search:
            bar.update(1)
            bar.set_postfix_str(spec.name)
        results["methods"][spec.name] = entry
        if checkpoint is not None:  # a long run keeps what it has finished
            write_json(checkpoint, results, indent=1)
    bar.close()
    results["methods"] = {spec.name: results["methods"][spec.name] for spec in chosen}
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


# ---------------------------------------------------------------------------------------------------------
# Reports

SHORT = {
    "sentiment": "sent",
    "fortune_topic": "topic",
    "language": "lang",
    "noun_category": "noun",
    "verb_category": "verb",
    "austen": "austen",
    "tweet_device": "tweet",
    "gloss_pos": "pos",
}


def format_cell(value: float, std: float = 0.0) -> str:
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std > 0 else "")


def format_interval(row: dict[str, Any], key: str = "normalized") -> str:
    """The row's normalized average with its 95 % interval, ``83.1 [81.9, 84.3]`` (± seeds' std without one)."""
    ci = row.get("ci")
    if ci is None:
        return format_cell(row[key], row.get(f"{key}_std", 0.0))
    return f"{100 * ci['estimate']:.1f} [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]"


def format_difference(row: dict[str, Any]) -> str:
    """The paired difference with task arithmetic (default), ``+2.5 [+1.2, +3.8]`` and ``*`` when significant."""
    diff = row.get("vs_task_arithmetic")
    if diff is None:
        return "—"
    cell = f"{100 * diff['estimate']:+.1f} [{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]"
    return cell + (" *" if diff["significant"] else "")


REFERENCE_NAMES = {
    "zeroshot": "zero-shot (base + heads)",
    "finetuned": "fine-tuned (each task)",
    "multitask": "multi-task",
}


def task_cell(value: float, kind: str) -> str:
    """Accuracy in %, or a loss task's perplexity (exp of its mean window loss)."""
    return f"{math.exp(value):.2f}" if kind == "loss" else format_cell(value)


def table_row(
    name: str, setting: str, row: dict[str, Any], tasks: Sequence[str], kinds: dict[str, str] | None = None
) -> str:
    kinds = kinds or {}
    mixed = any(
        k != "accuracy" for k in kinds.values()
    )  # an average of accuracies and perplexities means nothing
    cells = [
        name,
        setting,
        *[task_cell(row["accuracy"][t], kinds.get(t, "accuracy")) for t in tasks],
        "—" if mixed else format_cell(row["average"], row.get("average_std", 0.0)),
        format_interval(row),
        format_difference(row),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown_table(results: dict[str, Any]) -> str:
    """Per-task test accuracy, the average, the normalized average with its 95 % interval, and the paired
    difference with task arithmetic (``*``: significant at 5 %)."""
    add_intervals(results)
    tasks = results["tasks"]
    kinds = results.get("kinds") or {}
    names = [SHORT.get(t, t) + (" (ppl)" if kinds.get(t) == "loss" else "") for t in tasks]
    head = ["method", "setting", *names, "avg", "norm. avg [95 % CI]", "vs TA"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in results["reference"].items():
        name = (
            "zero-shot (base)"
            if key == "zeroshot" and not results.get("heads", True)
            else REFERENCE_NAMES[key]
        )
        lines.append(table_row(name, "—", row, tasks, kinds))
    for method, entry in results["methods"].items():
        settings = [("default", entry["default"])]
        if entry["best"]["params"] != entry["default"]["params"]:
            settings.append(("best on val", entry["best"]))
        for label, row in settings:
            params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "—"
            lines.append(table_row(f"`{method}`", f"{label}: {params}", row, tasks, kinds))
    return "\n".join(lines) + "\n"


def error_bars(rows: Sequence[dict[str, Any]]) -> list[list[float]]:
    """Matplotlib's asymmetric ``yerr`` (in %) from each row's interval (its seeds' std without one)."""
    low, high = [], []
    for row in rows:
        ci = row.get("ci")
        if ci is None:
            low.append(100 * row.get("normalized_std", 0.0))
            high.append(100 * row.get("normalized_std", 0.0))
        else:
            low.append(100 * (row["normalized"] - ci["low"]))
            high.append(100 * (ci["high"] - row["normalized"]))
    return [[max(0.0, v) for v in low], [max(0.0, v) for v in high]]


def plot(results: dict[str, Any], path: Path) -> None:
    """Bars of each method's normalized accuracy (paper default, and best on validation when searched) with
    95 % intervals as error bars, on a y axis from 0; the zero-shot and multi-task rows as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    add_intervals(results)
    methods = list(results["methods"])
    default = [results["methods"][m]["default"] for m in methods]
    best = [results["methods"][m]["best"] for m in methods]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    x = range(len(methods))
    searched = any(b["params"] != d["params"] for b, d in zip(best, default))
    width = 0.4 if searched else 0.6
    ax.bar(
        [i - (0.2 if searched else 0) for i in x],
        [100 * r["normalized"] for r in default],
        width,
        yerr=error_bars(default),
        capsize=3,
        label="paper default",
    )
    if searched:
        ax.bar(
            [i + 0.2 for i in x],
            [100 * r["normalized"] for r in best],
            width,
            yerr=error_bars(best),
            capsize=3,
            label="best on validation",
        )
    ax.set_ylim(0, 105)
    for key, style in (("zeroshot", ":"), ("multitask", "--")):
        if key in results["reference"]:
            ax.axhline(
                100 * results["reference"][key]["normalized"],
                linestyle=style,
                color="gray",
                label={"zeroshot": "zero-shot", "multitask": "multi-task"}[key],
            )
    ax.axhline(100, color="black", linewidth=0.8, label="fine-tuned (100 %)")
    ax.set_xticks(list(x), methods, rotation=35, ha="right")
    ax.set_ylabel("normalized accuracy (%), 95 % CI")
    ax.set_title(f"{results['zoo']}: merging {len(results['tasks'])} experts (test split)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: never over a bar
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def combine(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Join benchmark runs of the same zoo that covered different methods (e.g. run in parallel), in the
    canonical method order."""
    first = parts[0]
    for other in parts[1:]:
        if other["tasks"] != first["tasks"] or other["config"] != first["config"]:
            raise ValueError("these results come from different zoos")
    methods = {name: entry for part in parts for name, entry in part["methods"].items()}
    order = [m for m in ROWS if m in methods] + [m for m in methods if m not in ROWS]
    return {
        **first,
        "methods": {m: methods[m] for m in order},
        "seconds": round(sum(p.get("seconds", 0.0) for p in parts), 1),
    }


def claims_markdown(checked: list[dict[str, Any]]) -> str:
    """The papers' claims checked (``bench.zoo.claims``) as a Markdown table."""
    head = "| paper | claim | rows (normalized %) | difference [95 % CI] | verdict |\n|---|---|---|---|---|\n"
    lines = []
    for c in checked:
        d = c["difference"]
        rows = f"`{c['first']}` {100 * c['first_normalized']:.1f} vs `{c['second']}` {100 * c['second_normalized']:.1f}"
        cell = f"{100 * d['estimate']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
        lines.append(f"| {c['paper']} | {c['claim']} | {rows} | {cell} | **{c['verdict']}** |")
    return head + "\n".join(lines) + "\n"


def write_reports(results: dict[str, Any], out_dir: Path, name: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md", "png": out_dir / f"{name}.png"}
    add_intervals(results)  # the JSON keeps every row's interval and paired difference too
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    table = markdown_table(results)
    if results.get("command"):
        table = f"# Benchmark `{results['zoo']}`: `{results['command']}`\n\n" + table
    if results.get("claims"):
        table += "\n## The papers' claims, checked (paired bootstrap vs the second row)\n\n"
        table += f"`python -m mergesmith.bench.zoo.claims {paths['json']}`\n\n"
        table += claims_markdown(results["claims"])
    paths["md"].write_text(table)
    plot(results, paths["png"])
    return paths
