"""The continual-merging benchmark (#20) on the text8 v2 zoo: the eight experts arrive one at a time.

For each of ``orders`` seeded task orders and each method (OPCM at α = 0.5 and the continual baselines: task
arithmetic λ = 0.3, TIES λ = 0.5 K = 20 %, weight averaging), the running merge is scored after every arrival on
every task's test split: the average normalized accuracy (accuracy over the task's own expert's) on the tasks seen
so far and on all eight. Results are the mean over orders with a 95 % t-interval, next to the offline merges of all
eight experts (task arithmetic, TIES, TSV-M at their paper defaults, the text8 table's default rows, merged on
the same zoo build) as the ceiling; plus OPCM's α ablation (final merge, every order). Each state lives in
``<zoo>/continual/`` and each score in ``<out>/runs/continual/`` (keyed by the method, its parameters and the
models' sha256 in order): a stopped run resumes.

:func:`run_memory_bench` (``python -m mergesmith.bench.zoo.continual_bench memory --size 1.1b``) measures each add of
8 synthetic fine-tunes of the speed bench's Llamas as its own process: time, peak anonymous and resident memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from scipy import stats as scipy_stats
from tqdm.auto import tqdm

from mergesmith.api import merge_state_dicts
from mergesmith.bench.confidence import bootstrap_normalized, cached_outcomes
from mergesmith.bench.speed import SIZES, make_checkpoint, parameter_count, run_measured
from mergesmith.bench.zoo.bench import row_spec
from mergesmith.bench.zoo.text8 import Zoo, normalized_accuracy
from mergesmith.drivers.continual import add_model, init_state, read_state
from mergesmith.errors import MergeError
from mergesmith.io.cache import cache_dir, keyed_json

METHODS = ("opcm", "task_arithmetic", "ties", "average")
OFFLINE = ("task_arithmetic", "ties", "tsv")
OFFLINE_STYLES = (("0.45", ":"), ("0.2", "--"), ("purple", "-."))  # grey and purple: apart from the curves


@dataclass(frozen=True)
class ContinualBenchConfig:
    orders: int = 5
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    alphas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    eval_limit: int | None = None  # test examples per task (None: all)


def task_orders(tasks: Sequence[str], count: int, seed: int) -> list[list[str]]:
    """``count`` seeded permutations of the tasks (the first is a permutation too)."""
    g = torch.Generator().manual_seed(seed)
    return [[tasks[i] for i in torch.randperm(len(tasks), generator=g).tolist()] for _ in range(count)]


def interval(values: Sequence[float]) -> dict[str, float]:
    """Mean and 95 % t-interval over the orders."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": mean, "high": mean, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(scipy_stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def _merged_accuracy(zoo: Zoo, state_dir: Path, t: int, count: int, limit: int | None) -> dict[str, float]:
    """The accuracy of the continual state's merge after ``t`` models (it must still be the state's last)."""
    if count != t:
        raise MergeError(f"{state_dir}: step {t} was not scored before the state moved on; delete the state")
    return zoo.evaluate(str(state_dir / f"merged-{t}"), limit=limit)


def run_sequence(
    zoo: Zoo,
    state_dir: Path,
    method: str,
    order: Sequence[str],
    params: Mapping[str, float],
    cache: Path,
    limit: int | None,
    score_every_step: bool = True,
) -> list[dict[str, float]]:
    """Absorb the experts in ``order`` (resuming a state that holds a prefix of it) and score the running merge
    after each arrival (or only the last); returns per step the normalized accuracy of every task."""
    finetuned = zoo.finetuned_accuracy()
    if (state_dir / "state.json").exists():
        state = read_state(state_dir)
        if [h["model"] for h in state.history] != [str(zoo.encoder_path(t)) for t in order[: state.count]]:
            shutil.rmtree(state_dir)  # another sequence: start again
    if not (state_dir / "state.json").exists():
        init_state(str(zoo.base), state_dir, method, dict(params))
    steps = []
    for t, task in enumerate(order, start=1):
        state = read_state(state_dir)
        if state.count < t:
            add_model(state_dir, str(zoo.encoder_path(task)))
        if not score_every_step and t < len(order):
            continue
        state = read_state(state_dir)
        # the merge after t models is fixed by the method, its parameters, the base and the models in order
        key = {
            "method": state.method,
            "params": state.params,
            "base": str(zoo.base),
            "models": [h["sha256"] for h in state.history[:t]],
            "limit": limit,
        }
        path = cache / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]}.json"
        accuracy = keyed_json(
            path, key, partial(_merged_accuracy, zoo, state_dir, t, state.count, limit), field="accuracy"
        )
        steps.append(normalized_accuracy(accuracy, finetuned))
    return steps


