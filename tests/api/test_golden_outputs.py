"""Outputs do not change under refactoring: a fixed set of recipes — every registered method, the mergekit switches,
slices, an output dtype, and the data-driven methods replayed from fits saved in ``tests/data/golden/`` — must
give the same shard bytes as recorded in ``tests/data/golden/outputs.json``.

Bytes are only reproducible on the platform that recorded them (CPU model, torch's kernel set, torch version):
MKL's dot and SVD and the vectorised exp round differently on another CPU (the CI machine changed from one whose
``pcb``, ``tsv`` and mergekit-``dare_ties`` hashes these were to an AMD EPYC whose hashes differ, with the same
code). So on the recording platform the bytes must match; on any other, every tensor's signature (mean, RMS and
two fixed random projections, in float64) must match the recorded one to 1e-4 of the tensor's RMS — 5× the
largest fp32-vs-fp64 difference of any case (TSV's SVD, 2e-5) and far below what a changed rule moves.

The inputs are built here from seeded generators (not from a library's random init), so they do not depend on
transformers' initialisation code. The digests were recorded by the code before the layer refactor (#14) and
re-recorded on the CI machine with unchanged outputs (all 35 cases equal to the pre-refactor code's there);
``python tests/api/test_golden_outputs.py --write`` records them anew (for an intended change of outputs or a new
CI machine only, with the reason in the commit), and ``--write-fits`` refits the data-driven methods' saved fits.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
WORDS = ["apple", "banana", "cherry", "river", "mountain", "forest", "red", "blue", "green", "fast", "slow"]


def _save_folder(path: Path, tensors: dict[str, torch.Tensor], config: Any) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return path


def _family(
    root: Path, name: str, config: Any, shapes: dict[str, tuple[int, ...]], seed: int, experts: int = 3
) -> dict[str, Path]:
    """A base (N(0, 0.1²) weights, LayerNorm-like ones for 1-D 'weight's) and fine-tunes (base + N(0, 0.02²))."""
    gen = torch.Generator().manual_seed(seed)
    base = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=gen) * 0.1
        if len(shape) == 1 and key.endswith("weight"):
            value = value + 1.0
        base[key] = value
    out = {"base": _save_folder(root / f"{name}-base", base, config)}
    for i in range(experts):
        tuned = {k: v + torch.randn(v.shape, generator=gen) * 0.02 for k, v in base.items()}
        out[f"e{i}"] = _save_folder(root / f"{name}-e{i}", tuned, config)
    return out


def _shapes(model_class: Any, config: Any) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = model_class(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}


def build_inputs(root: Path) -> dict[str, dict[str, Path]]:
    """A tiny Llama family (base + 3) and a tiny BERT family (base + 2, with tokenizer, heads and data)."""
    from transformers import BertConfig, BertModel, BertTokenizer, LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    llama = _family(root, "llama", llama_config, _shapes(LlamaForCausalLM, llama_config), seed=1)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    bert_config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    shapes = _shapes(lambda c: BertModel(c, add_pooling_layer=False), bert_config)
    bert = _family(root, "bert", bert_config, shapes, seed=2, experts=2)
    for folder in bert.values():
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    extras: dict[str, Path] = {}
    for i in range(2):
        head = root / f"head{i}.safetensors"
        save_file(
            {"weight": torch.randn(2, 16, generator=gen), "bias": torch.randn(2, generator=gen)}, str(head)
        )
        extras[f"head{i}"] = head
        data = root / f"data{i}.jsonl"
        pools = (WORDS[0:3], WORDS[3:6]) if i == 0 else (WORDS[6:9], WORDS[9:11])
        lines = []
        for n in range(24):
            label = n % 2
            words = [
                pools[label][int(torch.randint(len(pools[label]), (1,), generator=gen))] for _ in range(5)
            ]
            lines.append(json.dumps({"text": " ".join(words), "label": label}))
        data.write_text("\n".join(lines) + "\n")
        extras[f"data{i}"] = data
    # one tensor above the engine's row-block size (2^19 elements): merged in blocks by elementwise rules
    wide_shapes = {"embed.weight": (1100, 512), "layers.0.proj.weight": (64, 64), "norm.weight": (512,)}
    gen = torch.Generator().manual_seed(4)
    wide_base = {k: torch.randn(v, generator=gen) * 0.1 for k, v in wide_shapes.items()}
    wide = {}
    for key, tensors in [("base", wide_base)] + [
        (f"e{i}", {k: v + torch.randn(v.shape, generator=gen) * 0.02 for k, v in wide_base.items()})
        for i in range(2)
    ]:
        wide[key] = root / f"wide-{key}.safetensors"
        save_file(tensors, str(wide[key]))
    return {"llama": llama, "bert": bert, "extras": extras, "wide": wide}


def _llama_recipe(
    inputs: dict[str, dict[str, Path]],
    method: str,
    experts: int = 2,
    parameters: dict[str, Any] | None = None,
    base: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    fam = inputs["llama"]
    recipe: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": str(fam[f"e{i}"])} for i in range(experts)],
        "parameters": parameters or {},
        **extra,
    }
    if base:
        recipe["base_model"] = str(fam["base"])
    return recipe


# Methods without data: (case name, method, recipe extras). Chosen to touch every rule, the whole-model and
# per-tensor statistics, the random rules, the mergekit switches and a gradient/filter parameter.
STATIC_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("linear", "linear", {"base": False, "parameters": {"weight": 1.0}}),
    ("linear_gradient", "linear", {"base": False, "parameters": {"weight": [0.2, 0.8]}}),
    ("task_arithmetic", "task_arithmetic", {"experts": 3}),
    (
        "task_arithmetic_filter",
        "task_arithmetic",
        {"parameters": {"lambda": [{"filter": "self_attn", "value": 0.5}, {"value": 1.0}]}},
    ),
    ("ties", "ties", {"experts": 3}),
    ("ties_mergekit", "ties", {"experts": 3, "compat": "mergekit", "parameters": {"density": 0.5}}),
    ("dare_linear", "dare_linear", {"parameters": {"density": 0.5}, "seed": 3}),
    ("dare_ties", "dare_ties", {"parameters": {"density": 0.3}, "seed": 4}),
    ("dare_ties_mergekit", "dare_ties", {"parameters": {"density": 0.3}, "compat": "mergekit"}),
    ("breadcrumbs", "breadcrumbs", {}),
    ("breadcrumbs_ties", "breadcrumbs_ties", {}),
    ("della", "della", {"seed": 5}),
    ("della_linear", "della_linear", {}),
    ("consensus", "consensus", {"experts": 3}),
    ("pcb", "pcb", {"experts": 3}),
    ("tsv", "tsv", {"experts": 3}),
    ("model_stock", "model_stock", {"experts": 3}),
    ("karcher", "karcher", {"base": False}),
    ("slerp", "slerp", {"experts": 1, "parameters": {"t": 0.3}}),
    ("nuslerp", "nuslerp", {"base": False}),
    ("bf16_out", "task_arithmetic", {"out_dtype": "bfloat16"}),
]

# Data-driven methods: (case name, method, fit parameters); the fits are tiny (a few steps), saved once.
DATA_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("fisher", "fisher", {"n_examples": 8}),
    ("regmean", "regmean", {"n_examples": 16}),
    ("adamerging", "adamerging", {"steps": 3, "lr": 0.05}),
    ("adamerging_task", "adamerging", {"steps": 3, "lr": 0.05, "granularity": "task"}),
    ("adamerging_ties", "adamerging", {"steps": 3, "lr": 0.05, "ties": True}),
    ("concrete_task_arithmetic", "concrete_task_arithmetic", {"steps": 3, "lr": 0.05}),
    ("concrete_adamerging", "concrete_adamerging", {"meta_steps": 2, "adamerging_steps": 2, "lr": 0.05}),
    ("dam", "dam", {"meta_steps": 2, "adamerging_steps": 2, "lr": 0.05}),
    ("twin", "twin", {"router_epochs": 2}),
]


def recipes(inputs: dict[str, dict[str, Path]]) -> dict[str, dict[str, Any]]:
    """Every case's recipe (data-driven ones replay the saved fit)."""
    out = {}
    for name, method, extra in STATIC_CASES:
        out[name] = _llama_recipe(inputs, method, **extra)
    llama = inputs["llama"]
    out["passthrough_slices"] = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(llama["e0"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(llama["e1"]), "layer_range": [1, 3]}]},
        ],
    }
    out["linear_slices"] = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": str(llama["e0"]), "layer_range": [0, 3], "parameters": {"weight": 0.7}},
                    {"model": str(llama["e1"]), "layer_range": [0, 3], "parameters": {"weight": 0.3}},
                ]
            }
        ],
    }
    wide = inputs["wide"]
    for method, seed in (("ties", 0), ("dare_ties", 7), ("task_arithmetic", 0)):
        out[f"{method}_blocks"] = {
            "merge_method": method,
            "base_model": str(wide["base"]),
            "seed": seed,
            "models": [{"model": str(wide["e0"])}, {"model": str(wide["e1"])}],
            "parameters": {"density": 0.4} if method != "task_arithmetic" else {},
        }
    for name, method, _ in DATA_CASES:
        out[name] = data_recipe(inputs, method, {}) | {"fitted": str(GOLDEN / "fits" / f"{name}.safetensors")}
    return out


