"""``mergesmith evolve``: the search space ↔ recipe round trip, CMA-ES on a toy fitness, resume = uninterrupted,
the in-memory candidate = the recipe merged to disk, a killed Ray worker survived, and the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mergesmith.api.pipeline import merge
from mergesmith.api.state_dicts import load_in_memory, merge_recipe_in_memory
from mergesmith.cli import main
from mergesmith.drivers.evolve.candidates import Evaluator, make_space
from mergesmith.drivers.evolve.search import HISTORY, MODEL, PLOT, RECIPE, evolve, run_cma
from mergesmith.drivers.evolve.space import ParameterSpace
from mergesmith.errors import MergeError, RecipeError
from mergesmith.recipe.search import load_search
from tests.helpers import load_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

CLOSENESS = "tests.drivers.evolve_kinds:closeness"


def search(llamas: dict[str, Path], **changes) -> dict:
    """TIES over two fine-tunes, per block of 2 layers, scored by closeness to a third fine-tune."""
    spec = {
        "merge_method": "ties",
        "base_model": str(llamas["base"]),
        "models": [str(llamas["a"]), str(llamas["b"])],
        "layer_granularity": 2,
        "fitness": {"kind": CLOSENESS, "target": str(llamas["c"])},
        "optimizer": {"budget": 8, "popsize": 4},
    }
    spec.update(changes)
    return spec


def one_generation(llamas: dict[str, Path], out: Path) -> None:
    """A search of one generation of four candidates, in this process, without the merged model."""
    evolve(
        search(llamas, optimizer={"budget": 4, "popsize": 4}),
        out,
        ray=False,
        progress=False,
        write_model=False,
    )


def test_a_genome_gives_the_recipe_it_says(llamas):
    """Each coordinate lands in its block's slice, model and filter entry as low + x·(high − low); x outside
    [0, 1] is clipped; and the merge applies each block's weights to that block's layers only."""
    spec = load_search(
        search(
            llamas,
            merge_method="linear",
            base_model=None,
            filters=["self_attn"],
            ranges={"weight": [0.2, 1.0]},
            parameters={"normalize": False},
        )
    )
    space = ParameterSpace(spec, num_layers=4)
    assert space.size == 2 * 2 * 2  # blocks × models × (filter + fallback), weight only
    x = np.random.default_rng(0).uniform(-0.2, 1.2, space.size)
    recipe = space.recipe(x)
    assert [s["sources"][0]["layer_range"] for s in recipe["slices"]] == [[0, 2], [2, 4]]
    for c, value in zip(space.coordinates, x, strict=True):
        entries = recipe["slices"][c.group]["sources"][c.model]["parameters"][c.param]
        entry = next(e for e in entries if e.get("filter") == c.filter)
        assert entry["value"] == pytest.approx(0.2 + 0.8 * min(max(value, 0), 1), abs=1e-6)
    state, _ = merge_recipe_in_memory(recipe, load_in_memory(spec.models))
    a, b = load_tensors(llamas["a"]), load_tensors(llamas["b"])
    for name, group, filter_ in (
        ("model.layers.1.self_attn.q_proj.weight", 0, "self_attn"),
        ("model.layers.3.mlp.up_proj.weight", 1, None),
    ):
        wa, wb = (
            next(
                e["value"]
                for e in recipe["slices"][group]["sources"][m]["parameters"]["weight"]
                if e.get("filter") == filter_
            )
            for m in (0, 1)
        )
        torch.testing.assert_close(state[name], wa * a[name] + wb * b[name], rtol=1e-6, atol=1e-7)


def test_smooth_values_become_gradients_over_the_layers(llamas):
    spec = load_search(search(llamas, smooth=True, layer_granularity=1))
    space = ParameterSpace(spec, num_layers=4)
    recipe = space.recipe(np.full(space.size, 0.5))
    assert "slices" not in recipe
    first = recipe["models"][0]["parameters"]
    assert first["weight"] == [0.5] * 4 and first["density"] == [0.55] * 4  # density's range [0.1, 1]
    assert recipe["models"][-1] == {"model": str(llamas["base"])}


def test_the_in_memory_candidate_equals_the_recipe_merged_to_disk(llamas, tmp_path):
    spec = load_search(search(llamas, merge_method="dare_ties", filters=["mlp"]))
    evaluator = Evaluator(spec)
    x = np.random.default_rng(1).uniform(0, 1, evaluator.space.size)
    state, config = evaluator.merged(x)
    merge(evaluator.space.recipe(x), tmp_path / "out", progress=False)
    on_disk = load_tensors(tmp_path / "out")
    assert state.keys() == on_disk.keys()
    for name, tensor in on_disk.items():
        assert torch.equal(state[name], tensor), name
    assert config["num_hidden_layers"] == 4


def test_cma_es_reaches_the_optimum_of_a_toy_fitness():
    target = np.array([0.2, 0.7, 0.5, 0.9, 0.1])

    def evaluate(genomes, g):
        return [{"fitness": -float(np.sum((np.asarray(x) - target) ** 2))} for x in genomes]

    history = run_cma(np.full(5, 0.5), 0.2, 0, 10, 60, evaluate, [], lambda h: None)
    best = max((r["fitness"], x) for gen in history for r, x in zip(gen["results"], gen["genomes"]))
    assert best[0] > -1e-6
    np.testing.assert_allclose(best[1], target, atol=1e-3)


def test_a_resumed_cma_run_equals_an_uninterrupted_one():
    """Stopped after 3 generations and resumed from the saved history, the run asks the same genomes and ends
    the same, although the evaluations in between consume numpy's global generator."""

    def evaluate(genomes, g):
        np.random.rand(7)  # an evaluator that draws from numpy's global generator
        return [{"fitness": -float(np.sum((np.asarray(x) - 0.3) ** 2))} for x in genomes]

    full = run_cma(np.full(4, 0.5), 1 / 6, 3, 6, 6, evaluate, [], lambda h: None)
    saved: list = []

    def stop_after_three(genomes, g):
        if g == 3:
            raise KeyboardInterrupt
        return evaluate(genomes, g)

    with pytest.raises(KeyboardInterrupt):
        run_cma(np.full(4, 0.5), 1 / 6, 3, 6, 6, stop_after_three, [], lambda h: saved.append(json.dumps(h)))
    recorded = json.loads(saved[-1])
    assert len(recorded) == 3
    resumed = run_cma(np.full(4, 0.5), 1 / 6, 3, 6, 6, evaluate, recorded, lambda h: None)
    assert json.dumps(resumed) == json.dumps(full)


