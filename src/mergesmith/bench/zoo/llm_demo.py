"""``make demo-llama``: build the quick LLM zoo (SmolLM2-135M-Instruct fine-tuned on six skills, offline), merge
the six experts with a handful of methods at their papers' defaults plus mergekit's community DARE-TIES recipe,
and print each skill's exact match and each row's normalized exact match with its 95 % interval and its paired
difference with task arithmetic.

The full benchmark (every method, validation grids, 3 seeds, the community recipes) is ``mergesmith bench --zoo
llm``; docs/llm-benchmark.md describes the zoo.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mergesmith.bench.suite import Suite
from mergesmith.bench.zoo.bench import run_bench
from mergesmith.bench.zoo.demo import report
from mergesmith.bench.zoo.llm import LLMZoo, build_llm_zoo, multitask_outcomes, reference_table

DEMO_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties@mergekit", "tsv")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", help="where the table and chart go (default demo-out/)")
    parser.add_argument("--methods", nargs="+", default=list(DEMO_METHODS))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    print("1/2 building the quick LLM zoo (SmolLM2-135M; cached after the first run) ...", flush=True)
    root = build_llm_zoo(quick=True)
    zoo = LLMZoo(root)
    print(reference_table(zoo))
    suite = Suite(root / "BENCH.yaml")
    suite.add_reference("multitask", multitask_outcomes(zoo))  # the ceiling a merge is compared with
    print(
        f"2/2 merging the {len(suite.tasks)} experts with {', '.join(args.methods)} and evaluating ...",
        flush=True,
    )
    results = run_bench(suite, methods=args.methods, seeds=1, search=False)
    report(results, Path(args.out), "llm-quick", started)
    print("Full benchmark: `mergesmith bench --zoo llm` (docs/llm-benchmark.md).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
