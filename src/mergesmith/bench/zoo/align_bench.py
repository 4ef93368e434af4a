"""The alignment benchmark (#18): models of different initializations, merged naively, after weight matching,
after activation matching, and by PLeaS, on the from-scratch zoo (:mod:`mergesmith.bench.zoo.scratch`).

Per pair (dataset, family, width, setting):

- **the linear path** θ(λ) = (1 − λ) θ_A + λ π(θ_B), λ ∈ {0, 0.1, …, 1}, for π = identity (naive), weight
  matching and activation matching: test loss and accuracy at each λ (on a seeded 2,000 of the test examples
  where there are more: ``PATH_EXAMPLES``) (BatchNorm statistics recomputed on training
  inputs at every point, as Git Re-Basin's REPAIR-free baseline does for ResNets), and the **barriers**
  max_λ [loss(λ) − ((1 − λ) loss(0) + λ loss(1))] and max_λ [((1 − λ) acc(0) + λ acc(1)) − acc(λ)];
- **merged accuracy** at λ = 0.5 for the three, PLeaS at width budgets 1.0 / 1.2 / 1.5 / 2.0, the ensemble
  (mean logits) and each model, with 95 % bootstrap intervals over the test examples and, against the naive
  average, paired differences;
- **Ito et al.'s diagnostics** for weight matching per layer: ‖θ_A − π(θ_B)‖ / ‖θ_A − θ_B‖ and the top-k
  singular-vector alignment before and after.

In the ``split`` setting (A on classes 0–4, B on 5–9) accuracy is on all ten classes: each model alone reaches at
most about half. A finished pair is cached in ``<out>/runs/align/`` by the stamps of its two models.

The bert pairs (Hugging Face ``BertForSequenceClassification`` folders) run the same way on the text task: test
texts for the scores, the first 512 training texts (tokenized with the zoo's tokenizer) for activation matching, the
first 256 as PLeaS's ``--data`` (a ``.jsonl`` with a ``text`` column); no BatchNorm, so a point of the path is scored
as it is. PLeaS widens only their FFN (one ``intermediate_size``; heads and the residual stream are merged as in Git
Re-Basin), so its 2.0 is twice the FFN — not the ensemble (the achieved budget, over every matrix, stays below 2).
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from scipy.stats import spearmanr
from torch import nn
from tqdm.auto import tqdm

from mergesmith.api.pleas import pleas
from mergesmith.arch.permutation import permutation_spec
from mergesmith.bench.confidence import bootstrap_normalized, paired_difference
from mergesmith.bench.zoo.scratch import Inputs, Pair, ScratchZoo, build_scratch_zoo, evaluate, predict
from mergesmith.bench.zoo.scratch_text import write_jsonl
from mergesmith.fit.activations import Batch, unit_correlations
from mergesmith.fit.hf import load_classifier
from mergesmith.fit.small_models import build, load_small_model, reset_batchnorm
from mergesmith.ops.alignment_diagnostics import alignment_diagnostics
from mergesmith.ops.permute import identity, permute_state, solve_assignment, weight_matching

LAMBDAS = tuple(round(i / 10, 1) for i in range(11))
BUDGETS = (1.0, 1.2, 1.5, 2.0)
MATCH_EXAMPLES, MATCH_BATCH = 2048, 256  # training inputs for activation matching, PLeaS and BatchNorm resets
MATCH_TEXTS, MATCH_TEXT_BATCH = 512, 32  # training texts for activation matching (PLeaS reads the first 256)
MATCHINGS = ("naive", "weight", "activation")
# test examples scored at each point of the path: a seeded subset (the barrier's standard error stays near one
# point; scoring Fashion-MNIST's 10,000 at 33 points costs a width-4 ResNet pair ~40 min on 2 cores); the merged
# accuracies at λ = 0.5, PLeaS, the ensemble and the models are scored on every test example
PATH_EXAMPLES = 2000


def path_subset(count: int) -> torch.Tensor:
    """The test examples the path scores: all of ``count`` up to ``PATH_EXAMPLES``, else a seeded subset (sorted)."""
    if count <= PATH_EXAMPLES:
        return torch.arange(count)
    return torch.randperm(count, generator=torch.Generator().manual_seed(0))[:PATH_EXAMPLES].sort().values


def interpolate(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], lam: float
) -> dict[str, torch.Tensor]:
    """(1 − λ) a + λ b for every float tensor; integer buffers (BatchNorm's step count) from ``a``."""
    return {k: (1 - lam) * v + lam * b[k] if v.is_floating_point() else v.clone() for k, v in a.items()}


def barrier(points: list[dict[str, float]], key: str, higher_is_better: bool) -> float:
    """The largest gap between the path and the straight line between its ends (≥ 0 at the ends)."""
    first, last = points[0][key], points[-1][key]
    gaps = []
    for p in points:
        line = (1 - p["lambda"]) * first + p["lambda"] * last
        gaps.append(line - p[key] if higher_is_better else p[key] - line)
    return max(gaps)


@dataclass
class _Subjects:
    """One pair as the benchmark runs it, whatever its family: the two models, their config.json, the inputs for
    activation matching, the test set, and the family's ways to score a state dict, to write PLeaS's data and to
    load PLeaS's output (with the widths it chose). ``score(state, False)`` scores the path's test subset
    (:func:`path_subset`), ``score(state, True)`` every test example."""

    module_a: nn.Module
    module_b: nn.Module
    config: dict[str, Any]
    match_batches: list[Batch]
    test: Inputs
    test_labels: torch.Tensor
    score: Callable[[Mapping[str, torch.Tensor], bool], dict[str, Any]]  # (state, every test example?)
    pleas_data: Callable[[Path], Path]
    load_merged: Callable[[Path], tuple[nn.Module, dict[str, Any]]]


def _image_subjects(zoo: ScratchZoo, pair: Pair) -> _Subjects:
    """A small-model pair: training inputs for matching, PLeaS and the BatchNorm statistics recomputed at every
    point of the path (Git Re-Basin's REPAIR-free baseline for ResNets; a no-op for an MLP)."""
    data = zoo.data(pair.dataset)
    module_a, config = load_small_model(pair.a)
    module_b, _ = load_small_model(pair.b)
    order = torch.randperm(len(data["train_inputs"]), generator=torch.Generator().manual_seed(0))
    match_inputs = data["train_inputs"][order[:MATCH_EXAMPLES]]

    subset = path_subset(len(data["test_labels"]))

    def score(state: Mapping[str, torch.Tensor], every: bool) -> dict[str, Any]:
        module = build(config)
        module.load_state_dict(state)
        reset_batchnorm(module, match_inputs)
        index = slice(None) if every else subset
        return evaluate(module.eval(), data["test_inputs"][index], data["test_labels"][index])

    def pleas_data(folder: Path) -> Path:
        path = folder / "inputs.safetensors"
        save_file({"inputs": match_inputs.contiguous()}, str(path))
        return path

    def load_merged(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
        module, merged = load_small_model(folder)
        return module, {k: merged[k] for k in ("sizes", "widths", "inner_widths") if k in merged}

    return _Subjects(
        module_a,
        module_b,
        config,
        list(match_inputs.split(MATCH_BATCH)),
        data["test_inputs"],
        data["test_labels"],
        score,
        pleas_data,
        load_merged,
    )


def _text_subjects(zoo: ScratchZoo, pair: Pair) -> _Subjects:
    """A bert pair (Hugging Face sequence classifiers): the first training texts, tokenized with the zoo's
    tokenizer, for matching and PLeaS; the test texts for scores. No BatchNorm: a state dict is scored as is."""
    data = zoo.text_data(pair.dataset)
    module_a, module_b = (load_classifier(folder, require_head=True) for folder in (pair.a, pair.b))
    config = json.loads((pair.a / "config.json").read_text())
    tokenizer = data.tokenizer()
    test = data.encoded("test", tokenizer=tokenizer)
    match = data.encoded("train", limit=MATCH_TEXTS, tokenizer=tokenizer)
    probe = copy.deepcopy(module_a)  # one module whose weights every point of the path replaces

    path_test = test.batch(path_subset(len(test)))

    def score(state: Mapping[str, torch.Tensor], every: bool) -> dict[str, Any]:
        probe.load_state_dict(state)
        return evaluate(probe, test if every else path_test)

    def pleas_data(folder: Path) -> Path:
        path = folder / "texts.jsonl"
        write_jsonl(path, data.texts("train")[0][:MATCH_TEXTS])
        return path

    def load_merged(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
        module = load_classifier(folder, require_head=True)
        return module, {"intermediate_size": int(module.config.intermediate_size)}

    batches = [match.batch(slice(i, i + MATCH_TEXT_BATCH)) for i in range(0, len(match), MATCH_TEXT_BATCH)]
    return _Subjects(module_a, module_b, config, batches, test, test.labels, score, pleas_data, load_merged)


def _interval(correct: torch.Tensor, seed: int = 0) -> dict[str, float]:
    return bootstrap_normalized({"test": correct.float()}, {"test": 1.0}, seed=seed).as_dict()


def run_pair(zoo: ScratchZoo, pair: Pair, progress: bool = True) -> dict[str, Any]:
    """Everything the module docstring lists for one pair (JSON-ready)."""
    started = time.perf_counter()
    subjects = _text_subjects(zoo, pair) if pair.is_text else _image_subjects(zoo, pair)
    module_a, module_b = subjects.module_a, subjects.module_b
    a, b = module_a.state_dict(), module_b.state_dict()
    spec = permutation_spec(subjects.config, {k: tuple(v.shape) for k, v in a.items()})
    perms = {"naive": identity(spec)}
    timings = {}
    t = time.perf_counter()
    perms["weight"], report = weight_matching(spec, a, b, seed=0)
    timings["weight_matching_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    costs = unit_correlations(spec, module_a, module_b, subjects.match_batches)
    perms["activation"] = {g: solve_assignment(costs[g]) for g in spec.groups}
    timings["activation_matching_s"] = round(time.perf_counter() - t, 3)
    row: dict[str, Any] = {
        "pair": pair.name,
        "dataset": pair.dataset,
        "family": pair.family,
        "width": pair.width,
    }
    row |= {"setting": pair.setting, "weight_matching_sweeps": report.sweeps, **timings}
    row["path_test_examples"] = min(len(subjects.test_labels), PATH_EXAMPLES)
    outcomes: dict[str, torch.Tensor] = {}
    paths = {}
    bar = tqdm(total=len(MATCHINGS) * len(LAMBDAS), desc=pair.name, leave=False, disable=not progress)
    for matching in MATCHINGS:
        aligned = permute_state(b, spec, perms[matching])
        points = []
        for lam in LAMBDAS:
            state = interpolate(a, aligned, lam)
            scores = subjects.score(state, False)
            points.append(
                {
                    "lambda": lam,
                    "loss": float(scores["loss"].mean()),
                    "accuracy": float(scores["correct"].float().mean()),
                }
            )
            if lam == 0.5:
                outcomes[matching] = subjects.score(state, True)["correct"]
            bar.update(1)
        paths[matching] = {
            "points": points,
            "loss_barrier": barrier(points, "loss", higher_is_better=False),
            "accuracy_barrier": barrier(points, "accuracy", higher_is_better=True),
        }
    bar.close()
    row["paths"] = paths
    logits = {}
    for name, module in (("model_a", module_a), ("model_b", module_b)):
        logits[name] = predict(module, subjects.test)
        outcomes[name] = logits[name].argmax(1) == subjects.test_labels
    outcomes["ensemble"] = ((logits["model_a"] + logits["model_b"]) / 2).argmax(1) == subjects.test_labels
    outcomes = {k: v.bool() for k, v in outcomes.items()}
    row["pleas"] = _pleas_rows(pair, subjects, outcomes)
    row["accuracy"] = {name: _interval(c) for name, c in outcomes.items()}
    row["vs_naive"] = {
        name: paired_difference(
            {"test": c.float()}, {"test": outcomes["naive"].float()}, {"test": 1.0}
        ).as_dict()
        for name, c in outcomes.items()
        if name != "naive"
    }
    # PLeaS's claim at 1× width: above Git Re-Basin's weight matching (paired over the same test examples)
    row["pleas_vs_weight"] = paired_difference(
        {"test": outcomes["pleas@1.0"].float()}, {"test": outcomes["weight"].float()}, {"test": 1.0}
    ).as_dict()
    diagnostics = alignment_diagnostics(spec, a, b, perms["weight"], k=8)
    row["diagnostics"] = diagnostics
    row["diagnostics_mean"] = {
        key: sum(d[key] for d in diagnostics.values()) / len(diagnostics)
        for key in (
            "relative_distance",
            "top_k_alignment_before",
            "top_k_alignment",
            "subspace_overlap_before",
            "subspace_overlap",
        )
    }
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _pleas_rows(pair: Pair, subjects: _Subjects, outcomes: dict[str, torch.Tensor]) -> dict[str, Any]:
    """PLeaS at every budget (the widths it chose, the budget reached, its time); its test outcomes go into
    ``outcomes``."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = subjects.pleas_data(Path(tmp))
        for budget in BUDGETS:
            result = pleas(
                pair.a, pair.b, Path(tmp) / f"pleas-{budget}", budget=budget, data=data, progress=False
            )
            module, widths = subjects.load_merged(result.out_dir)
            outcomes[f"pleas@{budget}"] = evaluate(module, subjects.test, subjects.test_labels)["correct"]
            out[str(budget)] = {
                "achieved_budget": result.budget,
                **widths,
                "seconds": round(result.seconds, 2),
            }
    return out


def run_align_bench(
    quick: bool = False,
    out: Path = Path("bench/results"),
    progress: bool = True,
    zoo: ScratchZoo | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Every pair of the (quick) from-scratch zoo, or of ``zoo``; finished pairs are reused from
    ``out/runs/align``."""
    zoo = zoo or ScratchZoo(build_scratch_zoo(quick=quick, progress=progress))
    name = name or ("align-quick" if quick else "align")
    cache = out / "runs" / "align"
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for pair in zoo.pairs():
        stamps = [
            json.loads((folder / "mergesmith_zoo.json").read_text())["stamp"] for folder in (pair.a, pair.b)
        ]
        path = cache / f"{name}-{pair.name.replace('/', '-')}.json"
        if path.exists() and json.loads(path.read_text()).get("stamps") == stamps:
            rows.append(json.loads(path.read_text())["row"])
            continue
        row = run_pair(zoo, pair, progress)
        path.write_text(json.dumps({"stamps": stamps, "row": row}) + "\n")
        rows.append(row)
    results = {
        "name": name,
        "command": f"mergesmith bench --zoo scratch{' --quick' if quick else ''}",
        "rows": rows,
        "width_trends": width_trends(rows),
    }
    (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(results))
    plot(results, out / f"{name}.png")
    return results


def _pct(interval: Mapping[str, float]) -> str:
    return f"{100 * interval['estimate']:.1f} [{100 * interval['low']:.1f}, {100 * interval['high']:.1f}]"


def width_trends(rows: list[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per dataset, family and setting with two widths or more: each matching's loss barrier by width, and whether
    it falls with width (Git Re-Basin's claim): the widest pair's barrier below the narrowest's, and Spearman's ρ
    between width and barrier."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(f"{r['dataset']}/{r['family']}/{r['setting']}", []).append(r)
    out = {}
    for key, members in groups.items():
        members = sorted(members, key=lambda r: r["width"])
        if len(members) < 2:
            continue
        widths = [r["width"] for r in members]
        entry: dict[str, Any] = {"widths": widths}
        for m in MATCHINGS:
            barriers = [r["paths"][m]["loss_barrier"] for r in members]
            entry[m] = {
                "loss_barrier": barriers,
                "falls": barriers[-1] < barriers[0],
                "spearman": _spearman(widths, barriers),
            }
        out[key] = entry
    return out


def _spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (0 when either side is constant)."""
    value = float(spearmanr(x, y).statistic)
    return 0.0 if math.isnan(value) else value


def markdown(results: Mapping[str, Any]) -> str:
    """The barrier table, the merged-accuracy table (95 % intervals) and the diagnostics table."""
    rows = results["rows"]
    lines = [
        f"# Alignment benchmark — `{results['command']}`",
        "",
        "## Barriers along the linear path (test loss / accuracy points)",
        "",
    ]
    lines += ["| pair | naive | weight matching | activation matching |", "|---|---|---|---|"]
    for r in rows:
        cells = [
            f"{r['paths'][m]['loss_barrier']:.3f} / {100 * r['paths'][m]['accuracy_barrier']:.1f}"
            for m in MATCHINGS
        ]
        lines.append(f"| {r['pair']} | " + " | ".join(cells) + " |")
    columns = [
        "model_a",
        "model_b",
        "naive",
        "weight",
        "activation",
        *[f"pleas@{b}" for b in BUDGETS],
        "ensemble",
    ]
    lines += ["", "## Merged test accuracy % (λ = 0.5; PLeaS at width budgets; 95 % bootstrap intervals)", ""]
    lines += ["| pair | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for r in rows:
        cells = [_pct(r["accuracy"][c]) if c in r["accuracy"] else "—" for c in columns]
        lines.append(f"| {r['pair']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "A difference from the naive average whose paired interval contains 0 is no difference (`vs_naive` in the JSON).",
        "For the bert pairs PLeaS widens only the FFN: pleas@2.0 is twice the FFN, not the ensemble.",
        "",
    ]
    trends = width_trends(rows)
    if trends:
        lines += [
            "## Does the barrier fall with width? (loss barrier by width; Spearman ρ of width and barrier)",
            "",
        ]
        lines += ["| dataset / family / setting | widths | naive | weight matching | activation matching |"]
        lines += ["|---|---|---|---|---|"]
        for key, entry in trends.items():
            cells = [
                " → ".join(f"{b:.3f}" for b in entry[m]["loss_barrier"]) + f" (ρ {entry[m]['spearman']:+.2f})"
                for m in MATCHINGS
            ]
            lines.append(f"| {key} | {', '.join(map(str, entry['widths']))} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## PLeaS at 1× width against weight matching (paired difference in test accuracy, points)", ""]
    lines += ["| pair | PLeaS@1.0 − weight matching |", "|---|---|"]
    for r in rows:
        d = r.get("pleas_vs_weight")
        if d:
            lines.append(
                f"| {r['pair']} | {100 * d['estimate']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] |"
            )
    lines.append("")
    lines += ["## Weight matching's diagnostics (Ito et al.; means over weight matrices)", ""]
    lines += [
        "| pair | ‖θ_A − π(θ_B)‖ / ‖θ_A − θ_B‖ | top-8 alignment before → after | top-8 subspace overlap before → after |",
        "|---|---|---|---|",
    ]
    for r in rows:
        d = r["diagnostics_mean"]
        lines.append(
            f"| {r['pair']} | {d['relative_distance']:.3f} | {d['top_k_alignment_before']:.3f} → {d['top_k_alignment']:.3f} | "
            f"{d['subspace_overlap_before']:.3f} → {d['subspace_overlap']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], path: Path, columns: int = 8) -> Path:
    """A grid: per pair the test accuracy along the path (naive, weight, activation matching; the split pairs'
    loss barriers are 0, their accuracy barriers are not), then per matching the loss barrier against width for
    every same-data dataset and family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    grid_rows = math.ceil(len(rows) / columns) + 1
    fig, axes = plt.subplots(grid_rows, columns, figsize=(2.4 * columns, 2.1 * grid_rows), squeeze=False)
    for k, r in enumerate(rows):
        ax = axes[k // columns][k % columns]
        for m in MATCHINGS:
            pts = r["paths"][m]["points"]
            ax.plot([p["lambda"] for p in pts], [100 * p["accuracy"] for p in pts], label=m)
        ax.set_title(r["pair"], fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("test accuracy %", fontsize=7)
    axes[0][0].legend(fontsize=6)
    for k in range(len(rows), (grid_rows - 1) * columns):
        axes[k // columns][k % columns].axis("off")
    same = sorted({(r["dataset"], r["family"]) for r in rows if r["setting"] == "same"})
    for c, m in enumerate(MATCHINGS):
        ax = axes[-1][c]
        for key in same:
            sel = sorted(
                (r for r in rows if (r["dataset"], r["family"]) == key and r["setting"] == "same"),
                key=lambda r: r["width"],
            )
            ax.plot(
                [r["width"] for r in sel],
                [r["paths"][m]["loss_barrier"] for r in sel],
                marker="o",
                label="/".join(key),
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width multiplier", fontsize=7)
        ax.set_title(f"loss barrier, {m} (same data)", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[-1][0].legend(fontsize=5)
    for c in range(len(MATCHINGS), columns):
        axes[-1][c].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
