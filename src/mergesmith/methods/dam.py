"""DAM, defense-aware merging (Yang, Tang, Zhu, Chen, Shen, Wu, ICLR 2025, "Mitigating the Backdoor Effect for
Multi-Task Model Merging via Safety-Aware Subspace").

    θ = θ₀ + Σ_k λ_k (m ⊙ τ_k)   (the Concrete AdaMerging merge), with the mask m learned on

    min_m Σ_k E_{x ∈ D_k} [ H(f_θ(x)) + α · H(f_θ(x + δ_k)) ],   δ_k ≈ argmin_δ −CE(f_θ(x + δ), argmax f_θ(x))

on each task's unlabeled test inputs (no labels, no knowledge of any trigger). Some experts may be backdoored;
the learned perturbation δ_k probes for inputs that flip the merged model's predictions (as a trigger does), and
the mask is pushed towards a subspace whose predictions stay stable under it (``mergesmith.fit.dam``).

The paper describes two alternately optimised masks: a task-shared mask (performance, L_perf) and a
backdoor-detection mask (safety, α·L_safe). The released code (FusionBench
``clip_safe_concrete_adamerging.py``, also ``Yangjinluan/DAM``), which this implements, has *one* Concrete mask
plus one learned input perturbation per task; the paper's backdoor-detection mask corresponds to this safety
branch (the perturbation step and the α-weighted term of the mask loss), not to a second mask tensor. Per meta
step: sample m; reset λ to 0.3 and take one inner Adam step (``base_lr`` 1) on λ with the detached mask; one
Adam step (``adv_lr`` 1e-4) on δ with the merged weights detached; one Adam step (lr 1e-3) on the mask logits.
After 1000 meta steps (layer-wise) the mask is frozen and AdaMerging runs 1000 steps (lr 1e-3) from λ = 0.3.

Choices and departures:
- ``regularizer``: ``entropy`` (α · H(f(x + δ_k)), the released "regu2", default) or ``consistency``
  (α · CE(f(x + δ_k), argmax f(x)), "regu1", a consistency term). The commented-out regu1 line of the released
  code carries a minus sign, which would reward the mask for *disagreeing* with the clean prediction; we use the
  consistency sign the option's name describes.
- Text: δ_k is added to the token embeddings (L × d); the image code clamps x + δ to [0, 1], embeddings have
  no range, so nothing is clamped. ``perturbation_units: embedding_rms`` (default) measures δ in units of the
  RMS of the base token embeddings, so that ``adv_lr`` keeps the image setting's meaning (pixels span [0, 1]);
  ``absolute`` is the raw embedding scale.
- The mask step detaches λ (as ``concrete_adamerging``); in the released code its gradient also reaches λ and
  is added to the next inner step's gradient (λ's gradients are zeroed after, not before, the inner step).
- ``trigger_norm: 1000`` in the released configs is unused there and is not a parameter here.

The rule is Concrete AdaMerging's: ``mask.{name}`` and ``lambda.{name}`` from the fit; a tensor the fit did not
see is merged unmasked with ``fallback.lambda``. The learned perturbations are saved as ``delta.{k}`` (for
inspection; the merge does not read them).
"""

from __future__ import annotations

from mergesmith.fit.dam import PERTURBATION_UNITS, REGULARIZERS, fit_dam
from mergesmith.methods.adamerging import BATCH_SIZE, GRANULARITY, INIT
from mergesmith.methods.base import DataNeed, Fit, MergeMethod, Param, Rule
from mergesmith.methods.concrete import (
    ADAMERGING_LR,
    ADAMERGING_STEPS,
    BASE_LR,
    CLAMP,
    EVAL_MASK,
    INIT_LOGIT,
    LR,
    TEMPERATURE,
    concrete_rule,
)

DAM = MergeMethod(
    name="dam",
    rule=Rule(concrete_rule),
    summary="Concrete AdaMerging whose shared mask is also trained to resist a learned input perturbation "
    "(backdoor-safe merging)",
    paper="Yang et al., Mitigating the Backdoor Effect for Multi-Task Model Merging via Safety-Aware Subspace, "
    "ICLR 2025",
    params=(
        GRANULARITY,
        INIT,
        CLAMP,
        Param("meta_steps", int, 1000, "meta steps learning the mask and the perturbations", low=0),
        BASE_LR,
        LR,
        Param("adv_lr", float, 1e-4, "Adam learning rate on the perturbations δ_k", low=0.0),
        Param("adv_weight", float, 0.1, "weight α of the perturbed-input term of the mask loss", low=0.0),
        Param(
            "regularizer",
            str,
            "entropy",
            "perturbed-input term: entropy H(f(x+δ)) (released 'regu2') or "
            "consistency CE(f(x+δ), argmax f(x)) ('regu1')",
            choices=REGULARIZERS,
        ),
        Param(
            "perturbation_units",
            str,
            "embedding_rms",
            "δ in units of the base token embeddings' RMS (embedding_rms) or raw (absolute)",
            choices=PERTURBATION_UNITS,
        ),
        ADAMERGING_STEPS,
        ADAMERGING_LR,
        TEMPERATURE,
        INIT_LOGIT,
        BATCH_SIZE,
        EVAL_MASK,
    ),
    fit=Fit(fit_dam, DataNeed.UNLABELED),
)

METHODS = (DAM,)
