"""Permutation specs and weight matching: a permuted model computes the same function, and weight matching finds
a random permutation of a model again, for every family with a spec (GQA included)."""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers

from mergesmith.arch.permutation import RESIDUAL, permutation_spec
from mergesmith.errors import CheckpointError
from mergesmith.ops.permute import (
    group_cost,
    identity,
    invert,
    permute_state,
    random_permutations,
    solve_assignment,
    weight_matching,
)
from tests.helpers import assert_weight_matching_undoes_a_shuffle, tiny_decoder


def encoder(model_type: str, head: str = "mlm", seed: int = 0) -> torch.nn.Module:
    config_class = {
        "bert": transformers.BertConfig,
        "roberta": transformers.RobertaConfig,
        "xlm-roberta": transformers.XLMRobertaConfig,
        "electra": transformers.ElectraConfig,
    }[model_type]
    extra = {"embedding_size": 32} if model_type == "electra" else {}
    config = config_class(
        **extra,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=3,
    )
    auto = {
        "mlm": transformers.AutoModelForMaskedLM,
        "sequence": transformers.AutoModelForSequenceClassification,
        "token": transformers.AutoModelForTokenClassification,
    }[head]
    torch.manual_seed(seed)
    return auto.from_config(config).eval()


MODELS = {
    "llama-gqa": lambda seed=0: tiny_decoder("llama", seed),
    "llama-tied": lambda seed=0: tiny_decoder("llama", seed, tie_word_embeddings=True),
    "mistral": lambda seed=0: tiny_decoder("mistral", seed),
    "qwen2-bias": lambda seed=0: tiny_decoder("qwen2", seed),
    "qwen3-qk-norm": lambda seed=0: tiny_decoder("qwen3", seed, head_dim=8),
    "bert-mlm": lambda seed=0: encoder("bert", "mlm", seed),
    "bert-sequence": lambda seed=0: encoder("bert", "sequence", seed),
    "bert-token": lambda seed=0: encoder("bert", "token", seed),
    "roberta-sequence": lambda seed=0: encoder("roberta", "sequence", seed),
    "xlm-roberta-token": lambda seed=0: encoder("xlm-roberta", "token", seed),
    "electra-sequence": lambda seed=0: encoder("electra", "sequence", seed),
}


def spec_of(model: torch.nn.Module, residual: bool = True):
    state = model.state_dict()
    return permutation_spec(model.config.to_dict(), {k: v.shape for k, v in state.items()}, residual)


