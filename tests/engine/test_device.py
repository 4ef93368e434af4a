"""``--device``: the rules run where their inputs are.

No GPU is needed for the main property. A rule that makes a tensor with a factory (``torch.zeros``,
``torch.tensor``, ...) and no ``device=`` gets the default device, i.e. the CPU, beside inputs on the GPU: a
cross-device error, or a silent copy back. With torch's default device set to ``meta``, such a tensor is on
``meta`` instead beside CPU inputs, which fails the same way — so every recipe of the golden set (every method)
merging byte-identically under a ``meta`` default device shows that every rule builds its tensors on its
inputs' device. The CUDA comparison runs where a GPU exists (skipped here otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mergesmith import merge
from mergesmith.engine.device import resolve_device
from mergesmith.engine.execute import DeviceTensors
from mergesmith.errors import MergeError
from tests.api import test_golden_outputs as golden


def _all_recipes(inputs: dict[str, dict[str, Path]]) -> dict[str, dict[str, Any]]:
    """The golden recipes (every method that has a golden case) and mergekit's four later methods."""
    llama = {k: str(v) for k, v in inputs["llama"].items()}
    three = [{"model": llama[f"e{i}"]} for i in range(3)]
    return golden.recipes(inputs) | {
        "sce": {"merge_method": "sce", "base_model": llama["base"], "models": three},
        "multislerp": {"merge_method": "multislerp", "base_model": llama["base"], "models": three},
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": llama["base"],
            "parameters": {"t": 0.01},
            "models": [{"model": llama["base"]}, {"model": llama["e0"]}],
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": llama["base"],
            "models": [{"model": llama["base"]}, {"model": llama["e0"]}],
        },
    }


CASES = [*golden.CASE_NAMES, "sce", "multislerp", "nearswap", "arcee_fusion"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, dict[str, Path]]:
    return golden.build_inputs(tmp_path_factory.mktemp("device-inputs"))


def _merge(recipe: dict[str, Any], out: Path, **options: Any) -> dict[str, str]:
    # one thread: torch's default device is per thread, and the merge runs its rules on the calling thread then
    merge(recipe, out, shard_size="8KB", threads=1, progress=False, **options)
    return golden.shard_digests(out)


@pytest.mark.parametrize("case", CASES)
def test_every_rule_makes_its_tensors_on_its_inputs_device(case, inputs, tmp_path):
    recipe = _all_recipes(inputs)[case]
    expected = _merge(recipe, tmp_path / "plain")
    torch.set_default_device("meta")
    try:
        got = _merge(recipe, tmp_path / "meta-default")
    finally:
        torch.set_default_device(None)
    assert got == expected


def test_fit_tensors_reach_the_rule_on_its_device():
    tensors = {"lambda.w": torch.ones(3), "gram.0.w": torch.eye(2)}
    view = DeviceTensors(tensors, torch.device("meta"))
    assert set(view) == set(tensors) and len(view) == 2 and "gram.0.w" in view
    assert view["lambda.w"].device.type == "meta" and view.get("missing") is None
    assert tensors["lambda.w"].device.type == "cpu"  # moved per read, the fit itself stays where it is


def test_the_manifest_records_the_device(inputs, tmp_path):
    _merge(_all_recipes(inputs)["task_arithmetic"], tmp_path / "out", device="auto")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["device"].startswith("cuda:0 (" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gpu9", "'gpu9' is not a device; use cpu, cuda, cuda:N, mps or auto"),
        ("xla", "merging runs on cpu, cuda or mps, not xla"),
    ],
)
def test_a_device_that_does_not_exist_is_one_line(name, message, inputs, tmp_path):
    with pytest.raises(MergeError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        _merge(_all_recipes(inputs)["linear"], tmp_path / "out", device=name)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine can use --device cuda")
def test_cuda_without_a_gpu_is_one_line(inputs, tmp_path):
    with pytest.raises(MergeError, match=r"--device cuda: this torch cannot use a CUDA GPU") as e:
        _merge(_all_recipes(inputs)["linear"], tmp_path / "out", device="cuda")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    assert resolve_device("auto") == torch.device("cpu")


def test_cli_cuda_flag_is_device_cuda(inputs, tmp_path, capsys):
    import yaml

    from mergesmith.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_all_recipes(inputs)["linear"]))
    code = main(["merge", str(recipe), str(tmp_path / "out"), "--cuda", "--quiet"])
    if torch.cuda.is_available():
        assert code == 0
        assert json.loads((tmp_path / "out" / "manifest.json").read_text())["device"].startswith("cuda:0")
    else:
        assert code != 0
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--device cuda: this torch cannot use a CUDA GPU" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES)
def test_cuda_gives_the_cpu_result_to_fp32_rounding(case, inputs, tmp_path):
    recipe = _all_recipes(inputs)[case]
    _merge(recipe, tmp_path / "cpu")
    _merge(recipe, tmp_path / "cuda", device="cuda")
    cpu, cuda = golden.signatures(tmp_path / "cpu"), golden.signatures(tmp_path / "cuda")
    assert cpu.keys() == cuda.keys()
    for name, values in cpu.items():
        tolerance = golden.SIGNATURE_TOLERANCE * max(values[1], 1e-12)
        assert max(abs(a - b) for a, b in zip(cuda[name], values)) <= tolerance, name
