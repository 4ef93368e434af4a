"""The evolutionary-search benchmark (#21) on the text8 v2 zoo (``python -m mergesmith.bench.zoo.evolve_bench``).

One parameter-space search (DARE-TIES, the paper's recipe: per block of ``layer_granularity`` layers and per
expert a weight and a density) scored on the validation split (the first ``val_limit`` examples per task, as the
benchmark's grids), run to the largest budget; the best candidate within each smaller budget is the first
generations' best (the search is the same, only stopped earlier). Each evolved recipe and each baseline — task
arithmetic, TIES, DARE-TIES and TSV-M at their validation-grid best from ``bench/results/text8.json``, merged again
on this zoo build, and layer-wise AdaMerging (its committed row when this build reproduces the committed task
arithmetic outcomes exactly, else fitted again) — is scored on the whole test split, never seen by the search:
normalized accuracy with a 95 % bootstrap interval and the paired difference to the evolved recipe.

Results: ``bench/results/evolve.{json,md,png}``; the search folder (resumable) is ``<zoo>/evolve/``.

``python -m mergesmith.bench.zoo.evolve_bench llm`` (:func:`run_llm_evolve_bench`) runs the LLM zoo's rows
(SmolLM2-135M experts; fitness: the zoo's BENCH.yaml on the first ``val_limit`` validation prompts per skill,
normalized by the experts): the sources, the best hand recipe (task arithmetic λ ∈ {0.3, 0.5, 0.7, 1.0} and
mergekit's community DARE-TIES, chosen on validation), PS (DARE-TIES per block of layers), DFS (a path through
the two experts whose skills PS keeps worst) and PS + DFS (a path through the PS model and the expert of the skill
it keeps worst), each scored on every skill's test split: exact match and answer loss. Results:
``bench/results/evolve-llm.{json,md}``.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mergesmith.api.state_dicts import load_in_memory, merge_recipe_in_memory, merge_state_dicts
from mergesmith.bench.confidence import (
    bootstrap_normalized,
    pack_outcomes,
    paired_difference,
    unpack_outcomes,
)
from mergesmith.bench.suite import Suite, backbone
from mergesmith.bench.zoo.bench import accuracies
from mergesmith.bench.zoo.databench import DataBench, rows
from mergesmith.bench.zoo.evolve_fitness import BENCH_KINDS
from mergesmith.bench.zoo.llm import LLMZoo, build_llm_zoo, normalized_exact_match, reference_evaluations
from mergesmith.bench.zoo.text8 import Zoo, summarize
from mergesmith.drivers.evolve.candidates import candidate_recipe, make_space
from mergesmith.drivers.evolve.fitness import Fitness
from mergesmith.drivers.evolve.search import HISTORY, MODEL, PLOT, draw_convergence, evolve
from mergesmith.fit.hf import load_causal_lm
from mergesmith.io.cache import keyed_json, zoo_dir
from mergesmith.recipe.search import load_search

BASELINES = ("task_arithmetic", "ties", "dare_ties", "tsv")


@dataclass(frozen=True)
class EvolveBenchConfig:
    budgets: tuple[int, ...] = (100, 300)
    method: str = "dare_ties"
    layer_granularity: int = 2
    val_limit: int = 100
    workers: int = 2
    seed: int = 0


def search_spec(zoo: Zoo, config: EvolveBenchConfig) -> dict[str, Any]:
    return {
        "merge_method": config.method,
        "base_model": str(zoo.base),
        "models": [str(zoo.encoder_path(t)) for t in zoo.tasks],
        "layer_granularity": config.layer_granularity,
        "fitness": {"kind": "text8", "zoo": str(zoo.root), "split": "val", "limit": config.val_limit},
        "optimizer": {"budget": max(config.budgets)},
        "seed": config.seed,
    }


def best_within(history: list[dict[str, Any]], budget: int) -> tuple[int, int, float, int]:
    """(generation, index, validation fitness, evaluations) of the best candidate among the whole generations
    that fit in ``budget`` evaluations."""
    best, used = (-1, -1, -np.inf), 0
    for gen in history:
        if used + len(gen["results"]) > budget:
            break
        used += len(gen["results"])
        for i, r in enumerate(gen["results"]):
            if r["fitness"] is not None and r["fitness"] > best[2]:
                best = (gen["generation"], i, r["fitness"])
    return (*best, used)


def scored_on_test(zoo: Zoo, state: dict[str, Any], finetuned: dict[str, float]) -> dict[str, Any]:
    outcomes = zoo.outcomes(state, "test")
    acc = accuracies(outcomes)
    return {
        "accuracy": acc,
        **summarize(acc, finetuned),
        "ci": _interval(outcomes, finetuned),
        "outcomes": pack_outcomes(outcomes),
    }


def _interval(outcomes: dict[str, Any], finetuned: dict[str, float]) -> dict[str, float]:
    interval = bootstrap_normalized(outcomes, finetuned)
    return {"low": interval.low, "high": interval.high}


def committed_rows(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def adamerging_row(zoo: Zoo, committed: dict[str, Any], same_build: bool, progress: bool) -> dict[str, Any]:
    """Layer-wise AdaMerging on unlabeled test inputs (the data benchmark's row, its validation-chosen lr)."""
    row = committed.get("data_methods", {}).get("methods", {}).get("adamerging")
    if row is not None and same_build:
        return {"source": "bench/results/text8.json (same zoo build)", **row}
    spec = next(r for r in rows() if r.key == "adamerging")
    params = row["params"] if row is not None else {}
    run = DataBench(zoo, progress=progress).run(spec, 0, params)
    return {"source": "fitted again on this build", "params": {**spec.params, **params}, "runs": [run], **run}


def run_evolve_bench(
    zoo_root: Path, out: Path, config: EvolveBenchConfig, progress: bool = True
) -> dict[str, Any]:
    zoo = Zoo(zoo_root)
    finetuned = zoo.finetuned_accuracy("test")
    committed = committed_rows(out / "text8.json")
    folder = zoo.root / "evolve" / f"{config.method}-g{config.layer_granularity}-s{config.seed}"
    spec = search_spec(zoo, config)
    started = time.perf_counter()
    result = evolve(
        spec,
        folder,
        resume=(folder / HISTORY).exists(),
        workers=config.workers,
        extra_kinds=BENCH_KINDS,
        progress=progress,
        write_model=False,
    )
    history = json.loads((folder / HISTORY).read_text())
    space = make_space(load_search(spec))
    sources = load_in_memory([str(zoo.base), *spec["models"]])
    report: dict[str, Any] = {
        "config": asdict(config),
        "zoo": zoo.name,
        "zoo_config": zoo.identity,
        "command": "python -m mergesmith.bench.zoo.evolve_bench",
        "search": {
            "evaluations": result.evaluations,
            "generations": result.generations,
            "popsize": len(history["generations"][0]["results"]),
            "genome": space.size,
            "candidates_per_minute": history["candidates_per_minute"],
            "workers": history["workers"],
            "seconds": round(time.perf_counter() - started, 1),
            "convergence": [{"best": g["best"], "mean": g["mean"]} for g in history["generations"]],
        },
        "rows": {},
    }
    for budget in config.budgets:
        g, i, val, used = best_within(history["generations"], budget)
        recipe = candidate_recipe(
            space, load_search(spec), np.asarray(history["generations"][g]["genomes"][i])
        )
        state, _ = merge_recipe_in_memory(recipe, sources)
        report["rows"][f"evolved@{budget}"] = {
            "val": val,
            "evaluations": used,
            "recipe": recipe,
            **scored_on_test(zoo, state, finetuned),
        }
    base, experts = zoo.base_state(), zoo.expert_states()
    for method in BASELINES:
        best = committed["methods"][method]["best"]
        state = merge_state_dicts(base, experts, method, threads=2, **best["params"])
        val_outcomes = zoo.outcomes(state, "val", limit=config.val_limit)
        report["rows"][method] = {
            "params": best["params"],
            "val": summarize(accuracies(val_outcomes), finetuned)["normalized"],
            **scored_on_test(zoo, state, finetuned),
        }
    ta_committed = unpack_outcomes(committed["methods"]["task_arithmetic"]["best"]["runs"][0]["outcomes"])
    ta_here = unpack_outcomes(report["rows"]["task_arithmetic"]["outcomes"])
    same_build = all(bool((ta_committed[t] == ta_here[t]).all()) for t in zoo.tasks)
    ada = adamerging_row(zoo, committed, same_build, progress)
    report["rows"]["adamerging_layerwise"] = {
        "params": ada.get("params"),
        "val": None,
        "source": ada["source"],
        "accuracy": ada["accuracy"],
        **summarize(ada["accuracy"], finetuned),
        "ci": ada.get("ci") or _interval(unpack_outcomes(ada["runs"][0]["outcomes"]), finetuned),
        "outcomes": ada["runs"][0]["outcomes"],
    }
    top = f"evolved@{max(config.budgets)}"
    evolved = unpack_outcomes(report["rows"][top]["outcomes"])
    for name, row in report["rows"].items():
        if name != top:
            d = paired_difference(evolved, unpack_outcomes(row["outcomes"]), finetuned)
            row[f"{top}_minus_this"] = {"estimate": d.estimate, "low": d.low, "high": d.high, "p": d.p_value}
    report["same_build_as_text8_json"] = same_build
    out.mkdir(parents=True, exist_ok=True)
    (out / "evolve.json").write_text(json.dumps(report, indent=1))
    (out / "evolve.md").write_text(markdown(report))
    shutil.copyfile(folder / PLOT, out / "evolve.png")
    return report


def markdown(report: dict[str, Any]) -> str:
    s = report["search"]
    top = f"evolved@{max(report['config']['budgets'])}"
    lines = [
        "# Evolutionary search on the text8 v2 zoo",
        "",
        f"`{report['command']}`: {report['config']['method']} per block of {report['config']['layer_granularity']} "
        f"layers, a weight and a density per expert and block ({s['genome']} numbers), CMA-ES (popsize "
        f"{s['popsize']}, σ0 = 1/6), fitness = normalized accuracy on the first {report['config']['val_limit']} "
        f"validation examples per task; {s['evaluations']} evaluations on {s['workers']} Ray workers, "
        f"{s['candidates_per_minute']} candidates/min. Test: the whole test split (never seen by the search), 95 % "
        "bootstrap intervals; the last column is the paired difference of the largest-budget evolved recipe minus "
        "the row (an interval containing 0 is no difference).",
        "",
        f"| row | validation | test normalized [95 % CI] | {top} − row [95 % CI] |",
        "|---|---|---|---|",
    ]
    for name, row in report["rows"].items():
        val = f"{100 * row['val']:.1f}" if row.get("val") is not None else "—"
        ci = row.get("ci") or {}
        test = f"{100 * row['normalized']:.1f} [{100 * ci.get('low', float('nan')):.1f}, {100 * ci.get('high', float('nan')):.1f}]"
        diff = row.get(f"{top}_minus_this")
        cell = (
            f"{100 * diff['estimate']:+.1f} [{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]"
            if diff
            else "—"
        )
        label = name if "params" not in row or not row["params"] else f"{name} {row['params']}"
        lines.append(f"| {label} | {val} | {test} | {cell} |")
    lines += ["", "Convergence (best / mean validation fitness per generation): `evolve.png`.", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class LLMEvolveConfig:
    method: str = "dare_ties"
    layer_granularity: int = 10
    ps_budget: int = 56
    dfs_budget: int = 38
    repeats: int = 2
    val_limit: int = 20
    hand_lambdas: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
    workers: int = 2
    seed: int = 0
    fitness: tuple[dict[str, Any], ...] = ()  # default: the zoo's BENCH.yaml on validation, normalized


def _per_skill(scores: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Exact match, answer loss and the per-prompt hits (for the intervals) of each skill."""
    return {
        s: {"exact_match": v["exact_match"], "loss": v["loss"], "hits": v["hits"]} for s, v in scores.items()
    }


def run_llm_evolve_bench(
    zoo_root: Path, out: Path, config: LLMEvolveConfig, progress: bool = True, ray: bool = True
) -> dict[str, Any]:
    zoo = LLMZoo(zoo_root)
    bench = zoo.root / "BENCH.yaml"
    work = zoo.root / "evolve"
    experts = [str(zoo.expert(s)) for s in zoo.skills]
    fitness = list(config.fitness) or [
        {"kind": "bench", "bench": str(bench), "split": "val", "limit": config.val_limit}
    ]
    run = {"workers": config.workers, "extra_kinds": BENCH_KINDS, "progress": progress, "ray": ray}
    suite = Suite(bench, progress=False)
    finetuned_val = accuracies(suite.outcomes(None, "val", limit=config.val_limit))
    base_module = load_causal_lm(zoo.base)
    report: dict[str, Any] = {
        "config": asdict(config),
        "command": "python -m mergesmith.bench.zoo.evolve_bench llm",
    }
    references = reference_evaluations(zoo, progress=progress)
    rows: dict[str, Any] = {name: {"test": _per_skill(v)} for name, v in references.items()}

    def kept_on_val(state: dict[str, Any]) -> dict[str, float]:
        acc = accuracies(suite.outcomes(backbone(state, suite.arch_prefix), "val", limit=config.val_limit))
        return {t: acc[t] / finetuned_val[t] if finetuned_val[t] else 0.0 for t in acc}

    # the best hand recipe, chosen on the search's own fitness
    spec_ps = {
        "merge_method": config.method,
        "base_model": str(zoo.base),
        "models": experts,
        "layer_granularity": config.layer_granularity,
        "fitness": fitness,
        "optimizer": {"budget": config.ps_budget},
        "seed": config.seed,
    }
    score = Fitness(load_search(spec_ps), BENCH_KINDS)
    # the sources' tensors, loaded only when a row is not cached (and let go before the path searches' workers)
    sources = functools.cache(lambda: load_in_memory([str(zoo.base), *experts]))
    hand = [
        {
            "merge_method": "task_arithmetic",
            "base_model": str(zoo.base),
            "models": experts,
            "parameters": {"lambda": lam},
        }
        for lam in config.hand_lambdas
    ] + [
        {
            "merge_method": "dare_ties",
            "base_model": str(zoo.base),
            "models": [{"model": m, "parameters": {"density": 0.5, "weight": 0.5}} for m in experts],
            "compat": "mergekit",
        }
    ]
    # a row's test scores are kept in <zoo>/evolve/rows/ under what they depend on: its recipe (for a search, the
    # result it resumed to), the zoo's models and test prompts; a rerun with everything saved only writes tables
    inputs = {
        "models": [zoo.model_stamp(Path(m)) for m in (zoo.base, *experts)],
        "test": zoo.test_stamp(),
        "fitness": fitness,
    }

    def cached(name: str, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = work / "rows" / f"{name.lower().replace(' + ', '-').replace(' ', '-')}.json"
        rows[name] = keyed_json(path, {**inputs, **key}, compute, field="row")
        return rows[name]

    def best_hand() -> dict[str, Any]:
        scored = [(score(merge_recipe_in_memory(r, sources())[0]), k) for k, r in enumerate(hand)]
        val, k = max(scored)
        state, _ = merge_recipe_in_memory(hand[k], sources())
        return {"recipe": hand[k], "val": val, "test": _per_skill(zoo.evaluate(base_module, state))}

    cached("best hand recipe", {"hand": hand}, best_hand)
    ps = evolve(spec_ps, work / "ps", resume=(work / "ps" / HISTORY).exists(), **run)
    searches = {"PS": work / "ps"}

    def ps_row() -> dict[str, Any]:
        state, _ = merge_recipe_in_memory(ps.best_recipe, sources())
        return {
            "val": ps.best_fitness,
            "evaluations": ps.evaluations,
            "candidates_per_minute": ps.candidates_per_minute,
            "test": _per_skill(zoo.evaluate(base_module, state)),
            "kept_on_val": kept_on_val(state),
        }

    kept = cached("PS", {"recipe": ps.best_recipe}, ps_row).pop("kept_on_val")
    worst = sorted(zoo.skills, key=lambda t: kept[t])
    sources.cache_clear()

    def path_search(name: str, models: list[str]) -> None:
        spec = {
            "space": "dataflow",
            "models": models,
            "dataflow": {"repeats": config.repeats},
            "fitness": fitness,
            "optimizer": {"budget": config.dfs_budget},
            "seed": config.seed,
        }
        folder = work / name.lower().replace(" + ", "-")
        result = evolve(spec, folder, resume=(folder / HISTORY).exists(), **run)
        searches[name] = folder

        def row() -> dict[str, Any]:
            module = load_causal_lm(folder / MODEL)
            return {
                "models": models,
                "layers": module.config.num_hidden_layers,
                "val": result.best_fitness,
                "evaluations": result.evaluations,
                "candidates_per_minute": result.candidates_per_minute,
                "test": _per_skill(zoo.evaluate(module)),
            }

        # PS's result picks the paths' experts (its weakest skills) and is the second path's first model
        cached(name, {"recipe": result.best_recipe, "ps": ps.best_recipe}, row)

    path_search("DFS", [str(zoo.expert(worst[0])), str(zoo.expert(worst[1]))])
    path_search("PS + DFS", [str(work / "ps" / MODEL), str(zoo.expert(worst[0]))])
    # normalized exact match with its interval; each search against where it started, on the same prompts
    experts = {s: rows[f"expert:{s}"]["test"][s]["exact_match"] for s in zoo.skills}
    starts = {"PS": "best hand recipe", "DFS": f"expert:{worst[0]}", "PS + DFS": "PS"}
    for name, row in rows.items():
        row["normalized"] = normalized_exact_match(row["test"], experts)
        if name in starts:
            row["versus"] = starts[name]
            row["difference"] = normalized_exact_match(row["test"], experts, rows[starts[name]]["test"])
    for row in rows.values():
        for scores in row["test"].values():
            del scores["hits"]
    report["rows"] = rows
    report["ps_kept_on_val"] = kept
    out.mkdir(parents=True, exist_ok=True)
    (out / "evolve-llm.json").write_text(json.dumps(report, indent=1))
    (out / "evolve-llm.md").write_text(llm_markdown(report, zoo.skills))
    histories = {
        name: json.loads((folder / HISTORY).read_text())["generations"] for name, folder in searches.items()
    }
    llm_plot(report, histories, out / "evolve-llm.png")
    return report


def _percent(interval: dict[str, float] | None, sign: str = "") -> str:
    if interval is None:
        return "—"
    low, high = 100 * interval["low"], 100 * interval["high"]
    return f"{100 * interval['estimate']:{sign}.1f} [{low:{sign}.1f}, {high:{sign}.1f}]"


def llm_markdown(report: dict[str, Any], skills: list[str]) -> str:
    lines = [
        "# Evolutionary search on the LLM zoo (SmolLM2-135M experts)",
        "",
        f"`{report['command']}`; {report['config']}. Exact match % (answer loss) per skill on the test split "
        "(never seen by the searches); normalized = exact match over each skill's own expert's, averaged, with "
        "its 95 % bootstrap interval; the last column is a search's paired difference from where it started (an "
        "interval containing 0 is no difference).",
        "",
        "| row | val fitness | "
        + " | ".join(skills)
        + " | mean EM | normalized % [95 % CI] | − start [95 % CI] |",
        "|---|---|" + "---|" * len(skills) + "---|---|---|",
    ]
    for name, row in report["rows"].items():
        test = row["test"]
        cells = [f"{100 * test[s]['exact_match']:.1f} ({test[s]['loss']:.2f})" for s in skills]
        mean = sum(test[s]["exact_match"] for s in skills) / len(skills)
        val = f"{row['val']:.3f}" if row.get("val") is not None else "—"
        versus = f"{_percent(row['difference'], '+')} vs {row['versus']}" if "versus" in row else ""
        lines.append(
            f"| {name} | {val} | "
            + " | ".join(cells)
            + f" | {100 * mean:.1f} | {_percent(row.get('normalized'))} | {versus} |"
        )
    searches = [
        f"{name}: {row['evaluations']} candidates, {row['candidates_per_minute']:.2f}/min"
        for name, row in report["rows"].items()
        if row.get("candidates_per_minute")
    ]
    if searches:  # the speed figure for a 135M Llama, with this run's workers
        lines += ["", f"Searches ({report['config']['workers']} workers): " + "; ".join(searches) + "."]
    lines += [
        "",
        "Convergence of each search and the normalized rows with their intervals: `evolve-llm.png`.",
    ]
    return "\n".join(lines) + "\n"


def llm_plot(report: dict[str, Any], histories: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Left: each search's validation fitness per generation; right: every row's normalized test exact match
    with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, history in histories.items():
        draw_convergence(left, history, f"{name}: ")
    left.set_title("searches (validation fitness)")
    left.legend(fontsize=6)
    rows = [(name, row["normalized"]) for name, row in report["rows"].items() if row.get("normalized")]
    y = range(len(rows))
    estimates = [100 * r["estimate"] for _, r in rows]
    errors = [
        [100 * (r["estimate"] - r["low"]) for _, r in rows],
        [100 * (r["high"] - r["estimate"]) for _, r in rows],
    ]
    right.barh(list(y), estimates, xerr=errors, capsize=3)
    right.set_yticks(list(y), [name for name, _ in rows], fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("normalized exact match % on test (95 % CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["llm"]:
        parser = argparse.ArgumentParser(prog="python -m mergesmith.bench.zoo.evolve_bench llm")
        parser.add_argument("--zoo", type=Path, default=None, help="the LLM zoo (default: the built one)")
        parser.add_argument("--out", type=Path, default=Path("bench/results"))
        parser.add_argument("--ps-budget", type=int, default=LLMEvolveConfig.ps_budget)
        parser.add_argument("--dfs-budget", type=int, default=LLMEvolveConfig.dfs_budget)
        parser.add_argument("--val-limit", type=int, default=LLMEvolveConfig.val_limit)
        args = parser.parse_args(argv[1:])
        llm_config = LLMEvolveConfig(
            ps_budget=args.ps_budget, dfs_budget=args.dfs_budget, val_limit=args.val_limit
        )
        # the built-in zoo's base and experts (and their reference rows); the multi-task model is not a row here
        root = args.zoo or build_llm_zoo(multitask=False)
        report = run_llm_evolve_bench(root, args.out, llm_config)
        print(llm_markdown(report, LLMZoo(root).skills))
        return 0
    parser = argparse.ArgumentParser(prog="python -m mergesmith.bench.zoo.evolve_bench")
    parser.add_argument("--zoo", type=Path, default=None, help="the text8 zoo (default: the built one)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--granularity", type=int, default=2)
    args = parser.parse_args(argv)
    config = EvolveBenchConfig(tuple(args.budgets), workers=args.workers, layer_granularity=args.granularity)
    report = run_evolve_bench(args.zoo or zoo_dir("text8"), args.out, config)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
