"""The data-driven benchmark and the backdoor scenario, end to end on the tiny zoo (few steps)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def zoo_copy(tiny_zoo, tmp_path_factory):
    """The backdoor scenario writes poisoned experts into the zoo: work on a copy."""
    import shutil

    from mergesmith.bench.zoo.text8 import Zoo

    root = tmp_path_factory.mktemp("zoo-copy") / "text8"
    shutil.copytree(tiny_zoo.root, root)
    return Zoo(root)


def test_every_data_row_has_a_validation_grid_of_its_own_params():
    """The issue asks for every method at its paper defaults *and* at validation-chosen settings."""
    from mergesmith.bench.zoo import databench
    from mergesmith.methods.registry import get_method

    for row in databench.rows(step_scale=0.02):
        names = {p.name for p in get_method(row.method).params}
        assert row.search, row.key
        assert set(row.params) <= names, row.key
        for overrides in row.search:
            assert set(overrides) <= names, (row.key, overrides)
        assert len({repr(sorted(o.items())) for o in row.search}) == len(row.search), row.key  # no repeats
        assert set(row.merge_only) <= names, row.key
    fisher = next(r for r in databench.rows() if r.key == "fisher")
    assert len(fisher.search) == 4 and set(fisher.merge_only) == {"normalize_fishers", "favor_target_model"}
    # a grid point that spells out the method's defaults is the default row: its runs are reused, not rerun
    assert databench._same_setting(fisher, {**fisher.params, **fisher.search[0]})
    assert not databench._same_setting(fisher, {**fisher.params, **fisher.search[-1]})


def test_data_bench_rows_and_reports(zoo_copy, tmp_path):
    from mergesmith.bench.zoo import databench
    from mergesmith.bench.zoo.bench import write_reports

    only = ["task_arithmetic", "regmean", "adamerging", "twin"]
    data = databench.run_data_bench(
        zoo_copy, seeds=2, step_scale=0.004, only=only, progress=False, checkpoint=tmp_path / "part.json"
    )
    # every grid row gets a "(val)" row chosen on validation, right after its default row
    assert list(data["methods"]) == [
        "task_arithmetic",
        "task_arithmetic_val",
        "regmean",
        "regmean_val",
        "adamerging",
        "adamerging_val",
        "twin",
        "twin_val",
    ]
    grid = data["methods"]["regmean_val"]["val_grid"]
    assert [g["params"]["alpha"] for g in grid] == [0.1, 0.5, 0.9, 1.0]
    best = max(grid, key=lambda g: g["val_average"])["params"]["alpha"]
    assert data["methods"]["regmean_val"]["params"]["alpha"] == best
    assert len(data["methods"]["regmean"]["runs"]) == 2  # calibration statistics: one run per seed
    assert data["lr_scale"] == pytest.approx(1 / 0.004)
    assert data["methods"]["adamerging"]["params"]["lr"] == pytest.approx(1e-3 / 0.004)
    assert len(data["methods"]["adamerging"]["runs"]) == 2  # learned: one run per seed
    assert len(data["methods"]["task_arithmetic"]["runs"]) == 1  # deterministic anchor: one run
    for key, row in data["methods"].items():
        assert 0.0 <= row["average"] <= 1.0 and set(row["accuracy"]) == {"a", "b"}, key
        assert row["average"] == pytest.approx(sum(row["accuracy"].values()) / 2)
    assert data["methods"]["regmean"]["examples"] > 0 and data["methods"]["regmean"]["fit_seconds"] >= 0
    # a rerun with the checkpoint does not recompute finished rows
    again = databench.run_data_bench(
        zoo_copy, seeds=2, step_scale=0.004, only=only, progress=False, checkpoint=tmp_path / "part.json"
    )
    assert again["methods"] == json.loads((tmp_path / "part.json").read_text())["methods"]

    saved = tmp_path / "backdoor.json"
    first = databench.run_backdoor_bench(
        zoo_copy, step_scale=0.002, progress=False, poisoned={"a": 0}, checkpoint=saved
    )
    assert set(first["methods"]) == {"task_arithmetic", "ties", "adamerging", "concrete_adamerging", "dam"}
    for row in first["methods"].values():
        assert 0.0 <= row["asr"]["a"] <= 1.0
    # more seeds later: the checkpoint's runs are kept and only the missing seeds run
    backdoor = databench.run_backdoor_bench(
        zoo_copy, seeds=2, step_scale=0.002, progress=False, poisoned={"a": 0}, checkpoint=saved
    )
    for key, row in backdoor["methods"].items():
        learned = key not in ("task_arithmetic", "ties")
        assert [r["seed"] for r in row["runs"]] == ([0, 1] if learned else [0]), key
        assert row["runs"][0] == first["methods"][key]["runs"][0], key
        assert row["asr"]["a"] == pytest.approx(sum(r["asr"]["a"] for r in row["runs"]) / len(row["runs"]))
    assert json.loads(saved.read_text())["methods"] == backdoor["methods"]
    assert "| runs |" in databench.backdoor_markdown(backdoor)
    # the settings the data bench's validation chose add "_val" rows, each after its default row
    chosen = databench.validation_choices(data)
    assert chosen["task_arithmetic"] == data["methods"]["task_arithmetic_val"]["params"]
    with_val = databench.run_backdoor_bench(
        zoo_copy,
        seeds=2,
        step_scale=0.002,
        progress=False,
        poisoned={"a": 0},
        checkpoint=saved,
        chosen=chosen,
    )
    assert list(with_val["methods"]) == [
        "task_arithmetic",
        "task_arithmetic_val",
        "ties",
        "adamerging",
        "adamerging_val",
        "concrete_adamerging",
        "dam",
    ]
    assert with_val["methods"]["task_arithmetic_val"]["params"] == chosen["task_arithmetic"]
    assert with_val["methods"]["dam"] == backdoor["methods"]["dam"]  # resumed, not rerun
    backdoor = with_val
    alone = databench.run_backdoor_bench(
        zoo_copy, step_scale=0.002, progress=False, poisoned={"a": 0}, only=["task_arithmetic"]
    )
    assert list(alone["methods"]) == ["task_arithmetic"]
    assert alone["methods"]["task_arithmetic"]["asr"] == backdoor["methods"]["task_arithmetic"]["asr"]

    from mergesmith.bench.zoo.bench import run_bench

    paths = write_reports(
        run_bench(zoo_copy, ["linear"], seeds=1, progress=False, search=False), tmp_path, "tiny"
    )
    databench.attach(paths["json"], data, backdoor)
    table = paths["md"].read_text()
    assert "`regmean`" in table and "ASR a" in table and "fit s" in table
    assert (tmp_path / "tiny-data.png").stat().st_size > 1000
    stored = json.loads(paths["json"].read_text())
    assert stored["data_methods"]["methods"].keys() == data["methods"].keys() and "backdoor" in stored


def test_seeds_read_disjoint_calibration_windows(tiny_zoo):
    from mergesmith.bench.zoo.databench import DataBench

    bench = DataBench(tiny_zoo, progress=False)
    task = tiny_zoo.tasks[0]
    n = len(tiny_zoo.split(task, "train"))
    first, second = (bench.tasks("train", n // 2, False, offset=s * (n // 2))[0].data for s in (0, 1))
    full = tiny_zoo.split(task, "train")
    assert (first.input_ids == full.input_ids[: n // 2]).all()
    assert (second.input_ids == full.input_ids[n // 2 : 2 * (n // 2)]).all()
    # past the end the window slides back to the last full window instead of failing on a small zoo
    last = bench.tasks("train", n // 2, False, offset=5 * n)[0].data
    assert (last.input_ids == full.input_ids[n - n // 2 :]).all()
    with pytest.raises(ValueError, match="asked for"):
        tiny_zoo.split(task, "train", n, offset=1)


def test_checks_rerun_a_row_with_a_compromise_undone_and_resume_by_seed(tiny_zoo, tmp_path):
    from mergesmith.bench.zoo import databench
    from mergesmith.bench.zoo.bench import run_bench, write_reports
    from mergesmith.bench.zoo.databench import Check
    from mergesmith.errors import MergeError

    data = databench.run_data_bench(
        tiny_zoo, seeds=2, step_scale=0.004, only=["adamerging", "fisher"], progress=False, search=False
    )
    checks = (
        Check("longer", "adamerging", "twice the steps at half the rate", step_scale=0.008, seeds=2),
        Check("fisher_n8", "fisher", "8 texts per task", n_examples=8),
    )
    row = databench.check_row(checks[0])
    assert row.params["steps"] == 2 * data["methods"]["adamerging"]["params"]["steps"]
    assert row.params["lr"] == pytest.approx(data["methods"]["adamerging"]["params"]["lr"] / 2)
    fisher = databench.check_row(checks[1])
    assert (
        fisher.params["n_examples"] == fisher.limit == 8
        and fisher.params != next(r for r in databench.rows() if r.key == "fisher").params
    )

    out = databench.run_checks(tiny_zoo, tmp_path, progress=False, checks=checks, row_step_scale=0.004)
    saved = tmp_path / f"{tiny_zoo.manifest['zoo']}-check-longer.json"
    longer = json.loads(saved.read_text())
    assert [r["seed"] for r in longer["runs"]] == [0, 1] and longer["params"] == row.params
    # the row it changes, rerun beside it on the same build: the data bench's runs, bit for bit
    assert longer["build"] == tiny_zoo.weights_digest()
    assert [r["accuracy"] for r in longer["baseline_runs"]] == [
        r["accuracy"] for r in data["methods"]["adamerging"]["runs"]
    ]
    assert out["fisher_n8"]["runs"][0]["examples"] == 8 * len(tiny_zoo.tasks)
    assert out["longer"]["entry"]["normalized"] == pytest.approx(
        sum(r["normalized"] for r in longer["runs"]) / 2
    )
    # a stopped check resumes at the next seed: seed 0's saved run is kept, seed 1 runs again, bit-identically
    marked = {**longer["runs"][0], "marker": True}
    saved.write_text(json.dumps({**longer, "runs": [marked]}))
    again = databench.run_checks(
        tiny_zoo, tmp_path, only=["longer"], progress=False, checks=checks, row_step_scale=0.004
    )
    assert list(again) == ["longer"]
    assert (
        again["longer"]["runs"][0]["marker"]
        and again["longer"]["runs"][1]["accuracy"] == longer["runs"][1]["accuracy"]
    )

    with pytest.raises(MergeError, match=r"unknown check.*nope.*the checks are longer, fisher_n8"):
        databench.run_checks(tiny_zoo, tmp_path, only=["nope"], progress=False, checks=checks)

    table = databench.checks_markdown(out, data)
    steps, lr = row.params["steps"], row.params["lr"]
    assert (
        f"| `longer` | `adamerging` | twice the steps at half the rate (steps={steps}, lr={lr}) | 2 |"
        in table
    )
    assert "| `fisher_n8` | `fisher` | 8 texts per task (n_examples=8) | 1 |" in table
    assert table.count("\n") == 2 + len(checks)
    paths = write_reports(
        run_bench(tiny_zoo, ["linear"], seeds=1, progress=False, search=False), tmp_path, "tiny"
    )
    databench.attach(paths["json"], data, None)
    databench.attach(paths["json"], None, None, {"longer": out["longer"]})
    databench.attach(
        paths["json"], None, None, {"fisher_n8": out["fisher_n8"]}
    )  # merged with the saved checks
    stored = json.loads(paths["json"].read_text())
    assert set(stored["data_checks"]) == {"longer", "fisher_n8"}
    assert "## Checks" in paths["md"].read_text() and "`fisher_n8`" in paths["md"].read_text()
