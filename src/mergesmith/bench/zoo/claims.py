"""The papers' headline claims, checked on a benchmark's results (``bench/results/text8.json``).

Each claim compares two rows of the same test examples with the paired bootstrap of
:mod:`mergesmith.bench.confidence` ("first − second" in normalized points, 95 % interval):

- **reproduced**: the difference has the claimed sign and its interval excludes 0 (for a "keeps accuracy"
  claim: the interval includes 0 or lies above it, i.e. no significant loss);
- **reversed**: the interval excludes 0 on the other side;
- **not significant**: the interval includes 0.

Rows the benchmark does not have (e.g. DARE at 90 % drop at TA's λ) are merged here (``extra_rows``), with seeds.
``python -m mergesmith.bench.zoo.claims [results.json]`` adds them, writes ``claims`` into the JSON and prints the
table; ``mergesmith bench`` reports include it whenever the JSON has it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergesmith.bench.confidence import paired_difference, runs_outcomes
from mergesmith.bench.suite import Suite
from mergesmith.bench.zoo.bench import Bench, add_intervals, claims_markdown, method_rows
from mergesmith.bench.zoo.databench import attach
from mergesmith.bench.zoo.text8 import Zoo
from mergesmith.io.cache import zoo_dir


@dataclass(frozen=True)
class Claim:
    paper: str
    claim: str
    first: str  # row labels as bench.method_rows names them ("ties:default", "data:adamerging", "extra:...")
    second: str
    kind: str = "better"  # better: first > second; keeps: first is not significantly below second


CLAIMS: tuple[Claim, ...] = (
    Claim("TIES (Yadav et al. 2023)", "TIES > task arithmetic (paper defaults)", "ties:default",
          "task_arithmetic:default"),
    Claim("TIES", "TIES > task arithmetic (both tuned on validation)", "ties:best", "task_arithmetic:best"),
    Claim("DARE (Yu et al. 2024)", "dropping 90 % of each delta (DARE, rescaled) keeps TA's accuracy (λ = 0.3)",
          "extra:dare_p0.9", "task_arithmetic:default", "keeps"),
    Claim("TSV-M (Gargiulo et al. 2025)", "TSV-M > TIES (paper defaults)", "tsv:default", "ties:default"),
    Claim("Consensus (Wang et al. 2024)", "Consensus TA > task arithmetic (same λ = 0.3)", "consensus:default",
          "task_arithmetic:default"),
    Claim("PCB (Du et al. 2024)", "PCB > TIES (paper defaults)", "pcb:default", "ties:default"),
    Claim("AdaMerging (Yang et al. 2024)", "layer-wise AdaMerging > task-wise AdaMerging", "data:adamerging",
          "data:adamerging_task"),
    Claim("AdaMerging", "task-wise AdaMerging > task arithmetic", "data:adamerging_task", "task_arithmetic:default"),
    Claim("AdaMerging", "AdaMerging++ > AdaMerging", "data:adamerging_pp", "data:adamerging"),
    Claim("Concrete (Tang et al. 2023)", "Concrete AdaMerging > AdaMerging", "data:concrete_adamerging",
          "data:adamerging"),
    Claim("Concrete", "Concrete TA > task arithmetic (same λ = 0.3)", "data:concrete_task_arithmetic",
          "task_arithmetic:default"),
    Claim("RegMean (Jin et al. 2023)", "RegMean > simple averaging", "data:regmean", "linear:default"),
    Claim("Fisher (Matena & Raffel 2022)", "Fisher merging > simple averaging", "data:fisher", "linear:default"),
    Claim("Twin-Merging (Lu et al. 2024)", "Twin-Merging is close to fine-tuned (within 2 points)", "data:twin",
          "finetuned", "keeps2"),
)  # fmt: skip


# The LLM benchmark's claims (bench/results/llm.json): DARE's own setting is one fine-tune (WizardMath), and
# "merging keeps each skill" is read per skill from the table, not only from the mean.
LLM_CLAIMS: tuple[Claim, ...] = (
    Claim("DARE (Yu et al. 2024)", "dropping 90 % of one expert's delta (rescaled) keeps its skill",
          "extra:dare_single_p0.9", "finetuned", "keeps"),
    Claim("TIES (Yadav et al. 2023)", "TIES > task arithmetic (paper defaults)", "ties:default",
          "task_arithmetic:default"),
    Claim("TIES", "TIES > task arithmetic (both tuned on validation)", "ties:best", "task_arithmetic:best"),
    Claim("DARE", "DARE-TIES > TIES (mergekit's community recipe vs the paper's TIES)", "dare_ties@mergekit:default",
          "ties:default"),
    Claim("TSV-M (Gargiulo et al. 2025)", "TSV-M > TIES (paper defaults)", "tsv:default", "ties:default"),
)  # fmt: skip


def is_llm(results: dict[str, Any]) -> bool:
    return str(results.get("zoo", "")).startswith("llm")


def extra_rows(zoo: Any, results: dict[str, Any], seeds: int = 3) -> dict[str, Any]:
    """Rows a claim needs that the benchmark grid does not test: on text8, DARE (linear) at drop p = 0.9 and
    TA's λ; on the LLM zoo, DARE at p = 0.9 on each expert alone (λ = 1: the expert with 10 % of its delta,
    rescaled by 10), scored on the expert's own skill."""
    bench = Bench(zoo, progress=False)
    if is_llm(results):
        return {
            "dare_single_p0.9": bench.single_expert_row("dare_linear", {"density": 0.1, "lambda": 1.0}, seeds)
        }
    return {"dare_p0.9": bench.test_row("dare_linear", {"density": 0.1, "lambda": 0.3}, seeds)}


