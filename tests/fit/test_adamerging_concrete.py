"""AdaMerging / AdaMerging++ and Concrete subspace learning (Concrete TA, Concrete AdaMerging)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mergesmith.api import fit_state_dicts, merge_state_dicts
from mergesmith.engine.execute import execute
from mergesmith.engine.plan import Planner
from mergesmith.fit.adamerging import (
    FALLBACK_LAMBDA,
    Coefficients,
    adamerging_recipe,
    entropy_loss,
    merged_params,
    selected_vectors,
    ties_statistics,
    write_learned_recipe,
)
from mergesmith.fit.concrete import ConcreteMask, inner_lambda_step, relaxed_bernoulli, rescale_by_mean
from mergesmith.fit.data import Encoded
from mergesmith.fit.task import FitResult, Task, TaskModel, batches, task_vectors
from mergesmith.io.reader import DictSource
from mergesmith.recipe import load_recipe

# Few steps and a larger learning rate than the paper's: the tests check the loops, not the paper's schedule.
FAST = {"steps": 12, "lr": 0.05, "batch_size": 20}


@pytest.fixture(scope="module")
def setup(tiny_zoo):
    zoo = tiny_zoo
    base = zoo.state_dict(zoo.base)
    experts = [zoo.state_dict(zoo.encoder_path(t)) for t in zoo.tasks]
    tasks = [zoo.task(t, "test", labeled=False) for t in zoo.tasks]
    return base, experts, tasks


class TokenEncoder(nn.Module):
    """A one-layer token encoder: the smallest module TaskModel runs (it returns .last_hidden_state)."""

    def __init__(self, vocab: int = 12, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        return SimpleNamespace(last_hidden_state=torch.tanh(self.mix(x)))


@pytest.fixture(scope="module")
def toy():
    """Two experts fine-tuned (to 100 % train accuracy) on two token-counting tasks, each with a fixed random head:
    their merge at λ = 0.3 is unsure, so entropy minimisation has a clear signal."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    module = TokenEncoder()
    base = {n: p.detach().clone() for n, p in module.named_parameters()}
    ids = torch.randint(0, 12, (48, 6), generator=g)
    mask = torch.ones_like(ids)
    labels = [((ids < 6).sum(1) >= 3).long(), ((ids % 2 == 0).sum(1) >= 3).long()]
    experts, tasks = [], []
    for k, y in enumerate(labels):
        model = TaskModel(module, {"weight": torch.randn(2, 8, generator=g), "bias": torch.zeros(2)})
        params = {n: t.clone().requires_grad_() for n, t in base.items()}
        optimizer = torch.optim.Adam(params.values(), lr=0.05)
        for _ in range(60):
            optimizer.zero_grad()
            F.cross_entropy(model.logits(Encoded(ids, mask, y), params), y).backward()
            optimizer.step()
        experts.append({n: p.detach() for n, p in params.items()})
        tasks.append(Task(f"t{k}", model, Encoded(ids, mask, torch.full_like(y, -1)), labeled=False))
    return base, experts, tasks


@pytest.fixture(scope="module")
def layer_fit(setup):
    base, experts, tasks = setup
    return fit_state_dicts(base, experts, "adamerging", tasks, **FAST)


