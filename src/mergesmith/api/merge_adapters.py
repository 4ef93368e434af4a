"""``mergesmith merge-adapters OUT ADAPTER...``: several LoRA adapters of one base merged into one adapter, with
PEFT's ``add_weighted_adapter`` combinations as the reference (the same numbers; DARE's drop seeded here, where PEFT
draws from the global RNG).

Per layer, with adapter i's factors A_i (r_i × in), B_i (out × r_i), its scale s_i (α_i / r_i, or α_i / √r_i with
rsLoRA) and its weight w_i:

- ``cat``: A = [w_1 s_1 A_1; …], B = [B_1, …] — exact: B A = Σ w_i s_i B_i A_i, rank Σ r_i;
- ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: Δ_i = s_i B_i A_i
  combined by task arithmetic (Σ w_i Δ_i), TIES, DARE or magnitude pruning, then the best rank-``rank``
  factorisation of the result (truncated SVD: B = U_k S_k, A = V_kᵀ; ``rank`` defaults to the largest r_i);
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the same combinations applied to the
  A's and to the B's separately (equal ranks needed), with √|w_i s_i| on each side and the sign on A — cheap, and
  only a rough approximation of the weighted sum (PEFT says so too).

TIES here is PEFT's: per tensor keep the ⌊K·n⌋ largest |x| (K = ``density``), the sign of Σ (``total``) or of the
count of signs (``frequency``) per element, and the mean of the weighted entries that agree. DARE keeps each entry
with probability K and divides by K. The new adapter has α = r (scale 1), no rank or alpha patterns.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mergesmith.errors import CheckpointError, RecipeError
from mergesmith.io.hub import resolve_model
from mergesmith.io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, Adapter, is_adapter
from mergesmith.io.output import atomic_folder

SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
COMBINATIONS = ("cat", *SVD, *FACTORWISE)


@dataclass(frozen=True)
class Options:
    combination: str
    density: float | None
    majority_sign: str
    seed: int


def _magnitude_pruned(x: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return x
    mask = torch.zeros(x.numel(), dtype=x.dtype)
    mask[torch.topk(x.abs().reshape(-1), k=int(density * x.numel()), largest=True).indices] = 1
    return x * mask.reshape(x.shape)


def _random_pruned(x: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return x
    return x * torch.bernoulli(torch.full_like(x, density), generator=generator) / density


def combine(tensors: list[torch.Tensor], weights: list[float], options: Options, name: str) -> torch.Tensor:
    """One combination of same-shape tensors (PEFT's merge_utils semantics)."""
    kind = options.combination.removesuffix("_svd")
    density = 1.0 if options.density is None else options.density
    w = torch.tensor(weights, dtype=tensors[0].dtype).reshape(-1, *([1] * tensors[0].dim()))
    if kind in ("svd", "linear"):
        return (torch.stack(tensors) * w).sum(0)
    if kind.startswith("dare"):
        salt = hashlib.sha256(f"{options.seed}\0{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(salt[:8], "little") & ((1 << 63) - 1))
        pruned = torch.stack([_random_pruned(t, density, generator) for t in tensors])
    else:
        pruned = torch.stack([_magnitude_pruned(t, density) for t in tensors])
    if kind in ("magnitude_prune", "dare_linear"):
        return (pruned * w).sum(0)
    # ties, dare_ties: elect signs on the unweighted pruned tensors, mean of the agreeing weighted entries
    votes = pruned.sum(0) if options.majority_sign == "total" else pruned.sign().sum(0)
    agree = pruned.sign() == torch.where(votes >= 0, 1.0, -1.0)
    return (pruned * w * agree).sum(0) / agree.sum(0).clamp(min=1.0)


def _layer(
    adapters: list[Adapter], name: str
) -> list[tuple[int, torch.Tensor, torch.Tensor, float, str, str]]:
    """(adapter index, A, B, scale, A key, B key) of every adapter that has this layer."""
    out = []
    for i, adapter in enumerate(adapters):
        patch = adapter.patches.get(name)
        if patch is not None and patch.a is not None and patch.b is not None:
            a, b = adapter.file.get(patch.a).float(), adapter.file.get(patch.b).float()
            out.append((i, a, b, patch.scale, patch.a, patch.b))
    return out


def merge_adapters(
    adapters: list[str],
    out: str | Path,
    weights: list[float] | None = None,
    combination: str = "svd",
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Merge LoRA adapters (folders or Hub ids) into one adapter folder at ``out``; returns its config."""
    if combination not in COMBINATIONS:
        raise RecipeError(f"--combination must be one of {', '.join(COMBINATIONS)}; got '{combination}'")
    if majority_sign not in ("total", "frequency"):
        raise RecipeError(f"--majority-sign must be total or frequency; got '{majority_sign}'")
    if density is not None and not 0 <= density <= 1:
        raise RecipeError(f"--density must be in [0, 1]; got {density}")
    weights = weights if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise RecipeError(f"{len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
    loaded = []
    for spec in adapters:
        folder = resolve_model(spec)
        if not folder.is_dir() or not is_adapter(folder):
            raise CheckpointError(f"{spec}: not a PEFT adapter folder (no adapter_config.json)")
        loaded.append(Adapter(folder))
    bases = {a.base_model for a in loaded}
    if len(bases) > 1:
        raise CheckpointError(f"the adapters name different bases ({', '.join(sorted(map(str, bases)))})")
    options = Options(combination, density, majority_sign, seed)
    names = sorted({n for a in loaded for n in a.patches})
    tensors: dict[str, torch.Tensor] = {}
    for name in names:  # full tensors (a saved embedding base layer, modules_to_save): kept when all agree
        fulls = [(a, a.patches[name].full) for a in loaded if name in a.patches and a.patches[name].full]
        if fulls:
            first = fulls[0][0].file.get(fulls[0][1])
            if any(not torch.equal(a.file.get(key), first) for a, key in fulls[1:]):
                raise CheckpointError(
                    f"the adapters save different full tensors for '{name}' (modules_to_save or a resized "
                    "embedding); they cannot be merged into one adapter"
                )
            tensors[fulls[0][1]] = first.clone()
    names = [n for n in names if any(n in a.patches and a.patches[n].a is not None for a in loaded)]
    ranks = {n: [int(a.shape[0]) for _, a, _, _, _, _ in _layer(loaded, n)] for n in names}
    if combination == "cat":
        new_rank = max(sum(r) for r in ranks.values())
    elif combination in SVD:
        new_rank = rank or max(max(r) for r in ranks.values())
    else:
        flat = {r for rs in ranks.values() for r in rs}
        if len(flat) > 1 or any(len(r) != len(loaded) for r in ranks.values()):
            raise RecipeError(
                f"combination '{combination}' needs every adapter to adapt the same layers at one rank "
                f"(ranks found: {sorted(flat)}); use cat or svd"
            )
        new_rank = flat.pop()
    for name in names:
        layer = _layer(loaded, name)
        key_a, key_b = layer[0][4].removeprefix(PEFT_PREFIX), layer[0][5].removeprefix(PEFT_PREFIX)
        w = [weights[i] for i, *_ in layer]
        if combination == "cat":
            a = torch.cat([wi * scale * a_i for wi, (_, a_i, _, scale, _, _) in zip(w, layer)], 0)
            b = torch.cat([b_i for _, _, b_i, _, _, _ in layer], 1)
            pad = new_rank - a.shape[0]  # PEFT's tensors have the largest layer's rank: zeros after
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])], 0)
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)
        elif combination in SVD:
            delta = combine([scale * (b_i @ a_i) for _, a_i, b_i, scale, _, _ in layer], w, options, name)
            u, s, vh = torch.linalg.svd(delta, full_matrices=True)
            b, a = u[:, :new_rank] @ torch.diag(s[:new_rank]), vh[:new_rank, :]
        else:
            signs = [1.0 if wi * scale >= 0 else -1.0 for wi, (_, _, _, scale, _, _) in zip(w, layer)]
            roots = [math.sqrt(abs(wi * scale)) for wi, (_, _, _, scale, _, _) in zip(w, layer)]
            a = combine(
                [a_i for _, a_i, _, _, _, _ in layer],
                [r * sg for r, sg in zip(roots, signs)],
                options,
                f"{name}.A",
            )
            b = combine([b_i for _, _, b_i, _, _, _ in layer], roots, options, f"{name}.B")
        tensors[PEFT_PREFIX + key_a] = a.contiguous()
        tensors[PEFT_PREFIX + key_b] = b.contiguous()
    config = dict(loaded[0].config)
    config.update(
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=sorted({n.removesuffix(".weight") for n in names}),
        rank_pattern={},
        alpha_pattern={},
        use_rslora=False,
    )
    with atomic_folder(Path(out), force=force) as folder:
        save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (folder / "merge.json").write_text(
            json.dumps(
                {
                    "adapters": adapters,
                    "weights": weights,
                    "combination": combination,
                    "rank": new_rank,
                    "density": density,
                    "majority_sign": majority_sign,
                    "seed": seed,
                },
                indent=1,
            )
            + "\n"
        )
    for adapter in loaded:
        adapter.close()
    return config
