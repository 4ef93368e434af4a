"""DAM's learning loop: Concrete AdaMerging with a learned per-task input perturbation (the safety branch).

Each meta step (FusionBench ``clip_safe_concrete_adamerging.py``, the authors' released code):

1. sample the shared Concrete mask m; reset λ to its init and take one inner Adam step on λ with the detached
   mask on clean batches (``fit.concrete.inner_lambda_step``);
2. perturbation step, merged weights detached: for every task, minimise −CE(f(x + δ_k), argmax f(x)), i.e. make
   the perturbed predictions disagree with the clean ones (Adam on δ, lr ``adv_lr``);
3. mask step: Σ_k [H(f(x)) + adv_weight · R_k] with the non-detached mask and detached δ, Adam on the mask logits.
   R_k = H(f(x + δ_k)) (``regularizer: entropy``, the released "regu2") or CE(f(x + δ_k), argmax f(x))
   (``consistency``, "regu1").

Then the mask is frozen and ordinary AdaMerging learns λ (``fit.adamerging.learn_coefficients``).

Text inputs: δ_k ∈ R^{L×d} is added to the token embeddings (``TaskModel.logits(..., embeds_delta=δ_k)``, the
text analogue of the image-space δ_k ∈ R^{3×224×224}); L is the longest input of any task. The image code clamps
x + δ to the pixel range [0, 1] in the mask step; token embeddings have no range, so nothing is clamped.

Perturbation scale: the image code's ``adv_lr`` = 1e-4 is in pixel units (inputs span [0, 1]). With
``perturbation_units: embedding_rms`` δ_k = s · u_k, where s is the RMS of the base model's token-embedding
entries, and Adam runs on u_k: δ is measured in units of the input's typical size, as for images (1000 Adam
steps move each coordinate by at most ~0.1 of the input scale). ``absolute`` runs Adam on δ directly (for
MiniLM, s ≈ 0.056, so the same lr moves δ about 18 times further relative to the embeddings).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mergesmith.fit.adamerging import (
    LOG_EVERY,
    Coefficients,
    merged_params,
    next_batches,
    seeded_generator,
    task_streams,
)
from mergesmith.fit.concrete import ConcreteMask, fit_masked_adamerging, inner_lambda_step
from mergesmith.fit.data import Encoded
from mergesmith.fit.task import FitInputs, FitResult, Task, entropy

REGULARIZERS = ("entropy", "consistency")
PERTURBATION_UNITS = ("embedding_rms", "absolute")


class Perturbations:
    """The per-task input perturbations δ_k = scale · u_k, u a leaf tensor ``(K, tokens, d)`` initialised to 0."""

    def __init__(self, num_tasks: int, max_tokens: int, dim: int, scale: float = 1.0):
        self.scale = scale
        self.raw = torch.zeros(num_tasks, max_tokens, dim, requires_grad=True)

    def delta(self, k: int) -> torch.Tensor:
        """δ_k ``(tokens, d)``, differentiable in ``raw``."""
        return self.scale * self.raw[k]

    def tensors(self) -> dict[str, torch.Tensor]:
        """``delta.{k}``: each task's learned δ_k (in embedding units), for inspection."""
        return {f"delta.{k}": self.delta(k).detach().clone() for k in range(self.raw.shape[0])}


def perturbation_for(
    tasks: Sequence[Task], base: Mapping[str, torch.Tensor], units: str = "embedding_rms"
) -> Perturbations:
    """Zero perturbations sized for ``tasks`` (the longest input of any task, the embedding width) and scaled by
    ``units`` (see the module docstring)."""
    if units not in PERTURBATION_UNITS:
        raise ValueError(f"perturbation_units must be one of {PERTURBATION_UNITS}, got {units!r}")
    model = tasks[0].model
    name = model.embedding_name()
    table = base[name] if name in base else model.named_parameters()[name].detach()
    scale = float(table.float().pow(2).mean().sqrt()) if units == "embedding_rms" else 1.0
    max_tokens = max(t.data.input_ids.shape[1] for t in tasks)
    return Perturbations(len(tasks), max_tokens, table.shape[1], scale)