def test_evolve_writes_the_search_folder_and_resumes_to_the_uninterrupted_result(llamas, tmp_path):
    spec = search(llamas)
    result = evolve(spec, tmp_path / "s", ray=False, progress=False)
    out = tmp_path / "s"
    for name in (HISTORY, RECIPE, PLOT, "search.yaml", f"{MODEL}/manifest.json"):
        assert (out / name).exists(), name
    assert result.evaluations == 8 and result.generations == 2
    history = json.loads((out / HISTORY).read_text())
    g, i = history["best"]["generation"], history["best"]["index"]
    assert history["best"]["fitness"] == max(
        r["fitness"] for gen in history["generations"] for r in gen["results"]
    )
    # the best recipe file and the merged model are that candidate's
    recipe = yaml.safe_load((out / RECIPE).read_text())
    state, _ = merge_recipe_in_memory(recipe, load_in_memory(recipe_models(recipe)))
    space = make_space(load_search(spec))
    assert recipe == space.recipe(np.asarray(history["generations"][g]["genomes"][i]))
    on_disk = load_tensors(out / MODEL)
    assert all(torch.equal(state[n], t) for n, t in on_disk.items())

    # one more generation on --resume equals a 3-generation search from scratch
    longer = evolve(spec, out, resume=True, budget=12, ray=False, progress=False, write_model=False)
    fresh = evolve(
        search(llamas, optimizer={"budget": 12, "popsize": 4}),
        tmp_path / "f",
        ray=False,
        progress=False,
        write_model=False,
    )
    assert longer.generations == fresh.generations == 3
    a, b = (json.loads((p / HISTORY).read_text())["generations"] for p in (out, tmp_path / "f"))
    assert [gen["genomes"] for gen in a] == [gen["genomes"] for gen in b]
    assert [[r["fitness"] for r in gen["results"]] for gen in a] == [
        [r["fitness"] for r in gen["results"]] for gen in b
    ]
    assert longer.best_recipe == fresh.best_recipe


def recipe_models(recipe: dict) -> list[str]:
    return list(dict.fromkeys(src["model"] for s in recipe["slices"] for src in s["sources"]))


def test_a_killed_ray_worker_is_survived(llamas, tmp_path):
    """The first evaluation kills its Ray worker process; the actor restarts, the evaluation is retried, and the
    search ends as the same search in one process does."""
    pytest.importorskip("ray")
    local = evolve(search(llamas), tmp_path / "local", ray=False, progress=False, write_model=False)
    fitness = {
        "kind": "tests.drivers.evolve_kinds:dies_once",
        "target": str(llamas["c"]),
        "marker": str(tmp_path / "died"),
    }
    on_ray = evolve(
        search(llamas, fitness=fitness), tmp_path / "ray", workers=2, progress=False, write_model=False
    )
    assert (tmp_path / "died").exists()  # a worker was killed mid-evaluation
    a, b = (json.loads((tmp_path / p / HISTORY).read_text()) for p in ("local", "ray"))
    assert [[r["fitness"] for r in g["results"]] for g in a["generations"]] == [
        [r["fitness"] for r in g["results"]] for g in b["generations"]
    ]
    assert on_ray.best_recipe == local.best_recipe
    assert b["workers"] == 2


