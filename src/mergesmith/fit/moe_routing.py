"""Routing in Hugging Face MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, and the models ``mergesmith moe`` writes).

**Router statistics** on data (:func:`router_statistics`): per MoE layer, how often each expert is a token's top-1
and among its top-k (fractions of the real tokens; padding excluded), its mean router probability, and the router
logits ``[tokens, E]`` themselves (MC-SMoE groups experts by the cosine similarity of their logit columns).

**Top-p routing** (Huang et al., ACL 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"): a
token is sent to the fewest experts whose router probabilities, largest first, sum to at least p,

    k(x) = min{ k : Σ_{i ≤ k} P_(i)(x) ≥ p },   capped at ``max_experts``,

and the expert outputs are mixed with those probabilities. The paper mixes with the raw probabilities (its
models are trained that way); a Mixtral or Qwen-MoE is trained with its top-k probabilities renormalised to sum to
one, so by default the selected probabilities are renormalised as the model's own top-k rule does (Mixtral always,
Qwen-MoE when ``norm_topk_prob``) — then p → 0 is exactly the model's top-1 routing — and ``renormalize=False``
gives the paper's weighting. The official code keeps experts while the running sum is *above* p (``>``); this
module uses ``≥`` as the paper's definition reads (the two differ only when a sum equals p exactly).
:func:`dynamic_routing_loss` is the paper's auxiliary loss (the mean entropy of the router distributions), for
router training that should make routing sharper.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergesmith.arch.layers import layer_index
from mergesmith.errors import CheckpointError
from mergesmith.fit.data import Encoded


def named_routers(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """Every MoE router of ``model`` (a ``…TopKRouter`` module: ``forward(hidden) → (logits, weights,
    indices)``) with its layer index and module name, in layer order; ``CheckpointError`` when it has none."""
    found = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("TopKRouter"):
            index = layer_index(name)
            found.append((index if index is not None else len(found), name, module))
    if not found:
        raise CheckpointError(
            f"{type(model).__name__} has no MoE router (Mixtral, Qwen2-MoE and Qwen3-MoE models have one per layer)"
        )
    return sorted(found, key=lambda item: item[0])


def routers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """:func:`named_routers` without the names: (layer index, router)."""
    return [(index, module) for index, _, module in named_routers(model)]


def _renormalizes(router: nn.Module) -> bool:
    """Whether the router's own top-k rule renormalises the selected probabilities (Mixtral: always)."""
    return bool(getattr(router, "norm_topk_prob", True))


@dataclass
class RouterStats:
    """Per MoE layer (``layers``): ``top1`` / ``topk`` ``[L, E]`` fractions of the tokens whose top-1 is, or whose
    top-k include, each expert; ``mean_probability`` ``[L, E]``; ``logits`` one ``[tokens, E]`` fp32 matrix per
    layer; ``tokens`` counted (padding excluded); ``k`` the model's experts per token; ``inputs`` (when asked for)
    the hidden states entering each router for the first real tokens, in the order of ``logits``' rows."""

    layers: list[int]
    top1: torch.Tensor
    topk: torch.Tensor
    mean_probability: torch.Tensor
    logits: list[torch.Tensor] = field(repr=False)
    tokens: int
    k: int
    inputs: list[torch.Tensor] = field(
        default_factory=list, repr=False
    )  # the first real tokens' router inputs

    def to_dict(self) -> dict[str, Any]:
        """Everything but the logit matrices, JSON-ready."""
        return {
            "layers": self.layers,
            "tokens": self.tokens,
            "experts_per_token": self.k,
            "top1": [[round(float(v), 6) for v in row] for row in self.top1],
            "topk": [[round(float(v), 6) for v in row] for row in self.topk],
            "mean_probability": [[round(float(v), 6) for v in row] for row in self.mean_probability],
        }


def router_statistics(model: nn.Module, batches: Iterable[Encoded], keep_inputs: int = 0) -> RouterStats:
    """Run ``model`` on ``batches`` and collect every router's logits on the real tokens (see :class:`RouterStats`),
    and the router inputs of the first ``keep_inputs`` real tokens."""
    found = routers(model)
    collected: dict[int, list[torch.Tensor]] = {i: [] for i, _ in found}
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i, _ in found}
    mask: list[torch.Tensor] = []

    def hook(index: int) -> Any:
        def record(_module: nn.Module, args: Any, output: Any) -> None:
            collected[index].append(output[0].detach().float()[mask[0]])
            kept = sum(len(x) for x in inputs[index])
            if kept < keep_inputs:
                hidden = args[0].detach().reshape(-1, args[0].shape[-1]).float()[mask[0]]
                inputs[index].append(hidden[: keep_inputs - kept])

        return record

    handles = [router.register_forward_hook(hook(i)) for i, router in found]
    try:
        with torch.no_grad():
            for batch in batches:
                mask[:] = [batch.attention_mask.reshape(-1).bool()]
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    k = int(getattr(found[0][1], "top_k", 1))
    logits = [torch.cat(collected[i]) for i, _ in found]
    experts = logits[0].shape[1]
    top1, topk, mean = [], [], []
    for matrix in logits:
        probs = matrix.softmax(dim=-1)
        top1.append(torch.bincount(matrix.argmax(dim=-1), minlength=experts).double() / len(matrix))
        chosen = probs.topk(min(k, experts), dim=-1).indices.reshape(-1)
        topk.append(torch.bincount(chosen, minlength=experts).double() / len(matrix))
        mean.append(probs.double().mean(dim=0))
    kept = [torch.cat(inputs[i]) for i, _ in found] if keep_inputs else []
    return RouterStats(
        [i for i, _ in found],
        torch.stack(top1),
        torch.stack(topk),
        torch.stack(mean),
        logits,
        len(logits[0]),
        k,
        kept,
    )


