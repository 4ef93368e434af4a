"""TSV-Merge (Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà, CVPR 2025, "Task Singular Vectors:
Reducing Task Interference in Model Merging").

For each 2-D tensor ("layer task matrix") with task matrices Δ_t = θ_t − θ₀ ∈ ℝ^{m×n}, t = 1..T, r = min(m, n):

1. thin SVD Δ_t = U_t S_t V_tᵀ and keep k = ⌊r/T⌋ components of each task;
2. concatenate: U = [U_1[:, :k] … U_T[:, :k]] (m × Tk), S = diag(S_1[:k], …, S_T[:k]), Vᵀ = [V_1ᵀ[:k]; …; V_Tᵀ[:k]];
3. decorrelate: replace U and Vᵀ by their nearest orthogonal matrices (polar factors, via SVD):
   U = P Σ Qᵀ → U⊥ = P Qᵀ, and likewise V⊥ᵀ;
4. Δ = U⊥ S V⊥ᵀ.

Every other tensor (biases, norms, embeddings of other ranks): Δ = mean_t Δ_t. Then θ = θ₀ + α Δ.

The official code (``compute_and_sum_svd_mem_reduction``) pads U, S, Vᵀ with zeros to width r when T·k < r; the
padded slots carry zero singular values, and when the Tk kept columns are linearly independent (always, for
nondegenerate task matrices) the polar factor restricted to them is the polar factor of the unpadded block, so the
unpadded block is used here: same result, less work. When T > r (k = 0) a 2-D tensor gets Δ = 0, as in the
official code. SVDs run in fp32 (fp64 when the input is fp64). The official code skips CLIP's
``text_projection`` (it is averaged); recipes that need this can route that tensor to another method.

Defaults: α (``alpha``) 1.0, FusionBench's default; the official code searches α ∈ {0.1, …, 3.0} on validation.
mergekit has no TSV, so there are no paper-vs-mergekit switches.
"""

from __future__ import annotations

from typing import Any

import torch

from mergesmith.methods.base import MergeMethod, Param, Rule
from mergesmith.ops.stream import TensorContext
from mergesmith.ops.taskvec import stack_deltas


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest (semi-)orthogonal matrix P Qᵀ of ``matrix`` = P Σ Qᵀ."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def tsv_merge_matrix(deltas: torch.Tensor) -> torch.Tensor:
    """TSV-M of ``[T, m, n]`` task matrices: Δ = U⊥ S V⊥ᵀ with ⌊min(m, n)/T⌋ components per task."""
    count, rows, cols = deltas.shape
    keep = min(rows, cols) // count
    if keep == 0:
        return torch.zeros(rows, cols, dtype=deltas.dtype, device=deltas.device)
    u, s, vh = torch.linalg.svd(deltas, full_matrices=False)  # batched over tasks
    u_cat = u[:, :, :keep].permute(1, 0, 2).reshape(rows, count * keep)
    s_cat = s[:, :keep].reshape(count * keep)
    vh_cat = vh[:, :keep, :].reshape(count * keep, cols)
    return polar_factor(u_cat) @ torch.diag(s_cat) @ polar_factor(vh_cat)


def tsv_rule(
    base: torch.Tensor, experts: list[torch.Tensor], params: dict[str, Any], ctx: TensorContext
) -> torch.Tensor:
    deltas = stack_deltas(base, experts)
    if base.dim() == 2 and base.numel() > 0:
        work = torch.float64 if deltas.dtype == torch.float64 else torch.float32
        merged = tsv_merge_matrix(deltas.to(work)).to(base.dtype)
    else:
        merged = deltas.mean(dim=0)
    return base + params["alpha"] * merged


TSV = MergeMethod(
    name="tsv",
    rule=Rule(tsv_rule),
    summary="per matrix: keep each task's top singular vectors, orthogonalize them jointly, recombine",
    paper="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025 "
    "(arXiv:2412.00081)",
    params=(Param("alpha", float, 1.0, "scale α of the merged task matrix (official search 0.1–3.0)"),),
    min_experts=1,
)

METHODS = (TSV,)
