"""AdaMerging's learning loop: merging coefficients λ fitted by test-time entropy minimisation.

θ(λ) = θ₀ + Σ_k λ_k^l τ_k^l, with one λ per task and parameter tensor l (layer-wise) or one per task (task-wise).
The loss is Σ_k mean entropy of task k's logits on a batch of its unlabeled inputs; only λ receives gradients
(the merged weights are built functionally, ``TaskModel.logits(batch, params)``).

The pieces here are shared by Concrete subspace learning (``fit/concrete.py``) and DAM: ``merged_params``
(θ₀ + m ⊙ Σ_k λ_k τ_k, with an optional shared mask m), ``entropy_loss`` (the summed entropies over one batch per
task), :class:`Coefficients` (the λ table) and :func:`learn_coefficients` (the AdaMerging loop).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from mergesmith.errors import RecipeError
from mergesmith.fit.data import Encoded
from mergesmith.fit.task import FitInputs, FitResult, Task, cycle_batches, entropy, eval_mode, task_vectors
from mergesmith.ops.stream import TensorInputs
from mergesmith.ops.taskvec import elect_signs
from mergesmith.ops.ties import prepare_ties
from mergesmith.recipe.schema import load_recipe

GRANULARITIES = ("layer", "task")
FALLBACK_LAMBDA = "fallback.lambda"
REPLAY_FILE = "learned_recipe.yaml"
# The loss curve keeps one point every this many steps (and the last step).
LOG_EVERY = 10


def seeded_generator(seed: int, salt: str) -> torch.Generator:
    """A CPU generator seeded from (seed, salt): each random stream of a fit (a task's batches, the mask
    samples) is reproducible and independent of the others."""
    digest = hashlib.sha256(f"{seed}\0{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def task_streams(tasks: Sequence[Task], batch_size: int, seed: int) -> list[Iterator[Encoded]]:
    """One endless stream of shuffled batches of unlabeled inputs per task, each with its own seeded generator."""
    return [
        cycle_batches(t.data, batch_size, seeded_generator(seed, f"batches/{k}")) for k, t in enumerate(tasks)
    ]


def next_batches(streams: Sequence[Iterator[Encoded]]) -> list[Encoded]:
    """The next batch of every task."""
    return [next(s) for s in streams]


def merged_params(
    base: Mapping[str, torch.Tensor],
    vectors: Sequence[Mapping[str, torch.Tensor]],
    mask: Mapping[str, torch.Tensor] | None,
    lambdas: Mapping[str, torch.Tensor] | torch.Tensor,
) -> dict[str, torch.Tensor]:
    """θ = θ₀ + m ⊙ Σ_k λ_k τ_k for every name of ``base`` (= θ₀ + Σ_k λ_k (m ⊙ τ_k), the mask being shared).

    ``lambdas`` maps each name to its ``(K,)`` coefficients, or is one ``(K,)`` tensor for every name. ``mask``
    (None: no mask) maps names to masks; a name it lacks is not masked. Differentiable in λ and the mask.
    """
    out = {}
    for name, theta0 in base.items():
        coefficients = lambdas[name] if isinstance(lambdas, Mapping) else lambdas
        combined = sum(coefficients[k] * vector[name] for k, vector in enumerate(vectors))
        if mask is not None and name in mask:
            combined = mask[name] * combined
        out[name] = theta0 + combined
    return out


def entropy_loss(
    tasks: Sequence[Task], params: Mapping[str, torch.Tensor], batches: Sequence[Encoded]
) -> torch.Tensor:
    """Σ_k mean entropy of task k's logits on ``batches[k]``, all tasks run with the same weights ``params``."""
    return sum(entropy(task.model.logits(batch, params)) for task, batch in zip(tasks, batches))