def rows_by_label(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows = dict(method_rows(results))
    rows.update({f"extra:{k}": v for k, v in results.get("claim_rows", {}).items()})
    return rows


def check_claims(results: dict[str, Any], claims: Sequence[Claim] = CLAIMS) -> list[dict[str, Any]]:
    """Every claim whose two rows the results have, with the paired difference and the verdict."""
    add_intervals(results)
    rows = rows_by_label(results)
    finetuned = results["reference"]["finetuned"]["accuracy"]
    kinds = results.get("kinds")
    out = []
    for claim in claims:
        if claim.first not in rows or claim.second not in rows:
            continue
        first, second = (runs_outcomes(rows[label].get("runs", [])) for label in (claim.first, claim.second))
        if first is None or second is None:
            continue
        diff = paired_difference(first, second, finetuned, kinds=kinds)
        if claim.kind == "better":
            verdict = "reproduced" if diff.low > 0 else "reversed" if diff.high < 0 else "not significant"
        elif claim.kind == "keeps":
            verdict = "reproduced" if diff.high >= 0 else "not reproduced"
        else:  # keeps2: within 2 points of the second row
            verdict = "reproduced" if diff.low > -0.02 else "not reproduced"
        out.append(
            {
                "paper": claim.paper,
                "claim": claim.claim,
                "first": claim.first,
                "second": claim.second,
                "first_normalized": rows[claim.first]["normalized"],
                "second_normalized": rows[claim.second]["normalized"],
                "difference": diff.as_dict(),
                "verdict": verdict,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="bench/results/text8.json")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    path = Path(args.results)
    results = json.loads(path.read_text())
    needed = "dare_single_p0.9" if is_llm(results) else "dare_p0.9"
    if needed not in results.get("claim_rows", {}):
        folder = zoo_dir(results["zoo"])
        zoo = Suite(folder / "BENCH.yaml") if is_llm(results) else Zoo(folder)
        results.setdefault("claim_rows", {}).update(extra_rows(zoo, results, args.seeds))
    results["claims"] = check_claims(results, LLM_CLAIMS if is_llm(results) else CLAIMS)
    path.write_text(json.dumps(results, indent=1) + "\n")
    attach(path, None, None)  # rewrites the reports with every section the JSON has (data rows, backdoor)
    print(claims_markdown(results["claims"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