def perturbation_step(
    tasks: Sequence[Task],
    params: Mapping[str, torch.Tensor],
    batches: Sequence[Encoded],
    perturbations: Perturbations,
    optimizer: torch.optim.Optimizer,
) -> float:
    """DAM's step (2): with the merged weights detached, minimise Σ_k −CE(f(x + δ_k), argmax f(x)) over δ.
    Returns the loss (the negated disagreement)."""
    weights = {name: value.detach() for name, value in params.items()}
    loss = torch.zeros(())
    for k, (task, batch) in enumerate(zip(tasks, batches)):
        with torch.no_grad():
            clean = task.model.logits(batch, weights).argmax(-1)
        perturbed = task.model.logits(batch, weights, embeds_delta=perturbations.delta(k))
        loss = loss - F.cross_entropy(perturbed, clean)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def safety_loss(
    tasks: Sequence[Task],
    params: Mapping[str, torch.Tensor],
    batches: Sequence[Encoded],
    perturbations: Perturbations,
    adv_weight: float,
    regularizer: str = "entropy",
) -> tuple[torch.Tensor, float, float]:
    """DAM's mask objective Σ_k [H(f(x)) + adv_weight · R_k] (δ detached). Returns (loss, Σ H, Σ R)."""
    if regularizer not in REGULARIZERS:
        raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}")
    natural = torch.zeros(())
    regular = torch.zeros(())
    for k, (task, batch) in enumerate(zip(tasks, batches)):
        clean = task.model.logits(batch, params)
        perturbed = task.model.logits(batch, params, embeds_delta=perturbations.delta(k).detach())
        natural = natural + entropy(clean)
        if regularizer == "entropy":
            regular = regular + entropy(perturbed)
        else:  # consistency with the clean prediction
            regular = regular + F.cross_entropy(perturbed, clean.argmax(-1).detach())
    return natural + adv_weight * regular, float(natural.detach()), float(regular.detach())


def learn_dam(
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
    adv_lr: float = 1e-4,
    adv_weight: float = 0.1,
    regularizer: str = "entropy",
    perturbation_units: str = "embedding_rms",
    temperature: float = 0.5,
    init_logit: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
    streams: list[Iterator[Encoded]] | None = None,
) -> tuple[ConcreteMask, Perturbations, list[dict[str, float]]]:
    """DAM's meta-learning stage: the safety-aware mask and the perturbations. The caller freezes the mask and
    runs ``learn_coefficients``. Returns the mask, the perturbations and the loss curve."""
    mask = ConcreteMask(base, init_logit, temperature)
    coefficients = Coefficients(list(base), len(vectors), granularity, init, clamp)
    perturbations = perturbation_for(tasks, base, perturbation_units)
    # Three optimizers live across meta steps (λ is reset every step, its Adam moments are not), as released.
    inner_optimizer = torch.optim.Adam([coefficients.raw], lr=base_lr)
    mask_optimizer = torch.optim.Adam(mask.parameters(), lr=lr)
    adv_optimizer = torch.optim.Adam([perturbations.raw], lr=adv_lr)
    streams = streams if streams is not None else task_streams(tasks, batch_size, seed)
    generator = seeded_generator(seed, "mask")
    curve: list[dict[str, float]] = []
    for step in tqdm(range(meta_steps), desc="DAM (mask + perturbation)", disable=not progress):
        sample = mask.sample(generator)
        inner = inner_lambda_step(
            tasks, base, vectors, sample, next_batches(streams), coefficients, inner_optimizer
        )
        lambdas = coefficients.detached()
        params = merged_params(base, vectors, sample, lambdas)
        adversarial = perturbation_step(tasks, params, next_batches(streams), perturbations, adv_optimizer)
        loss, natural, regular = safety_loss(
            tasks, params, next_batches(streams), perturbations, adv_weight, regularizer
        )
        mask_optimizer.zero_grad()
        loss.backward()
        mask_optimizer.step()
        if step % LOG_EVERY == 0 or step == meta_steps - 1:
            curve.append(
                {
                    "step": step,
                    "inner_loss": inner,
                    "adversarial_loss": adversarial,
                    "loss": float(loss.detach()),
                    "natural": natural,
                    "regularizer": regular,
                }
            )
    return mask, perturbations, curve


def fit_dam(inputs: FitInputs) -> FitResult:
    """DAM: meta-learn the safety-aware mask with the perturbations, freeze the mask (``eval_mask_type``), then
    AdaMerging on the masked task vectors. Tensors: ``mask.{name}``, ``lambda.{name}`` (K,), ``fallback.lambda``
    (read by the rule) and ``delta.{k}`` (the learned perturbations, for inspection only)."""
    p = inputs.params

    def meta_learn(base, vectors, streams):
        mask, perturbations, curve = learn_dam(
            inputs.tasks,
            base,
            vectors,
            granularity=p["granularity"],
            init=p["init"],
            clamp=p["clamp"],
            meta_steps=p["meta_steps"],
            base_lr=p["base_lr"],
            lr=p["lr"],
            adv_lr=p["adv_lr"],
            adv_weight=p["adv_weight"],
            regularizer=p["regularizer"],
            perturbation_units=p["perturbation_units"],
            temperature=p["temperature"],
            init_logit=p["init_logit"],
            batch_size=p["batch_size"],
            seed=inputs.seed,
            progress=inputs.progress,
            streams=streams,
        )
        info = {
            "regularizer": p["regularizer"],
            "adv_weight": p["adv_weight"],
            "perturbation_units": p["perturbation_units"],
            "perturbation_scale": perturbations.scale,
            "perturbation_rms": [
                float(perturbations.delta(k).detach().pow(2).mean().sqrt()) for k in range(len(inputs.tasks))
            ],
        }
        return mask, curve, perturbations.tensors(), info

    return fit_masked_adamerging(inputs, "dam", "DAM", meta_learn, 3)
