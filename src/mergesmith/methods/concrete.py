"""Concrete subspace learning (Tang et al., 2023, "Concrete Subspace Learning based Interference Elimination for
Multi-task Model Fusion"): Concrete Task Arithmetic and Concrete AdaMerging.

    θ = θ₀ + Σ_k λ_k (m ⊙ τ_k),   m̂ = σ((log u − log(1 − u) + x) / T),  u ~ U(0, 1),  m = m̂ / mean(m̂) per tensor

One mask m, shared by every task vector, with logits x (init 0) over every mergeable tensor, sampled as a binary
Concrete variable (temperature T = 0.5) and rescaled by its mean per tensor. x is learned at test time by
minimising Σ_k E_{x ∈ D_k} H(f_θ(x; head_k)) on each task's unlabeled inputs (``mergesmith.fit.concrete``):

- ``concrete_task_arithmetic``: λ fixed (``scaling`` 0.3); 2000 Adam steps (lr 1e-3) on x, one batch of 16 per
  task per step.
- ``concrete_adamerging``: a first-order bi-level loop, 1000 meta steps: sample m; reset λ to 0.3 and take one
  inner Adam step (``base_lr`` 1) on λ with the detached mask; one outer Adam step (lr 1e-3) on x with the
  non-detached mask and the updated λ on a fresh batch. Then the mask is frozen and AdaMerging runs for 1000
  steps (lr 1e-3) from λ = 0.3, layer-wise by default.

Defaults are the authors' code (FusionBench ``method/concrete_subspace``, configs
``clip_concrete_{task_arithmetic,layer_wise_adamerging}.yaml``), including ``clamp: false`` (λ not clamped, unlike
official AdaMerging). The final mask (``eval_mask_type``) is, as there, one RelaxedBernoulli sample
(``continuous``), or one Bernoulli sample (``discrete``); ``expected`` (σ(x), deterministic) is ours. Every
final mask is rescaled by its mean.

The rule reads ``mask.{name}`` and ``lambda.{name}`` from the fit. A tensor the fit did not see is merged
unmasked (the expectation of an untrained rescaled mask is 1) with ``fallback.lambda`` (``scaling``, or for
Concrete AdaMerging as in ``adamerging``). The mask is elementwise, so these merges replay from their saved fit
only, not as a plain recipe.
"""

from __future__ import annotations

from mergesmith.fit.concrete import MASK_KINDS, fit_concrete_adamerging, fit_concrete_task_arithmetic
from mergesmith.methods.adamerging import (
    BATCH_SIZE,
    GRANULARITY,
    INIT,
    combine,
    fitted_lambdas,
    fitted_tensors,
)
from mergesmith.methods.base import DataNeed, Fit, MergeMethod, Param, Rule
from mergesmith.ops.taskvec import stack_deltas

PAPER = (
    "Tang et al., Concrete Subspace Learning based Interference Elimination for Multi-task Model Fusion, "
    "2023 (arXiv:2312.06173)"
)


def concrete_rule(base, experts, params, ctx):
    fitted = fitted_tensors(ctx, "concrete")
    mask = fitted.get(f"mask.{ctx.name}")  # None: merged unmasked
    return combine(base, stack_deltas(base, experts), fitted_lambdas(fitted, ctx.name), mask)


TEMPERATURE = Param("temperature", float, 0.5, "Concrete (RelaxedBernoulli) temperature T", low=0.0)
INIT_LOGIT = Param("init_logit", float, 0.0, "initial mask logits x (0: keep probability 0.5)")
LR = Param("lr", float, 1e-3, "Adam learning rate on the mask logits", low=0.0)
EVAL_MASK = Param(
    "eval_mask_type",
    str,
    "continuous",
    "final mask: one relaxed sample (continuous, FusionBench), "
    "one Bernoulli sample (discrete) or σ(x) (expected)",
    choices=MASK_KINDS,
)

CONCRETE_TASK_ARITHMETIC = MergeMethod(
    name="concrete_task_arithmetic",
    rule=Rule(concrete_rule),
    summary="θ₀ + λ Σ (m ⊙ τ_k) with a shared Concrete mask m learned by test-time entropy minimisation",
    paper=PAPER,
    params=(
        Param("scaling", float, 0.3, "fixed task-arithmetic coefficient λ"),
        Param("steps", int, 2000, "Adam steps on the mask logits", low=0),
        LR,
        TEMPERATURE,
        INIT_LOGIT,
        BATCH_SIZE,
        EVAL_MASK,
    ),
    fit=Fit(fit_concrete_task_arithmetic, DataNeed.UNLABELED),
)

# shared with DAM, which is Concrete AdaMerging plus a safety branch
CLAMP = Param(
    "clamp", bool, False, "clamp λ to [0, 1] in the forward (FusionBench and the released DAM code: false)"
)
BASE_LR = Param("base_lr", float, 1.0, "Adam learning rate of the one inner step on λ", low=0.0)
ADAMERGING_STEPS = Param("adamerging_steps", int, 1000, "AdaMerging steps on λ with the frozen mask", low=0)
ADAMERGING_LR = Param(
    "adamerging_lr", float, 1e-3, "Adam learning rate on λ after the mask is frozen", low=0.0
)

CONCRETE_ADAMERGING = MergeMethod(
    name="concrete_adamerging",
    rule=Rule(concrete_rule),
    summary="θ₀ + Σ λ_k (m ⊙ τ_k): a shared Concrete mask meta-learned with AdaMerging's λ, then AdaMerging",
    paper=PAPER,
    params=(
        GRANULARITY,
        INIT,
        CLAMP,
        Param("meta_steps", int, 1000, "meta steps learning the mask", low=0),
        BASE_LR,
        LR,
        ADAMERGING_STEPS,
        ADAMERGING_LR,
        TEMPERATURE,
        INIT_LOGIT,
        BATCH_SIZE,
        EVAL_MASK,
    ),
    fit=Fit(fit_concrete_adamerging, DataNeed.UNLABELED),
)

METHODS = (
    CONCRETE_TASK_ARITHMETIC,
    CONCRETE_ADAMERGING,
)
