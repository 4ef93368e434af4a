"""Parameters that several methods share (the generalized task-arithmetic family's weight, λ, disjoint merge and
sign rule), defined once so that their defaults, help and mergekit values cannot drift apart."""

from __future__ import annotations

from mergesmith.methods.base import Param

WEIGHT = Param("weight", float, 1.0, "per-model coefficient w_t applied to its task vector", per_model=True)
LAMBDA = Param("lambda", float, 1.0, "global scale λ of the merged task vector")
DISJOINT = Param(
    "disjoint",
    str,
    "mean",
    "disjoint merge over sign-agreeing experts: mean (paper's dis-mean; mergekit normalize: true) or sum",
    choices=("mean", "sum"),
)
SIGN_ZERO = Param(
    "sign_zero",
    str,
    "majority",
    "elected sign where Σ_t τ̂_t = 0: majority (paper: sign of the whole model's elected signs) or positive "
    "(mergekit)",
    choices=("majority", "positive"),
    mergekit="positive",
)
# mergekit spells the disjoint-merge choice as a boolean `normalize`.
NORMALIZE_ALIAS = {"normalize": ("disjoint", {True: "mean", False: "sum"})}
