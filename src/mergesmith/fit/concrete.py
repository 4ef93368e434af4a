"""Concrete subspace learning (Tang et al., 2023): a shared mask over the task vectors, learned at test time.

One mask m (same shape as θ₀, every mergeable tensor) is parameterised by logits x and sampled as a binary
Concrete (RelaxedBernoulli) variable, m̂ = σ((log u − log(1 − u) + x) / T), u ~ U(0, 1), then rescaled per tensor
by its mean (m ← m / mean(m)). The same mask multiplies every task vector: θ = θ₀ + Σ_k λ_k (m ⊙ τ_k).

- Concrete Task Arithmetic: λ fixed (0.3); Adam on x minimising the summed entropy, one batch per task.
- Concrete AdaMerging: first-order bi-level loop. Each meta step samples m, resets λ to its init and takes one
  inner Adam step on λ (lr ``base_lr`` = 1; the optimizer's moments persist across meta steps, as in FusionBench's
  ``clip_concrete_adamerging.py``) with the *detached* mask, then an outer Adam step on x with the non-detached
  mask and the updated λ on a fresh batch. Afterwards the mask is frozen and ordinary AdaMerging runs.

Pieces reused by DAM (``fit/dam.py``): :class:`ConcreteMask`, :func:`merged_params`, :func:`entropy_loss`,
:func:`inner_lambda_step`, :func:`mask_step`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from mergesmith.fit.adamerging import (
    FALLBACK_LAMBDA,
    LOG_EVERY,
    Coefficients,
    entropy_loss,
    examples_used,
    learn_coefficients,
    merged_params,
    next_batches,
    require_base,
    seeded_generator,
    task_streams,
)
from mergesmith.fit.data import Encoded
from mergesmith.fit.task import FitInputs, FitResult, Task, eval_mode, task_vectors

__all__ = [
    "MASK_KINDS",
    "ConcreteMask",
    "entropy_loss",
    "fit_concrete_adamerging",
    "fit_concrete_task_arithmetic",
    "inner_lambda_step",
    "learn_concrete_adamerging",
    "learn_concrete_task_arithmetic",
    "mask_step",
    "merged_params",
    "relaxed_bernoulli",
    "rescale_by_mean",
]

# How the final mask is drawn from the learned logits: ``continuous`` one RelaxedBernoulli sample (FusionBench's
# eval_mask_type default), ``discrete`` one Bernoulli sample, ``expected`` σ(x) (deterministic; ours).
MASK_KINDS = ("continuous", "discrete", "expected")


def relaxed_bernoulli(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """A reparameterised RelaxedBernoulli(logits, temperature) sample in (0, 1), differentiable in ``logits``.

    The same formula as ``torch.distributions.RelaxedBernoulli.rsample`` (u clamped away from 0 and 1 by the
    dtype's eps), written out so that ``generator`` controls the noise.
    """
    eps = torch.finfo(logits.dtype).eps
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype).clamp(eps, 1 - eps)
    return torch.sigmoid((u.log() - torch.log1p(-u) + logits) / temperature)


def rescale_by_mean(mask: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """m / mean(m) per tensor (DARE-like: the masked task vector keeps its expected size). An all-zero mask (a
    discrete sample can be one for a tiny tensor) stays zero."""
    out = {}
    for name, m in mask.items():
        mean = m.mean()
        out[name] = m / mean if bool(mean.detach() > 0) else torch.zeros_like(m)
    return out


class ConcreteMask:
    """The shared mask's logits x (one leaf tensor per mergeable name) and its samples."""

    def __init__(self, like: Mapping[str, torch.Tensor], init_logit: float = 0.0, temperature: float = 0.5):
        self.temperature = temperature
        self.logits = {
            name: torch.full(t.shape, float(init_logit), dtype=torch.float32, requires_grad=True)
            for name, t in like.items()
        }

    def parameters(self) -> list[torch.Tensor]:
        return list(self.logits.values())

    def sample_unscaled(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A relaxed sample m̂ ∈ (0, 1) per tensor, differentiable in the logits."""
        return {name: relaxed_bernoulli(x, self.temperature, generator) for name, x in self.logits.items()}

    def sample(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A relaxed sample rescaled by its mean per tensor (what the training loops merge with)."""
        return rescale_by_mean(self.sample_unscaled(generator))

    def expected(self) -> dict[str, torch.Tensor]:
        """σ(x) rescaled by its mean per tensor (deterministic)."""
        return rescale_by_mean({name: torch.sigmoid(x) for name, x in self.logits.items()})

    def discrete(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A Bernoulli(σ(x)) sample rescaled by its mean per tensor."""
        with torch.no_grad():
            return rescale_by_mean(
                {
                    name: (torch.rand(x.shape, generator=generator) < torch.sigmoid(x)).to(x.dtype)
                    for name, x in self.logits.items()
                }
            )

    def final(self, kind: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The mask a merge uses after training (``kind`` in :data:`MASK_KINDS`), detached and rescaled."""
        if kind not in MASK_KINDS:
            raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")
        with torch.no_grad():
            if kind == "continuous":
                return self.sample(generator)
            if kind == "discrete":
                return self.discrete(generator)
            return self.expected()


def mask_step(
    tasks: Sequence[Task],
    base: Mapping[str, torch.Tensor],
    vectors: Sequence[Mapping[str, torch.Tensor]],
    mask: Mapping[str, torch.Tensor],
    lambdas: Mapping[str, torch.Tensor] | torch.Tensor,
    batches: Sequence[Encoded],
    optimizer: torch.optim.Optimizer,
) -> float:
    """One optimizer step on the mask logits: the summed entropy of θ₀ + Σ_k λ_k (m ⊙ τ_k) with the
    non-detached ``mask`` sample (λ detached). Returns the loss."""
    if isinstance(lambdas, Mapping):
        lambdas = {name: value.detach() for name, value in lambdas.items()}
    else:
        lambdas = lambdas.detach()
    loss = entropy_loss(tasks, merged_params(base, vectors, mask, lambdas), batches)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def inner_lambda_step(
    tasks: Sequence[Task],
    base: Mapping[str, torch.Tensor],
    vectors: Sequence[Mapping[str, torch.Tensor]],
    mask: Mapping[str, torch.Tensor],
    batches: Sequence[Encoded],
    coefficients: Coefficients,
    optimizer: torch.optim.Optimizer,
) -> float:
    """Concrete AdaMerging's inner step: reset λ to its init, then one ``optimizer`` step on λ minimising the
    summed entropy with the *detached* mask (no gradient reaches the mask: first-order meta-learning).
    ``coefficients.per_tensor()`` holds the updated λ afterwards. Returns the loss."""
    coefficients.reset()
    detached = {name: m.detach() for name, m in mask.items()}
    loss = entropy_loss(tasks, merged_params(base, vectors, detached, coefficients.per_tensor()), batches)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def learn_concrete_task_arithmetic(
    tasks: Sequence[Task],
    base: Mapping[str, torch.Tensor],
    vectors: Sequence[Mapping[str, torch.Tensor]],
    *,
    scaling: float = 0.3,
    steps: int = 2000,
    lr: float = 1e-3,
    temperature: float = 0.5,
    init_logit: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> tuple[ConcreteMask, list[dict[str, float]]]:
    """Concrete TA: Adam on the mask logits, θ = θ₀ + Σ_k scaling (m ⊙ τ_k). Returns the mask and the loss curve."""
    mask = ConcreteMask(base, init_logit, temperature)
    optimizer = torch.optim.Adam(mask.parameters(), lr=lr)
    streams = task_streams(tasks, batch_size, seed)
    generator = seeded_generator(seed, "mask")
    lambdas = torch.full((len(vectors),), float(scaling))
    curve: list[dict[str, float]] = []
    for step in tqdm(range(steps), desc="Concrete TA", disable=not progress):
        loss = mask_step(
            tasks, base, vectors, mask.sample(generator), lambdas, next_batches(streams), optimizer
        )
        if step % LOG_EVERY == 0 or step == steps - 1:
            curve.append({"step": step, "loss": loss})
    return mask, curve


def learn_concrete_adamerging(
    tasks: Sequence[Task],
    base: Mapping[str, torch.Tensor],
    vectors: Sequence[Mapping[str, torch.Tensor]],
    *,
    granularity: str = "layer",
    init: float = 0.3,
    clamp: bool = False,
    meta_steps: int = 1000,
    base_lr: float = 1.0,
    lr: float = 1e-3,
    temperature: float = 0.5,
    init_logit: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
    streams: list[Iterator[Encoded]] | None = None,
) -> tuple[ConcreteMask, list[dict[str, float]]]:
    """The meta-learning stage of Concrete AdaMerging (the mask); the caller then freezes the mask and runs
    ``learn_coefficients``. ``streams`` (default: fresh seeded ones) are the per-task batch streams; pass them on
    to the AdaMerging stage to continue the same shuffles, as FusionBench does. Returns the mask and the curve
    (``inner_loss`` of the λ step, ``loss`` of the mask step)."""
    mask = ConcreteMask(base, init_logit, temperature)
    coefficients = Coefficients(list(base), len(vectors), granularity, init, clamp)
    # Both optimizers live across meta steps: λ is reset each step, its Adam moments are not (FusionBench).
    inner_optimizer = torch.optim.Adam([coefficients.raw], lr=base_lr)
    outer_optimizer = torch.optim.Adam(mask.parameters(), lr=lr)
    streams = streams if streams is not None else task_streams(tasks, batch_size, seed)
    generator = seeded_generator(seed, "mask")
    curve: list[dict[str, float]] = []
    for step in tqdm(range(meta_steps), desc="Concrete AdaMerging (mask)", disable=not progress):
        sample = mask.sample(generator)
        inner = inner_lambda_step(
            tasks, base, vectors, sample, next_batches(streams), coefficients, inner_optimizer
        )
        outer = mask_step(
            tasks, base, vectors, sample, coefficients.per_tensor(), next_batches(streams), outer_optimizer
        )
        if step % LOG_EVERY == 0 or step == meta_steps - 1:
            curve.append({"step": step, "inner_loss": inner, "loss": outer})
    return mask, curve


# --- fits: FitInputs -> FitResult --------------------------------------------------------------------------


def _mask_info(mask: ConcreteMask) -> dict[str, float]:
    """How much of the mask the logits keep: mean σ(x) and the share of x > 0, over every entry."""
    logits = torch.cat([x.detach().reshape(-1) for x in mask.logits.values()])
    return {
        "mean_keep_probability": float(torch.sigmoid(logits).mean()),
        "share_kept": float((logits > 0).float().mean()),
    }


# (base, task vectors, batch streams) -> (mask, meta-loss curve, extra fit tensors, extra fit info)
MetaLearn = Callable[[Any, Any, Any], tuple[Any, list, dict[str, torch.Tensor], dict[str, Any]]]


def fit_concrete_task_arithmetic(inputs: FitInputs) -> FitResult:
    """Concrete TA. Tensors: ``mask.{name}`` (final mask, rescaled by its mean), ``lambda.{name}`` = scaling."""
    start = time.perf_counter()
    p = inputs.params
    base = require_base(inputs, "concrete_task_arithmetic")
    with eval_mode(*(t.model.module for t in inputs.tasks)):
        mask, curve = learn_concrete_task_arithmetic(
            inputs.tasks,
            base,
            task_vectors(base, inputs.experts),
            scaling=p["scaling"],
            steps=p["steps"],
            lr=p["lr"],
            temperature=p["temperature"],
            init_logit=p["init_logit"],
            batch_size=p["batch_size"],
            seed=inputs.seed,
            progress=inputs.progress,
        )
    final = mask.final(p["eval_mask_type"], seeded_generator(inputs.seed, "final mask"))
    scaling = torch.full((len(inputs.experts),), float(p["scaling"]))
    tensors = {f"mask.{name}": m for name, m in final.items()}
    tensors.update({f"lambda.{name}": scaling.clone() for name in base})
    tensors[FALLBACK_LAMBDA] = scaling
    info: dict[str, Any] = {
        "method": "concrete_task_arithmetic",
        "steps": p["steps"],
        "eval_mask_type": p["eval_mask_type"],
        "loss": curve,
        "mask": _mask_info(mask),
        "examples": examples_used(inputs.tasks, p["steps"], p["batch_size"]),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return FitResult(tensors, info)


def fit_masked_adamerging(
    inputs: FitInputs, method: str, label: str, meta_learn: MetaLearn, meta_batches_per_step: int
) -> FitResult:
    """The two stages Concrete AdaMerging and DAM share: meta-learn the mask (``meta_learn(base, vectors,
    streams) -> (mask, meta curve, extra tensors, extra info)``), freeze it (``eval_mask_type``), then AdaMerging
    on the masked task vectors. Tensors: ``mask.{name}``, ``lambda.{name}`` (K,), ``fallback.lambda`` and the
    extra ones."""
    start = time.perf_counter()
    p = inputs.params
    base = require_base(inputs, method)
    vectors = task_vectors(base, inputs.experts)
    streams = task_streams(inputs.tasks, p["batch_size"], inputs.seed)
    with eval_mode(*(t.model.module for t in inputs.tasks)):
        mask, meta_curve, extra_tensors, extra_info = meta_learn(base, vectors, streams)
        final = mask.final(p["eval_mask_type"], seeded_generator(inputs.seed, "final mask"))
        coefficients, curve = learn_coefficients(
            inputs.tasks,
            base,
            vectors,
            granularity=p["granularity"],
            init=p["init"],
            clamp=p["clamp"],
            steps=p["adamerging_steps"],
            lr=p["adamerging_lr"],
            batch_size=p["batch_size"],
            seed=inputs.seed,
            mask=final,
            progress=inputs.progress,
            desc=f"{label} (λ)",
            streams=streams,
        )
    tensors = {f"mask.{name}": m for name, m in final.items()}
    tensors.update(coefficients.tensors())
    tensors.update(extra_tensors)
    info: dict[str, Any] = {
        "method": method,
        "granularity": p["granularity"],
        "clamp": bool(p["clamp"]),
        "meta_steps": p["meta_steps"],
        "adamerging_steps": p["adamerging_steps"],
        "eval_mask_type": p["eval_mask_type"],
        **extra_info,
        "meta_loss": meta_curve,
        "loss": curve,
        "lambda": coefficients.table(),
        "mask": _mask_info(mask),
        "examples": examples_used(
            inputs.tasks, meta_batches_per_step * p["meta_steps"] + p["adamerging_steps"], p["batch_size"]
        ),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return FitResult(tensors, info)


def fit_concrete_adamerging(inputs: FitInputs) -> FitResult:
    """Concrete AdaMerging: meta-learn the mask, freeze it, then AdaMerging on the masked task vectors."""
    p = inputs.params

    def meta_learn(base, vectors, streams):
        mask, curve = learn_concrete_adamerging(
            inputs.tasks,
            base,
            vectors,
            granularity=p["granularity"],
            init=p["init"],
            clamp=p["clamp"],
            meta_steps=p["meta_steps"],
            base_lr=p["base_lr"],
            lr=p["lr"],
            temperature=p["temperature"],
            init_logit=p["init_logit"],
            batch_size=p["batch_size"],
            seed=inputs.seed,
            progress=inputs.progress,
            streams=streams,
        )
        return mask, curve, {}, {}

    return fit_masked_adamerging(inputs, "concrete_adamerging", "Concrete AdaMerging", meta_learn, 2)
