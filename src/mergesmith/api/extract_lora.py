"""``mergesmith extract-lora BASE FINETUNED OUT``: a fine-tune's difference from its base as a PEFT LoRA adapter
(mergekit-extract-lora's job).

For every 2-D weight (linear layers, the LM head, the token embedding) with δ = W_ft − W_base ≠ 0, the truncated
SVD δ ≈ U_k S_k V_kᵀ is the best rank-k approximation in Frobenius norm (Eckart–Young), with relative error

    ‖δ − U_k S_k V_kᵀ‖_F / ‖δ‖_F = √(Σ_{i>k} s_i²) / √(Σ_i s_i²).

k is ``rank`` (the largest rank), or with ``energy`` E the smallest k whose singular values keep a fraction E of
Σ s_i² (at most ``rank``). The adapter stores B = U_k S_k (out × k) and A = V_kᵀ (k × in) with α = k per layer
(``rank_pattern``/``alpha_pattern`` where k differs from r), so PEFT's scale α/k is 1 and W_base + B A is the
approximation; an embedding (vocab × d) is stored as PEFT stores one, ``lora_embedding_A`` (k × vocab) and
``lora_embedding_B`` (d × k), the factors of δᵀ. Tensors of other shapes (norms, biases) that differ cannot be a
LoRA factor: they are reported with their share of ‖δ‖, not stored. One tensor at a time, SVD in fp32; the output
folder (``adapter_config.json``, ``adapter_model.safetensors``, ``extraction.json`` with every layer's rank and
error) appears atomically.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mergesmith.arch.embeddings import is_input_side
from mergesmith.errors import CheckpointError, RecipeError
from mergesmith.io.models import open_model
from mergesmith.io.output import atomic_folder

PEFT_PREFIX = "base_model.model."


@dataclass
class Extraction:
    """What was extracted: per layer its rank, its relative error and the Eckart–Young bound (equal up to
    rounding), and the tensors that differ but are not 2-D."""

    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    left_out: dict[str, float] = field(default_factory=dict)  # name -> ‖δ‖_F of a non-2-D tensor
    delta_norm: float = 0.0  # ‖δ‖_F over every tensor

    def summary(self) -> str:
        ranks = [v["rank"] for v in self.layers.values()]
        worst = max((v["relative_error"] for v in self.layers.values()), default=0.0)
        missing = math.sqrt(sum(v * v for v in self.left_out.values()))
        share = missing / self.delta_norm if self.delta_norm else 0.0
        return (
            f"{len(ranks)} LoRA layers (rank {min(ranks, default=0)}–{max(ranks, default=0)}), worst relative error "
            f"{worst:.3g}; {len(self.left_out)} non-2-D tensors differ ({100 * share:.2g} % of ‖δ‖, not stored)"
        )


def chosen_rank(singular: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """k: ``rank``, or the smallest k keeping ``energy`` of Σ s², at most ``rank``."""
    cap = min(rank or len(singular), len(singular))
    if energy is None:
        return cap
    power = singular.double().square()
    kept = torch.cumsum(power, 0) / power.sum()
    k = int(torch.searchsorted(kept, torch.tensor(energy, dtype=torch.float64) - 1e-12)) + 1
    return max(1, min(k, cap))


def extract_lora(
    base: str,
    finetuned: str,
    out: str | Path,
    *,
    rank: int | None = 32,
    energy: float | None = None,
    force: bool = False,
    progress: bool = True,
) -> Extraction:
    if rank is None and energy is None:
        raise RecipeError("extract-lora needs --rank or --energy")
    if rank is not None and rank < 1:
        raise RecipeError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise RecipeError(f"--energy must be in (0, 1], got {energy}")
    base_source, tuned = open_model(base), open_model(finetuned)
    names = base_source.keys()
    missing = [n for n in names if not tuned.has(n)]
    if missing or len(names) != len(tuned.keys()):
        raise CheckpointError(
            f"{finetuned}: its tensors differ from {base}'s (first: '{(missing or sorted(set(tuned.keys()) - set(names)))[0]}'); "
            "extract-lora needs a fine-tune of this base"
        )
    report = Extraction()
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    total = 0.0
    for name in tqdm(names, desc="extract-lora", disable=not progress, leave=False):
        dtype, shape = base_source.info(name)
        if tuple(tuned.info(name)[1]) != tuple(shape):
            raise CheckpointError(
                f"tensor '{name}': shape {list(shape)} in {base} but {list(tuned.info(name)[1])} in {finetuned}"
            )
        if not dtype.is_floating_point:
            continue
        delta = tuned.get(name).float() - base_source.get(name).float()
        norm = float(torch.linalg.vector_norm(delta))
        total += norm * norm
        if norm == 0:
            continue
        if delta.dim() != 2 or not name.endswith(".weight"):
            report.left_out[name] = norm
            continue
        module = name.removesuffix(".weight")
        embedding = is_input_side(name)
        matrix = delta.T if embedding else delta  # PEFT factors an embedding's δᵀ (d × vocab)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        k = chosen_rank(s, rank, energy)
        b, a = (u[:, :k] * s[:k]).contiguous(), vh[:k].contiguous()
        error = float(torch.linalg.vector_norm(matrix - b @ a)) / norm
        bound = float(s[k:].double().square().sum().sqrt()) / norm
        kind = "lora_embedding" if embedding else "lora"
        suffix = "" if embedding else ".weight"
        tensors[f"{PEFT_PREFIX}{module}.{kind}_A{suffix}"] = a
        tensors[f"{PEFT_PREFIX}{module}.{kind}_B{suffix}"] = b
        ranks[module] = k
        report.layers[module] = {"rank": k, "relative_error": error, "bound": bound, "norm": norm}
    report.delta_norm = math.sqrt(total)
    if not ranks:
        raise CheckpointError(f"{finetuned}: no 2-D weight differs from {base}; there is nothing to extract")
    r = max(ranks.values())
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": r,
        "target_modules": sorted(ranks),
        # PEFT reads these keys as regular expressions: escaped, a layer's name matches only itself
        "rank_pattern": {re.escape(m): k for m, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(m): k for m, k in ranks.items() if k != r},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "task_type": "CAUSAL_LM"
        if str(base_source.config.get("architectures", [""])[0]).endswith("ForCausalLM")
        else None,
    }
    with atomic_folder(Path(out), force=force) as folder:
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "extraction.json").write_text(
            json.dumps(
                {
                    "base": base,
                    "finetuned": finetuned,
                    "rank": rank,
                    "energy": energy,
                    "layers": report.layers,
                    "left_out": report.left_out,
                    "delta_norm": report.delta_norm,
                },
                indent=1,
            )
            + "\n"
        )
    return report