class Coefficients:
    """AdaMerging's λ: a raw table ``(L, K)`` (one row per tensor, layer-wise) or ``(1, K)`` (task-wise).

    The forward uses clamp(raw, 0, 1) when ``clamp`` (official AdaMerging), raw λ otherwise (FusionBench).
    """

    def __init__(
        self,
        names: Sequence[str],
        num_tasks: int,
        granularity: str = "layer",
        init: float = 0.3,
        clamp: bool = True,
    ):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.names = list(names)
        self.granularity = granularity
        self.init = init
        self.clamp = clamp
        rows = len(self.names) if granularity == "layer" else 1
        self.raw = torch.full((rows, num_tasks), float(init), requires_grad=True)

    def effective(self) -> torch.Tensor:
        """The λ table the forward uses (clamped when ``clamp``), differentiable in ``raw``."""
        return self.raw.clamp(0.0, 1.0) if self.clamp else self.raw

    def per_tensor(self) -> dict[str, torch.Tensor]:
        """name → its ``(K,)`` λ (task-wise: the same row for every name)."""
        table = self.effective()
        if self.granularity == "task":
            return {name: table[0] for name in self.names}
        return {name: table[i] for i, name in enumerate(self.names)}

    def reset(self) -> None:
        """Back to the initial value (Concrete AdaMerging resets λ before each inner step)."""
        with torch.no_grad():
            self.raw.fill_(self.init)

    def detached(self) -> dict[str, torch.Tensor]:
        return {name: value.detach().clone() for name, value in self.per_tensor().items()}

    def fallback(self) -> torch.Tensor:
        """λ for a tensor the fit did not see: task-wise, the learned row; layer-wise, the (clamped) init, which
        is what the loop leaves for a tensor that gets no gradient."""
        if self.granularity == "task":
            return self.effective()[0].detach().clone()
        init = torch.full((self.raw.shape[1],), float(self.init))
        return init.clamp(0.0, 1.0) if self.clamp else init

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fit-result entries: ``lambda.{name}`` (K,) per tensor and ``fallback.lambda``."""
        out = {f"lambda.{name}": value for name, value in self.detached().items()}
        out[FALLBACK_LAMBDA] = self.fallback()
        return out

    def table(self) -> dict[str, list[float]] | list[float]:
        """The learned λ as JSON: ``{name: [λ_k]}`` layer-wise, ``[λ_k]`` task-wise."""
        if self.granularity == "task":
            return [float(v) for v in self.fallback()]
        return {name: [float(v) for v in value] for name, value in self.detached().items()}


def learn_coefficients(
    tasks: Sequence[Task],
    base: Mapping[str, torch.Tensor],
    vectors: Sequence[Mapping[str, torch.Tensor]],
    *,
    granularity: str = "layer",
    init: float = 0.3,
    clamp: bool = True,
    steps: int = 500,
    lr: float = 1e-3,
    batch_size: int = 16,
    batches_per_step: int = 1,
    seed: int = 0,
    mask: Mapping[str, torch.Tensor] | None = None,
    progress: bool = False,
    desc: str = "AdaMerging",
    streams: list[Iterator[Encoded]] | None = None,
) -> tuple[Coefficients, list[dict[str, float]]]:
    """The AdaMerging loop: Adam(lr, betas (0.9, 0.999)) on λ minimising the summed entropy; ``mask`` (fixed, e.g.
    Concrete AdaMerging's learned mask) multiplies the combined task vectors. ``streams`` (default: fresh seeded
    ones) are the per-task batch streams. Returns λ and the loss curve."""
    coefficients = Coefficients(list(base), len(vectors), granularity, init, clamp)
    optimizer = torch.optim.Adam([coefficients.raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    streams = streams if streams is not None else task_streams(tasks, batch_size, seed)
    curve: list[dict[str, float]] = []
    for step in tqdm(range(steps), desc=desc, disable=not progress):
        params = merged_params(base, vectors, mask, coefficients.per_tensor())
        loss = sum(entropy_loss(tasks, params, next_batches(streams)) for _ in range(batches_per_step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % LOG_EVERY == 0 or step == steps - 1:
            curve.append({"step": step, "loss": loss.item()})
    return coefficients, curve


# --- AdaMerging++: TIES-selected task vectors ------------------------------------------------------------


def ties_statistics(
    base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]], density: float
) -> tuple[list[float], float]:
    """The official TIES trim over the whole model (``ties_merging_split``): each expert's global threshold κ_k
    (keep the top ``density`` of |τ_k| over every tensor) and the majority sign for exact-zero sums.

    Reuses TIES' whole-model passes (``ops.ties.prepare_ties``, ``trim_scope: global``, ``sign_zero:
    majority``, unit weights) over the in-memory tensors.
    """

    k = len(experts)
    params: dict[str, Any] = {"density": [density] * k, "weight": [1.0] * k, "trim_scope": "global"}

    def stream() -> Iterator[TensorInputs]:
        for name, theta0 in base.items():
            yield TensorInputs(name, theta0, [e[name] for e in experts], params)

    state = prepare_ties(stream, {"trim_scope": "global", "sign_zero": "majority"})
    return list(state["thresholds"]), float(state["majority"])


def ties_selected(deltas: torch.Tensor, thresholds: Sequence[float], majority: float) -> torch.Tensor:
    """AdaMerging++'s task vectors for one tensor (``selected_entries``): τ_k trimmed to |τ_k| ≥ κ_k, then only
    the entries whose sign agrees with the elected sign γ = sign(Σ_k τ̂_k). ``deltas`` is ``[K, *shape]``."""
    kappa = torch.tensor(list(thresholds), dtype=torch.float32).reshape(-1, *([1] * (deltas.dim() - 1)))
    trimmed = deltas * (deltas.abs().to(torch.float32) >= kappa)  # as TIES' global trim (ops/ties.py)
    signs = elect_signs(trimmed, "majority", majority)
    return trimmed * (torch.sign(trimmed) == signs)


def selected_vectors(
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    thresholds: Sequence[float],
    majority: float,
) -> list[dict[str, torch.Tensor]]:
    """AdaMerging++'s task vectors for every tensor (:func:`ties_selected`), one dict per expert."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in experts]
    for name, theta0 in base.items():
        selected = ties_selected(torch.stack([e[name] - theta0 for e in experts]), thresholds, majority)
        for k in range(len(experts)):
            out[k][name] = selected[k]
    return out