def data_recipe(
    inputs: dict[str, dict[str, Path]], method: str, parameters: dict[str, Any]
) -> dict[str, Any]:
    bert, extras = inputs["bert"], inputs["extras"]
    return {
        "merge_method": method,
        "base_model": str(bert["base"]),
        "parameters": parameters,
        "models": [
            {
                "model": str(bert[f"e{i}"]),
                "head": str(extras[f"head{i}"]),
                "data": {"path": str(extras[f"data{i}"])},
            }
            for i in range(2)
        ],
    }


def shard_digests(folder: Path) -> dict[str, str]:
    """sha256 of every weight shard (not the saved fit) and of the index."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if (p.suffix == ".safetensors" and p.name != "mergesmith_fit.safetensors")
        or p.name == "model.safetensors.index.json"
    }


SIGNATURE_TOLERANCE = 1e-4  # of the tensor's RMS


def platform() -> dict[str, str]:
    """What the bytes of a float merge depend on beyond the code: the CPU, torch's kernel set and version."""
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "unknown",
        )
        if Path("/proc/cpuinfo").exists()
        else "unknown"
    )
    return {"cpu": cpu, "kernels": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def signatures(folder: Path) -> dict[str, list[float]]:
    """Per output tensor, in float64: mean, RMS and Σ rᵢxᵢ/√n for two fixed ±1 vectors r (seeded by position)."""
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        for name, tensor in load_file(shard).items():
            x = tensor.double().reshape(-1)
            n = max(x.numel(), 1)
            gen = torch.Generator().manual_seed(n)
            signs = [torch.randint(0, 2, (x.numel(),), generator=gen).double() * 2 - 1 for _ in range(2)]
            out[name] = [float(x.mean()), float(x.pow(2).mean().sqrt())] + [
                float(r @ x) / n**0.5 for r in signs
            ]
    return out


def run_case(recipe: dict[str, Any], out: Path) -> dict[str, str]:
    from mergesmith import merge

    merge(recipe, out, shard_size="8KB", threads=2, progress=False)
    return shard_digests(out)


def write_fits(root: Path) -> None:
    from mergesmith import merge

    inputs = build_inputs(root / "inputs")
    (GOLDEN / "fits").mkdir(parents=True, exist_ok=True)
    for name, method, parameters in DATA_CASES:
        out = root / f"fit-{name}"
        merge(data_recipe(inputs, method, parameters), out, progress=False)
        (GOLDEN / "fits" / f"{name}.safetensors").write_bytes(
            (out / "mergesmith_fit.safetensors").read_bytes()
        )


def write_golden(root: Path) -> None:
    inputs = build_inputs(root / "inputs")
    digests = {name: run_case(recipe, root / name) for name, recipe in recipes(inputs).items()}
    (GOLDEN / "outputs.json").write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    recorded = {"platform": platform(), "cases": {name: signatures(root / name) for name in digests}}
    (GOLDEN / "signatures.json").write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def golden_inputs(tmp_path_factory) -> dict[str, dict[str, Path]]:
    return build_inputs(tmp_path_factory.mktemp("golden-inputs"))


CASE_NAMES = (
    [name for name, _, _ in STATIC_CASES]
    + ["passthrough_slices", "linear_slices"]
    + ["ties_blocks", "dare_ties_blocks", "task_arithmetic_blocks"]
    + [name for name, _, _ in DATA_CASES]
)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_outputs_equal_the_recorded_ones(case, golden_inputs, tmp_path):
    expected = json.loads((GOLDEN / "outputs.json").read_text())[case]
    recorded = json.loads((GOLDEN / "signatures.json").read_text())
    digests = run_case(recipes(golden_inputs)[case], tmp_path / "out")
    if digests == expected:
        return
    assert platform() != recorded["platform"], "the recording platform must reproduce the recorded bytes"
    assert digests.keys() == expected.keys()
    wanted = recorded["cases"][case]
    got = signatures(tmp_path / "out")
    assert got.keys() == wanted.keys()
    for name, values in wanted.items():
        tolerance = SIGNATURE_TOLERANCE * max(values[1], 1e-12)
        differences = [abs(a - b) for a, b in zip(got[name], values)]
        assert max(differences) <= tolerance, f"{case}: tensor '{name}' moved by {max(differences):.3g}"


def test_signatures_tell_a_changed_rule_from_rounding(tmp_path):
    """The fallback's tolerance: ulp-level rounding passes, a change of 1 % in one row of 64 does not."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensor = torch.randn(64, 32, generator=gen)
    variants = {
        "same": tensor,
        "rounded": tensor * (1 + 6e-8 * torch.randn(tensor.shape, generator=gen)),
        "changed": torch.cat([tensor[:1] * 1.01, tensor[1:]]),
    }
    sig = {}
    for label, value in variants.items():
        (tmp_path / label).mkdir()
        save_file({"w": value.float()}, str(tmp_path / label / "model.safetensors"))
        sig[label] = signatures(tmp_path / label)["w"]
    tolerance = SIGNATURE_TOLERANCE * sig["same"][1]
    assert max(abs(a - b) for a, b in zip(sig["rounded"], sig["same"])) <= tolerance
    assert max(abs(a - b) for a, b in zip(sig["changed"], sig["same"])) > tolerance


def test_every_registered_method_has_a_golden_case():
    from mergesmith.methods import all_methods

    recorded = json.loads((GOLDEN / "outputs.json").read_text())
    root = Path("/nonexistent")
    fake_wide = {k: root for k in ("base", "e0", "e1")}
    fake = {
        "llama": {k: root for k in ("base", "e0", "e1", "e2")},
        "bert": {k: root for k in ("base", "e0", "e1")},
        "extras": {k: root for k in ("head0", "head1", "data0", "data1")},
        "wide": fake_wide,
    }
    covered = {r["merge_method"] for name, r in recipes(fake).items() if name in recorded}
    # mergekit's own methods added after the recording are pinned instead by the in-process comparison with
    # mergekit (tests/api/test_mergekit_compat.py): a machine-independent reference, where byte hashes recorded
    # on one machine's reductions need not hold on another's
    pinned_by_mergekit = {"sce", "multislerp", "nearswap", "arcee_fusion"}
    assert {m.name for m in all_methods()} <= covered | pinned_by_mergekit


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        if "--write-fits" in sys.argv:
            write_fits(Path(tmp) / "fits")
        if "--write" in sys.argv:
            write_golden(Path(tmp) / "golden")
