"""95 % confidence intervals for benchmark rows, by the bootstrap (#15: noise you can see).

A row's score is the **normalized average**: the mean over tasks of (accuracy on the task / the fine-tuned expert's
accuracy on it). Its uncertainty has two sources, and the bootstrap resamples both:

- the **test examples**: each task's examples are resampled with replacement, independently per task (a stratified
  bootstrap: every task keeps its size, so the average stays an average over the same tasks);
- the **seeds**, for rows whose merge is random (DARE, DELLA) or learned (AdaMerging, Concrete, DAM, Twin): the
  seeds are resampled with replacement too, and a resample's accuracy on a task is the mean over its drawn seeds
  of their accuracy on the drawn examples (the same examples for every seed: they are one test set).

The fine-tuned accuracies that normalize the score are taken as fixed (they are the ruler, not the measurement).

A task may instead be scored by a **loss** (``kinds[task] == "loss"``: a causal-LM task's per-window mean token
cross-entropy, lower is better): its outcomes are per-example losses, its fine-tuned value is the expert's mean
loss, and its normalized score is ``exp(finetuned loss - loss)`` = the expert's perplexity / this row's
perplexity (1 at the expert, below 1 when worse), so it averages with accuracy ratios.

**Comparing two rows** (:func:`paired_difference`): both rows were scored on the same test examples, so the
difference is bootstrapped with the *same* resampled examples for both (a paired bootstrap); seeds are resampled
per row. The interval of the difference excludes 0 exactly when the difference is significant at the 5 % level (the
two-sided p-value is twice the smaller tail of the resampled differences around 0). Two unpaired intervals that
overlap can still differ significantly; that is why the benchmark tables' significance column comes from this test.

Percentile intervals from ``resamples`` draws (default 2,000) of a seeded generator: the same inputs give the same
interval bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mergesmith.io.cache import keyed_json

RESAMPLES = 2000
LEVEL = 0.95
ACCURACY, LOSS = "accuracy", "loss"  # a task's kind: outcomes are 0/1 hits, or per-example losses

# Per task: correctness of each test example, one row per seed: a bool or 0/1 tensor of shape (seeds, examples).
Outcomes = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided percentile bootstrap interval at ``level``."""

    estimate: float
    low: float
    high: float
    level: float = LEVEL

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}


@dataclass(frozen=True)
class Difference(Interval):
    """The paired difference of two rows (first minus second) and its two-sided bootstrap p-value."""

    p_value: float = 1.0

    @property
    def significant(self) -> bool:
        """The interval excludes 0: the rows differ at the level's significance."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, float | bool]:  # type: ignore[override]
        return {**super().as_dict(), "p_value": self.p_value, "significant": self.significant}


def _as_runs(outcomes: Outcomes) -> dict[str, torch.Tensor]:
    """Every task's outcomes as a float (seeds, examples) tensor; one dimension means one seed."""
    out = {}
    for task, values in outcomes.items():
        tensor = torch.as_tensor(values).to(torch.float64)
        if tensor.dim() == 1:
            tensor = tensor.unsqueeze(0)
        if tensor.dim() != 2 or tensor.shape[1] == 0 or tensor.shape[0] == 0:
            raise ValueError(
                f"task '{task}': outcomes must be (seeds, examples) with at least one of each, "
                f"got shape {tuple(tensor.shape)}"
            )
        out[task] = tensor
    return out


def normalized_score(
    value: float | torch.Tensor, finetuned: float, kind: str = ACCURACY
) -> float | torch.Tensor:
    """One task's normalized score: accuracy / the expert's accuracy, or for a loss exp(expert's loss - loss)
    (the ratio of perplexities)."""
    if kind == LOSS:
        return math.exp(finetuned - value) if isinstance(value, float) else torch.exp(finetuned - value)
    return value / finetuned


def normalized_average(
    outcomes: Outcomes, finetuned: Mapping[str, float], kinds: Mapping[str, str] | None = None
) -> float:
    """Mean over tasks of the normalized score of the task's mean outcome (averaged over seeds)."""
    runs = _as_runs(outcomes)
    kinds = kinds or {}
    return float(
        sum(normalized_score(float(r.mean()), finetuned[t], kinds.get(t, ACCURACY)) for t, r in runs.items())
        / len(runs)
    )


def _check_tasks(
    runs: Mapping[str, torch.Tensor], finetuned: Mapping[str, float], kinds: Mapping[str, str] | None = None
) -> None:
    missing = [t for t in runs if t not in finetuned]
    if missing:
        raise ValueError(f"no fine-tuned accuracy for task '{missing[0]}'")
    bad = [t for t in runs if not finetuned[t] > 0 and (kinds or {}).get(t, ACCURACY) == ACCURACY]
    if bad:
        raise ValueError(
            f"task '{bad[0]}': the fine-tuned accuracy must be positive, got {finetuned[bad[0]]}"
        )