def test_a_ray_worker_that_cannot_start_is_one_line_and_writes_nothing(llamas, tmp_path):
    """An evaluator whose construction fails in the workers (a missing setting) stops the search with the
    worker's own one-line error, before the search folder is written; an unknown kind fails before any starts."""
    pytest.importorskip("ray")
    with pytest.raises(RecipeError, match=r"^fitness .*: missing setting 'target'$"):
        evolve(search(llamas, fitness={"kind": CLOSENESS}), tmp_path / "s", workers=2, progress=False)
    with pytest.raises(RecipeError, match="unknown evaluator kind 'bogus'"):
        evolve(search(llamas, fitness={"kind": "bogus"}), tmp_path / "s", workers=2, progress=False)
    assert not (tmp_path / "s").exists()


def test_bad_input_is_one_line(llamas, tmp_path):
    cases = [
        (
            search(llamas, ranges={"density": [0.0, 1.5]}),
            RecipeError,
            r"ranges.density: \[0.0, 1.5\] is outside",
        ),
        (search(llamas, ranges={"weight": [1.0, 0.0]}), RecipeError, "low <= high"),
        (search(llamas, fitness={"kind": "bogus"}), RecipeError, "unknown evaluator kind 'bogus'"),
        (
            search(llamas, fitness={"kind": "tests.drivers.evolve_kinds:not_finite"}),
            RecipeError,
            "returned nan",
        ),
        (search(llamas, search=["lambda_x"]), RecipeError, "no parameter 'lambda_x'"),
        (search(llamas, layer_granularity=3), RecipeError, "does not divide the models' 4 layers"),
        (search(llamas, optimizer={"budget": 3, "popsize": 4}), RecipeError, "less than one generation"),
        (search(llamas, merge_method="fisher"), RecipeError, "learns from data"),
    ]
    for n, (spec, error, message) in enumerate(cases):
        with pytest.raises(error, match=message) as caught:
            evolve(spec, tmp_path / f"bad{n}", ray=False, progress=False)
        assert "\n" not in str(caught.value)
    # an existing search folder is not overwritten without --resume
    one_generation(llamas, tmp_path / "s")
    with pytest.raises(MergeError, match="pass --resume"):
        evolve(search(llamas), tmp_path / "s", ray=False, progress=False)
    with pytest.raises(MergeError, match="other settings"):
        evolve(search(llamas, seed=5), tmp_path / "s", resume=True, ray=False, progress=False)


def test_the_cli_runs_a_search_and_refuses_bad_input_in_one_line(llamas, tmp_path, capsys):
    path = tmp_path / "SEARCH.yaml"
    path.write_text(yaml.safe_dump(search(llamas, optimizer={"budget": 4, "popsize": 4})))
    assert main(["evolve", str(path), str(tmp_path / "out"), "--no-ray", "--quiet", "--no-model"]) == 0
    assert "best fitness" in capsys.readouterr().out
    path.write_text(yaml.safe_dump(search(llamas, fitness={"kind": "nope"})))
    assert main(["evolve", str(path), str(tmp_path / "out2"), "--no-ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "unknown evaluator kind 'nope'" in err and "\n" not in err


def test_a_dataflow_search_finds_a_path_and_writes_a_model_transformers_runs(llamas, tmp_path):
    """DFS over two fine-tunes: the initial path is model a (4 layers); the fitness wants 6 layers; the best
    path's recipe (passthrough slices, scales folded) is merged to a folder that transformers loads and runs."""
    from transformers import AutoModelForCausalLM

    spec = {
        "space": "dataflow",
        "models": [str(llamas["a"]), str(llamas["b"])],
        "dataflow": {"repeats": 2},
        "fitness": {"kind": "tests.drivers.evolve_kinds:layers_near", "layers": 6},
        "optimizer": {"budget": 60, "popsize": 10, "sigma0": 0.3},
    }
    result = evolve(spec, tmp_path / "dfs", ray=False, progress=False)
    assert result.best_fitness == 0
    history = json.loads((tmp_path / "dfs" / HISTORY).read_text())
    assert history["generations"][0]["results"][0]["fitness"] is not None
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dfs" / MODEL)
    assert model.config.num_hidden_layers == 6
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    assert result.best_recipe["merge_method"] == "passthrough"
    # PS + DFS: the parameter-space output is one of the next search's models
    assert make_space(load_search({**spec, "models": [str(tmp_path / "dfs" / MODEL), str(llamas["c"])]})).size


def test_a_dataflow_search_refuses_models_it_cannot_fold(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=8)).save_pretrained(
        tmp_path / "g"
    )
    spec = {
        "space": "dataflow",
        "models": [str(tmp_path / "g")],
        "fitness": {"kind": "perplexity", "data": "x.txt"},
    }
    with pytest.raises(RecipeError, match="model_type 'gpt2'"):
        evolve(spec, tmp_path / "out", ray=False, progress=False)
    with pytest.raises(RecipeError, match="remove merge_method"):
        load_search({**spec, "merge_method": "ties"})


def test_a_search_in_this_process_leaves_its_thread_count_as_it_was(llamas, tmp_path):
    """The evaluator runs with ``threads`` torch threads; in this process it must not change the caller's (a
    later computation would round differently)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one_generation(llamas, tmp_path / "s")
        assert torch.get_num_threads() == 2
        with pytest.raises(RecipeError):
            evolve(search(llamas, fitness={"kind": "nope"}), tmp_path / "t", ray=False, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
