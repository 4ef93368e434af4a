"""``mergesmith multi``: merges that name earlier merges run in dependency order (whatever the file's order),
equal to running them one by one; an unchanged rerun reuses every merge; changing one recipe redoes it and what
reads it, not the others; cycles, repeated names and a missing --out are one-line errors."""

from __future__ import annotations

import pytest
import torch
import yaml

from mergesmith import merge
from mergesmith.api.multi import run_multi
from mergesmith.cli import main
from mergesmith.errors import RecipeError
from tests.helpers import load_tensors


def documents(llamas, weight: float = 0.5) -> list[dict]:
    base, a, b, c = (str(llamas[k]) for k in ("base", "a", "b", "c"))
    return [
        # the final merge first: it reads both named merges below
        {
            "merge_method": "linear",
            "models": [
                {"model": "ab", "parameters": {"weight": 1.0}},
                {"model": "bc", "parameters": {"weight": 1.0}},
            ],
        },
        {
            "name": "bc",
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": b}, {"model": c}],
        },
        {
            "name": "ab",
            "merge_method": "linear",
            "models": [
                {"model": a, "parameters": {"weight": weight}},
                {"model": b, "parameters": {"weight": 1.0}},
            ],
        },
    ]


def write(path, docs) -> None:
    path.write_text(yaml.safe_dump_all(docs))


def test_multi_runs_in_dependency_order_and_caches(llamas, tmp_path, capsys):
    config = tmp_path / "multi.yaml"
    write(config, documents(llamas))
    code = main(
        ["multi", str(config), "-I", str(tmp_path / "mid"), "--out", str(tmp_path / "final"), "--quiet"]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    order = [line.split(":")[0] for line in lines]
    assert (
        sorted(order[:2]) == ["ab", "bc"] and order[2] == "(final)"
    )  # both before the merge that reads them
    # the same as merging one by one
    docs = documents(llamas)
    merge({k: v for k, v in docs[2].items() if k != "name"}, tmp_path / "ab", progress=False)
    merge({k: v for k, v in docs[1].items() if k != "name"}, tmp_path / "bc", progress=False)
    final = {
        **docs[0],
        "models": [{"model": str(tmp_path / m), "parameters": {"weight": 1.0}} for m in ("ab", "bc")],
    }
    merge(final, tmp_path / "by-hand", progress=False)
    got, want = load_tensors(tmp_path / "final"), load_tensors(tmp_path / "by-hand")
    assert all(torch.equal(got[k], want[k]) for k in want)

    # unchanged: every merge reused
    results = run_multi(config, tmp_path / "mid", tmp_path / "final", report=lambda _: None, progress=False)
    assert results == {"ab": None, "bc": None, "(final)": None}
    # one recipe changed: it and the final merge are redone, bc is reused
    write(config, documents(llamas, weight=0.25))
    results = run_multi(config, tmp_path / "mid", tmp_path / "final", report=lambda _: None, progress=False)
    assert results["bc"] is None and results["ab"] is not None and results["(final)"] is not None


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d[1]["models"].append({"model": "ab"}), "the merges form a cycle"),
        (lambda d: d[2].update(name="bc"), "the name 'bc' is used by two merges"),
        (lambda d: d[1].pop("name"), "more than one merge has no name"),
    ],
)
def test_bad_multi_files(llamas, tmp_path, change, message):
    docs = documents(llamas)
    if "cycle" in message:
        docs[2]["models"][1] = {"model": "bc"}  # ab reads bc, bc reads ab
        docs[1]["models"][1] = {"model": "ab"}
    else:
        change(docs)
    write(tmp_path / "m.yaml", docs)
    with pytest.raises(RecipeError, match=message):
        run_multi(tmp_path / "m.yaml", tmp_path / "mid", tmp_path / "out", report=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_final_merge_needs_out(llamas, tmp_path):
    write(tmp_path / "m.yaml", documents(llamas))
    with pytest.raises(RecipeError, match="needs --out"):
        run_multi(tmp_path / "m.yaml", tmp_path / "mid", None, report=lambda _: None)