def run_continual_bench(
    zoo_root: Path, out: Path, config: ContinualBenchConfig | None = None, progress: bool = True
) -> dict[str, Any]:
    config = config or ContinualBenchConfig()
    zoo = Zoo(zoo_root)
    work = zoo.root / "continual"
    cache = out / "runs" / "continual"
    cache.mkdir(parents=True, exist_ok=True)
    orders = task_orders(zoo.tasks, config.orders, config.seed)
    started = time.perf_counter()
    curves: dict[str, dict[str, list[dict[str, float]]]] = {}
    jobs = [(m, k) for m in config.methods for k in range(len(orders))]
    for method, k in tqdm(jobs, desc="continual", disable=not progress):
        steps = run_sequence(zoo, work / f"{method}-o{k}", method, orders[k], {}, cache, config.eval_limit)
        seen = [sum(s[t] for t in orders[k][: i + 1]) / (i + 1) for i, s in enumerate(steps)]
        every = [sum(s.values()) / len(s) for s in steps]
        curves.setdefault(method, {"seen": [], "all": []})
        curves[method]["seen"].append(seen)
        curves[method]["all"].append(every)
    ablation: dict[str, dict[str, float]] = {}
    for alpha in config.alphas:
        finals = []
        for k, order in enumerate(orders):
            if alpha == 0.5 and "opcm" in curves:
                finals.append(curves["opcm"]["all"][k][-1])
                continue
            steps = run_sequence(
                zoo,
                work / f"opcm-a{alpha}-o{k}",
                "opcm",
                order,
                {"alpha": alpha},
                cache,
                config.eval_limit,
                False,
            )
            finals.append(sum(steps[-1].values()) / len(steps[-1]))
        ablation[str(alpha)] = interval(finals)
    summary = {
        method: {
            kind: [interval([run[i] for run in runs]) for i in range(len(zoo.tasks))]
            for kind, runs in by_kind.items()
        }
        for method, by_kind in curves.items()
    }
    results = {
        "name": "continual",
        "command": "mergesmith bench --zoo continual",
        "zoo": zoo.name,
        "tasks": zoo.tasks,
        "orders": orders,
        "config": asdict(config),
        "curves": curves,
        "summary": summary,
        "offline": offline_ceilings(zoo, cache),
        "alpha_ablation": ablation,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "continual.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "continual.md").write_text(markdown(results))
    plot(results, out / "continual.png")
    return results


def offline_ceilings(zoo: Zoo, cache: Path) -> dict[str, Any]:
    """The offline merges of all eight experts at their paper defaults (the text8 table's default rows), on the
    same zoo build as the curves (a rebuild differs in float rounding, so the committed table is not reused):
    normalized accuracy with its 95 % bootstrap interval. Outcomes are cached under the zoo's weights."""
    rows = {name: row_spec(name) for name in OFFLINE}
    base, experts = zoo.base_state(), zoo.expert_states()

    def compute() -> dict[str, dict[str, torch.Tensor]]:
        return {
            name: zoo.outcomes(merge_state_dicts(base, experts, row.method, threads=2, **row.default))
            for name, row in rows.items()
        }

    key = {"weights": zoo.weights_digest(), "rows": {n: [r.method, r.default] for n, r in rows.items()}}
    outcomes = cached_outcomes(cache / "offline.json", key, compute)
    finetuned = zoo.finetuned_accuracy()
    out = {}
    for name, row in rows.items():
        ci = bootstrap_normalized(outcomes[name], finetuned)
        out[name] = {
            "normalized": ci.estimate,
            "ci": {"low": ci.low, "high": ci.high},
            "params": row.default,
        }
    return out


def _pct(value: Mapping[str, float]) -> str:
    return f"{100 * value['mean']:.1f} [{100 * value['low']:.1f}, {100 * value['high']:.1f}]"


def markdown(results: Mapping[str, Any]) -> str:
    tasks = len(results["tasks"])
    lines = [
        "# Continual merging on the text8 v2 zoo",
        "",
        f"`{results['command']}`: {len(results['orders'])} task orders; average normalized accuracy (%) with a 95 % "
        "t-interval over the orders, after each arrival.",
        "",
    ]
    for kind, title in (("all", "All eight tasks"), ("seen", "Tasks seen so far")):
        lines += [f"## {title}", "", "| method | " + " | ".join(f"t={i + 1}" for i in range(tasks)) + " |"]
        lines.append("|---|" + "---|" * tasks)
        for method, by_kind in results["summary"].items():
            lines.append(f"| {method} | " + " | ".join(_pct(v) for v in by_kind[kind]) + " |")
        lines.append("")
    if results["offline"]:
        lines += [
            "## Offline merges of all eight (the ceiling: paper defaults, same zoo build, 95 % bootstrap interval)",
            "",
            "| method | normalized % |",
            "|---|---|",
        ]
        for name, row in results["offline"].items():
            ci = row.get("ci") or {}
            text = f"{100 * row['normalized']:.1f}"
            if ci:
                text += f" [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]"
            lines.append(f"| {name} | {text} |")
        lines.append("")
    lines += ["## OPCM's α (final merge, all tasks)", "", "| α | normalized % |", "|---|---|"]
    lines += [f"| {a} | {_pct(v)} |" for a, v in results["alpha_ablation"].items()]
    return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind in zip(axes, ("seen", "all")):
        for method, by_kind in results["summary"].items():
            points = by_kind[kind]
            x = list(range(1, len(points) + 1))
            ax.plot(x, [100 * p["mean"] for p in points], marker="o", label=method)
            ax.fill_between(
                x, [100 * p["low"] for p in points], [100 * p["high"] for p in points], alpha=0.15
            )
        for (name, row), style in zip(results["offline"].items(), OFFLINE_STYLES):
            ax.axhline(
                100 * row["normalized"],
                color=style[0],
                linestyle=style[1],
                linewidth=1,
                label=f"offline {name} (all eight)" if kind == "all" else None,
            )
        ax.set_xlabel("models absorbed")
        ax.set_title("tasks seen so far" if kind == "seen" else "all eight tasks")
    axes[0].set_ylabel("average normalized accuracy (%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_memory(state_dir: Path, model: str) -> dict[str, float]:
    """One ``mergesmith continual add`` as its own process: wall time, peak anonymous memory (what the process
    allocated: the memory-mapped inputs are not counted) and peak resident memory, in MiB."""
    command = [sys.executable, "-m", "mergesmith.cli", "continual", "add", str(state_dir), model]
    measured = run_measured(command)
    if measured.returncode != 0:
        raise MergeError(f"continual add {model} into {state_dir} failed (exit {measured.returncode})")
    return {
        "seconds": round(measured.seconds, 2),
        "peak_anon_mib": round(measured.peak_anon_mb, 1),
        "peak_rss_mib": round(measured.peak_rss_mb, 1),
    }


def memory_curve(
    base: str, models: Sequence[str], state_dir: Path, method: str = "opcm"
) -> list[dict[str, float]]:
    """Peak memory and time of each add, from the first model to the last, in a new state."""
    shutil.rmtree(state_dir, ignore_errors=True)
    init_state(base, state_dir, method)
    return [{"models": i + 1, **add_memory(state_dir, m)} for i, m in enumerate(models)]


def run_memory_bench(root: Path, out: Path, size: str = "135m", count: int = 8) -> dict[str, Any]:
    """OPCM adds of ``count`` synthetic fine-tunes of the speed bench's ``size`` Llama (bf16, random init plus
    seeded noise): time and peak memory per add; ``<out>/continual-memory-<size>.{json,md}``."""
    base = make_checkpoint(root / f"{size}-base", size, 0)
    models = [str(make_checkpoint(root / f"{size}-ft{i}", size, i + 1, base)) for i in range(count)]
    curve = memory_curve(str(base), models, root / f"{size}-state")
    results = {
        "command": f"python -m mergesmith.bench.zoo.continual_bench memory --size {size} --count {count}",
        "size": size,
        "parameters": parameter_count(size),
        "adds": curve,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"continual-memory-{size}.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        f"# Continual merging: OPCM adds of a {size} Llama ({results['parameters']:,} parameters, bf16)",
        "",
        f"`{results['command']}`; each add its own process.",
        "",
        "| models absorbed | seconds | peak anonymous MiB | peak RSS MiB |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['models']} | {r['seconds']} | {r['peak_anon_mib']} | {r['peak_rss_mib']} |" for r in curve
    ]
    (out / f"continual-memory-{size}.md").write_text("\n".join(lines) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mergesmith.bench.zoo.continual_bench")
    parser.add_argument("action", choices=["memory"])
    parser.add_argument("--size", default="135m", choices=sorted(SIZES))
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument(
        "--root", default=None, help="where the synthetic checkpoints go (default: the cache)"
    )
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    root = Path(args.root) if args.root else cache_dir() / "continual-memory"
    print(json.dumps(run_memory_bench(root, Path(args.out), args.size, args.count)["adds"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