def _resampled_accuracy(
    runs: torch.Tensor, examples: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Each resample's accuracy on one task: (resamples,). ``examples`` (resamples, n) are the drawn example
    indices; the seeds are drawn here (resamples, seeds)."""
    seeds, n = runs.shape
    # (seeds, resamples): each seed's mean on each resample's examples; 0/1 counts are exact in fp32
    exact = bool(((runs == 0) | (runs == 1)).all())
    per_seed = runs.to(torch.float32 if exact else torch.float64)[:, examples].sum(-1).to(torch.float64) / n
    if seeds == 1:
        return per_seed[0]
    drawn = torch.randint(seeds, (examples.shape[0], seeds), generator=generator)
    return per_seed.T.gather(1, drawn).mean(1)


def _draws(
    runs: Mapping[str, torch.Tensor], resamples: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The resampled example indices of every task, (resamples, examples): one draw shared by paired rows."""
    return {
        t: torch.randint(r.shape[1], (resamples, r.shape[1]), generator=generator) for t, r in runs.items()
    }


def _percentiles(values: torch.Tensor, level: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([alpha, 1 - alpha], dtype=values.dtype)).tolist()
    return low, high


def bootstrap_normalized(
    outcomes: Outcomes,
    finetuned: Mapping[str, float],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
    kinds: Mapping[str, str] | None = None,
) -> Interval:
    """The normalized average of one row with its percentile bootstrap interval (examples resampled within each
    task; seeds resampled too when a task has more than one row)."""
    runs = _as_runs(outcomes)
    _check_tasks(runs, finetuned, kinds)
    kinds = kinds or {}
    generator = torch.Generator().manual_seed(seed)
    draws = _draws(runs, resamples, generator)
    scores = sum(
        normalized_score(_resampled_accuracy(r, draws[t], generator), finetuned[t], kinds.get(t, ACCURACY))
        for t, r in runs.items()
    ) / len(runs)
    low, high = _percentiles(scores, level)
    return Interval(normalized_average(runs, finetuned, kinds), low, high, level)


def paired_difference(
    first: Outcomes,
    second: Outcomes,
    finetuned: Mapping[str, float],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
    kinds: Mapping[str, str] | None = None,
) -> Difference:
    """Normalized average of ``first`` minus that of ``second``, both scored on the same test examples: a paired
    bootstrap (the same resampled examples for both rows; each row's seeds resampled on their own)."""
    a, b = _as_runs(first), _as_runs(second)
    if set(a) != set(b):
        raise ValueError(f"the rows cover different tasks: {sorted(a)} vs {sorted(b)}")
    for task in a:
        if a[task].shape[1] != b[task].shape[1]:
            raise ValueError(
                f"task '{task}': {a[task].shape[1]} vs {b[task].shape[1]} test examples; a paired "
                "comparison needs the same examples"
            )
    _check_tasks(a, finetuned, kinds)
    kinds = kinds or {}
    generator = torch.Generator().manual_seed(seed)
    draws = _draws(a, resamples, generator)
    diffs = sum(
        normalized_score(_resampled_accuracy(a[t], draws[t], generator), finetuned[t], kinds.get(t, ACCURACY))
        - normalized_score(
            _resampled_accuracy(b[t], draws[t], generator), finetuned[t], kinds.get(t, ACCURACY)
        )
        for t in a
    ) / len(a)
    low, high = _percentiles(diffs, level)
    tail = min(float((diffs <= 0).double().mean()), float((diffs >= 0).double().mean()))
    estimate = normalized_average(a, finetuned, kinds) - normalized_average(b, finetuned, kinds)
    return Difference(estimate, low, high, level, p_value=min(1.0, 2 * tail))


# ---------------------------------------------------------------------------------------------------------
# Benchmark rows: per-example outcomes kept compactly in the results JSON, and a row's interval from its runs


def pack_outcomes(outcomes: Mapping[str, torch.Tensor]) -> dict[str, str | list[float]]:
    """Per task, 0/1 outcomes as a hex string of their bits (8 examples a byte; the length is kept as
    ``"<n>:<hex>"``): a 1,000-example task is 255 characters of JSON instead of a list of 1,000 numbers.
    Per-example losses (a float tensor) stay a list of floats."""
    out: dict[str, str | list[float]] = {}
    for task, values in outcomes.items():
        if torch.is_floating_point(torch.as_tensor(values)):
            out[task] = [float(v) for v in torch.as_tensor(values).flatten()]
            continue
        bits = torch.as_tensor(values).to(torch.bool).flatten()
        n = len(bits)
        padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8)
        padded[:n] = bits.to(torch.uint8)
        weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
        packed = (padded.view(-1, 8) * weights).sum(1).to(torch.uint8)
        out[task] = f"{n}:{bytes(packed.tolist()).hex()}"
    return out


def unpack_outcomes(packed: Mapping[str, str | list[float]]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`pack_outcomes`: per task, a bool tensor (or a float64 one of losses)."""
    out = {}
    for task, text in packed.items():
        if not isinstance(text, str):
            out[task] = torch.tensor(text, dtype=torch.float64)
            continue
        count, _, digits = text.partition(":")
        raw = torch.tensor(list(bytes.fromhex(digits)), dtype=torch.uint8)
        bits = (raw.unsqueeze(1) >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1
        out[task] = bits.flatten()[: int(count)].to(torch.bool)
    return out


def runs_outcomes(runs: list[Mapping[str, object]]) -> dict[str, torch.Tensor] | None:
    """A row's outcomes as (seeds, examples) per task, from its runs' packed ``outcomes`` (None when a run
    has none: results written before intervals existed)."""
    if not runs or any("outcomes" not in run for run in runs):
        return None
    unpacked = [unpack_outcomes(run["outcomes"]) for run in runs]  # type: ignore[arg-type]
    return {task: torch.stack([u[task] for u in unpacked]) for task in unpacked[0]}


def cached_outcomes(
    path: Path, key: Mapping[str, object], compute: Callable[[], dict[str, dict[str, torch.Tensor]]]
) -> dict[str, dict[str, torch.Tensor]]:
    """Named rows of per-task outcomes kept in a JSON file under ``key`` (:func:`keyed_json`); a first run returns
    them as a cached one does (read back from their packed form)."""

    def packed() -> dict[str, dict[str, str | list[float]]]:
        return {name: pack_outcomes(r) for name, r in compute().items()}

    return {name: unpack_outcomes(r) for name, r in keyed_json(path, key, packed, field="rows").items()}
