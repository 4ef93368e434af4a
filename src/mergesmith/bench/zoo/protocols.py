"""The zoo-protocol pilot behind text8 v2 (docs/design.md, "text8 v2"): build the quick zoo under each way of
making heads and fine-tuning, merge each with four methods at their paper defaults, and tabulate.

    python -m mergesmith.bench.zoo.protocols [--only NAME ...]   # ~3 min per variant on 2 cores

Each variant is built in its own scratch cache (``<cache>/protocol-pilot/<name>``; the Debian packages are
shared) and its results are kept there, so a rerun only builds what is missing. The table goes to
``bench/results/text8-protocols.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from mergesmith.bench.zoo.bench import SHORT, run_bench
from mergesmith.bench.zoo.text8 import Zoo, ZooConfig, build_zoo
from mergesmith.io.cache import cache_dir

PILOT_METHODS = ("linear", "task_arithmetic", "ties", "tsv")

# name -> what changes from the quick zoo (160 training texts per task). "v1" is the committed v1 recipe.
VARIANTS: dict[str, dict[str, Any]] = {
    "lpft-v1": {"protocol": "lpft", "epochs": 2, "batch_size": 32, "lr": 5e-5},
    "descriptions-short": {"protocol": "descriptions", "epochs": 2, "batch_size": 32, "lr": 5e-5},
    "joint-short": {"protocol": "joint", "epochs": 2, "batch_size": 32, "lr": 5e-5, "head_lr": 2e-3},
    "joint-fast-head": {"protocol": "joint", "epochs": 4, "batch_size": 16, "lr": 1e-4, "head_lr": 1e-2},
    "joint": {"protocol": "joint", "epochs": 4, "batch_size": 16, "lr": 1e-4, "head_lr": 1e-4},
    "descriptions": {"protocol": "descriptions", "epochs": 4, "batch_size": 16, "lr": 1e-4},
}


def run_variant(name: str, changes: dict[str, Any], root: Path) -> dict[str, Any]:
    cache = root / name
    saved = cache / "results.json"
    if saved.exists():
        return json.loads(saved.read_text())
    cache.mkdir(parents=True, exist_ok=True)
    debs = cache / "debs"
    if not debs.exists():
        (cache_dir() / "debs").mkdir(parents=True, exist_ok=True)
        os.symlink(cache_dir() / "debs", debs)
    config = replace(ZooConfig.quick(), **changes)
    zoo = Zoo(build_zoo(quick=True, cache=cache, config=config, multitask=False))
    results = run_bench(zoo, methods=list(PILOT_METHODS), seeds=1, search=False, progress=False)
    saved.write_text(json.dumps(results) + "\n")
    return results


def markdown(all_results: dict[str, dict[str, Any]]) -> str:
    tasks = next(iter(all_results.values()))["tasks"]
    head = ["variant", "setting", "row", *[SHORT.get(t, t) for t in tasks], "avg", "norm. avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, results in all_results.items():
        setting = ", ".join(f"{k}={v}" for k, v in VARIANTS[name].items())
        rows = [
            ("zero-shot", results["reference"]["zeroshot"]),
            ("fine-tuned", results["reference"]["finetuned"]),
        ]
        rows += [(f"`{m}`", results["methods"][m]["default"]) for m in PILOT_METHODS]
        for label, row in rows:
            cells = [f"{100 * row['accuracy'][t]:.1f}" for t in tasks]
            lines.append(
                f"| {name} | {setting} | {label} | "
                + " | ".join(cells)
                + f" | {100 * row['average']:.1f} | {100 * row['normalized']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, choices=list(VARIANTS))
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    root = cache_dir() / "protocol-pilot"
    names = args.only or list(VARIANTS)
    results = {name: run_variant(name, VARIANTS[name], root) for name in names}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "text8-protocols.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (out / "text8-protocols.md").write_text(
        "# text8 v2: the protocol pilot on the quick zoo (test split, 200 texts per task)\n\n"
        "`python -m mergesmith.bench.zoo.protocols` (quick zoo: 160 training texts per task; paper defaults)\n\n"
        + table
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
