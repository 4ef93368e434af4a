"""Twin-Merging (Lu et al., NeurIPS 2024, "Twin-Merging: Dynamic Integration of Modular Expertise in Model
Merging", arXiv:2406.15479).

θ(x) = θ* + Σ_t w_t(x) · SVD_r(θ_t − θ*),  θ* = θ₀ + λ Σ_t (θ_t − θ₀),  w(x) = softmax(router(x)),
r = int((1 − mask_rate) · rank).

Twin-Merging is dynamic: the weights depend on the input. This registry entry writes its static part, the
shared expert θ* (task arithmetic, the paper's default shared merge; tensors matching ``exclude`` keep the base
value, as the official ``--exclude-param '.*classifier.*' '.*bias.*'``). Its fit builds the rest — the
SVD-compressed exclusive parts and the task router — and returns them as the fit result, which a checkpoint
merge saves next to the weights (``mergesmith_fit.safetensors``). ``mergesmith.fit.twin.TwinMerge.from_fit(
merged, fitted)`` — or ``TwinMerge.load(output folder)`` — turns the pair into the dynamic model; ``mergesmith.fit.twin.build_twin`` does everything in
memory (and offers a TIES shared expert). Details, defaults and deviations from the official code:
:mod:`mergesmith.fit.twin`.

Defaults: λ = 0.3 (the common task-arithmetic value; the official Twin config uses a tuned 0.29), mask_rate 0.9,
router trained 50 epochs with AdamW at lr 5e-4, batch 1024, at most 5500 texts per task (official).
"""

from __future__ import annotations

from typing import Any

import torch

from mergesmith.fit.task import FitInputs, FitResult
from mergesmith.fit.twin import DEFAULT_EXCLUDE, build_twin, shared_tensor
from mergesmith.methods.base import DataNeed, Fit, MergeMethod, Param, Rule
from mergesmith.ops.stream import TensorContext


def _exclude_patterns(params: dict[str, Any]) -> list[str]:
    return [params["exclude"]] if params["exclude"] else []  # an empty pattern excludes nothing


def fit_twin(inputs: FitInputs) -> FitResult:
    """Build the exclusive parts and the router (``fit.twin.build_twin``); the fit result holds both."""
    p = inputs.params
    twin = build_twin(
        inputs.base,
        inputs.experts,
        inputs.tasks,
        scaling=p["scaling"],
        mask_rate=p["mask_rate"],
        exclude=_exclude_patterns(p),
        factor_dtype=getattr(torch, p["factor_dtype"]),
        router_epochs=p["router_epochs"],
        router_lr=p["router_lr"],
        router_batch_size=p["router_batch_size"],
        max_router_examples=p["max_router_examples"],
        seed=inputs.seed,
        progress=inputs.progress,
    )
    return twin.to_fit()


def twin_rule(
    base: torch.Tensor, experts: list[torch.Tensor], params: dict[str, Any], ctx: TensorContext
) -> torch.Tensor:
    """The shared expert θ* (``fit.twin.shared_tensor``, the definition the fit uses too)."""
    return shared_tensor(ctx.name, base, experts, params["scaling"], _exclude_patterns(params), ctx)


TWIN = MergeMethod(
    name="twin",
    rule=Rule(twin_rule),
    summary="shared expert θ* = θ₀ + λ Σ τ_t; fit: SVD-compressed θ_t − θ* and a task router for per-input merging",
    paper="Lu et al., Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging, NeurIPS 2024 "
    "(arXiv:2406.15479)",
    params=(
        Param("scaling", float, 0.3, "λ of the task-arithmetic shared expert (official Twin config: 0.29)"),
        Param(
            "mask_rate",
            float,
            0.9,
            "fraction of singular values of θ_t − θ* dropped (keep 10 %)",
            low=0.0,
            high=1.0,
        ),
        Param(
            "exclude",
            str,
            "|".join(DEFAULT_EXCLUDE),
            "regex (re.match) of tensors kept out of the shared merge and the SVD ('' = none)",
        ),
        Param(
            "factor_dtype", str, "float32", "dtype of the stored SVD factors", choices=("float32", "float16")
        ),
        Param("router_epochs", int, 50, "router training epochs", low=0),
        Param("router_lr", float, 5e-4, "router AdamW learning rate", low=0.0),
        Param("router_batch_size", int, 1024, "router training batch size", low=1),
        Param("max_router_examples", int, 5500, "router training texts per task (the first ones)", low=1),
    ),
    fit=Fit(fit_twin, DataNeed.UNLABELED),  # the router's label is the model's index, not the texts' labels
)

METHODS = (TWIN,)
