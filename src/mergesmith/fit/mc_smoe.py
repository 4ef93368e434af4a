"""MC-SMoE's routing-guided grouping (Li et al., ICLR 2024, "Merge, Then Compress"), as its official code runs it
for Mixtral (``mcsmoe/merging/grouping_mixtral.py``), and the router of the smaller model it produces.

Per MoE layer, from router statistics on calibration tokens (:mod:`mergesmith.fit.moe_routing`):

1. **usage frequency** f_e: how often expert e is among a token's top-k, normalised to sum to one (the official
   Mixtral code counts top-2 selections; padding tokens are excluded here);
2. **similarity** of experts i, j: (cos(L[:, i], L[:, j]) + 1) / 2 over the router-logit columns L ``[tokens, E]``;
3. **group count** G_ℓ: fixed, or adaptive — every layer's frequencies pooled, each layer's most-used expert set to
   1 (a layer keeps at least one group), the threshold t the (G·layers)-th largest value (0-based index, one less
   when G = E), and G_ℓ = #{e : f_e > t};
4. **dominant experts**: the G_ℓ most used; every other expert, in decreasing usage, joins the dominant expert it
   is most similar to.

The official code then *binds* every member of a group to the merged expert, keeping the router's E rows. A
Hugging Face MoE has one router row per stored expert, so the smaller model's router gets one row per group (the
``remapped`` form): the dominant expert's row plus a least-squares correction for the other members' mass,

    w_g = w_c + Δ_g,   Δ_g = argmin_Δ Σ_x (x·Δ − [log Σ_{e∈g} exp(l_e(x) − l_c(x)) − log n_g])²

over the calibration router inputs x (l = router logits, c the dominant expert, n_g the copies of group g when
layers of fewer groups are padded to the most groups of any layer), so that softmax over the groups approximates
the summed probability of each group's members. A group of one expert keeps its row exactly (Δ = 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

RIDGE = 1e-6  # × the mean diagonal of XᵀX: conditioning only


def usage_frequencies(logits: torch.Tensor, k: int) -> torch.Tensor:
    """f ``[E]`` (float64, sums to one): the share of top-``k`` selections each expert gets over ``logits``
    ``[tokens, E]``."""
    experts = logits.shape[1]
    chosen = logits.topk(min(k, experts), dim=-1).indices.reshape(-1)
    counts = torch.bincount(chosen, minlength=experts).double()
    return counts / counts.sum()


def logit_similarity(logits: torch.Tensor) -> torch.Tensor:
    """``[E, E]``: (cos(L[:, i], L[:, j]) + 1) / 2 of the router-logit columns; 1 on the diagonal."""
    columns = logits.double().T
    unit = columns / columns.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return (unit @ unit.T + 1) / 2


def adaptive_group_counts(frequencies: Sequence[torch.Tensor], average: int) -> list[int]:
    """Per layer, the group count of MC-SMoE's global threshold for ``average`` groups per layer on average (the
    module docstring's step 3)."""
    experts = len(frequencies[0])
    pooled = []
    for f in frequencies:
        f = f.clone().double()
        f[int(f.argmax())] = 1.0
        pooled.append(f)
    values = torch.cat(pooled).sort(descending=True).values
    position = average * len(frequencies) - (1 if average == experts else 0)
    threshold = values[min(position, len(values) - 1)]
    if float(threshold) == 1.0:
        raise ValueError(
            f"cannot make {average} groups per layer on average from this model's usage (the threshold falls on a "
            "layer's most used expert)"
        )
    return [int((f > threshold).sum()) for f in pooled]


@dataclass
class LayerGroups:
    """One layer's grouping: ``labels[e]`` the group of expert e (groups numbered by their dominant expert's
    usage, most used first), ``centers[g]`` group g's dominant expert."""

    labels: list[int]
    centers: list[int]

    def members(self, group: int) -> list[int]:
        return [e for e, g in enumerate(self.labels) if g == group]

    @property
    def count(self) -> int:
        return len(self.centers)


def group_experts(frequency: torch.Tensor, similarity: torch.Tensor, count: int) -> LayerGroups:
    """MC-SMoE's step 4: the ``count`` most used experts are the dominant ones; every other expert, in decreasing
    usage, joins the dominant expert it is most similar to (ties: the earlier, i.e. more used, dominant expert)."""
    experts = len(frequency)
    if not 1 <= count <= experts:
        raise ValueError(f"the group count must be between 1 and {experts}, got {count}")
    order = torch.argsort(frequency, descending=True, stable=True).tolist()
    centers = order[:count]
    labels = [-1] * experts
    for g, e in enumerate(centers):
        labels[e] = g
    for e in order[count:]:
        scores = similarity[e, centers]
        labels[e] = int(torch.argmax(scores))  # argmax returns the first maximum
    return LayerGroups(labels, centers)


def slots_for(groups: LayerGroups, slots: int, frequency: torch.Tensor) -> list[int]:
    """Which group each of ``slots`` stored experts holds: every group once, then (a layer with fewer groups than
    the model's widest layer) copies of its groups in decreasing usage, round robin."""
    if slots < groups.count:
        raise ValueError(f"{slots} slots cannot hold {groups.count} groups")
    mass = [float(sum(frequency[e] for e in groups.members(g))) for g in range(groups.count)]
    extra = sorted(range(groups.count), key=lambda g: -mass[g])
    return list(range(groups.count)) + [extra[i % groups.count] for i in range(slots - groups.count)]


def remapped_router(
    weight: torch.Tensor, inputs: torch.Tensor, groups: LayerGroups, slot_groups: Sequence[int]
) -> torch.Tensor:
    """The router of the merged layer (``[slots, H]``), one row per stored expert (the module docstring): the
    dominant expert's row plus the least-squares correction for the rest of its group's mass on ``inputs``
    ``[N, H]``."""
    w = weight.double()
    x = inputs.double()
    logits = x @ w.T
    copies = {g: slot_groups.count(g) for g in set(slot_groups)}
    rows = []
    gram = None
    for g in slot_groups:
        center, members = groups.centers[g], groups.members(g)
        row = w[center].clone()
        if len(members) > 1 or copies[g] > 1:
            if gram is None:
                gram = x.T @ x
                gram += (
                    RIDGE * gram.diagonal().mean().clamp(min=1e-12) * torch.eye(len(gram), dtype=gram.dtype)
                )
            target = torch.logsumexp(logits[:, members] - logits[:, [center]], dim=1) - torch.log(
                torch.tensor(float(copies[g]), dtype=torch.float64)
            )
            row += torch.linalg.solve(gram, x.T @ target)
        rows.append(row)
    return torch.stack(rows).to(weight.dtype)
