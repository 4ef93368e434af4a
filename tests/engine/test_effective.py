"""No silent differences (mergekit users): the parameters in effect written out, one notice line where the paper
and mergekit disagree on an unset parameter, mergekit's no-op keys accepted with a notice, filters that match
nothing and out-of-range values named by their recipe key and model."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from mergesmith import merge
from mergesmith.cli import main
from mergesmith.errors import RecipeError
from mergesmith.methods.registry import get_method
from tests.helpers import load_tensors


def ties(llamas, **extra) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas["a"])}, {"model": str(llamas["b"])}],
        **extra,
    }


def notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mergesmith"]


def test_unset_paper_defaults_are_announced_and_written_out(llamas, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mergesmith")
    result = merge(ties(llamas, parameters={"lambda": 1.0}), tmp_path / "paper", progress=False)
    (line,) = notices(caplog)
    assert line.startswith("notice: ties: unset parameters take the paper's values density=0.2")
    assert "trim_scope=global" in line and "mergekit: density=1.0" in line and "--compat mergekit" in line
    assert result.notices == (line.removeprefix("notice: "),)
    manifest = json.loads((tmp_path / "paper" / "manifest.json").read_text())
    assert manifest["notices"] == list(result.notices)
    written = yaml.safe_load((tmp_path / "paper" / "mergesmith_recipe.yaml").read_text())
    params = written["parameters"]
    assert params["density"] == 0.2 and params["trim_scope"] == "global" and params["sign_zero"] == "majority"
    assert "density: 0.2" in (tmp_path / "paper" / "README.md").read_text()
    # the written recipe is explicit: under mergekit's compat it still gives the same merge, silently
    caplog.clear()
    merge({**written, "compat": "mergekit"}, tmp_path / "again", progress=False)
    assert notices(caplog) == []
    assert_same_tensors(tmp_path / "paper", tmp_path / "again")
    # mergekit's compat: its values, no notice, and they are written out too
    merge(ties(llamas, compat="mergekit"), tmp_path / "mk", progress=False)
    assert notices(caplog) == []
    params = yaml.safe_load((tmp_path / "mk" / "mergesmith_recipe.yaml").read_text())["parameters"]
    assert params["density"] == 1.0 and params["trim_scope"] == "tensor"


def assert_same_tensors(first, second) -> None:
    a, b = load_tensors(first), load_tensors(second)
    assert a.keys() == b.keys()
    for name in a:
        assert bool((a[name] == b[name]).all()), name


def test_every_model_setting_counts(llamas, tmp_path, caplog):
    """A per-model parameter set on one model still falls back for the other: announced; set on both: not."""
    caplog.set_level(logging.WARNING, logger="mergesmith")
    recipe = ties(llamas, parameters={"sign_zero": "majority", "trim_scope": "global"})
    recipe["models"][0]["parameters"] = {"density": 0.5}
    merge(recipe, tmp_path / "one", progress=False)
    assert "density=0.2" in notices(caplog)[0]
    caplog.clear()
    recipe["models"][1]["parameters"] = {"density": 0.4}
    merge(recipe, tmp_path / "both", progress=False)
    assert notices(caplog) == []


def test_density_gradient_trims_per_tensor(llamas, tmp_path, caplog):
    """The README's first recipe: a density gradient cannot be one global top-k, so an unset trim_scope becomes
    'tensor', said in a notice; set to global explicitly, the conflict is an error."""
    caplog.set_level(logging.WARNING, logger="mergesmith")
    recipe = ties(llamas, parameters={"density": [0.1, 0.3]})
    merge(recipe, tmp_path / "grad", progress=False)
    assert any(
        "parameters.density varies over tensors, so trim_scope is 'tensor'" in n for n in notices(caplog)
    )
    written = yaml.safe_load((tmp_path / "grad" / "mergesmith_recipe.yaml").read_text())
    assert written["parameters"]["trim_scope"] == "tensor"
    explicit = ties(llamas, parameters={"density": [0.1, 0.3], "trim_scope": "tensor"})
    merge(explicit, tmp_path / "explicit", progress=False)
    assert_same_tensors(tmp_path / "grad", tmp_path / "explicit")
    with pytest.raises(RecipeError, match="trim_scope: global"):
        merge(
            ties(llamas, parameters={"density": [0.1, 0.3], "trim_scope": "global"}),
            tmp_path / "x",
            progress=False,
        )


def test_mergekit_noop_keys_run_with_a_notice(llamas, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mergesmith")
    merge(
        ties(llamas, compat="mergekit", parameters={"int8_mask": True}), tmp_path / "masked", progress=False
    )
    assert any("parameters.int8_mask: a mergekit memory option" in n for n in notices(caplog))
    merge(ties(llamas, compat="mergekit"), tmp_path / "plain", progress=False)
    assert_same_tensors(tmp_path / "masked", tmp_path / "plain")
    caplog.clear()
    stock = {
        "merge_method": "model_stock",
        "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas[k]), "parameters": {"weight": 0.5}} for k in ("a", "b")],
    }
    merge(stock, tmp_path / "stock", progress=False)
    assert any("models[0]" in n and "model_stock has no per-model weights" in n for n in notices(caplog))


def test_filter_matching_nothing_is_an_error(llamas, tmp_path):
    recipe = ties(llamas, compat="mergekit")
    recipe["models"][1]["parameters"] = {"weight": [{"filter": "self_atn", "value": 0.8}, {"value": 0.5}]}
    with pytest.raises(
        RecipeError, match=r"models\[1\] \(.*/b\)\.parameters\.weight: filter 'self_atn' matches"
    ):
        merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_value_errors_name_the_key_and_the_model(llamas, tmp_path, capsys):
    recipe = ties(llamas, compat="mergekit")
    recipe["models"][1]["parameters"] = {"density": [0.5, 1.5]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {path}: models[1] ({llamas['b']}).parameters.density: parameter 'density' must be <= 1.0, "
        "got 1.5"
    ]


def test_output_parent_folders_are_created(llamas, tmp_path):
    merge(ties(llamas, compat="mergekit"), tmp_path / "a" / "b" / "out", progress=False)
    assert (tmp_path / "a" / "b" / "out" / "config.json").exists()


def test_known_parameters_are_listed_once():
    with pytest.raises(RecipeError) as e:
        get_method("dare_ties").check_param_name("rescal", "parameters")
    known = str(e.value)
    with pytest.raises(RecipeError) as e:
        get_method("dare_ties").check_param_name("zzz", "parameters")
    listed = str(e.value).split("known: ")[1].split(", ")
    assert len(listed) == len(set(listed)) and "rescale" in listed and "rescale" in known
