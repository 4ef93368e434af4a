"""Continual merging: OPCM's step against a dense computation, the λ_t / norm bookkeeping against an in-memory
reference of the official algorithm, the baselines' rules, atomic adds, reproducibility, constant inputs per add,
and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergesmith.cli import main
from mergesmith.drivers import continual
from mergesmith.drivers.continual import add_model, export_state, init_state, read_state, state_tensors
from mergesmith.errors import CheckpointError, MergeError, RecipeError
from mergesmith.methods.opcm import is_linear_weight, project_out, split_rank
from tests.helpers import build_llama, load_tensors

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("continual")
    base = build_llama(root / "base", 0, layers=2)
    return {"base": base, **{f"m{i}": build_llama(root / f"m{i}", i + 1, base, layers=2) for i in range(4)}}


def test_split_rank_and_projection_against_a_dense_computation():
    assert (
        split_rank(torch.tensor([5.0, 3.0, 2.0]), 0.5) == 1
    )  # shares 0.5, 0.8, 1.0: first above 0.5 is index 1
    assert split_rank(torch.tensor([5.0, 3.0, 2.0]), 0.1) == 0
    g = torch.Generator().manual_seed(0)
    for shape in ((6, 4), (4, 6), (5, 5)):  # tall (an LM head), wide, square
        merged, task = (
            torch.randn(*shape, generator=g, dtype=torch.float64),
            torch.randn(*shape, generator=g, dtype=torch.float64),
        )
        cleaned = project_out(merged, task, 0.5)
        # the official form: the full SVD, P's diagonal and dominant block zeroed, rebuilt with the full factors
        u, s, vh = torch.linalg.svd(merged, full_matrices=True)
        before, after = u.T @ task @ vh.T, u.T @ cleaned @ vh.T
        k = split_rank(s, 0.5)
        expected = before.clone()
        for i in range(min(shape)):
            expected[i, i] = 0
        expected[:k, :k] = 0
        torch.testing.assert_close(after, expected)
        torch.testing.assert_close(cleaned, u @ expected @ vh)
        assert k >= 1 and before[:k, :k].abs().sum() > 0  # the block removed held something
    merged = torch.zeros(4, 4)
    assert is_linear_weight("model.layers.0.mlp.up_proj.weight", merged)
    assert not is_linear_weight("model.embed_tokens.weight", merged) and not is_linear_weight(
        "x.bias", task[0]
    )


def reference_opcm(base: dict, models: list[dict], alpha: float = 0.5) -> tuple[dict, float]:
    """The official algorithm in memory (fusion_bench OPCMForCLIP), on state dicts."""
    merged = dict(models[0])
    norm = lambda sd: sum(float((sd[k].double() - base[k].double()).pow(2).sum()) for k in base) ** 0.5  # noqa: E731
    norms, lam = [norm(models[0])], 1.0
    for model in models[1:]:
        norms.append(norm(model))
        mean = sum(norms) / len(norms)
        new = {}
        for k in base:
            prev_tv, tv = merged[k] - base[k], model[k] - base[k]
            if is_linear_weight(k, base[k]):
                tv = project_out(prev_tv, tv, alpha)
            new[k] = base[k] + lam * prev_tv + tv
        merged_norm = norm(new)
        lam = merged_norm / mean
        merged = {k: base[k] + (new[k] - base[k]) * (mean / merged_norm) for k in base}
    return merged, lam


def test_opcm_state_follows_the_official_algorithm(models, tmp_path):
    state_dir = tmp_path / "state"
    init_state(str(models["base"]), state_dir, "opcm")
    add_model(state_dir, str(models["m0"]))
    first = state_tensors(state_dir)
    assert all(
        torch.equal(first[k], v) for k, v in load_tensors(models["m0"]).items()
    )  # one model: that model
    for name in ("m1", "m2"):
        add_model(state_dir, str(models[name]))
    base = load_tensors(models["base"])
    expected, lam = reference_opcm(base, [load_tensors(models[f"m{i}"]) for i in range(3)])
    found = state_tensors(state_dir)
    for k in base:
        torch.testing.assert_close(found[k], expected[k], rtol=1e-5, atol=1e-6)
    state = read_state(state_dir)
    assert state.lam == pytest.approx(lam, rel=1e-6) and len(state.norms) == 3
    merged_norm = sum(float((found[k].double() - base[k].double()).pow(2).sum()) for k in base) ** 0.5
    assert merged_norm == pytest.approx(sum(state.norms) / 3, rel=1e-5)  # rescaled to the mean norm
    assert [h["model"] for h in state.history] == [str(models[f"m{i}"]) for i in range(3)]
    assert sorted(p.name for p in state_dir.iterdir()) == ["merged-3", "state.json"]


def test_the_baselines_follow_their_rules(models, tmp_path):
    base = load_tensors(models["base"])
    tv = [{k: v - base[k] for k, v in load_tensors(models[f"m{i}"]).items()} for i in range(2)]
    for method, expected in (
        ("task_arithmetic", {k: base[k] + 0.3 * (tv[0][k] + tv[1][k]) for k in base}),
        ("average", {k: base[k] + (tv[0][k] + tv[1][k]) / 2 for k in base}),
    ):
        state_dir = tmp_path / method
        init_state(str(models["base"]), state_dir, method)
        for i in range(2):
            add_model(state_dir, str(models[f"m{i}"]))
        found = state_tensors(state_dir)
        for k in base:
            torch.testing.assert_close(found[k], expected[k], rtol=1e-5, atol=1e-6)
    ties = tmp_path / "ties"
    init_state(str(models["base"]), ties, "ties", {"lambda": 0.5})
    add_model(ties, str(models["m0"]))
    found = state_tensors(ties)
    for k in base:  # the first step: θ₀ + λ τ_1
        torch.testing.assert_close(found[k], base[k] + 0.5 * tv[0][k], rtol=1e-5, atol=1e-6)
    add_model(ties, str(models["m1"]))
    assert read_state(ties).count == 2


def test_a_failed_add_leaves_the_previous_state_byte_identical(models, tmp_path, monkeypatch):
    state_dir = tmp_path / "state"
    init_state(str(models["base"]), state_dir, "opcm")
    add_model(state_dir, str(models["m0"]))
    before = {p.relative_to(state_dir): p.read_bytes() for p in state_dir.rglob("*") if p.is_file()}
    real = continual._run
    calls = []

    def failing(recipe, out, method=None):
        calls.append(out)
        if len(calls) == 2:  # after the OPCM step, before the rescaled merge
            raise OSError("disk full (injected)")
        return real(recipe, out, method)

    monkeypatch.setattr(continual, "_run", failing)
    with pytest.raises(OSError, match="injected"):
        add_model(state_dir, str(models["m1"]))
    after = {
        p.relative_to(state_dir): p.read_bytes()
        for p in state_dir.rglob("*")
        if p.is_file() and ".work" not in p.parts
    }
    assert after == before
    monkeypatch.setattr(continual, "_run", real)
    assert add_model(state_dir, str(models["m1"])).count == 2  # the next add cleans up and goes on
    assert not (state_dir / ".work").exists()


def test_the_same_inputs_give_byte_identical_states_and_exports(models, tmp_path):
    outputs = []
    for run in ("a", "b"):
        state_dir = tmp_path / f"state-{run}"
        init_state(str(models["base"]), state_dir, "opcm")
        for i in range(3):
            add_model(state_dir, str(models[f"m{i}"]))
        export_state(state_dir, tmp_path / f"out-{run}", progress=False)
        outputs.append(state_dir)
    a, b = outputs
    for path in (a / "merged-3" / "model.safetensors", a / "merged-3" / "config.json"):
        assert path.read_bytes() == (b / path.relative_to(a)).read_bytes()
    state_a = json.loads((a / "state.json").read_text())
    state_b = json.loads((b / "state.json").read_text())
    for h in state_a["history"] + state_b["history"]:
        h.pop("seconds")
    assert state_a == state_b
    assert (tmp_path / "out-a" / "model.safetensors").read_bytes() == (
        tmp_path / "out-b" / "model.safetensors"
    ).read_bytes()
    manifest = json.loads((tmp_path / "out-a" / "manifest.json").read_text())
    assert manifest["method"] == "continual" and len(manifest["continual"]["models"]) == 3


def test_each_add_reads_three_models_at_most(models, tmp_path, monkeypatch):
    """Constant memory: whatever the number of models absorbed, a step's merges read the base, the running merge
    and the new model (tensor by tensor, through the engine)."""
    read = []
    real = continual.merge

    def spy(recipe, out, **kwargs):
        read.append(
            len(
                {m["model"] for m in recipe["models"]}
                | ({recipe["base_model"]} if "base_model" in recipe else set())
            )
        )
        return real(recipe, out, **kwargs)

    monkeypatch.setattr(continual, "merge", spy)
    state_dir = tmp_path / "state"
    init_state(str(models["base"]), state_dir, "opcm")
    for i in range(4):
        add_model(state_dir, str(models[f"m{i}"]))
    assert max(read) <= 3 and len(read) == 1 + 3 * 2


def test_bad_input_is_one_line(models, tmp_path, capsys):
    state_dir = tmp_path / "state"
    assert (
        main(["continual", "init", str(models["base"]), str(state_dir), "--method", "opcm", "--alpha", "0.3"])
        == 0
    )
    assert read_state(state_dir).params == {"alpha": 0.3}
    assert main(["continual", "add", str(state_dir), str(models["m0"])]) == 0
    assert main(["continual", "add", str(state_dir), str(models["m0"])]) == 2
    assert "already added (model 1 of this state" in capsys.readouterr().err
    other = build_llama(tmp_path / "wide", 9, layers=3)
    with pytest.raises(CheckpointError):
        add_model(state_dir, str(other))
    assert read_state(state_dir).count == 1
    with pytest.raises(MergeError, match="exists and is not empty"):
        init_state(str(models["base"]), state_dir, "opcm")
    with pytest.raises(RecipeError, match="average has no parameter 'alpha'"):
        init_state(str(models["base"]), tmp_path / "x", "average", {"alpha": 0.5})
    data = json.loads((state_dir / "state.json").read_text())
    data["mergesmith_version"] = "0.0.1"
    (state_dir / "state.json").write_text(json.dumps(data))
    with pytest.raises(MergeError, match=r"written by mergesmith 0\.0\.1"):
        add_model(state_dir, str(models["m1"]))
    with pytest.raises(MergeError, match="no continual state here"):
        read_state(tmp_path / "nothing")
    assert main(["continual", "export", str(tmp_path / "empty-state"), str(tmp_path / "o")]) == 2
