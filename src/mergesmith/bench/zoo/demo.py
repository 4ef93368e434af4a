"""``make demo``: build a quick text8 zoo (MiniLM-L6 fine-tuned on eight real text tasks, offline), merge the
eight experts with a handful of methods at their papers' defaults, and print per-task accuracy and each row's
normalized accuracy with its 95 % interval and its paired difference with task arithmetic.

The full benchmark (every method, validation grids, 3 seeds) is ``mergesmith bench --zoo text8``; its committed
results are in bench/results/text8.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from mergesmith.bench.zoo.bench import markdown_table, run_bench, write_reports
from mergesmith.bench.zoo.text8 import Zoo, build_zoo

DEMO_METHODS = ("linear", "task_arithmetic", "ties", "consensus", "tsv")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", help="where the table and chart go (default demo-out/)")
    parser.add_argument("--methods", nargs="+", default=list(DEMO_METHODS))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    print("1/2 building the quick text8 zoo (cached after the first run) ...", flush=True)
    zoo = Zoo(build_zoo(quick=True, multitask=False))
    print(
        f"2/2 merging the {len(zoo.tasks)} experts with {', '.join(args.methods)} and evaluating ...",
        flush=True,
    )
    results = run_bench(zoo, methods=args.methods, seeds=1, search=False)
    report(results, Path(args.out), "text8-quick", started)
    print("Full benchmark: `mergesmith bench --zoo text8` (results committed in bench/results/text8.md).")
    return 0


def report(results: dict[str, Any], out: Path, name: str, started: float) -> None:
    """A demo's ending: the reports written under ``out``, the table printed, where the chart went and how long
    the demo took."""
    paths = write_reports(results, out, name)
    print()
    print(markdown_table(results))
    print(f"chart: {paths['png']}   table: {paths['md']}   ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    raise SystemExit(main())
