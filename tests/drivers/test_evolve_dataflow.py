"""The data-flow space: genome decoding (indicators across repetitions, the compact scales, clamping), the initial
genome as model ``start`` itself, and the path's recipe (layer stacking with the scales folded into the branch
outputs), merged by the engine, against the scaled path computed by its definition (hooks that multiply each
layer's input) on tiny Llama / Mistral / Qwen2 models; the refusals."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from mergesmith.api.state_dicts import merge_recipe_in_memory
from mergesmith.drivers.evolve.dataflow import DataflowSpace, PathStep, check_sources, path_recipe
from mergesmith.drivers.evolve.search import cma_options
from mergesmith.errors import RecipeError
from mergesmith.fit.hf import causal_lm_from_state
from mergesmith.io.reader import DictSource

pytestmark = pytest.mark.usefixtures("one_thread")

# The fold is exact up to RMSNorm's eps (norm(C·y) with eps is norm(y) with eps/C²): a negligible eps makes the
# comparison against the scaled path test the fold itself.
TINY_EPS = 1e-12


def tiny_model(family: str, seed: int, layers: int = 3, **overrides) -> torch.nn.Module:
    """A tiny random decoder of ``family``, every parameter (norm gains and biases too) perturbed away from its
    initial value so that no tensor is trivially 0 or 1."""
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    settings = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rms_norm_eps": TINY_EPS,
        **overrides,
    }
    if family != "qwen2":
        settings.setdefault("head_dim", 8)
    torch.manual_seed(seed)
    model = model_class(config_class(**settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


def config_and_state(model: torch.nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """What a checkpoint holds: config.json and the tensors (a tied head is not saved)."""
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    return model.config.to_dict(), state


def path_model(
    models: list[torch.nn.Module], steps: list[PathStep], dtype: str = "float32"
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The path's recipe merged by the engine over the models held in memory: config.json and tensors."""
    sources = {}
    for i, model in enumerate(models):
        config, state = config_and_state(model)
        sources[f"m{i}"] = DictSource(state, f"m{i}", config)
    state, config = merge_recipe_in_memory(path_recipe(steps, list(sources), dtype), sources)
    return config, state


def scale_input(scale: float, calls: list[int]):
    """A forward pre-hook multiplying a decoder layer's input hidden state by ``scale``."""

    def hook(module, args, kwargs):
        calls.append(1)
        if args:
            return (args[0] * scale, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * scale}

    return hook


def scaled_path_reference(
    models: list[torch.nn.Module], steps: list[PathStep], calls: list[int]
) -> torch.nn.Module:
    """The path by its definition, built from the source modules (not from the recipe): h = embed(x) of the first
    step's model; h = layer(scale · h) for each step; logits = lm_head(norm(h)) of the last step's model."""
    source, last = models[steps[0].model], models[steps[-1].model]
    config = copy.deepcopy(source.config)
    config.num_hidden_layers = len(steps)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [models[s.model].config.layer_types[s.layer] for s in steps]
    reference = type(source)(config)
    reference.model.embed_tokens.load_state_dict(source.model.embed_tokens.state_dict())
    reference.model.norm.load_state_dict(last.model.norm.state_dict())
    if not config.tie_word_embeddings:  # a tied head is the first model's embedding
        reference.lm_head.load_state_dict(last.lm_head.state_dict())
    for k, step in enumerate(steps):
        layer = reference.model.layers[k]
        layer.load_state_dict(models[step.model].model.layers[step.layer].state_dict())
        layer.register_forward_pre_hook(scale_input(step.scale, calls), with_kwargs=True)
    return reference.eval()


def random_tokens(seed: int, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def mixed_path(seed: int, lengths: tuple[int, ...]) -> list[PathStep]:
    """Layers of both models, one repeated, scales in [0.5, 2]."""
    rng = np.random.default_rng(seed)
    picks = [(0, 0), (1, 1), (1, 1), (0, 2), (1, lengths[1] - 1), (0, 1)]
    return [PathStep(m, layer, float(2 ** rng.uniform(-1, 1))) for m, layer in picks]


FAMILIES = {
    # Llama with attention and MLP biases: o_proj and down_proj biases are folded too
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),  # q/k/v biases
}


