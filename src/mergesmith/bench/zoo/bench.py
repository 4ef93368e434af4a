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
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergesmith.api import merge_state_dicts
from mergesmith.bench.zoo.models import mean
from mergesmith.bench.zoo.text8 import Zoo, summarize
from mergesmith.methods.registry import get_method


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


@dataclass(frozen=True)
class BenchMethod:
    """A method's benchmark settings: the paper's default and the validation grid."""

    method: str
    default: dict[str, Any]
    search: list[dict[str, Any]]
    note: str = ""


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


class Bench:
    def __init__(self, zoo: Zoo, val_limit: int | None = None, progress: bool = True):
        self.zoo = zoo
        self.val_limit = val_limit
        self.progress = progress
        self.base_state = zoo.state_dict(zoo.base)
        self.expert_states = [zoo.state_dict(zoo.encoder_path(t)) for t in zoo.tasks]
        self.finetuned = zoo.finetuned_accuracy("test")

    def merged(self, method: str, params: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
        base = self.base_state if get_method(method).base.value != "ignored" else None
        return merge_state_dicts(base, self.expert_states, method, seed=seed, threads=2, **params)

    def val_score(self, method: str, params: dict[str, Any]) -> float:
        acc = self.zoo.evaluate(self.merged(method, params), "val", limit=self.val_limit)
        return mean(acc.values())

    def test_row(self, method: str, params: dict[str, Any], seeds: int) -> dict[str, Any]:
        runs = []
        for seed in range(seeds):
            started = time.perf_counter()
            state = self.merged(method, params, seed)
            merge_seconds = time.perf_counter() - started
            acc = self.zoo.evaluate(state, "test")
            runs.append(
                {
                    "seed": seed,
                    "accuracy": acc,
                    "merge_seconds": round(merge_seconds, 2),
                    **summarize(acc, self.finetuned),
                }
            )
        return aggregate(runs) | {"params": params}


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


def reference_rows(zoo: Zoo) -> dict[str, dict[str, Any]]:
    finetuned = zoo.finetuned_accuracy("test")
    rows = {}
    for name in ("zeroshot", "finetuned", "multitask"):
        per_task = zoo.manifest["accuracy"].get(name) or {}
        if not per_task:
            continue
        acc = {t: per_task[t]["test"] for t in zoo.tasks}
        rows[name] = {"accuracy": acc, **summarize(acc, finetuned), "average_std": 0.0, "normalized_std": 0.0}
    return rows


def run_bench(
    zoo: Zoo,
    methods: Sequence[str] | None = None,
    seeds: int = 3,
    val_limit: int | None = None,
    progress: bool = True,
    search: bool = True,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """Grid-search each method on validation, then test the paper default and the best setting.
    ``search=False`` tests the paper defaults only (the demo)."""
    bench = Bench(zoo, val_limit, progress)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "zoo": zoo.manifest["zoo"],
        "tasks": zoo.tasks,
        "seeds": seeds,
        "config": zoo.manifest["config"],
        "reference": reference_rows(zoo),
        "methods": {},
    }
    chosen = [BENCH_METHODS[m] for m in (methods or BENCH_METHODS)]
    total = sum(len(m.search) for m in chosen) if search else 0
    bar = tqdm(total=total, desc="validation grid", unit="setting", disable=not progress or not search)
    for spec in chosen:
        method_start = time.perf_counter()
        scores = []
        for params in spec.search if search else []:
            scores.append({"params": params, "val_average": bench.val_score(spec.method, params)})
            bar.update(1)
            bar.set_postfix_str(spec.method)
        best = (
            max(scores, key=lambda s: s["val_average"])
            if scores
            else {"params": spec.default, "val_average": None}
        )
        entry = {
            "note": spec.note,
            "grid": scores,
            # random methods: all seeds at the chosen setting, one (seed 0) at the default
            "default": bench.test_row(spec.method, spec.default, 1),
            "best": None,
            "best_val_average": best["val_average"],
            "seconds": 0.0,
        }
        random = get_method(spec.method).random
        if search and (random or best["params"] != spec.default):
            entry["best"] = bench.test_row(spec.method, best["params"], seeds if random else 1)
        else:  # the default won (or no search): same setting, same numbers
            entry["best"] = entry["default"]
        entry["seconds"] = round(time.perf_counter() - method_start, 1)
        results["methods"][spec.method] = entry
        if checkpoint is not None:  # a long run keeps what it has finished
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text(json.dumps(results, indent=1) + "\n")
    bar.close()
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


def markdown_table(results: dict[str, Any]) -> str:
    tasks = results["tasks"]
    head = ["method", "setting", *[SHORT.get(t, t) for t in tasks], "avg", "norm. avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = {
        "zeroshot": "zero-shot (base + heads)",
        "finetuned": "fine-tuned (each task)",
        "multitask": "multi-task",
    }
    for key, row in results["reference"].items():
        lines.append(
            "| "
            + " | ".join(
                [
                    names[key],
                    "—",
                    *[format_cell(row["accuracy"][t]) for t in tasks],
                    format_cell(row["average"]),
                    format_cell(row["normalized"]),
                ]
            )
            + " |"
        )
    for method, entry in results["methods"].items():
        settings = [("default", entry["default"])]
        if entry["best"]["params"] != entry["default"]["params"]:
            settings.append(("best on val", entry["best"]))
        for label, row in settings:
            params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "—"
            lines.append(
                "| "
                + " | ".join(
                    [
                        f"`{method}`",
                        f"{label}: {params}",
                        *[format_cell(row["accuracy"][t]) for t in tasks],
                        format_cell(row["average"], row["average_std"]),
                        format_cell(row["normalized"], row["normalized_std"]),
                    ]
                )
                + " |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["methods"])
    default = [results["methods"][m]["default"]["normalized"] for m in methods]
    best = [results["methods"][m]["best"]["normalized"] for m in methods]
    best_err = [results["methods"][m]["best"]["normalized_std"] for m in methods]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    x = range(len(methods))
    searched = any(
        results["methods"][m]["best"] is not results["methods"][m]["default"]
        and results["methods"][m]["best"]["params"] != results["methods"][m]["default"]["params"]
        for m in methods
    )
    width = 0.4 if searched else 0.6
    ax.bar(
        [i - (0.2 if searched else 0) for i in x], [100 * v for v in default], width, label="paper default"
    )
    if searched:
        ax.bar(
            [i + 0.2 for i in x],
            [100 * v for v in best],
            width,
            yerr=[100 * e for e in best_err],
            capsize=3,
            label="best on validation",
        )
    shown = [*default, *best] + [r["normalized"] for r in results["reference"].values()]
    ax.set_ylim(max(0.0, 100 * min(shown) - 5), 102)  # the differences live in the last few points
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
    ax.set_ylabel("normalized accuracy (%)")
    ax.set_title(f"{results['zoo']}: merging {len(results['tasks'])} MiniLM-L6 experts (test split)")
    ax.legend(fontsize=8, loc="lower left")
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
    order = [m for m in BENCH_METHODS if m in methods] + [m for m in methods if m not in BENCH_METHODS]
    return {
        **first,
        "methods": {m: methods[m] for m in order},
        "seconds": round(sum(p.get("seconds", 0.0) for p in parts), 1),
    }


def write_reports(results: dict[str, Any], out_dir: Path, name: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md", "png": out_dir / f"{name}.png"}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["md"].write_text(markdown_table(results))
    plot(results, paths["png"])
    return paths