def hand_made(seed: int = 0, experts: int = 3) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "a.weight": (4, 5),
        "ba.weight": (6,),
        "c.bias": (3, 2),
    }  # "a.weight" is a substring of "ba.weight"
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    return base, [{n: t + torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(experts)]


def hand_fit(base: dict, experts: int, seed: int = 1) -> FitResult:
    g = torch.Generator().manual_seed(seed)
    tensors = {f"lambda.{n}": torch.rand(experts, generator=g) for n in base}
    tensors[FALLBACK_LAMBDA] = torch.rand(experts, generator=g)
    return FitResult(tensors, {"method": "adamerging", "ties": False})


# --- equations on hand-made tensors -------------------------------------------------------------------------


def test_merged_params_is_base_plus_masked_weighted_sum():
    base, experts = hand_made()
    vectors = task_vectors(base, experts)
    lambdas = {n: torch.tensor([0.2, -0.5, 0.7]) for n in base}
    mask = {n: torch.rand(t.shape, generator=torch.Generator().manual_seed(5)) for n, t in base.items()}
    out = merged_params(base, vectors, mask, lambdas)
    shared = merged_params(base, vectors, None, torch.tensor([0.2, -0.5, 0.7]))
    for n in base:
        expected = base[n] + sum(lam * mask[n] * v[n] for lam, v in zip([0.2, -0.5, 0.7], vectors))
        torch.testing.assert_close(out[n], expected)
        torch.testing.assert_close(
            shared[n], base[n] + sum(lam * v[n] for lam, v in zip([0.2, -0.5, 0.7], vectors))
        )


def test_rule_is_base_plus_lambda_weighted_task_vectors_with_fallback():
    base, experts = hand_made()
    fit = hand_fit(base, 3)
    del fit.tensors["lambda.c.bias"]  # a tensor the fit did not see: the fallback λ
    merged = merge_state_dicts(base, experts, "adamerging", fitted=fit)
    for n in base:
        lambdas = fit.tensors.get(f"lambda.{n}", fit.tensors[FALLBACK_LAMBDA])
        expected = base[n] + sum(lam * (e[n] - base[n]) for lam, e in zip(lambdas, experts))
        torch.testing.assert_close(merged[n], expected)


def test_plus_plus_rule_with_unit_lambdas_is_official_ties_dis_sum():
    base, experts = hand_made(experts=3)
    thresholds, majority = ties_statistics(base, experts, 0.2)
    fit = FitResult({f"lambda.{n}": torch.ones(3) for n in base}, {"method": "adamerging", "ties": True})
    fit.tensors[FALLBACK_LAMBDA] = torch.ones(3)
    fit.tensors["ties.thresholds"] = torch.tensor(thresholds)
    fit.tensors["ties.majority"] = torch.tensor([majority])
    plus_plus = merge_state_dicts(base, experts, "adamerging", ties=True, fitted=fit)
    ties = merge_state_dicts(
        base, experts, "ties", density=0.2, disjoint="sum", trim_scope="global", sign_zero="majority"
    )
    for n in base:
        torch.testing.assert_close(plus_plus[n], ties[n])
    # the selected entries of each task are its trimmed entries that agree with the elected sign
    selected = selected_vectors(base, experts, thresholds, majority)
    total = sum(selected[k]["a.weight"] for k in range(3))
    for k in range(3):
        kept = selected[k]["a.weight"] != 0
        assert (torch.sign(selected[k]["a.weight"][kept]) == torch.sign(total[kept])).all()


def test_replay_recipe_orders_names_longest_first_and_merges_the_same():
    base, experts = hand_made()
    fit = hand_fit(base, 3)
    recipe = adamerging_recipe(fit, "base", ["model_0", "model_1", "model_2"])
    filters = [w.get("filter") for w in recipe["models"][0]["parameters"]["weight"]]
    assert filters == ["ba.weight", "a.weight", "c.bias", None]
    replayed = _merge_recipe(recipe, base, experts)
    direct = merge_state_dicts(base, experts, "adamerging", fitted=fit)
    for n in base:
        torch.testing.assert_close(replayed[n], direct[n], rtol=1e-6, atol=1e-6)


def _merge_recipe(recipe: dict, base: dict, experts: list[dict]) -> dict[str, torch.Tensor]:
    sources = {
        "base": DictSource(base, "base"),
        **{f"model_{i}": DictSource(e, f"model {i}") for i, e in enumerate(experts)},
    }
    plan = Planner(load_recipe(recipe), sources).plan()
    out: dict[str, torch.Tensor] = {}
    execute(plan, out.__setitem__, threads=1, progress=False)
    return out


def test_write_learned_recipe(tmp_path):
    base, _ = hand_made()
    fit = hand_fit(base, 3)
    fitted_recipe = {
        "merge_method": "adamerging",
        "base_model": "base",
        "dtype": "bfloat16",
        "seed": 7,
        "models": [{"model": f"model_{i}"} for i in range(3)],
    }
    path = write_learned_recipe(fit, fitted_recipe, tmp_path)
    learned = load_recipe(path)
    assert path.name == "learned_recipe.yaml"
    assert (learned.merge_method, learned.dtype, learned.seed) == ("task_arithmetic", "bfloat16", 7)
    assert (
        yaml.safe_load(path.read_text())["models"]
        == adamerging_recipe(fit, "base", [f"model_{i}" for i in range(3)])["models"]
    )
    fit.info["ties"] = True  # AdaMerging++ replays from its saved fit only
    assert write_learned_recipe(fit, fitted_recipe, tmp_path / "none") is None


def test_coefficients_clamp_and_task_wise_sharing():
    c = Coefficients(["x", "y"], 2, "task", init=0.3, clamp=True)
    with torch.no_grad():
        c.raw.copy_(torch.tensor([[1.7, -0.4]]))
    per_tensor = c.per_tensor()
    assert torch.equal(per_tensor["x"], torch.tensor([1.0, 0.0])) and torch.equal(
        per_tensor["x"], per_tensor["y"]
    )
    c.reset()
    assert torch.equal(c.raw, torch.full((1, 2), 0.3))


# --- AdaMerging on the tiny zoo ------------------------------------------------------------------------------


def test_adamerging_fit_lowers_the_entropy_and_keeps_lambda_in_unit_interval(toy):
    base, experts, tasks = toy
    fit = fit_state_dicts(base, experts, "adamerging", tasks, steps=30, lr=0.05, batch_size=48)
    losses = [p["loss"] for p in fit.info["loss"]]
    assert losses[-1] < 0.8 * losses[0]  # full-batch steps: the same inputs every step
    table = torch.stack([fit.tensors[f"lambda.{n}"] for n in base])
    assert table.min() >= 0 and table.max() == 1  # clamped, and the clamp is active
    unclamped = fit_state_dicts(
        base, experts, "adamerging", tasks, steps=30, lr=0.05, batch_size=48, clamp=False
    )
    assert max(float(unclamped.tensors[f"lambda.{n}"].max()) for n in base) > 1
    assert fit.info["examples"] == {t.name: len(t.data) for t in tasks}


def test_layer_fit_covers_every_mergeable_tensor(setup, layer_fit):
    _, _, tasks = setup
    names = tasks[0].model.merge_names()
    assert {f"lambda.{n}" for n in names} <= set(layer_fit.tensors)
    assert all(layer_fit.tensors[f"lambda.{n}"].shape == (2,) for n in names)


def test_merge_is_what_was_learned(setup, layer_fit):
    base, experts, tasks = setup
    merged = merge_state_dicts(base, experts, "adamerging", fitted=layer_fit)
    names = tasks[0].model.merge_names()
    learned = merged_params(
        {n: base[n] for n in names},
        task_vectors({n: base[n] for n in names}, experts),
        None,
        {n: layer_fit.tensors[f"lambda.{n}"] for n in names},
    )
    for n in names:
        torch.testing.assert_close(merged[n], learned[n])
    # and the replayed plain recipe merges the same tensors
    recipe = adamerging_recipe(layer_fit, "base", ["model_0", "model_1"])
    replayed = _merge_recipe(recipe, base, experts)
    for n in merged:
        torch.testing.assert_close(replayed[n], merged[n], rtol=1e-6, atol=1e-6)


def test_task_wise_lambdas_are_equal_across_tensors(setup):
    base, experts, tasks = setup
    fit = fit_state_dicts(base, experts, "adamerging", tasks, granularity="task", **FAST)
    rows = [v for k, v in fit.tensors.items() if k.startswith("lambda.")]
    assert all(torch.equal(r, fit.tensors[FALLBACK_LAMBDA]) for r in rows)
    assert fit.info["lambda"] == [float(v) for v in fit.tensors[FALLBACK_LAMBDA]]


def test_same_seed_same_fit(setup):
    base, experts, tasks = setup
    params = {"steps": 3, "batch_size": 8, "ties": True}
    one = fit_state_dicts(base, experts, "adamerging", tasks, seed=3, **params)
    two = fit_state_dicts(base, experts, "adamerging", tasks, seed=3, **params)
    assert one.tensors.keys() == two.tensors.keys()
    assert all(torch.equal(one.tensors[k], two.tensors[k]) for k in one.tensors)
    assert one.info["loss"] == two.info["loss"]


def test_plus_plus_merge_is_what_was_learned(setup):
    base, experts, tasks = setup
    fit = fit_state_dicts(base, experts, "adamerging", tasks, ties=True, steps=2, batch_size=8)
    names = tasks[0].model.merge_names()
    sub_base = {n: base[n] for n in names}
    thresholds, majority = ties_statistics(sub_base, [{n: e[n] for n in names} for e in experts], 0.2)
    assert torch.equal(fit.tensors["ties.thresholds"], torch.tensor(thresholds))
    vectors = selected_vectors(sub_base, experts, thresholds, majority)
    learned = merged_params(sub_base, vectors, None, {n: fit.tensors[f"lambda.{n}"] for n in names})
    merged = merge_state_dicts(base, experts, "adamerging", ties=True, fitted=fit)
    for n in names:
        torch.testing.assert_close(merged[n], learned[n])


# --- Concrete masks --------------------------------------------------------------------------------------------


def test_relaxed_bernoulli_matches_torch_rsample():
    logits = torch.linspace(-3, 3, 50).reshape(5, 10)
    torch.manual_seed(11)  # the default generator and a fresh one with the same seed draw the same uniforms
    reference = torch.distributions.RelaxedBernoulli(torch.tensor(0.5), logits=logits).rsample()
    ours = relaxed_bernoulli(logits, 0.5, torch.Generator().manual_seed(11))
    torch.testing.assert_close(ours, reference)


def test_concrete_mask_shapes_range_and_rescaling():
    base, _ = hand_made()
    mask = ConcreteMask(base, init_logit=0.0, temperature=0.5)
    raw = mask.sample_unscaled(torch.Generator().manual_seed(0))
    scaled = mask.sample(torch.Generator().manual_seed(0))
    for n, t in base.items():
        assert raw[n].shape == t.shape and scaled[n].shape == t.shape
        assert ((raw[n] > 0) & (raw[n] < 1)).all()
        torch.testing.assert_close(scaled[n], raw[n] / raw[n].mean())
        torch.testing.assert_close(scaled[n].mean(), torch.tensor(1.0))
    for kind in ("continuous", "discrete", "expected"):
        final = mask.final(kind, torch.Generator().manual_seed(1))
        assert all(not m.requires_grad and torch.isclose(m.mean(), torch.tensor(1.0)) for m in final.values())
    assert rescale_by_mean({"z": torch.zeros(3)})["z"].eq(0).all()


def test_inner_lambda_step_leaves_the_mask_alone(setup):
    base, experts, tasks = setup
    names = tasks[0].model.merge_names()
    sub_base = {n: base[n] for n in names}
    vectors = task_vectors(sub_base, experts)
    mask = ConcreteMask(sub_base)
    coefficients = Coefficients(names, 2, "task", init=0.3, clamp=False)
    optimizer = torch.optim.Adam([coefficients.raw], lr=1.0)
    with torch.no_grad():
        coefficients.raw.fill_(5.0)  # reset to the init before the step
    batch = [batches(t.data, 8)[0] for t in tasks]
    inner_lambda_step(
        tasks,
        sub_base,
        vectors,
        mask.sample(torch.Generator().manual_seed(0)),
        batch,
        coefficients,
        optimizer,
    )
    assert all(x.grad is None for x in mask.parameters())
    # Adam's first step moves every coordinate by lr (sign of its gradient): 0.3 ± 1
    assert torch.allclose((coefficients.raw.detach() - 0.3).abs(), torch.ones(1, 2), atol=1e-4)


def test_concrete_task_arithmetic_learns_a_mask_that_lowers_the_entropy(toy):
    base, experts, tasks = toy
    fit = fit_state_dicts(
        base,
        experts,
        "concrete_task_arithmetic",
        tasks,
        steps=30,
        lr=0.1,
        batch_size=48,
        eval_mask_type="expected",
    )
    vectors = task_vectors(base, experts)
    full = [batches(t.data, len(t.data))[0] for t in tasks]
    untrained = ConcreteMask(base).expected()  # all ones
    learned = {n: fit.tensors[f"mask.{n}"] for n in base}
    with torch.no_grad():
        before = entropy_loss(tasks, merged_params(base, vectors, untrained, torch.full((2,), 0.3)), full)
        after = entropy_loss(tasks, merged_params(base, vectors, learned, torch.full((2,), 0.3)), full)
    assert after < 0.9 * before
    losses = [p["loss"] for p in fit.info["loss"]]
    assert losses[-1] < losses[0]
    for n in base:
        torch.testing.assert_close(learned[n].mean(), torch.tensor(1.0))
        assert torch.equal(fit.tensors[f"lambda.{n}"], torch.full((2,), 0.3))
    merged = merge_state_dicts(base, experts, "concrete_task_arithmetic", fitted=fit)
    for n in base:
        torch.testing.assert_close(merged[n], base[n] + sum(0.3 * learned[n] * v[n] for v in vectors))


def test_concrete_adamerging_runs_and_returns_mask_and_lambdas(setup):
    base, experts, tasks = setup
    fit = fit_state_dicts(
        base, experts, "concrete_adamerging", tasks, meta_steps=3, adamerging_steps=3, batch_size=8
    )
    names = tasks[0].model.merge_names()
    assert set(fit.tensors) == {f"mask.{n}" for n in names} | {f"lambda.{n}" for n in names} | {
        FALLBACK_LAMBDA
    }
    assert all(
        fit.tensors[f"lambda.{n}"].shape == (2,) and fit.tensors[f"mask.{n}"].shape == base[n].shape
        for n in names
    )
    assert len(fit.info["meta_loss"]) == 2 and len(fit.info["loss"]) == 2  # steps 0 and the last
    merged = merge_state_dicts(base, experts, "concrete_adamerging", fitted=fit)
    n = names[0]
    expected = base[n] + sum(
        lam * fit.tensors[f"mask.{n}"] * (e[n] - base[n])
        for lam, e in zip(fit.tensors[f"lambda.{n}"], experts)
    )
    torch.testing.assert_close(merged[n], expected)