def top_p_select(
    probs: torch.Tensor, p: float, max_experts: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``probs`` ``[T, E]``: ``(weights [T, m], indices [T, m], counts [T])`` with m = ``max_experts``:
    the fewest experts whose probabilities sum to ≥ p (at most m), largest first; unused slots repeat the row's
    top expert with weight 0. Not the out-of-range index E: transformers' default ``grouped_mm`` experts kernel
    leaves the output rows of such indices uninitialised, and garbage × 0 can be NaN (seen on CI's CPU)."""
    count_experts = probs.shape[-1]
    m = min(max_experts, count_experts)
    top, index = probs.sort(dim=-1, descending=True)
    top, index = top[:, :m], index[:, :m]
    reached = top.cumsum(dim=-1) >= p
    # the first position whose running sum reaches p, + 1; rows that never reach it (rounding, or the cap) keep m
    counts = torch.where(
        reached.any(dim=-1), reached.int().argmax(dim=-1) + 1, torch.full_like(index[:, 0], m)
    )
    keep = torch.arange(m, device=probs.device)[None, :] < counts[:, None]
    weights = torch.where(keep, top, torch.zeros_like(top))
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, torch.where(keep, index, index[:, :1]), counts


@dataclass
class TopPReport:
    """Mean experts per token, overall and per MoE layer, since top-p routing was enabled (or last reset)."""

    per_layer: dict[int, float]
    tokens: int

    @property
    def mean(self) -> float:
        return sum(self.per_layer.values()) / len(self.per_layer) if self.per_layer else float("nan")


class TopPRouting:
    """Top-p routing enabled on a model's routers (see :func:`top_p_routing`); counts the experts each token gets."""

    def __init__(self, model: nn.Module, p: float, max_experts: int | None, renormalize: bool | None):
        if not 0.0 <= p <= 1.0:
            raise CheckpointError(f"top-p routing: p must be in [0, 1], got {p}")
        self.found = routers(model)
        self.p, self.max_experts, self.renormalize = p, max_experts, renormalize
        self.counts = {i: [0, 0] for i, _ in self.found}  # layer → [tokens, experts activated]
        self._originals: list[tuple[nn.Module, Any]] = []
        for index, router in self.found:
            self._originals.append((router, router.forward))
            router.forward = types.MethodType(self._forward(index), router)

    def _forward(self, index: int) -> Any:
        routing = self

        def forward(router: nn.Module, hidden_states: torch.Tensor) -> Any:
            hidden_states = hidden_states.reshape(-1, router.hidden_dim)
            logits = F.linear(hidden_states, router.weight, getattr(router, "bias", None))
            probs = torch.softmax(logits.float(), dim=-1)
            renormalize = _renormalizes(router) if routing.renormalize is None else routing.renormalize
            cap = routing.max_experts or router.num_experts
            weights, indices, counts = top_p_select(probs, routing.p, cap, renormalize)
            tally = routing.counts[index]
            tally[0] += len(counts)
            tally[1] += int(counts.sum())
            return logits, weights.to(logits.dtype), indices

        return forward

    def report(self) -> TopPReport:
        per_layer = {
            i: (active / tokens if tokens else float("nan")) for i, (tokens, active) in self.counts.items()
        }
        return TopPReport(per_layer, max((t for t, _ in self.counts.values()), default=0))

    def reset(self) -> None:
        for tally in self.counts.values():
            tally[0] = tally[1] = 0

    def restore(self) -> None:
        """The model's own top-k routing again."""
        for router, forward in self._originals:
            router.forward = forward
        self._originals = []


@contextmanager
def top_p_routing(
    model: nn.Module, p: float, max_experts: int | None = None, renormalize: bool | None = None
) -> Iterator[TopPRouting]:
    """Route ``model``'s tokens by top-p inside the block (the module docstring; ``max_experts`` None: no cap
    beyond the number of experts; ``renormalize`` None: as the model's top-k does). Works with ``generate``."""
    routing = TopPRouting(model, p, max_experts, renormalize)
    try:
        yield routing
    finally:
        routing.restore()


def dynamic_routing_loss(router_logits: Iterable[torch.Tensor]) -> torch.Tensor:
    """The paper's dynamic loss: the mean over layers and tokens of the router distribution's entropy
    −Σ_e P_e log P_e (minimising it makes routing confident, so top-p activates fewer experts)."""
    entropies = [
        -(F.softmax(logits.float(), dim=-1) * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()
        for logits in router_logits
    ]
    return torch.stack(entropies).mean()
