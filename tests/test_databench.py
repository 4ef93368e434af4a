"""The data-driven benchmark and the backdoor scenario, end to end on the tiny zoo (few steps)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def zoo_copy(tiny_zoo, tmp_path_factory):
    """The backdoor scenario writes poisoned experts into the zoo: work on a copy."""
    import shutil

    from mergesmith.zoo.text8 import Zoo

    root = tmp_path_factory.mktemp("zoo-copy") / "text8"
    shutil.copytree(tiny_zoo.root, root)
    return Zoo(root)


def test_data_bench_rows_and_reports(zoo_copy, tmp_path):
    from mergesmith.zoo import databench
    from mergesmith.zoo.bench import write_reports

    only = ["task_arithmetic", "regmean", "adamerging", "twin"]
    data = databench.run_data_bench(zoo_copy, seeds=2, step_scale=0.004, only=only, progress=False,
                                    checkpoint=tmp_path / "part.json")
    assert list(data["methods"]) == only
    assert len(data["methods"]["adamerging"]["runs"]) == 2  # learned: one run per seed
    assert len(data["methods"]["task_arithmetic"]["runs"]) == 1  # deterministic anchor: one run
    for key, row in data["methods"].items():
        assert 0.0 <= row["average"] <= 1.0 and set(row["accuracy"]) == {"a", "b"}, key
        assert row["average"] == pytest.approx(sum(row["accuracy"].values()) / 2)
    assert data["methods"]["regmean"]["examples"] > 0 and data["methods"]["regmean"]["fit_seconds"] >= 0
    # a rerun with the checkpoint does not recompute finished rows
    again = databench.run_data_bench(zoo_copy, seeds=2, step_scale=0.004, only=only, progress=False,
                                     checkpoint=tmp_path / "part.json")
    assert again["methods"] == json.loads((tmp_path / "part.json").read_text())["methods"]

    backdoor = databench.run_backdoor_bench(zoo_copy, step_scale=0.002, progress=False, poisoned={"a": 0})
    assert set(backdoor["methods"]) == {"task_arithmetic", "ties", "adamerging", "concrete_adamerging", "dam"}
    for row in backdoor["methods"].values():
        assert 0.0 <= row["asr"]["a"] <= 1.0

    from mergesmith.zoo.bench import run_bench

    paths = write_reports(run_bench(zoo_copy, ["linear"], seeds=1, progress=False, search=False), tmp_path, "tiny")
    databench.attach(paths["json"], data, backdoor)
    table = paths["md"].read_text()
    assert "`regmean`" in table and "ASR a" in table and "fit s" in table
    assert (tmp_path / "tiny-data.png").stat().st_size > 1000
    stored = json.loads(paths["json"].read_text())
    assert stored["data_methods"]["methods"].keys() == data["methods"].keys() and "backdoor" in stored
