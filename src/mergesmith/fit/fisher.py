"""Diagonal Fisher information of a task model, for Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022).

Three estimators (``estimator``):

- ``exact`` (the paper's): F = (1/N) Σ_n Σ_y p(y|x_n) (∇_θ log p(y|x_n))², the expectation over the model's own
  predictive distribution, from per-example gradients of every class's log-probability (``torch.func.jacrev``
  over the classes). Examples are processed ``chunk_size`` at a time with ``torch.func.vmap`` when the model
  allows it; Hugging Face models branch on the attention mask's values while building it (data-dependent
  control flow, which vmap cannot trace), so for them the examples run one by one (still exact, the classes
  still vectorised). ``FisherDiagonal.per_example`` says which path ran.
- ``empirical``: F = (1/N) Σ_n (∇_θ log p(y_n|x_n))² with the true labels y_n (a different estimator, the paper
  warns; the RegMean repo's ``emp_fisher``). For a causal LM given prompt + answer sequences (per-position labels,
  :func:`mergesmith.fit.data.encode_answers`), y_n is the whole answer: log p(a|x) = Σ_t log p(a_t | x, a_<t), the
  sequence log-likelihood whose gradient fine-tuning followed (MergeLM's LLM Fisher takes the training loss's).
- ``batch``: the fast approximation of MergeLM and FusionBench (``fisher_merging``): per batch B of
  ``chunk_size`` examples, g_B = ∇_θ Σ_{n∈B} Σ_y sqrt(p_ny) log p_ny with p detached, then F = (1/N) Σ_B g_B².
  Squaring a batch-level sum keeps cross terms between examples and classes, so it is not the Fisher; its value
  depends on the batch size (FusionBench uses 32 for CLIP).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import grad, jacrev, vmap
from tqdm.auto import tqdm

from mergesmith.errors import RecipeError
from mergesmith.fit.data import Encoded, sample_examples
from mergesmith.fit.task import FitInputs, FitResult, TaskModel, batches, eval_mode

ESTIMATORS = ("exact", "empirical", "batch")

Params = dict[str, torch.Tensor]


@dataclass
class FisherDiagonal:
    """One model's diagonal Fisher (name -> tensor shaped like the parameter), how many examples it averages,
    and how per-example gradients were computed (``vmap``, ``loop``, or ``batch`` for the batch estimator)."""

    fisher: Params
    examples: int
    per_example: str


def _example_term(model: TaskModel, estimator: str) -> Callable[..., Params]:
    """The Fisher term of one example, a function of (params, input_ids, attention_mask, label) for one
    unbatched example, so that vmap can map it over a chunk."""

    def term(
        params: Params, input_ids: torch.Tensor, attention_mask: torch.Tensor, label: torch.Tensor
    ) -> Params:
        example = Encoded(input_ids[None], attention_mask[None], label[None])

        def log_probs(p: Params) -> torch.Tensor:
            return model.logits(example, p)[0].log_softmax(-1)

        if estimator == "empirical":

            def log_likelihood(p: Params) -> torch.Tensor:
                if label.dim() == 1:  # an answer's tokens: its sequence log-likelihood
                    return model.answer_log_likelihood(example, p).sum()
                # gather with a tensor index (not int(label)) so that vmap can batch the label too
                return log_probs(p).gather(0, label.reshape(1)).sum()

            return {n: g.square() for n, g in grad(log_likelihood)(params).items()}

        def with_probs(p: Params) -> tuple[torch.Tensor, torch.Tensor]:
            logp = log_probs(p)
            return logp, logp.detach().exp()

        jacobian, probs = jacrev(with_probs, has_aux=True)(params)  # jacobian[n]: [classes, *shape]
        return {n: torch.tensordot(probs, j.square(), dims=1) for n, j in jacobian.items()}

    return term


def _per_example_sum(
    model: TaskModel, params: Params, chunk: Encoded, estimator: str, how: str
) -> tuple[Params, str]:
    """Σ over the chunk's examples of their Fisher terms, and the path that computed them."""
    term = _example_term(model, estimator)
    if how == "vmap":
        try:
            terms = vmap(term, in_dims=(None, 0, 0, 0))(
                params, chunk.input_ids, chunk.attention_mask, chunk.labels
            )
            return {n: t.sum(0) for n, t in terms.items()}, how
        except RuntimeError as e:
            if "vmap" not in str(e):
                raise
            how = (
                "loop"  # data-dependent control flow in the model (HF attention masks): one example at a time
            )
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for k in range(len(chunk)):
        one = chunk.batch(slice(k, k + 1))  # trimmed to its own length: no padding at all
        for n, t in term(params, one.input_ids[0], one.attention_mask[0], one.labels[0]).items():
            total[n] += t
    return total, how


