"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

Each linear layer is merged to best reproduce every model's outputs on that model's own inputs:

    W* = argmin_W Σ_i ‖X_i W − X_i W_i‖²  =  (Σ_i G_i)⁻¹ Σ_i G_i W_i,   G_i = X_iᵀ X_i

(W in [in, out] layout: a PyTorch ``nn.Linear`` weight is transposed in and out; HF ``Conv1D`` already is).
The Grams come from the fit (``mergesmith.fit.gram``: mean XᵀX over non-padding tokens of ``n_examples``
examples per model, official configs ``gram_n_example: 1000``).

- ``alpha`` scales the off-diagonal entries, G̃_i = α G_i + (1 − α) diag(G_i) (official ``reduce_non_diag``):
  α = 1 is exact RegMean, α = 0 a diagonal-weighted average. Default 0.9, the value the official demo
  (``regmean_demo.ipynb``) recommends (it matters for DeBERTa and T5, hardly for RoBERTa); α < 1 also makes Σ G̃_i better
  conditioned. MergeLM searches {0.7, 0.8, 0.9, 1.0}; FusionBench CLIP uses 0.95.
- ``weight`` c_i scales model i's Gram (c_i G_i) and its share of every averaged tensor.
- The system is solved in fp64 (``torch.linalg.solve``). When Σ G̃_i is singular (an input feature no model
  ever activates), a tiny ridge pulls the solution towards the c-weighted average W̄ instead:
  (Σ G̃_i + εI) W = Σ G̃_i W_i + ε W̄, so directions the data never reaches keep the average.

Every tensor without Grams (biases, LayerNorm, embeddings, layers not reached by the forward pass) is the
c-weighted average. The base model plays no role.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergesmith.errors import MergeError
from mergesmith.fit.gram import fit_regmean, gram_key
from mergesmith.methods.base import BasePolicy, DataNeed, Fit, MergeMethod, Param, Rule
from mergesmith.ops.taskvec import per_model, weighted_sum

RIDGE = 1e-8  # relative to the mean diagonal of Σ G̃_i; only used when the system is singular


def reduce_non_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α G + (1 − α) diag(G): off-diagonal entries times α, diagonal unchanged."""
    return alpha * gram + (1 - alpha) * torch.diag_embed(gram.diagonal())


def regmean_solve(
    grams: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    alpha: float,
) -> torch.Tensor:
    """W* = (Σ_i c_i G̃_i)⁻¹ Σ_i c_i G̃_i W_i in fp64, for weights in [in, out] layout."""
    scaled = [c * reduce_non_diagonal(g.double(), alpha) for g, c in zip(grams, coefficients, strict=True)]
    lhs = torch.stack(scaled).sum(0)
    rhs = torch.stack([g @ w.double() for g, w in zip(scaled, weights, strict=True)]).sum(0)
    solution, info = torch.linalg.solve_ex(lhs, rhs)
    if int(info) == 0 and bool(torch.isfinite(solution).all()):
        return solution
    stacked = torch.stack([w.double() for w in weights])
    average = weighted_sum(stacked, per_model(coefficients, stacked), normalize=True)
    eps = RIDGE * max(float(lhs.diagonal().mean()), 1e-12)
    identity = torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
    return torch.linalg.solve(lhs + eps * identity, rhs + eps * average)


def regmean_rule(base, experts, params, ctx):
    stacked = torch.stack(experts)
    coefficients = params["weight"]
    keys = [gram_key(i, ctx.name) for i in range(len(experts))]
    fitted = ctx.fitted.tensors if ctx.fitted is not None else {}
    present = [k in fitted for k in keys]
    if not any(present):
        return weighted_sum(stacked, per_model(coefficients, stacked), normalize=True)
    transposed = ctx.name in ctx.fitted.info.get("transposed", [])  # HF Conv1D: stored [in, out] already
    in_out = [e if transposed else e.T for e in experts]
    # a model whose forward never reaches this layer (a task that pools its tokens itself skips BERT's pooler)
    # has no inputs there: its term of Σ_i ‖X_i W − X_i W_i‖² is zero, i.e. a zero Gram
    width = next(fitted[k] for k in keys if k in fitted).shape[0]
    grams = [fitted[k] if k in fitted else torch.zeros(width, width, device=stacked.device) for k in keys]
    if any(g.shape != (w.shape[0], w.shape[0]) for g, w in zip(grams, in_out, strict=True)):
        raise MergeError(
            f"tensor '{ctx.name}': Gram shape {list(grams[0].shape)} does not fit the weight "
            f"{list(experts[0].shape)}; was the fit made for these models?"
        )
    merged = regmean_solve(grams, in_out, coefficients, params["alpha"])
    return (merged if transposed else merged.T).to(experts[0].dtype).contiguous()


REGMEAN = MergeMethod(
    name="regmean",
    rule=Rule(regmean_rule),
    summary="linear layers solved to reproduce every model's outputs on its inputs (Gram matrices)",
    paper="Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023 "
    "(arXiv:2212.09849)",
    params=(
        Param(
            "weight",
            float,
            1.0,
            "per-model coefficient c_i (scales its Gram and its average share)",
            per_model=True,
            low=0.0,
        ),
        Param(
            "alpha",
            float,
            0.9,
            "off-diagonal scale of the Grams (1 = exact RegMean, 0 = diagonal)",
            low=0.0,
            high=1.0,
        ),
        Param("n_examples", int, 1000, "examples per model for its Grams (capped at the data given)", low=1),
        Param(
            "batch_size", int, 16, "examples per forward pass (changes the Grams only with padding)", low=1
        ),
        Param("include_padding", bool, False, "count padding positions too (official code)"),
    ),
    base=BasePolicy.IGNORED,
    fit=Fit(fit_regmean, DataNeed.UNLABELED),
)

METHODS = (REGMEAN,)