def outputs(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def loaded(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    twin = type(model)(model.config).eval()
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("residual", [True, False])
def test_a_permuted_model_computes_the_same_function(family, residual):
    model = MODELS[family]()
    spec = spec_of(model, residual)
    assert (RESIDUAL in spec.sizes) == residual
    perms = random_permutations(spec, seed=3)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    state = permute_state(model.state_dict(), spec, perms)
    moved = [k for k, v in state.items() if not torch.equal(v, model.state_dict()[k])]
    assert len(moved) > 10
    torch.testing.assert_close(outputs(loaded(model, state)), outputs(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_weight_matching_recovers_a_random_permutation_exactly(family):
    model = MODELS[family]()
    spec = spec_of(model)
    assert_weight_matching_undoes_a_shuffle(spec, model.state_dict())


def test_weight_matching_is_seeded_and_brings_independent_models_closer():
    a, b = tiny_decoder("llama", 0).state_dict(), tiny_decoder("llama", 1).state_dict()
    spec = permutation_spec(tiny_decoder("llama").config.to_dict(), {k: v.shape for k, v in a.items()})
    first, report = weight_matching(spec, a, b, seed=5)
    again, _ = weight_matching(spec, a, b, seed=5)
    assert all(torch.equal(first[g], again[g]) for g in spec.groups)
    aligned = permute_state(b, spec, first)
    inner = {k: float((a[k].double() * aligned[k].double()).sum()) for k in spec.axes}
    before = {k: float((a[k].double() * b[k].double()).sum()) for k in spec.axes}
    assert sum(inner.values()) > sum(before.values())
    assert sum(report.gains) == pytest.approx(sum(inner.values()) - sum(before.values()), rel=1e-3)


def test_assignment_solver_against_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        cost = torch.randn(5, 5, generator=g, dtype=torch.float64)
        best = max(
            itertools.permutations(range(5)), key=lambda p: float(cost[torch.arange(5), list(p)].sum())
        )
        assert solve_assignment(cost).tolist() == list(best)


def test_group_cost_is_the_inner_product_of_units():
    """On a hand-made two-layer MLP written as Llama FFN tensors: C[i, j] = ⟨row i of gate/up of A, row j of B⟩
    + ⟨column i of down of A, column j of B⟩."""
    model = tiny_decoder("llama")
    spec = spec_of(model, residual=False)
    a, b = model.state_dict(), tiny_decoder("llama", 1).state_dict()
    group = "model.layers.0.mlp"
    cost = group_cost(group, spec, a, b, identity(spec))
    p = "model.layers.0.mlp."
    expected = sum(
        a[p + n + ".weight"].double() @ b[p + n + ".weight"].double().T for n in ("gate_proj", "up_proj")
    )
    expected = expected + a[p + "down_proj.weight"].double().T @ b[p + "down_proj.weight"].double()
    torch.testing.assert_close(cost, expected, rtol=1e-5, atol=1e-5)


def test_a_family_without_a_spec_is_one_line():
    with pytest.raises(CheckpointError, match="model_type 'gpt2' has no permutation spec") as e:
        permutation_spec({"model_type": "gpt2"}, {"h.0.attn.c_attn.weight": (4, 12)})
    assert "\n" not in str(e.value)


def test_an_unknown_tensor_on_the_stream_is_refused():
    model = tiny_decoder("llama")
    shapes = {k: v.shape for k, v in model.state_dict().items()} | {"extra_head.weight": (5, 32)}
    with pytest.raises(CheckpointError, match=r"'extra_head\.weight' has no rule .* residual: false"):
        permutation_spec(model.config.to_dict(), shapes)
    assert permutation_spec(model.config.to_dict(), shapes, residual=False).sizes


@pytest.mark.parametrize("family", ["bert-mlm", "roberta-sequence", "qwen2-bias", "llama-gqa"])
def test_activation_matching_recovers_a_random_permutation(family):
    """Correlations of the two models' activations on random tokens: the shuffle's inverse for every group."""
    from mergesmith.fit.activations import unit_correlations
    from mergesmith.fit.data import Encoded

    model = MODELS[family]()
    spec = spec_of(model)
    perms = random_permutations(spec, seed=2)
    shuffled = loaded(model, permute_state(model.state_dict(), spec, perms))
    ids = torch.randint(4, 60, (6, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # padding is left out of the statistics
    batches = [Encoded(ids[:3], mask[:3], -torch.ones(3)), Encoded(ids[3:], mask[3:], -torch.ones(3))]
    costs = unit_correlations(spec, model, shuffled, batches)
    assert set(costs) == set(spec.groups)
    for group in spec.groups:
        assert torch.equal(solve_assignment(costs[group]), invert(perms[group])), group


def test_diagnostics_of_a_recovered_shuffle_and_of_hand_made_matrices():
    from mergesmith.ops.alignment_diagnostics import alignment_diagnostics, matrix_alignment

    model = MODELS["llama-gqa"]()
    spec = spec_of(model)
    reference = model.state_dict()
    perms = random_permutations(spec, seed=1)
    shuffled = permute_state(reference, spec, perms)
    found, _ = weight_matching(spec, reference, shuffled)
    rows = alignment_diagnostics(spec, reference, shuffled, found, k=4)
    assert "model.layers.0.mlp.down_proj.weight" in rows and "model.norm.weight" not in rows
    for row in rows.values():
        assert row["relative_distance"] == 0.0
        assert row["top_k_alignment"] == pytest.approx(1.0) and row["subspace_overlap"] == pytest.approx(1.0)
        assert row["top_k_alignment_before"] < 0.9
    # a rotation of the singular vectors within the top-2 subspace: the subspace is the same, the pairs are not
    u = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    s = torch.diag(torch.tensor([5.0, 4.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64))
    a = u @ s @ u.T
    swap = u.clone()
    swap[:, [0, 1]] = u[:, [1, 0]]
    b = swap @ s @ swap.T  # same top-2 subspace, its two directions exchanged
    scores = matrix_alignment(a, b, 2)
    assert scores["subspace_overlap"] == pytest.approx(1.0)
    assert scores["top_k_alignment"] == pytest.approx(0.0, abs=1e-9)
