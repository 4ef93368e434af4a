"""``mergesmith align`` and a recipe's ``align:``: outputs, records and refusals on tiny HF folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from mergesmith import merge
from mergesmith.api.align import align
from mergesmith.arch.permutation import permutation_spec
from mergesmith.cli import main
from mergesmith.errors import CheckpointError, MergeError, RecipeError
from mergesmith.ops.permute import invert, permute_state, random_permutations
from tests.helpers import tiny_decoder

TEXTS = [
    f"{name} has {n} apples and gives {k} to the next person in line."
    for n in range(30)
    for k in (1, 2)
    for name in ("Tom", "Ann")
]


@pytest.fixture(scope="module")
def tokenizer():
    from mergesmith.bench.llama_demo import train_tokenizer

    return train_tokenizer(TEXTS, 300)


def llama(seed: int, hidden: int = 32, model_type: str = "llama") -> torch.nn.Module:
    return tiny_decoder(model_type, seed, vocab_size=300, hidden_size=hidden)


def save(
    model: torch.nn.Module, folder: Path, state: dict[str, torch.Tensor] | None = None, tokenizer=None
) -> Path:
    if state is not None:
        model.load_state_dict(state)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def state_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def logits(folder: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(4, 290, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("align")
    assert len(tokenizer) <= 300
    reference = llama(0)
    spec = permutation_spec(
        reference.config.to_dict(), {k: v.shape for k, v in reference.state_dict().items()}
    )
    perms = random_permutations(spec, seed=4)
    shuffled = permute_state(reference.state_dict(), spec, perms)
    return {
        "reference": save(reference, root / "reference", tokenizer=tokenizer),
        "shuffled": save(llama(0), root / "shuffled", shuffled, tokenizer),
        "other": save(llama(1), root / "other", tokenizer=tokenizer),
        "perms": perms,
        "data": _texts(root / "texts.jsonl"),
    }


def _texts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def test_activation_matching_recovers_a_shuffled_copy_and_keeps_function(models, tmp_path):
    out = align(
        models["reference"],
        models["shuffled"],
        tmp_path / "out",
        method="activation",
        data=models["data"],
        progress=False,
    ).out_dir
    reference = state_of(models["reference"])
    assert all(torch.equal(state_of(out)[k], reference[k]) for k in reference)
    other = align(
        models["reference"],
        models["other"],
        tmp_path / "other",
        method="activation",
        data=models["data"],
        progress=False,
    ).out_dir
    torch.testing.assert_close(logits(other), logits(models["other"]), rtol=1e-5, atol=1e-5)
    record = json.loads((other / "manifest.json").read_text())["alignment"]
    assert record["method"] == "activation" and record["models"][str(models["other"])]["objective_gain"] > 0


def test_a_shuffled_copy_comes_back_as_the_reference_bit_for_bit(models, tmp_path):
    result = align(models["reference"], models["shuffled"], tmp_path / "out", progress=False)
    reference, out = state_of(models["reference"]), state_of(result.out_dir)
    assert set(out) == set(reference) and all(torch.equal(out[k], reference[k]) for k in reference)
    record = json.loads((result.out_dir / "alignment.json").read_text())
    found = record["models"][str(models["shuffled"])]["permutations"]
    for group, perm in models["perms"].items():
        assert found[group] == invert(perm).tolist()
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    summary = manifest["alignment"]
    info = summary["models"][str(models["shuffled"])]
    assert info["distance_after"] == 0.0 < info["distance_before"]
    assert summary["reference"] == str(models["reference"]) and "permutations" not in info
    assert str(models["reference"]) in manifest["inputs"]  # the reference is hashed like every input


def test_the_aligned_model_keeps_its_function(models, tmp_path):
    out = align(models["reference"], models["other"], tmp_path / "out", seed=2, progress=False).out_dir
    torch.testing.assert_close(logits(out), logits(models["other"]), rtol=1e-5, atol=1e-5)
    before = json.loads((out / "manifest.json").read_text())["alignment"]["models"][str(models["other"])]
    assert before["distance_after"] < before["distance_before"]
    again = align(models["reference"], models["other"], tmp_path / "again", seed=2, progress=False).out_dir
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


def test_align_in_a_recipe_averages_like_units(models, tmp_path):
    """Averaging the reference with its shuffled copy: without align: it is another model; with it, the reference."""
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(models["reference"])}, {"model": str(models["shuffled"])}],
        "parameters": {"weight": 0.5},
    }
    naive = merge(recipe, tmp_path / "naive", progress=False).out_dir
    aligned = merge({**recipe, "align": "weight"}, tmp_path / "aligned", progress=False).out_dir
    reference = state_of(models["reference"])
    torch.testing.assert_close(state_of(aligned), reference, rtol=0, atol=1e-6)
    assert not torch.allclose(
        state_of(naive)["model.layers.0.mlp.up_proj.weight"], reference["model.layers.0.mlp.up_proj.weight"]
    )
    assert "alignment" in json.loads((aligned / "manifest.json").read_text())


def test_bad_inputs_are_one_line_and_write_nothing(models, tmp_path):
    wider = save(llama(0, hidden=48), tmp_path / "wider")
    mistral = save(llama(0, model_type="mistral"), tmp_path / "mistral")
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    )
    gpt2.save_pretrained(tmp_path / "gpt2")
    cases = [
        (wider, CheckpointError, "different widths cannot be aligned"),
        (tmp_path / "gpt2", CheckpointError, "model_type 'gpt2'"),
    ]
    for model, error, message in cases:
        reference = model if "gpt2" in str(model) else models["reference"]
        with pytest.raises(error, match=message) as e:
            align(reference, model, tmp_path / "out", progress=False)
        assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="model_type 'mistral', but the reference is 'llama'"):
        align(models["reference"], mistral, tmp_path / "out", progress=False)
    with pytest.raises(RecipeError, match=r"align\.method"):
        merge(
            {"merge_method": "linear", "models": [str(models["reference"])], "align": "magic"}, tmp_path / "o"
        )
    with pytest.raises(RecipeError, match=r"unknown key 'align.width' \(known align keys"):
        merge(
            {"merge_method": "linear", "models": [str(models["reference"])], "align": {"width": 2}},
            tmp_path / "o",
        )
    with pytest.raises(RecipeError, match="activation matching needs data"):
        align(models["reference"], models["other"], tmp_path / "out", method="activation", progress=False)
    with pytest.raises(MergeError, match="not empty"):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        align(models["reference"], models["shuffled"], tmp_path / "full", progress=False)


def test_the_command_line(models, tmp_path, capsys):
    assert (
        main(["align", str(models["reference"]), str(models["shuffled"]), str(tmp_path / "out"), "--quiet"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "units moved" in printed and "-> 0 ->" in printed
    assert (
        main(
            [
                "align",
                str(models["reference"]),
                str(models["other"]),
                str(tmp_path / "o2"),
                "--no-residual",
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "o2" / "manifest.json").read_text())["alignment"]
    assert "residual" not in summary["groups"] and summary["residual"] is False


@pytest.mark.parametrize("budget", [1.0, 1.5, 2.0])
def test_pleas_writes_a_wider_model_that_transformers_loads(models, tmp_path, budget):
    from mergesmith.api.pleas import pleas

    result = pleas(models["reference"], models["other"], tmp_path / "out", budget=budget, data=models["data"])
    record = json.loads((result.out_dir / "pleas.json").read_text())
    assert result.budget == record["achieved_budget"] <= budget + 1e-9
    widths = {w["after"] for g, w in record["widths"].items()}
    ratio = record["ratios"]["model.layers.0.mlp"]
    assert len(widths) == 1 and set(record["ratios"].values()) == {ratio}  # one intermediate_size
    width = widths.pop()
    assert width == 48 + round(48 * ratio)
    assert (width > 48) == (budget > 1.0)
    model = transformers.AutoModelForCausalLM.from_pretrained(result.out_dir)
    assert model.config.intermediate_size == width
    assert torch.isfinite(logits(result.out_dir)).all()
    if budget == 2.0:  # every FFN unit kept from both models
        assert ratio == 1.0 and width == 96


def test_pleas_refuses_bad_input_in_one_line(models, tmp_path):
    from mergesmith.api.pleas import pleas

    with pytest.raises(RecipeError, match=r"between 1\.0 and 2\.0"):
        pleas(models["reference"], models["other"], tmp_path / "out", budget=2.5, data=models["data"])
    wider = save(llama(0, hidden=48), tmp_path / "wider")
    with pytest.raises(CheckpointError, match="different widths"):
        pleas(models["reference"], wider, tmp_path / "out", budget=1.2, data=models["data"])
    assert not (tmp_path / "out").exists()


def test_pleas_on_a_from_scratch_mlp_widens_layers_to_the_budget(tmp_path):
    """Two MLPs of different seeds: per-layer widths in the saved config; at budget 2.0 the ensemble's outputs."""
    from safetensors.torch import save_file

    from mergesmith.api.pleas import pleas
    from mergesmith.fit.small_models import build, load_small_model, save_small_model

    config = {"model_type": "mergesmith_mlp", "sizes": [12, 16, 16, 3]}
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folders.append(save_small_model(build(config), config, tmp_path / f"m{seed}"))
    inputs = torch.randn(512, 12, generator=torch.Generator().manual_seed(0))
    save_file({"inputs": inputs}, str(tmp_path / "inputs.safetensors"))
    a, b = (load_small_model(f)[0] for f in folders)
    for budget in (1.0, 1.4, 2.0):
        out = tmp_path / f"pleas-{budget}"
        result = pleas(*folders, out, budget=budget, data=tmp_path / "inputs.safetensors")
        merged, merged_config = load_small_model(out)
        record = json.loads((out / "pleas.json").read_text())
        assert merged_config["sizes"][1:3] == [w["after"] for w in record["widths"].values()]
        assert result.budget <= budget + 1e-9
        if budget == 1.0:
            assert merged_config["sizes"] == config["sizes"]
        if budget == 2.0:  # every unit of both kept: least squares reproduces the ensemble
            assert merged_config["sizes"] == [12, 32, 32, 3]
            with torch.no_grad():
                torch.testing.assert_close(merged(inputs), (a(inputs) + b(inputs)) / 2, rtol=1e-3, atol=1e-3)
    with pytest.raises(RecipeError, match="'inputs' tensor"):
        save_file({"x": inputs}, str(tmp_path / "bad.safetensors"))
        pleas(*folders, tmp_path / "bad", budget=1.2, data=tmp_path / "bad.safetensors")
    with pytest.raises(RecipeError, match=r"\(9 features\), the MLP takes 12"):
        save_file({"inputs": torch.randn(8, 9)}, str(tmp_path / "narrow.safetensors"))
        pleas(*folders, tmp_path / "bad", budget=1.2, data=tmp_path / "narrow.safetensors")
    assert not (tmp_path / "bad").exists()


