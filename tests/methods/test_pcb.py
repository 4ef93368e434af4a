"""pcb: the official PCB_merge on the flattened model (scope: global) and per tensor, plus invariants."""

from __future__ import annotations

import pytest
import torch

from mergesmith.errors import RecipeError
from mergesmith.methods import get_method
from mergesmith.methods.base import resolve_method_params
from mergesmith.ops.stream import TensorInputs
from tests.helpers import run_method


def merge_model(base, experts, shared=None, per_model=None, seed=0):
    return run_method("pcb", base, experts, shared, per_model, seed)


# --- a straight port of the official code (duguodong7/pcb-merging, pcb-merging.py and vision pcb.py) ---------
def ref_normalize(x, dim=0):
    lo = torch.min(x, dim=dim, keepdim=True).values
    hi = torch.max(x, dim=dim, keepdim=True).values
    return (x - lo) / (hi - lo)


def ref_clamp(x, min_ratio=0.0, max_ratio=0.0):
    d = x.size(1)
    ordered = torch.sort(x, dim=1).values
    lo = ordered[:, int(d * min_ratio)].unsqueeze(1)
    hi = ordered[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
    return torch.clamp(x, lo, hi)


def ref_pcb(flat, ratio=0.1, clip=1e-4, lams=None, vision=False):
    n, _ = flat.shape
    checks_abs = ref_clamp(flat.abs(), clip, clip)
    clamped = torch.sign(flat) * checks_abs
    intra = torch.exp(n * ref_normalize(checks_abs, 1) ** 2)
    trend = torch.sum(torch.sign(flat) * ref_normalize(checks_abs, 1), dim=0) if vision else flat.sum(dim=0)
    inter = torch.tanh(flat * trend)
    scale = ref_normalize(ref_clamp(intra * inter, 1 - ratio, 0), dim=1)
    tvs = clamped if lams is None else clamped * torch.tensor(lams).unsqueeze(1)
    return torch.sum(tvs * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)


def model(seed=0, count=3):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"emb": (40, 16), "attn.q": (16, 16), "norm": (16,), "mlp.up": (32, 16), "scalar": ()}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    experts = [
        {k: v + 0.1 * torch.randn(v.shape, generator=gen) * (1 + i) for k, v in base.items()}
        for i in range(count)
    ]
    # a few outliers, so the clipping matters
    experts[0]["emb"][0, 0] += 5.0
    experts[1]["mlp.up"][3, 2] -= 4.0
    return base, experts


def flatten(base, experts):
    return torch.stack([torch.cat([(e[k] - base[k]).reshape(-1) for k in base]) for e in experts])


def unflatten(vector, like):
    out, start = {}, 0
    for k, v in like.items():
        out[k] = vector[start : start + v.numel()].reshape(v.shape)
        start += v.numel()
    return out


@pytest.mark.parametrize(
    "shared,lams,vision",
    [
        ({}, None, False),
        ({"ratio": 0.2, "lambda": 1.3}, None, False),
        ({"ratio": 0.05, "clip": 0.01, "inter": "normalized"}, [1.2, 1.2, 1.2], True),
        ({"ratio": 1.0, "clip": 0.0}, [0.8, 1.1, 1.3], False),
    ],
)
def test_global_scope_matches_the_official_code_on_the_flattened_model(shared, lams, vision):
    base, experts = model()
    per_model = None if lams is None else [{"weight": w} for w in lams]
    got = merge_model(base, experts, shared, per_model)
    ref = ref_pcb(flatten(base, experts), shared.get("ratio", 0.1), shared.get("clip", 1e-4), lams, vision)
    expected = unflatten(ref, base)
    for k in base:
        torch.testing.assert_close(
            got[k], base[k] + shared.get("lambda", 1.0) * expected[k], rtol=1e-5, atol=1e-6
        )


def test_tensor_scope_matches_the_official_code_per_tensor():
    base, experts = model(1)
    got = merge_model(base, experts, {"scope": "tensor", "ratio": 0.3})
    for k in ("emb", "attn.q", "mlp.up"):
        flat = torch.stack([(e[k] - base[k]).reshape(-1) for e in experts])
        expected = base[k] + ref_pcb(flat, 0.3).reshape(base[k].shape)
        torch.testing.assert_close(got[k], expected, rtol=1e-5, atol=1e-6)


def test_global_statistics_are_over_the_whole_model():
    base, experts = model(2)
    global_out = merge_model(base, experts)
    tensor_out = merge_model(base, experts, {"scope": "tensor"})
    assert not torch.allclose(global_out["attn.q"], tensor_out["attn.q"])


def test_kept_fraction_and_invariants():
    base, experts = model(3)
    zero = merge_model(base, experts, {"lambda": 0.0})
    assert all(torch.equal(zero[k], base[k]) for k in base)
    # ratio r keeps about r of each task's entries (the top scores): count where the merge moved off the base
    out = merge_model(base, experts, {"ratio": 0.25}, [{"weight": 1.0}, {"weight": 0.0}, {"weight": 0.0}])
    moved = sum(int((out[k] != base[k]).sum()) for k in base)
    total = sum(v.numel() for v in base.values())
    assert abs(moved / total - 0.25) < 0.02


def test_settings_must_be_constant_for_the_global_scope():
    base, experts = model(4)
    method = get_method("pcb")
    params = resolve_method_params(method, {}, [{}] * 3)

    def stream():
        for i, name in enumerate(base):
            yield TensorInputs(
                name, base[name], [e[name] for e in experts], {**params, "ratio": 0.1 + 0.1 * (i == 2)}
            )

    with pytest.raises(RecipeError):
        method.model_stats(stream, params, 0)
    with pytest.raises(RecipeError):
        merge_model(base, experts, {"ratio": 0.0})
