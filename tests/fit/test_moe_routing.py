"""Router statistics and top-p routing on tiny random Mixtral / Qwen2-MoE / Qwen3-MoE models."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from mergesmith.errors import CheckpointError
from mergesmith.fit.data import Encoded
from mergesmith.fit.moe_routing import (
    dynamic_routing_loss,
    router_statistics,
    routers,
    top_p_routing,
    top_p_select,
)
from tests.helpers import TINY_DECODER, tiny_decoder

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = TINY_DECODER


def tiny_moe(family: str, experts_per_token: int = 2, seed: int = 0) -> torch.nn.Module:
    if family == "mixtral":
        config = transformers.MixtralConfig(
            **SHAPE, num_local_experts=4, num_experts_per_tok=experts_per_token
        )
    elif family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            **SHAPE,
            num_experts=4,
            num_experts_per_tok=experts_per_token,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=24,
            norm_topk_prob=False,
        )
    else:
        config = transformers.Qwen3MoeConfig(
            **SHAPE,
            num_experts=4,
            num_experts_per_tok=experts_per_token,
            moe_intermediate_size=24,
            head_dim=8,
            norm_topk_prob=True,
        )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight seeded (some fused expert tensors start as torch.empty)
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        for _, router in routers(model):  # routers with something to choose by
            router.weight.mul_(5)
    return model


def batch(lengths=(7, 4)) -> Encoded:
    """Two right-padded sequences (the second padded with id 0)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = ids * mask
    return Encoded(ids, mask, torch.zeros(len(lengths), dtype=torch.long))


def test_top_p_selects_the_fewest_experts_reaching_p():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]])
    weights, index, counts = top_p_select(probs, 0.6, 3, renormalize=False)
    assert counts.tolist() == [2, 1]
    assert index.tolist() == [[1, 2, 1], [0, 0, 0]]  # unused slots repeat the top expert, at weight 0
    assert torch.equal(weights, torch.tensor([[0.5, 0.3, 0.0], [0.9, 0.0, 0.0]]))
    assert top_p_select(probs, 0.5, 3, False)[2].tolist() == [1, 1]  # ≥ p: 0.5 reaches 0.5
    assert top_p_select(probs, 0.0, 3, False)[2].tolist() == [1, 1]
    assert top_p_select(probs, 0.99, 2, False)[2].tolist() == [2, 2]  # the cap
    assert top_p_select(probs, 1.0, 3, False)[2].tolist() == [3, 3]
    renormalized = top_p_select(probs, 0.6, 3, True)[0]
    torch.testing.assert_close(renormalized[0], torch.tensor([0.625, 0.375, 0.0]))


# every experts kernel transformers may pick: with an out-of-range index for unused slots, batched_mm indexes out
# of bounds and grouped_mm returned uninitialised rows (NaN × 0) on CI's CPU
@pytest.mark.parametrize("kernel", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_top_p_near_zero_is_the_models_top_1_routing(family, kernel):
    top1 = tiny_moe(family, experts_per_token=1)
    top2 = tiny_moe(family, experts_per_token=2)
    top2.load_state_dict(top1.state_dict())
    for model in (top1, top2):
        model.set_experts_implementation(kernel)
    data = batch((7, 7))
    with torch.no_grad():
        expected = top1(input_ids=data.input_ids).logits
        with top_p_routing(top2, 1e-6) as routing:
            found = top2(input_ids=data.input_ids).logits
        assert routing.report().mean == 1.0
        default = top2(input_ids=data.input_ids).logits  # restored: top-2 again
    # fp32 rounding only: the weight-0 slots change the experts' matmul batch shapes, not the sum
    torch.testing.assert_close(found, expected)
    assert not torch.allclose(default, expected)


def test_top_p_one_uses_every_expert_and_counts_them_per_layer():
    model = tiny_moe("mixtral")
    data = batch((7, 7))
    with top_p_routing(model, 1.0) as routing, torch.no_grad():
        model(input_ids=data.input_ids)
        report = routing.report()
    assert report.per_layer == {0: 4.0, 1: 4.0} and report.tokens == 14
    with top_p_routing(model, 0.7, max_experts=2) as routing, torch.no_grad():
        model(input_ids=data.input_ids)
        assert 1.0 <= routing.report().mean <= 2.0
        routing.reset()
        assert routing.report().tokens == 0


def test_top_p_routing_generates():
    model = tiny_moe("qwen2_moe")
    with top_p_routing(model, 0.5) as routing:
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8) and routing.report().tokens > 0
    with pytest.raises(CheckpointError, match=r"p must be in \[0, 1\], got 1.5"), top_p_routing(model, 1.5):
        pass


def test_router_statistics_count_real_tokens_and_match_the_models_logits():
    model = tiny_moe("mixtral")
    data = batch((7, 4))
    stats = router_statistics(model, [data])
    assert stats.tokens == 11 and stats.layers == [0, 1] and stats.k == 2
    torch.testing.assert_close(stats.top1.sum(dim=1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(stats.topk.sum(dim=1), torch.full((2,), 2.0, dtype=torch.float64))
    with torch.no_grad():
        full = model(input_ids=data.input_ids[:1], output_router_logits=True).router_logits
    torch.testing.assert_close(stats.logits[1][:7], full[1].float())  # the first sequence's 7 tokens
    assert set(stats.to_dict()) == {
        "layers",
        "tokens",
        "experts_per_token",
        "top1",
        "topk",
        "mean_probability",
    }


def test_a_dense_model_has_no_router_and_the_dynamic_loss_is_the_entropy():
    with pytest.raises(CheckpointError, match="LlamaForCausalLM has no MoE router"):
        routers(tiny_decoder("llama"))
    uniform = dynamic_routing_loss([torch.zeros(5, 4)])
    assert float(uniform) == pytest.approx(math.log(4))
    assert float(dynamic_routing_loss([torch.tensor([[50.0, 0.0, 0.0, 0.0]])])) < 1e-6