# --- fit: FitInputs -> FitResult ---------------------------------------------------------------------------


def examples_used(tasks: Sequence[Task], draws: int, batch_size: int) -> dict[str, int]:
    """Distinct inputs each task contributed after ``draws`` batches (the first epoch is one permutation)."""
    return {t.name: min(len(t.data), draws * batch_size) for t in tasks}


def require_base(inputs: FitInputs, method: str) -> dict[str, torch.Tensor]:
    if inputs.base is None:
        raise RecipeError(f"method '{method}' needs base_model: it learns coefficients of task vectors")
    return inputs.base


def fit_adamerging(inputs: FitInputs) -> FitResult:
    """AdaMerging (``ties: false``) or AdaMerging++ (``ties: true``) on the tasks' unlabeled inputs.

    Tensors: ``lambda.{name}`` (K,) — the λ the forward used (clamped when ``clamp``) — and ``fallback.lambda``;
    for ++ also ``ties.thresholds`` (K,) and ``ties.majority`` (1,), so the rule selects the same entries.
    """
    start = time.perf_counter()
    p = inputs.params
    base = require_base(inputs, "adamerging")
    tensors: dict[str, torch.Tensor] = {}
    if p["ties"]:
        thresholds, majority = ties_statistics(base, inputs.experts, p["density"])
        vectors = selected_vectors(base, inputs.experts, thresholds, majority)
        tensors["ties.thresholds"] = torch.tensor(thresholds, dtype=torch.float32)
        tensors["ties.majority"] = torch.tensor([majority], dtype=torch.float32)
    else:
        vectors = task_vectors(base, inputs.experts)
    with eval_mode(*(t.model.module for t in inputs.tasks)):
        coefficients, curve = learn_coefficients(
            inputs.tasks,
            base,
            vectors,
            granularity=p["granularity"],
            init=p["init"],
            clamp=p["clamp"],
            steps=p["steps"],
            lr=p["lr"],
            batch_size=p["batch_size"],
            batches_per_step=p["batches_per_step"],
            seed=inputs.seed,
            progress=inputs.progress,
            desc="AdaMerging++" if p["ties"] else "AdaMerging",
        )
    tensors.update(coefficients.tensors())
    info = {
        "method": "adamerging",
        "ties": bool(p["ties"]),
        "granularity": p["granularity"],
        "clamp": bool(p["clamp"]),
        "steps": p["steps"],
        "loss": curve,
        "lambda": coefficients.table(),
        "examples": examples_used(inputs.tasks, p["steps"] * p["batches_per_step"], p["batch_size"]),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return FitResult(tensors, info)


# --- replay as a plain task_arithmetic recipe -------------------------------------------------------------


def adamerging_recipe(fit: FitResult, base_path: str, expert_paths: Sequence[str]) -> dict[str, Any]:
    """A ``task_arithmetic`` recipe (λ = 1, per-model ``weight`` filters) that merges exactly what the AdaMerging
    rule merges: each expert's ``weight`` is a list of ``{filter: <tensor name>, value: λ_k}``, longest name first
    (filters match substrings, first match wins: a longer name can never be a substring of a shorter one, so every
    fitted name meets its own entry first), then ``{value: fallback λ_k}`` for tensors the fit did not see.

    AdaMerging++ cannot be written this way (our ``ties`` elects signs on the λ-weighted vectors, AdaMerging++ on
    the unweighted ones); it replays from the saved fit only.
    """
    if fit.info.get("method") != "adamerging":
        raise RecipeError("only an AdaMerging fit replays as a task_arithmetic recipe")
    if fit.info.get("ties"):
        raise RecipeError(
            "an AdaMerging++ fit replays from its saved fit (fitted:), not as a plain recipe: its "
            "sign election runs on the unweighted trimmed task vectors"
        )
    prefix = "lambda."
    names = sorted(
        (key[len(prefix) :] for key in fit.tensors if key.startswith(prefix)),
        key=lambda name: (-len(name), name),
    )
    fallback = fit.tensors[FALLBACK_LAMBDA]
    if len(expert_paths) != len(fallback):
        raise RecipeError(
            f"the fit has coefficients for {len(fallback)} experts, got {len(expert_paths)} paths"
        )
    models = []
    for k, path in enumerate(expert_paths):
        weight: list[dict[str, Any]] = [
            {"filter": name, "value": float(fit.tensors[prefix + name][k])} for name in names
        ]
        weight.append({"value": float(fallback[k])})
        models.append({"model": str(path), "parameters": {"weight": weight}})
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base_path),
        "models": models,
        "parameters": {"lambda": 1.0},
    }


def write_learned_recipe(fit: FitResult, recipe: Any, out_dir: str | Path) -> Path | None:
    """Write ``learned_recipe.yaml`` into ``out_dir``: the fitted ``recipe``'s merge as a plain task_arithmetic
    recipe (:func:`adamerging_recipe`; the recipe's dtype, seed, tokenizer and name carry over). Returns its path,
    or None, writing nothing, for fits that replay from the saved fit only (AdaMerging++, Concrete)."""
    if fit.info.get("method") != "adamerging" or fit.info.get("ties"):
        return None
    recipe = load_recipe(recipe)
    if recipe.base_model is None:
        raise RecipeError("the fitted recipe has no base_model")
    learned = adamerging_recipe(fit, recipe.base_model, [m.model for m in recipe.models])
    for key in ("dtype", "out_dtype", "tokenizer_source", "name"):
        if getattr(recipe, key) is not None:
            learned[key] = getattr(recipe, key)
    learned["seed"] = recipe.seed
    path = Path(out_dir) / REPLAY_FILE
    path.write_text(yaml.safe_dump(learned, sort_keys=False))
    return path