def test_pleas_on_a_from_scratch_resnet_writes_stream_and_block_widths(tmp_path):
    """Two tiny ResNets: at budget 2.0 every stream and block keeps both models' channels, and with BatchNorm
    statistics recomputed on the same data the merge computes the ensemble of the two (recomputed) models."""
    from safetensors.torch import save_file

    from mergesmith.api.pleas import pleas
    from mergesmith.fit.small_models import build, load_small_model, reset_batchnorm, save_small_model

    config = {
        "model_type": "mergesmith_resnet",
        "in_channels": 1,
        "widths": [4, 8],
        "blocks": [1, 1],
        "num_classes": 3,
    }
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folders.append(save_small_model(build(config), config, tmp_path / f"r{seed}"))
    inputs = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    save_file({"inputs": inputs}, str(tmp_path / "inputs.safetensors"))
    result = pleas(
        *folders, tmp_path / "wide", budget=2.0, data=tmp_path / "inputs.safetensors", method="weight"
    )
    merged, merged_config = load_small_model(result.out_dir)
    assert merged_config["widths"] == [8, 16] and merged_config["inner_widths"] == [[8], [16]]
    a, b = (load_small_model(f)[0] for f in folders)
    for model in (a, b):
        reset_batchnorm(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs), (a(inputs) + b(inputs)) / 2, rtol=1e-3, atol=1e-3)
    half = pleas(*folders, tmp_path / "half", budget=1.3, data=tmp_path / "inputs.safetensors")
    record = json.loads((half.out_dir / "pleas.json").read_text())
    assert 1.0 < half.budget <= 1.3 + 1e-9 and any(r > 0 for r in record["ratios"].values())
    assert torch.isfinite(load_small_model(half.out_dir)[0](inputs)).all()
