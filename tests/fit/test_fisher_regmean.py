"""Fisher merging and RegMean: the statistics against closed forms, the rules against their equations, and
end-to-end merges on the tiny text zoo."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mergesmith.api import fit_state_dicts, merge_state_dicts
from mergesmith.errors import RecipeError
from mergesmith.fit.data import Encoded
from mergesmith.fit.fisher import diagonal_fisher, fisher_key, global_l2_norm, norm_key
from mergesmith.fit.gram import gram_key, gram_matrices
from mergesmith.fit.task import FitResult, TaskModel
from mergesmith.methods.regmean import reduce_non_diagonal, regmean_solve

# --- a softmax regression small enough to differentiate by hand -------------------------------------------------


class SoftmaxRegression(nn.Module):
    """p(y|x) = softmax(W x + b), x = the mean of fixed token features over the example's non-padding tokens."""

    def __init__(self, features: torch.Tensor, classes: int):
        super().__init__()
        self.register_buffer("features", features)
        self.linear = nn.Linear(features.shape[1], classes)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.features.dtype)
        return (self.features[input_ids] * mask).sum(1) / mask.sum(1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.linear(self.pooled(input_ids, attention_mask)))


def softmax_setup(n: int = 7, vocab: int = 9, dim: int = 4, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    module = SoftmaxRegression(torch.randn(vocab, dim, generator=g), classes)
    lengths = torch.randint(1, 5, (n,), generator=g)
    width = int(lengths.max())
    ids = torch.randint(1, vocab, (n, width), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = ids * mask  # padding positions hold token 0
    data = Encoded(ids, mask, torch.randint(0, classes, (n,), generator=g))
    params = {
        "linear.weight": torch.randn(classes, dim, generator=g),
        "linear.bias": torch.randn(classes, generator=g),
    }
    x = module.pooled(ids, mask)
    probs = (x @ params["linear.weight"].T + params["linear.bias"]).softmax(-1)
    return TaskModel(module), params, data, x, probs


def test_exact_fisher_matches_closed_form():
    # E_y[(∂ log p_y / ∂W_cj)²] = Σ_y p_y (1[y=c] − p_c)² x_j² = p_c (1 − p_c) x_j²
    model, params, data, x, p = softmax_setup()
    result = diagonal_fisher(model, params, data, "exact", chunk_size=3)  # chunks with padding inside
    n = len(data)
    expected_w = torch.einsum("nc,nj->cj", p * (1 - p), x.square()) / n
    expected_b = (p * (1 - p)).sum(0) / n
    assert result.per_example == "vmap" and result.examples == n
    torch.testing.assert_close(result.fisher["linear.weight"], expected_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.fisher["linear.bias"], expected_b, atol=1e-6, rtol=1e-5)


def test_empirical_fisher_matches_closed_form():
    model, params, data, x, p = softmax_setup(seed=1)
    result = diagonal_fisher(model, params, data, "empirical", chunk_size=2)
    residual = nn.functional.one_hot(data.labels, p.shape[1]).float() - p  # ∂ log p_y / ∂z_c = 1[y=c] − p_c
    expected_w = torch.einsum("nc,nj->cj", residual.square(), x.square()) / len(data)
    torch.testing.assert_close(result.fisher["linear.weight"], expected_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.fisher["linear.bias"], residual.square().mean(0), atol=1e-6, rtol=1e-5)


def test_batch_fisher_matches_its_definition():
    # g_B = ∇ Σ_n Σ_y sqrt(p_ny) log p_ny: ∂/∂z_c = Σ_y sqrt(p_y)(1[y=c] − p_c) = sqrt(p_c) − p_c Σ_y sqrt(p_y)
    model, params, data, x, p = softmax_setup(seed=2)
    result = diagonal_fisher(model, params, data, "batch", chunk_size=3)
    dz = p.sqrt() - p * p.sqrt().sum(1, keepdim=True)
    expected = sum((dz[i : i + 3].T @ x[i : i + 3]).square() for i in range(0, len(data), 3)) / len(data)
    torch.testing.assert_close(result.fisher["linear.weight"], expected, atol=1e-6, rtol=1e-5)


def test_exact_fisher_on_hf_model_matches_naive_backward(tiny_zoo):
    # HF BERT cannot run under vmap (mask-dependent control flow): the per-example loop must still be exact.
    task = tiny_zoo.task("a", "train", 3)
    params = tiny_zoo.state_dict(tiny_zoo.encoder_path("a"))
    params = {n: params[n].float() for n in task.model.merge_names()}
    result = diagonal_fisher(task.model, params, task.data, "exact", chunk_size=2)
    assert result.per_example == "loop"
    names = ["encoder.layer.0.attention.self.query.weight", "embeddings.LayerNorm.bias"]
    expected = {n: torch.zeros_like(params[n]) for n in names}
    for k in range(len(task.data)):
        example = task.data.batch(slice(k, k + 1))
        leaves = {n: p.clone().requires_grad_(n in names) for n, p in params.items()}
        logp = task.model.logits(example, leaves)[0].log_softmax(-1)
        for c in range(logp.shape[0]):
            grads = torch.autograd.grad(logp[c], [leaves[n] for n in names], retain_graph=True)
            for n, g in zip(names, grads, strict=True):
                expected[n] += logp[c].exp().detach() * g.square()
    for n in names:
        torch.testing.assert_close(result.fisher[n], expected[n] / len(task.data), atol=1e-9, rtol=1e-4)


def test_empirical_needs_labels(tiny_zoo):
    sd = tiny_zoo.state_dict(tiny_zoo.encoder_path("a"))
    with pytest.raises(RecipeError, match="empirical"):
        fit_state_dicts(
            None, [sd], "fisher", [tiny_zoo.task("a", "train", 2, labeled=False)], estimator="empirical"
        )


# --- the Fisher merge rule on hand-made tensors -----------------------------------------------------------------


def fisher_fit(fishers: list[dict[str, torch.Tensor]]) -> FitResult:
    tensors = {fisher_key(i, n): f for i, fs in enumerate(fishers) for n, f in fs.items()}
    tensors.update({norm_key(i): torch.tensor([global_l2_norm(fs)]) for i, fs in enumerate(fishers)})
    return FitResult(tensors)


@pytest.mark.parametrize("favor", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_rule_equation(favor: bool, normalize: bool):
    theta = [
        {"w": torch.tensor([1.0, 2.0, 3.0, -1.0]), "buf": torch.tensor([1.0, 5.0])},
        {"w": torch.tensor([3.0, -2.0, 0.5, 4.0]), "buf": torch.tensor([3.0, 1.0])},
    ]
    # entry 2: both Fishers are zero (only the floor decides); entry 3: the target's is below the floor
    fishers = [{"w": torch.tensor([0.5, 2.0, 0.0, 1e-8])}, {"w": torch.tensor([1.5, 1.0, 0.0, 0.25])}]
    weights, floor = [0.3, 0.7], 1e-6
    merged = merge_state_dicts(
        None,
        theta,
        "fisher",
        fitted=fisher_fit(fishers),
        weight=weights,
        favor_target_model=favor,
        normalize_fishers=normalize,
        fisher_floor=floor,
    )
    norms = [float(fishers[i]["w"].norm()) for i in range(2)]
    lam = [weights[i] / norms[i] if normalize else weights[i] for i in range(2)]
    num, den = torch.zeros(4), torch.zeros(4)
    for i in range(2):
        f = fishers[i]["w"].clamp_min(floor) if (i == 0 or not favor) else fishers[i]["w"]
        num += lam[i] * f * theta[i]["w"]
        den += lam[i] * f
    torch.testing.assert_close(merged["w"], num / den)
    if favor:  # all Fishers tiny: the target's value wins
        assert merged["w"][2] == theta[0]["w"][2]
    else:  # all floored alike: the λ-weighted average
        assert float(merged["w"][2]) == pytest.approx((lam[0] * 3.0 + lam[1] * 0.5) / (lam[0] + lam[1]))
    # a tensor without a Fisher is the λ-weighted average
    torch.testing.assert_close(merged["buf"], (0.3 * theta[0]["buf"] + 0.7 * theta[1]["buf"]) / 1.0)


def test_fisher_rule_zero_denominator_falls_back_to_average():
    theta = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
    fishers = [{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([0.0, 2.0])}]
    merged = merge_state_dicts(None, theta, "fisher", fitted=fisher_fit(fishers), weight=[0.0, 1.0])
    # entry 0: λ_target = 0 and the donor's Fisher is 0 → average (= the donor, the only weighted model)
    torch.testing.assert_close(merged["w"], torch.tensor([3.0, 6.0]))


def zoo_experts(zoo) -> list[dict[str, torch.Tensor]]:
    """The zoo's two experts, the second moved by seeded noise so that the two surely differ everywhere."""
    a, b = (zoo.state_dict(zoo.encoder_path(t)) for t in ("a", "b"))
    g = torch.Generator().manual_seed(0)
    return [
        a,
        {
            n: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for n, v in b.items()
        },
    ]


def test_fisher_end_to_end_on_tiny_zoo(tiny_zoo):
    experts = zoo_experts(tiny_zoo)
    tasks = [tiny_zoo.task("a", "train", 16), tiny_zoo.task("b", "train", 16)]
    fit = fit_state_dicts(None, experts, "fisher", tasks, fisher_batch_size=4)
    assert fit.info["examples"] == [16, 16] and fit.info["per_example_gradients"] == ["loop", "loop"]
    assert all(fit.info["fisher_norms"][i] > 0 for i in range(2))
    merged = merge_state_dicts(None, experts, "fisher", tasks=tasks, fisher_batch_size=4)
    assert set(merged) == set(experts[0])
    for name, value in merged.items():  # a coordinate-wise convex combination stays between the experts
        if not value.is_floating_point():
            continue
        low, high = (
            torch.minimum(experts[0][name], experts[1][name]),
            torch.maximum(*(e[name] for e in experts)),
        )
        assert bool(((value >= low - 1e-6) & (value <= high + 1e-6)).all()), name
    torch.testing.assert_close(merge_state_dicts(None, experts, "fisher", fitted=fit), merged)
    for estimator, path in (
        ("empirical", "loop"),
        ("batch", "batch"),
    ):  # the other estimators run on HF models
        few = [tiny_zoo.task("a", "train", 4), tiny_zoo.task("b", "train", 4)]
        other = fit_state_dicts(None, experts, "fisher", few, estimator=estimator)
        assert other.info["per_example_gradients"] == [path, path] and min(other.info["fisher_norms"]) > 0


# --- RegMean ----------------------------------------------------------------------------------------------------


def least_squares_problem(seed: int = 0, d_in: int = 5, d_out: int = 3, rows=(8, 11)):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(r, d_in, generator=g, dtype=torch.float64) for r in rows]
    ws = [torch.randn(d_in, d_out, generator=g, dtype=torch.float64) for _ in rows]
    return xs, ws


@pytest.mark.parametrize("coefficients", [[1.0, 1.0], [0.25, 2.0]])
def test_regmean_is_the_least_squares_solution(coefficients):
    # argmin_W Σ c_i ‖X_i W − X_i W_i‖²: scaling X_i by sqrt(c_i) gives one stacked least-squares problem
    xs, ws = least_squares_problem()
    merged = regmean_solve([x.T @ x for x in xs], ws, coefficients, alpha=1.0)
    a = torch.cat([c**0.5 * x for c, x in zip(coefficients, xs, strict=True)])
    b = torch.cat([c**0.5 * x @ w for c, x, w in zip(coefficients, xs, ws, strict=True)])
    reference = torch.linalg.lstsq(a, b).solution
    torch.testing.assert_close(merged, reference, atol=1e-6, rtol=0)


def test_regmean_alpha_zero_is_the_diagonal_weighted_average():
    xs, ws = least_squares_problem(seed=1)
    grams = [x.T @ x for x in xs]
    merged = regmean_solve(grams, ws, [1.0, 1.0], alpha=0.0)
    d = [g.diagonal()[:, None] for g in grams]
    torch.testing.assert_close(merged, (d[0] * ws[0] + d[1] * ws[1]) / (d[0] + d[1]), atol=1e-12, rtol=0)
    g = grams[0]
    torch.testing.assert_close(reduce_non_diagonal(g, 0.3).diagonal(), g.diagonal())
    off = ~torch.eye(len(g), dtype=torch.bool)
    torch.testing.assert_close(reduce_non_diagonal(g, 0.3)[off], 0.3 * g[off])


def test_regmean_singular_system_keeps_the_average_where_no_input_reaches():
    xs, ws = least_squares_problem(seed=2)
    xs = [
        torch.cat([x[:, :4], torch.zeros(len(x), 1, dtype=x.dtype)], 1) for x in xs
    ]  # feature 4 never active
    merged = regmean_solve([x.T @ x for x in xs], ws, [1.0, 3.0], alpha=1.0)
    assert bool(torch.isfinite(merged).all())
    torch.testing.assert_close(merged[4], (ws[0][4] + 3 * ws[1][4]) / 4)
    reference = regmean_solve([x[:, :4].T @ x[:, :4] for x in xs], [w[:4] for w in ws], [1.0, 3.0], alpha=1.0)
    torch.testing.assert_close(merged[:4], reference, atol=1e-6, rtol=0)


def test_regmean_rule_layouts_and_averages():
    # nn.Linear weights are [out, in]; HF Conv1D weights are [in, out] (listed in the fit's info["transposed"])
    xs, ws = least_squares_problem(seed=3)
    grams = [x.T @ x for x in xs]
    theta = [
        {
            "lin.weight": w.T.contiguous(),
            "conv.weight": w,
            "lin.bias": torch.full((3,), float(i), dtype=w.dtype),
        }
        for i, w in enumerate(ws)
    ]
    fit = FitResult(
        {gram_key(i, n): g for i, g in enumerate(grams) for n in ("lin.weight", "conv.weight")},
        {"transposed": ["conv.weight"]},
    )
    merged = merge_state_dicts(None, theta, "regmean", fitted=fit, alpha=1.0, weight=[1.0, 2.0])
    expected = regmean_solve(grams, ws, [1.0, 2.0], 1.0)
    torch.testing.assert_close(merged["lin.weight"], expected.T)
    torch.testing.assert_close(merged["conv.weight"], expected)
    torch.testing.assert_close(merged["lin.bias"], torch.full((3,), 2.0 / 3.0, dtype=torch.float64))


def test_regmean_model_without_a_gram_has_no_inputs_there():
    """A model whose forward never reaches a layer has no Gram for it: its term of the objective is zero, so
    the layer is the others' least-squares solution (here: the one model that reaches it)."""
    xs, ws = least_squares_problem(seed=4)
    theta = [{"lin.weight": w.T.contiguous()} for w in ws]
    fit = FitResult({gram_key(0, "lin.weight"): xs[0].T @ xs[0]}, {})
    merged = merge_state_dicts(None, theta, "regmean", fitted=fit, alpha=1.0)
    torch.testing.assert_close(merged["lin.weight"], ws[0].T)


class TinyTagger(nn.Module):
    """Embedding → Linear → ReLU → HF Conv1D → masked mean → Linear: real inputs for the Gram hooks."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.up = nn.Linear(4, 6)
        self.conv = Conv1D(5, 6)  # nf = out, nx = in; weight [6, 5]
        self.classifier = nn.Linear(5, 2)

    def forward(self, input_ids, attention_mask):
        hidden = self.conv(torch.relu(self.up(self.embed(input_ids))))
        mask = attention_mask.unsqueeze(-1).float()
        return SimpleNamespace(logits=self.classifier((hidden * mask).sum(1) / mask.sum(1)))


@pytest.mark.parametrize("include_padding", [False, True])
def test_gram_hooks_measure_the_real_inputs(include_padding: bool):
    torch.manual_seed(0)
    module = TinyTagger()
    model = TaskModel(module)
    params = model.params()
    ids = torch.randint(1, 10, (5, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] * 2 + [0] * 4, [1] * 6])
    data = Encoded(ids, mask, torch.zeros(5, dtype=torch.long))
    grams = gram_matrices(model, params, data, batch_size=2, include_padding=include_padding)
    assert grams.transposed == ["conv.weight"] and set(grams.grams) == {
        "up.weight",
        "conv.weight",
        "classifier.weight",
    }
    with torch.no_grad():
        rows = []
        for start in range(0, 5, 2):  # the same batches, each trimmed to its longest example
            b = data.batch(slice(start, start + 2))
            keep = (
                torch.ones_like(b.attention_mask, dtype=torch.bool)
                if include_padding
                else b.attention_mask.bool()
            )
            e = module.embed(b.input_ids)
            hidden = torch.relu(module.up(e))
            m = b.attention_mask.unsqueeze(-1).float()
            pooled = (module.conv(hidden) * m).sum(1) / m.sum(1)  # one row per example, padding never counts
            rows.append((e[keep], hidden[keep], pooled))
    for name, index in (("up.weight", 0), ("conv.weight", 1), ("classifier.weight", 2)):
        x = torch.cat([r[index] for r in rows]).double()
        torch.testing.assert_close(grams.grams[name], x.T @ x / len(x))
    assert grams.examples == 5


def test_regmean_end_to_end_on_tiny_zoo(tiny_zoo, tmp_path):
    experts = zoo_experts(tiny_zoo)
    tasks = [tiny_zoo.task("a", "train", 16), tiny_zoo.task("b", "train", 16)]
    fit = fit_state_dicts(None, experts, "regmean", tasks)
    query = "encoder.layer.0.attention.self.query.weight"
    assert gram_key(0, query) in fit.tensors and fit.info["examples"] == [16, 16]
    fit.save(tmp_path / "fit.safetensors")
    replayed = merge_state_dicts(
        None, experts, "regmean", fitted=FitResult.load(tmp_path / "fit.safetensors")
    )
    merged = merge_state_dicts(None, experts, "regmean", tasks=tasks)
    assert set(merged) == set(experts[0])
    torch.testing.assert_close(replayed, merged)
    assert all(bool(torch.isfinite(v).all()) for v in merged.values() if v.is_floating_point())
    # the merged query layer reproduces both experts' outputs better than the plain average (its objective)
    grams = [fit.tensors[gram_key(i, query)].double() for i in range(2)]

    def objective(w):
        return sum(
            torch.trace((w - e[query]).double() @ g @ (w - e[query]).double().T)
            for e, g in zip(experts, grams)
        )

    exact = merge_state_dicts(None, experts, "regmean", fitted=fit, alpha=1.0)
    assert objective(exact[query]) < objective((experts[0][query] + experts[1][query]) / 2)
    # merging a model with itself gives it back
    same = merge_state_dicts(None, [experts[0], experts[0]], "regmean", tasks=[tasks[0], tasks[0]])
    torch.testing.assert_close(same, experts[0], atol=1e-5, rtol=1e-4)