def _batch_squared_gradient(model: TaskModel, params: Params, batch: Encoded) -> Params:
    """MergeLM/FusionBench's batch approximation: (∇ Σ_n Σ_y sqrt(p_ny) log p_ny)² with p detached."""

    def objective(p: Params) -> torch.Tensor:
        logits = model.logits(batch, p)
        # sqrt(p), because the gradient is squared afterwards: each class's term then carries weight p_y
        return (logits.softmax(-1).detach().sqrt() * logits.log_softmax(-1)).sum()

    return {n: g.square() for n, g in grad(objective)(params).items()}


def diagonal_fisher(
    model: TaskModel,
    params: Params,
    data: Encoded,
    estimator: str = "exact",
    chunk_size: int = 2,
    progress: bool = False,
    desc: str = "fisher",
) -> FisherDiagonal:
    """The diagonal Fisher of ``model`` run with ``params`` (the parameters it is taken with respect to) averaged
    over every example of ``data``. Memory: the Fisher plus ``chunk_size`` × classes gradients (exact)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown Fisher estimator {estimator!r}; one of {ESTIMATORS}")
    params = {n: p.detach() for n, p in params.items()}
    totals = {n: torch.zeros_like(p) for n, p in params.items()}
    how = "batch" if estimator == "batch" else "vmap"
    chunks = batches(data, chunk_size)
    with eval_mode(model.module), warnings.catch_warnings():
        # jacrev batches the class dimension of the backward pass; ops without a batching rule (CPU flash
        # attention's backward) fall back to a loop over the classes: slower, still exact, not worth a warning
        warnings.filterwarnings(
            "ignore", message="There is a performance drop because we have not yet implemented"
        )
        for chunk in tqdm(chunks, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
            if estimator == "batch":
                squares = _batch_squared_gradient(model, params, chunk)
            else:
                squares, how = _per_example_sum(model, params, chunk, estimator, how)
            for n, s in squares.items():
                totals[n] += s
    count = max(len(data), 1)
    return FisherDiagonal({n: t / count for n, t in totals.items()}, len(data), how)


def global_l2_norm(tensors: Params) -> float:
    """‖F‖₂ over the whole model (all tensors as one vector), accumulated in fp64."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))


def fisher_key(model_index: int, name: str) -> str:
    """Where the fit stores expert ``model_index``'s Fisher of parameter ``name``."""
    return f"fisher.{model_index}.{name}"


def norm_key(model_index: int) -> str:
    """Where the fit stores expert ``model_index``'s global Fisher norm (a one-element tensor)."""
    return f"fisher_norm.{model_index}"


def fit_fisher(inputs: FitInputs) -> FitResult:
    """Every expert's diagonal Fisher on (a seeded sample of ``n_examples`` of) its own task's examples, and its
    global L2 norm (for ``normalize_fishers``)."""
    settings = inputs.params
    estimator = settings["estimator"]
    result = FitResult(
        info={
            "estimator": estimator,
            "examples": [],
            "seconds": [],
            "per_example_gradients": [],
            "fisher_norms": [],
        }
    )
    for i, (task, params) in enumerate(zip(inputs.tasks, inputs.experts, strict=True)):
        if estimator == "exact" and task.model.next_token:
            raise RecipeError(
                f"Fisher: task '{task.name}' (model {i}) predicts a causal LM's next token, and the exact Fisher "
                "needs one gradient per vocabulary entry; use estimator: empirical (the answers' log-likelihood) "
                "or batch"
            )
        if estimator == "empirical" and not task.labeled:
            raise RecipeError(
                f"Fisher estimator 'empirical' needs labels, but task '{task.name}' (model {i}) is "
                "unlabeled; use estimator: exact (the paper's, label-free)"
            )
        start = time.perf_counter()
        data = sample_examples(task.data, settings["n_examples"], inputs.seed + i)
        diagonal = diagonal_fisher(
            task.model,
            params,
            data,
            estimator,
            settings["fisher_batch_size"],
            inputs.progress,
            desc=f"fisher ({task.name})",
        )
        norm = global_l2_norm(diagonal.fisher)
        result.tensors.update({fisher_key(i, n): f for n, f in diagonal.fisher.items()})
        result.tensors[norm_key(i)] = torch.tensor([norm], dtype=torch.float64)
        result.info["examples"].append(diagonal.examples)
        result.info["seconds"].append(round(time.perf_counter() - start, 3))
        result.info["per_example_gradients"].append(diagonal.per_example)
        result.info["fisher_norms"].append(norm)
    return result