@pytest.mark.parametrize("case", list(FAMILIES))
def test_folded_path_model_equals_the_scaled_path(case):
    family, overrides = FAMILIES[case]
    models = [tiny_model(family, 1, 3, **overrides), tiny_model(family, 2, 4, **overrides)]
    steps = mixed_path(0, (3, 4))
    config, state = path_model(models, steps)

    assert config["num_hidden_layers"] == len(steps)
    assert ("lm_head.weight" in state) != bool(overrides.get("tie_word_embeddings"))
    folded = causal_lm_from_state(config, state)
    assert type(folded) is type(models[0])
    calls: list[int] = []
    reference = scaled_path_reference(models, steps, calls)
    tokens = random_tokens(3)
    with torch.no_grad():
        expected = reference(tokens).logits
        actual = folded(tokens).logits
    assert len(calls) == len(steps)  # the reference did scale every layer's input
    assert relative_error(actual, expected) < 1e-4
    # the scales matter: the same path without them computes something else
    unscaled = path_model(models, [PathStep(s.model, s.layer, 1.0) for s in steps])
    with torch.no_grad():
        assert relative_error(causal_lm_from_state(*unscaled)(tokens).logits, expected) > 1e-2


def test_folding_divides_the_branch_outputs_by_the_cumulative_scale_in_fp32_and_keeps_dtypes():
    model = tiny_model("llama", 4, 2, attention_bias=True, mlp_bias=True).to(torch.bfloat16)
    _, state = config_and_state(model)
    steps = [PathStep(0, 1, 2.0), PathStep(0, 0, 0.3), PathStep(0, 1, 1.25)]
    _, out = path_model([model], steps, "bfloat16")
    cumulative = [2.0, 2.0 * 0.3, 2.0 * 0.3 * 1.25]
    for k, step in enumerate(steps):
        for suffix in ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight"):
            source = state[f"model.layers.{step.layer}.{suffix}"]
            expected = (source.float() * (1.0 / cumulative[k])).to(torch.bfloat16)
            assert torch.equal(out[f"model.layers.{k}.{suffix}"], expected)
        for suffix in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
            assert torch.equal(
                out[f"model.layers.{k}.{suffix}"], state[f"model.layers.{step.layer}.{suffix}"]
            )
    assert all(t.dtype == torch.bfloat16 for t in out.values())


@pytest.mark.parametrize("start", [0, 1])
def test_initial_genome_is_model_start_itself(start):
    models = [tiny_model("qwen2", 5, 3), tiny_model("qwen2", 6, 4)]
    configs, states = zip(*(config_and_state(m) for m in models))
    space = DataflowSpace([3, 4], repeats=2, start=start)
    steps = space.decode(space.initial())
    assert steps == [PathStep(start, layer, 1.0) for layer in range(configs[start]["num_hidden_layers"])]
    config, state = path_model(models, steps)
    assert config["num_hidden_layers"] == configs[start]["num_hidden_layers"]
    assert state.keys() == states[start].keys()
    tokens = random_tokens(7)
    with torch.no_grad():
        assert torch.equal(causal_lm_from_state(config, state)(tokens).logits, models[start](tokens).logits)


def test_the_first_samples_stay_near_the_start_path():
    """A 135M-sized space (2 models × 30 layers, repeated twice): with σ0 = 1/6 on every coordinate no sample kept
    the start path; with the initial spread about one slot flips per sample (a path equals the start with
    P = (1 − 1/T)^T ≈ e⁻¹) and the input scales stay within ±10 %."""
    import cma

    space = DataflowSpace([30, 30], repeats=2)
    start = space.decode(space.initial())

    def samples(spread):
        options = cma_options(0, 400, None, spread)
        return [space.decode(x) for x in cma.CMAEvolutionStrategy(space.initial(), 1 / 6, options).ask()]

    def same_path(steps):
        return [(s.model, s.layer) for s in steps] == [(s.model, s.layer) for s in start]

    spread = samples(space.initial_spread(1 / 6))
    kept = sum(map(same_path, spread)) / len(spread)
    assert 0.25 < kept < 0.5  # e⁻¹ ≈ 0.37
    assert all(0.9 < s.scale < 1.1 for steps in spread for s in steps)
    assert sum(map(same_path, samples(None))) / 400 < 0.05
    assert space.initial_spread(0.01)[0] == 1.0  # never above σ0


