"""Passthrough: copy one model's tensor unchanged (optionally scaled).

With ``slices`` this is layer stacking ("frankenmerges"): the plan picks which source layer feeds each output layer
(renumbered), and this rule copies it. θ_out = s · θ_src, ``scale`` s = 1 by default.
"""

from __future__ import annotations

from mergesmith.dtypes import compute_dtype
from mergesmith.methods.base import BasePolicy, MergeMethod, Param, Rule


def passthrough_rule(base, experts, params, ctx):
    # the tensor arrives as stored (Rule reads="first"): unscaled it is copied bit for bit without an fp32 round trip
    tensor, scale = experts[0], params["scale"][0]
    return tensor if scale == 1.0 else tensor.to(compute_dtype([tensor])) * scale


PASSTHROUGH = MergeMethod(
    name="passthrough",
    rule=Rule(passthrough_rule, reads="first"),
    summary="copy one model's tensors (layer stacking with slices)",
    paper="mergekit passthrough (Goddard et al., Arcee's MergeKit, EMNLP 2024 industry track, arXiv:2403.13257)",
    params=(Param("scale", float, 1.0, "multiply the copied tensor", per_model=True),),
    base=BasePolicy.IGNORED,
    max_experts=1,
)

METHODS = (PASSTHROUGH,)
