"""Per-layer diagnostics of an alignment (Ito, Yamada, Kumagai, ICLR 2025, "Analysis of Linear Mode Connectivity
via Permutation-Based Weight Matching").

Their finding: weight matching barely shrinks the distance between two models; what it does is align the singular
vectors with large singular values, which carry the layers' function. So, for every weight matrix W (a conv kernel
as out × (in·kh·kw)), before (π = id) and after the permutation:

- ``relative_distance`` = ‖W_A − π(W_B)‖_F / ‖W_A − W_B‖_F (1 before; the paper: still near 1 after matching);
- ``top_k_alignment`` = (1/k) Σ_{i<k} |⟨u_i^A, u_i^{π(B)}⟩| · |⟨v_i^A, v_i^{π(B)}⟩| — how well the i-th left and
  right singular vectors agree, for the k largest singular values (1: the same directions);
- ``subspace_overlap`` = ‖U_{A,k}^⊤ U_{π(B),k}‖_F² / k — the overlap of the top-k left singular subspaces.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mergesmith.arch.permutation import PermutationSpec
from mergesmith.ops.permute import permute_tensor


def _top(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, _s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :k], vh[:k].T


def matrix_alignment(a: torch.Tensor, b: torch.Tensor, k: int) -> dict[str, float]:
    """The top-k singular-vector agreement of two matrices of one shape (float64)."""
    a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    k = min(k, *a.shape)
    ua, va = _top(a, k)
    ub, vb = _top(b, k)
    paired = ((ua * ub).sum(0).abs() * (va * vb).sum(0).abs()).mean()
    overlap = (ua.T @ ub).square().sum() / k
    return {"top_k_alignment": float(paired), "subspace_overlap": float(overlap)}


def alignment_diagnostics(
    spec: PermutationSpec,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor],
    k: int = 8,
) -> dict[str, dict[str, float]]:
    """For every weight matrix the spec moves (2-D and conv kernels): relative distance, and the top-k
    singular-vector alignment and subspace overlap before (``*_before``) and after the permutation."""
    out = {}
    for name, axes in spec.axes.items():
        if a[name].dim() < 2 or all(e is None for e in axes) or not a[name].is_floating_point():
            continue
        wa, wb = a[name].double(), b[name].double()
        aligned = permute_tensor(wb, axes, perms)
        naive = float(torch.linalg.vector_norm(wa - wb))
        row = {"relative_distance": float(torch.linalg.vector_norm(wa - aligned)) / naive if naive else 0.0}
        row.update({f"{key}_before": v for key, v in matrix_alignment(wa, wb, k).items()})
        row.update(matrix_alignment(wa, aligned, k))
        out[name] = row
    return out