def test_decode_picks_the_positive_slots_in_order_across_repetitions_with_the_compact_scales():
    space = DataflowSpace([2, 3], repeats=2)
    assert (space.num_kinds, space.slots, space.size) == (5, 10, 10 + 4 + 5)
    rng = np.random.default_rng(0)
    u, v = rng.normal(0, 0.3, (2, 2)), rng.normal(0, 0.3, 5)
    indicators = np.full(10, -1.0)
    indicators[[1, 3, 5, 9, 4]] = [0.2, 1.0, 3.0, 0.01, 0.5]
    indicators[7] = 0.0  # not > 0
    steps = space.decode(np.concatenate([indicators, u.ravel(), v]))
    # slots 1 3 4 5 9 → kinds 1 3 4 0 4 → (0,1) (1,1) (1,2) (0,0) (1,2)
    assert [(s.model, s.layer) for s in steps] == [(0, 1), (1, 1), (1, 2), (0, 0), (1, 2)]
    models_before = [0, 0, 1, 1, 0]  # the embedding counts as the first layer's model
    kinds = [1, 3, 4, 0, 4]
    for step, before, kind in zip(steps, models_before, kinds):
        assert step.scale == pytest.approx(math.exp(u[before, step.model] + v[kind]), rel=1e-12)
    assert space.kind_of(9) == (1, 2)


def test_scales_are_clamped_to_a_quarter_and_four_and_the_genome_is_checked():
    space = DataflowSpace([1, 1], repeats=1)
    genome = np.zeros(space.size)
    genome[:2] = 1.0
    genome[2 + 4 :] = [5.0, -5.0]  # v
    assert [s.scale for s in space.decode(genome)] == pytest.approx([4.0, 0.25])
    slices = path_recipe(space.decode(genome), ["a", "b"])["slices"]
    assert slices[0]["sources"][0] == {
        "model": "a",
        "layer_range": [0, 1],
        "parameters": {
            "scale": [
                {"filter": ".self_attn.o_proj.", "value": 0.25},  # 1 / C_1
                {"filter": ".mlp.down_proj.", "value": 0.25},
                {"value": 1.0},
            ]
        },
    }
    assert slices[1]["sources"][0] == {"model": "b", "layer_range": [0, 1]}  # C_2 = 4 · 1/4 = 1
    with pytest.raises(RecipeError, match="needs 8"):
        space.decode(genome[:-1])
    genome[0] = np.nan
    with pytest.raises(RecipeError, match="NaN"):
        space.decode(genome)
    with pytest.raises(RecipeError, match="start is 2"):
        DataflowSpace([1, 1], start=2)


def test_describe_is_compact():
    steps = [PathStep(0, layer, 1.0) for layer in range(6)] + [PathStep(1, 3, 1.0)]
    assert DataflowSpace.describe(steps) == "0:0-5, 1:3 (scales all 1)"
    steps = [PathStep(0, 0, 1.0), PathStep(0, 1, 1.5), PathStep(0, 1, 0.25)]
    assert DataflowSpace.describe(steps) == "0:0-1, 0:1 (scales 1 1.5 0.25)"
    assert DataflowSpace.describe([]) == "(empty path)"


def test_empty_path_decodes_to_nothing_and_is_refused():
    space = DataflowSpace([2, 2])
    genome = space.initial()
    genome[: space.slots] = -1.0
    assert space.decode(genome) == []
    with pytest.raises(RecipeError, match="empty") as error:
        path_recipe(space.decode(genome), ["a", "b"])
    assert "\n" not in str(error.value)


def test_refusals_name_what_differs():
    config, _ = config_and_state(tiny_model("llama", 9, 2))
    wide_config, _ = config_and_state(tiny_model("llama", 10, 2, hidden_size=48, head_dim=12))
    with pytest.raises(RecipeError, match=r"hidden_size \(a: 32, b: 48\)"):
        check_sources([config, wide_config], ["a", "b"])
    qwen_config, _ = config_and_state(tiny_model("qwen2", 11, 2))
    with pytest.raises(RecipeError, match="different families"):
        check_sources([config, qwen_config], ["a", "b"])
    with pytest.raises(RecipeError, match="out of bounds"):
        path_model([tiny_model("llama", 9, 2)], [PathStep(0, 2, 1.0)])


def test_unsupported_family_is_refused_by_name():
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32).to_dict()
    with pytest.raises(RecipeError, match="gpt: model_type 'gpt2'"):
        check_sources([config], ["gpt"])


def test_folded_model_generates_what_the_scaled_path_generates():
    models = [tiny_model("llama", 13, 3), tiny_model("llama", 14, 3)]
    steps = mixed_path(1, (3, 3))
    folded = causal_lm_from_state(*path_model(models, steps))
    reference = scaled_path_reference(models, steps, [])
    prompt = random_tokens(15, (1, 5))
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        generated = folded.generate(prompt, **settings)
        expected = reference.generate(prompt, **settings)
    assert generated.shape == (1, 9)
    assert torch.equal(generated, expected)
