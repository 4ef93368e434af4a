"""``mergesmith moe``: dense fine-tunes → Mixtral / Qwen2-MoE / Qwen3-MoE, against mergekit-moe itself (tensors and
config bit for bit), loading and generating in transformers, the MoE's function, determinism and the refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from mergesmith.api.moe import build_moe
from mergesmith.cli import main
from mergesmith.errors import CheckpointError, RecipeError
from tests.helpers import load_tensors, tiny_decoder

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["the cat sat on the mat", "one two three four five", "print(x + 1)", "hello world again"] * 5
PROMPTS = [(["the cat sat"], []), (["one two three"], ["hello"]), (["print(x"], [])]


def _save(model: torch.nn.Module, folder: Path, tokenizer, base: torch.nn.Module | None, seed: int) -> Path:
    """``model`` saved with the tokenizer; with ``base``, a 'fine-tune': base + seeded noise of scale 0.02."""
    if base is not None:
        model.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def family_models(root: Path, model_type: str, tokenizer, count: int = 3, **config) -> dict[str, Path]:
    """A base and ``count`` fine-tunes of one tiny decoder (vocabulary 300, the tokenizer's)."""
    base = tiny_decoder(model_type, 0, vocab_size=300, **config)
    models = {"base": _save(base, root / f"{model_type}-base", tokenizer, None, 0)}
    for i in range(count):
        twin = tiny_decoder(model_type, 0, vocab_size=300, **config)
        models[f"e{i}"] = _save(twin, root / f"{model_type}-e{i}", tokenizer, base, i + 1)
    return models


@pytest.fixture(scope="module")
def tokenizer():
    from mergesmith.bench.llama_demo import train_tokenizer

    tok = train_tokenizer(TEXTS, 300)
    tok.bos_token = tok.eos_token  # a BOS token: mergekit prepends its text to every prompt
    return tok


@pytest.fixture(scope="module")
def llamas(tmp_path_factory, tokenizer) -> dict[str, Path]:
    return family_models(tmp_path_factory.mktemp("llamas"), "llama", tokenizer)


def moe_config(models: dict[str, Path], gate_mode: str = "cheap_embed", **extra) -> dict:
    experts = [
        {
            "source_model": str(models[f"e{i}"]),
            "positive_prompts": pos,
            **({"negative_prompts": neg} if neg else {}),
        }
        for i, (pos, neg) in enumerate(PROMPTS)
    ]
    return {"base_model": str(models["base"]), "gate_mode": gate_mode, "experts": experts, **extra}


def run_mergekit_moe(config: dict, out: Path, seed: int = 0) -> None:
    """mergekit-moe itself, in-process, with ``--random-seed seed`` (its global generator seeded)."""
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    options = MergeOptions(random_seed=seed, quiet=True)
    options.apply_global_options()
    build(MoEMergeConfig.model_validate(copy.deepcopy(config)), str(out), options, device="cpu")


def assert_same_as_mergekit(config: dict, tmp_path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    ours = build_moe({**config, "seed": seed}, tmp_path / "ours", progress=False).out_dir
    run_mergekit_moe(config, tmp_path / "theirs", seed)
    a, b = load_tensors(ours), load_tensors(tmp_path / "theirs")
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    theirs = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert json.loads((ours / "config.json").read_text()) == theirs
    return a


@pytest.mark.parametrize("gate_mode", ["cheap_embed", "random", "uniform_random", "hidden", "hidden_avg"])
def test_mixtral_equals_mergekit_moe_for_every_deterministic_gate_mode(llamas, tmp_path, gate_mode):
    config = moe_config(llamas, gate_mode, experts_per_token=2, dtype="float32")
    config["experts"][1]["residual_scale"] = 0.5
    tensors = assert_same_as_mergekit(config, tmp_path, seed=3)
    assert tensors["model.layers.0.mlp.gate.weight"].shape == (3, 32)
    assert tensors["model.layers.1.mlp.experts.gate_up_proj"].shape == (3, 96, 32)


def test_qwen2_moe_with_a_shared_expert_equals_mergekit_moe(llamas, tmp_path):
    config = moe_config(llamas, "cheap_embed", architecture="qwen")
    config["shared_experts"] = [{"source_model": str(llamas["base"]), "positive_prompts": ["hello world"]}]
    tensors = assert_same_as_mergekit(config, tmp_path)
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.bias"], torch.zeros(32))  # llama has none
    assert tensors["model.layers.1.mlp.shared_expert_gate.weight"].shape == (1, 32)


def test_qwen3_moe_equals_mergekit_moe(tmp_path, tokenizer):
    models = family_models(tmp_path / "models", "qwen3", tokenizer, head_dim=8)
    tensors = assert_same_as_mergekit(moe_config(models, "cheap_embed"), tmp_path)
    assert "model.layers.0.self_attn.q_norm.weight" in tensors


@pytest.mark.parametrize("architecture", ["mixtral", "qwen"])
def test_the_output_loads_and_generates_in_transformers(llamas, tmp_path, architecture):
    config = moe_config(llamas, "hidden", architecture=architecture)
    if architecture == "qwen":
        config["shared_experts"] = [{"source_model": str(llamas["base"]), "positive_prompts": ["hello"]}]
    out = build_moe(config, tmp_path / "moe", progress=False).out_dir
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (
        type(model).__name__ == {"mixtral": "MixtralForCausalLM", "qwen": "Qwen2MoeForCausalLM"}[architecture]
    )
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("the cat sat", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "moe" and manifest["moe"]["experts"] == 3
    assert yaml.safe_load((out / "mergesmith_moe.yaml").read_text())["gate_mode"] == "hidden"


def test_experts_that_are_all_the_base_compute_the_base(llamas, tmp_path):
    """Top-k weights renormalised over identical experts sum to one: the MoE is the dense base."""
    config = moe_config(llamas, "cheap_embed", experts_per_token=2)
    for expert in config["experts"]:
        expert["source_model"] = str(llamas["base"])
    with pytest.raises(
        RecipeError, match=r"every expert is .*--i-understand-this-is-not-useful-without-training"
    ):
        build_moe(config, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    out = build_moe(config, tmp_path / "moe", allow_all_same=True, progress=False).out_dir
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moe = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        dense = transformers.AutoModelForCausalLM.from_pretrained(llamas["base"]).eval()(input_ids=ids).logits
    torch.testing.assert_close(moe, dense, rtol=1e-5, atol=1e-5)


def test_noise_is_seeded_and_the_build_is_byte_identical(llamas, tmp_path):
    config = moe_config(llamas, "random")
    config["experts"][0]["noise_scale"] = 0.1
    first = build_moe({**config, "seed": 5}, tmp_path / "a", progress=False).out_dir
    again = build_moe({**config, "seed": 5}, tmp_path / "b", progress=False).out_dir
    other = build_moe({**config, "seed": 6}, tmp_path / "c", progress=False).out_dir
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    a, c = load_tensors(first), load_tensors(other)
    clean = load_tensors(llamas["e0"])["model.layers.0.mlp.down_proj.weight"]
    down = a["model.layers.0.mlp.experts.down_proj"]
    assert 0.05 < float((down[0] - clean).std()) < 0.15  # expert 0 got noise of scale 0.1 …
    assert torch.equal(down[1], load_tensors(llamas["e1"])["model.layers.0.mlp.down_proj.weight"])  # … not 1
    assert not torch.equal(down[0], c["model.layers.0.mlp.experts.down_proj"][0])


def test_bad_configs_are_one_line_errors_and_write_nothing(llamas, tmp_path, tokenizer):
    other = family_models(tmp_path / "wide", "llama", tokenizer, count=1, intermediate_size=64)
    qwen3 = family_models(tmp_path / "q3", "qwen3", tokenizer, count=1, head_dim=8)
    cases = [
        ({"gate_mode": "router"}, RecipeError, "gate_mode 'router' is not one of"),
        ({"experts_per_token": 4}, RecipeError, "experts_per_token is 4 but there are only 3 experts"),
        ({"architecture": "deepseek"}, RecipeError, "architecture 'deepseek' is not one of"),
        ({"architecture": "qwen3"}, CheckpointError, "qwen3_moe hosts qwen3 experts, not llama"),
        (
            {
                "shared_experts": [{"source_model": str(llamas["base"]), "positive_prompts": ["x"]}],
                "architecture": "mixtral",
            },
            CheckpointError,
            "mixtral takes no shared experts, the config has 1",
        ),
        ({"topk": 2}, RecipeError, r"unknown key 'topk' \(known top-level keys: base_model, experts"),
    ]
    for i, (change, error, message) in enumerate(cases):
        with pytest.raises(error, match=message):
            build_moe({**moe_config(llamas), **change}, tmp_path / f"out{i}", progress=False)
    no_prompts = moe_config(llamas, "hidden")
    del no_prompts["experts"][2]["positive_prompts"]
    with pytest.raises(
        RecipeError, match=r"experts\[2\] .* has no positive_prompts, which gate_mode hidden routes by"
    ):
        build_moe(no_prompts, tmp_path / "p", progress=False)
    same_prompts = moe_config(llamas)
    for expert in same_prompts["experts"]:
        expert["positive_prompts"] = ["same"]
        expert.pop("negative_prompts", None)
    with pytest.raises(RecipeError, match="every expert has the same prompts"):
        build_moe(same_prompts, tmp_path / "s", progress=False)
    wider = moe_config(llamas)
    wider["experts"][1]["source_model"] = str(other["e0"])
    with pytest.raises(
        CheckpointError, match=r"mlp\.gate_proj\.weight is \[64, 32\], the base's is \[48, 32\]"
    ):
        build_moe(wider, tmp_path / "w", progress=False)
    mixed = moe_config(llamas)
    mixed["experts"][0]["source_model"] = str(qwen3["e0"])
    with pytest.raises(CheckpointError, match="needs every model of one architecture, got llama, qwen3"):
        build_moe(mixed, tmp_path / "m", progress=False)
    written = {p.name for p in tmp_path.iterdir()} - {"wide", "q3"}
    assert not written, written


def test_the_cli_builds_from_a_mergekit_moe_yaml(llamas, tmp_path, capsys):
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(moe_config(llamas, "cheap_embed")))
    assert main(["moe", str(path), str(tmp_path / "out"), "--quiet"]) == 0
    assert "MixtralForCausalLM" in json.loads((tmp_path / "out" / "config.json").read_text())["architectures"]
    (tmp_path / "bad.yaml").write_text("base_model: x\nexperts: []\n")
    assert main(["moe", str(tmp_path / "bad.yaml"), str(tmp_path / "bad")]) != 0
    assert "bad.yaml: experts is empty" in capsys.readouterr().err


def test_inspect_reports_routing_per_layer(llamas, tmp_path, capsys):
    out = build_moe(moe_config(llamas, "cheap_embed"), tmp_path / "moe", progress=False).out_dir
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    png, report = tmp_path / "routing.png", tmp_path / "routing.json"
    args = ["moe", "inspect", str(out), "--data", str(data), "--png", str(png), "--json", str(report)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| layer | expert 0 top-1 / top-2 %" in printed and png.stat().st_size > 0
    stats = json.loads(report.read_text())
    assert stats["layers"] == [0, 1] and stats["experts_per_token"] == 2
    for row in stats["top1"]:
        assert sum(row) == pytest.approx(1.0, abs=1e-5)  # rounded to 6 decimals in the JSON
    assert main(["moe", "inspect", str(llamas["base"]), "--data", str(data)]) == 2
    assert "LlamaForCausalLM has no MoE router" in capsys.readouterr().err


@pytest.fixture(scope="module")
def moe_model(llamas, tmp_path_factory) -> tuple[Path, Path]:
    """A 3-expert Mixtral built from the llamas, and calibration texts."""
    root = tmp_path_factory.mktemp("moe")
    out = build_moe(moe_config(llamas, "cheap_embed"), root / "moe", progress=False).out_dir
    data = root / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return out, data


def logits_of(folder: Path) -> torch.Tensor:
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=ids).logits


@pytest.mark.parametrize("form", ["remapped", "bound"])
def test_one_group_per_expert_leaves_the_model_unchanged(moe_model, tmp_path, form):
    from mergesmith.api.moe_merge import merge_moe_experts

    folder, data = moe_model
    out = merge_moe_experts(folder, tmp_path / "out", data, groups=3, form=form, progress=False).out_dir
    torch.testing.assert_close(logits_of(out), logits_of(folder), rtol=1e-5, atol=1e-5)


def test_experts_that_are_one_model_merge_into_it_exactly(llamas, tmp_path):
    from mergesmith.api.moe_merge import merge_moe_experts

    config = moe_config(llamas, "cheap_embed")
    for expert in config["experts"]:
        expert["source_model"] = str(llamas["e0"])
    folder = build_moe(config, tmp_path / "same", allow_all_same=True, progress=False).out_dir
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = merge_moe_experts(folder, tmp_path / "out", data, groups=1, form="bound", progress=False).out_dir
    torch.testing.assert_close(logits_of(out), logits_of(folder), rtol=1e-5, atol=1e-5)


def test_merging_to_fewer_experts_writes_a_smaller_moe_and_its_record(moe_model, tmp_path, capsys):
    folder, data = moe_model
    args = [
        "moe",
        "merge",
        str(folder),
        str(tmp_path / "out"),
        "--data",
        str(data),
        "--groups",
        "2",
        "--quiet",
    ]
    assert main(args) == 0
    assert "3 -> groups per layer [2, 2]" in capsys.readouterr().out
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 2
    tensors = load_tensors(out)
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].shape == (2, 96, 32)
    assert tensors["model.layers.0.mlp.gate.weight"].shape == (2, 32)
    record = json.loads((out / "manifest.json").read_text())["moe_merge"]
    assert record["unique_expert_parameters"] == {"before": 2 * 3 * 3 * 48 * 32, "after": 2 * 2 * 3 * 48 * 32}
    assert all(0.0 <= v <= 1.0 for v in record["routing_agreement"].values())
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    for method in ("m-smoe-no-align", "uniform", "frequency-prune", "random-drop"):
        args = ["moe", "merge", str(folder), str(tmp_path / method), "--data", str(data), "--groups", "2"]
        assert main([*args, "--method", method, "--quiet"]) == 0, method
    pruned = json.loads((tmp_path / "frequency-prune" / "manifest.json").read_text())["moe_merge"]
    for centers, usage, labels in zip(pruned["centers"], pruned["usage_frequency"], pruned["labels"]):
        assert sorted(centers) == sorted(sorted(range(3), key=lambda e: -usage[e])[:2])  # the two most used
        assert labels.count(-1) == 1  # the third is dropped
    adaptive = [
        "moe",
        "merge",
        str(folder),
        str(tmp_path / "adaptive"),
        "--data",
        str(data),
        "--average-groups",
        "2",
    ]
    assert main([*adaptive, "--quiet"]) == 0
    recovered = ["moe", "merge", str(folder), str(tmp_path / "rec"), "--data", str(data), "--groups", "2"]
    assert main([*recovered, "--recover-steps", "4", "--quiet"]) == 0
    recovery = json.loads((tmp_path / "rec" / "manifest.json").read_text())["moe_merge"]["recovery"]
    # 3 calibration batches in turn: step 4 sees step 1's batch again, after 3 updates toward the teacher
    assert recovery["steps"] == 4 and recovery["losses"][3] < recovery["losses"][0]
    changed = load_tensors(tmp_path / "rec")["model.layers.0.mlp.experts.down_proj"]
    assert not torch.equal(changed, load_tensors(out)["model.layers.0.mlp.experts.down_proj"])
    for name, tensor in load_tensors(out).items():  # only experts and routers trained
        if ".mlp." not in name:
            assert torch.equal(load_tensors(tmp_path / "rec")[name], tensor), name
    one = [
        "moe",
        "merge",
        str(folder),
        str(tmp_path / "one"),
        "--data",
        str(data),
        "--groups",
        "1",
        "--quiet",
    ]
    assert main(one) == 0  # one expert left: top-2 becomes top-1
    assert json.loads((tmp_path / "one" / "config.json").read_text())["num_experts_per_tok"] == 1
    assert torch.isfinite(logits_of(tmp_path / "one")).all()
    counts = json.loads((tmp_path / "adaptive" / "manifest.json").read_text())["moe_merge"][
        "groups_per_layer"
    ]
    assert len(counts) == 2 and all(1 <= c <= 3 for c in counts)


def test_bad_merge_requests_are_one_line_errors(moe_model, llamas, tmp_path, capsys):
    folder, data = moe_model
    base = ["moe", "merge", str(folder), str(tmp_path / "out"), "--data", str(data)]
    cases = [
        ([], "give --groups N (every layer) or --average-groups N"),
        (["--groups", "4"], "the group count must be between 1 and 3, got 4"),
        (
            ["--groups", "2", "--method", "frequency-prune", "--form", "bound"],
            "frequency-prune drops experts",
        ),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    dense = ["moe", "merge", str(llamas["base"]), str(tmp_path / "d"), "--data", str(data), "--groups", "1"]
    assert main(dense) == 2
    assert "no num_local_experts / num_experts: not an MoE model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "d").exists()


def test_compressing_experts_writes_the_dense_reconstruction_and_its_factors(moe_model, tmp_path, capsys):
    from safetensors.torch import load_file

    from tests.fit.test_losparse import rebuild

    folder, data = moe_model
    args = [
        "moe",
        "compress",
        str(folder),
        str(tmp_path / "out"),
        "--rank",
        "4",
        "--remaining",
        "0.1",
        "--quiet",
    ]
    assert main(args) == 0
    assert "moe compress: expert parameters 27,648 ->" in capsys.readouterr().out
    out = tmp_path / "out"
    record = json.loads((out / "manifest.json").read_text())["moe_compress"]
    assert record["expert_parameters_stored"] < 0.5 * record["expert_parameters_dense"]
    factors = load_file(str(out / "mergesmith_losparse.safetensors"))
    dense = load_tensors(out)["model.layers.1.mlp.experts.down_proj"]
    rebuilt = rebuild(factors, "model.layers.1.mlp.experts.down_proj", 3)
    torch.testing.assert_close(rebuilt, dense, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(logits_of(out)).all()
    tuned = ["moe", "compress", str(folder), str(tmp_path / "tuned"), "--rank", "4", "--data", str(data)]
    assert main([*tuned, "--steps", "4", "--quiet"]) == 0
    assert json.loads((tmp_path / "tuned" / "manifest.json").read_text())["moe_compress"]["steps"] == 4
    assert main(["moe", "compress", str(folder), str(tmp_path / "bad"), "--steps", "3"]) == 2
    assert "--steps fine-tunes on calibration texts; give --data FILE" in capsys.readouterr().err


def test_moe_help_documents_every_config_key(capsys):
    from mergesmith.recipe.moe import MoEConfig, MoEExpert

    with pytest.raises(SystemExit):
        main(["moe", "--help"])
    text = capsys.readouterr().out
    for key in [*MoEConfig.model_fields, *MoEExpert.model_fields]:
        assert f"  {key} " in text, key
