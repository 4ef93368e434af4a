"""Small models trained from scratch (MLP, CIFAR-style ResNet): the folder format, its one-line refusals, and their
permutation specs — a permuted model computes the same function, and weight matching and activation matching both
find a random permutation again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mergesmith.arch.permutation import AxisGroup, permutation_spec
from mergesmith.errors import CheckpointError
from mergesmith.fit.activations import capture_points, unit_correlations
from mergesmith.fit.small_models import build, load_small_model, save_small_model
from mergesmith.io.safetensors_io import save_file
from mergesmith.ops.permute import (
    invert,
    permute_state,
    random_permutations,
    solve_assignment,
)
from tests.helpers import assert_weight_matching_undoes_a_shuffle

IMAGE = (3, 8, 8)  # channels, height, width: the ResNet's stages see 8×8, 4×4 and 2×2 positions
CONFIGS = {
    "mlp": {"model_type": "mergesmith_mlp", "sizes": [3 * 8 * 8, 32, 24, 10]},
    "resnet": {
        "model_type": "mergesmith_resnet",
        "in_channels": 3,
        "widths": [8, 16, 32],
        "blocks": [2, 2, 2],
        "num_classes": 10,
    },
}
CASES = [(family, residual) for family in CONFIGS for residual in (True, False)]

pytestmark = pytest.mark.usefixtures("one_thread")


def model(family: str, seed: int = 0) -> nn.Module:
    """A randomly initialized small model whose BatchNorms look trained: per-channel affine parameters, and
    running statistics (and a step count) from a few batches in training mode, so that moving them with the
    channels is tested and eval-mode activations have a sensible scale."""
    torch.manual_seed(seed)
    module = build(CONFIGS[family])
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.momentum = None  # running statistics: the plain average over the batches below
        module.train()
        for k in range(3):
            module(images(16, seed=seed + 200 + k))
    return module.eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *IMAGE, generator=torch.Generator().manual_seed(seed))


def outputs(module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return module(images(4, seed=1))


def twin(family: str, state: dict[str, torch.Tensor]) -> nn.Module:
    module = build(CONFIGS[family])
    module.load_state_dict(state)
    return module.eval()


def spec_of(family: str, module: nn.Module, residual: bool = True):
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    return permutation_spec(CONFIGS[family], shapes, residual)


def one_line(error: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


# --- the folder format -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_save_and_load_round_trip_bit_for_bit(family, tmp_path):
    module = model(family)
    folder = save_small_model(module, CONFIGS[family], tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded, config = load_small_model(folder)
    assert config == CONFIGS[family] and not loaded.training
    saved, back = module.state_dict(), loaded.state_dict()
    assert list(back) == list(saved)
    for name, tensor in saved.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert torch.equal(outputs(loaded), outputs(module))


def _saved(tmp_path: Path, family: str = "resnet") -> Path:
    return save_small_model(model(family), CONFIGS[family], tmp_path / "m")


def _drop(folder: Path, file: str) -> None:
    (folder / file).unlink()


def _config(folder: Path, **changes) -> None:
    (folder / "config.json").write_text(json.dumps(CONFIGS["resnet"] | changes))


def _weights(folder: Path, drop: str | None = None, add: str | None = None) -> None:
    state = model("resnet").state_dict()
    state.pop(drop or "", None)
    if add:
        state[add] = torch.zeros(3)
    save_file(state, folder / "model.safetensors")


LOAD_ERRORS = {
    "no config": (lambda f: _drop(f, "config.json"), r"config\.json: not found \(a small model folder holds"),
    "no weights": (lambda f: _drop(f, "model.safetensors"), r"model\.safetensors: not found"),
    "unknown type": (
        lambda f: _config(f, model_type="mergesmith_cnn"),
        r"/m/config\.json: model_type 'mergesmith_cnn' is not a small model \(supported: mergesmith_mlp, mergesmith_resnet\)",
    ),
    "bad config value": (
        lambda f: _config(f, blocks=[2, 0, 2]),
        r"'blocks' must be a non-empty list of positive",
    ),
    "missing tensor": (
        lambda f: _weights(f, drop="layer2.1.bn1.running_var"),
        r"tensor 'layer2\.1\.bn1\.running_var' is missing",
    ),
    "wrong shape": (  # the first tensor in module order whose shape the config does not give
        lambda f: _config(f, widths=[8, 16, 24]),
        r"tensor 'layer3\.0\.conv1\.weight' has shape \[32, 16, 3, 3\] but the config gives \[24, 16, 3, 3\]",
    ),
    "extra tensor": (lambda f: _weights(f, add="fc.scale"), r"tensor 'fc\.scale' is not part of"),
}


@pytest.mark.parametrize("case", sorted(LOAD_ERRORS))
def test_load_refusals_are_one_line(case, tmp_path):
    folder = _saved(tmp_path)
    spoil, message = LOAD_ERRORS[case]
    spoil(folder)
    with pytest.raises(CheckpointError, match=message) as e:
        load_small_model(folder)
    one_line(e)


def test_save_refuses_a_module_the_config_does_not_describe(tmp_path):
    with pytest.raises(CheckpointError, match=r"module: tensor 'conv1\.weight' is missing") as e:
        save_small_model(model("mlp"), CONFIGS["resnet"], tmp_path / "m")
    one_line(e)
    assert not (tmp_path / "m").exists()


# --- permutation specs ----------------------------------------------------------------------------------------


def test_the_specs_groups_and_axes():
    mlp = spec_of("mlp", model("mlp"))
    assert mlp.sizes == {"layers.0": 32, "layers.1": 24}
    assert mlp.axes["layers.0.weight"] == (AxisGroup("layers.0"), None)
    assert mlp.axes["layers.1.weight"] == (AxisGroup("layers.1"), AxisGroup("layers.0"))
    assert mlp.axes["layers.2.weight"] == (None, AxisGroup("layers.1"))
    assert "layers.2.bias" not in mlp.axes  # the logits stay in place
    assert spec_of("mlp", model("mlp"), residual=False) == mlp  # no residual stream

    resnet = spec_of("resnet", model("resnet"))
    s1, s2, s3 = AxisGroup("stage1"), AxisGroup("stage2"), AxisGroup("stage3")
    inner = {f"layer{s}.{b}": w for s, w in ((1, 8), (2, 16), (3, 32)) for b in (0, 1)}
    assert resnet.sizes == {"stage1": 8, "stage2": 16, "stage3": 32} | inner
    assert resnet.axes["conv1.weight"] == (s1, None, None, None)
    assert resnet.axes["bn1.running_var"] == (s1,)
    assert resnet.axes["layer1.0.conv1.weight"] == (AxisGroup("layer1.0"), s1, None, None)
    assert resnet.axes["layer1.0.bn1.running_mean"] == (AxisGroup("layer1.0"),)
    assert resnet.axes["layer1.1.conv2.weight"] == (s1, AxisGroup("layer1.1"), None, None)
    assert resnet.axes["layer2.0.conv1.weight"] == (AxisGroup("layer2.0"), s1, None, None)
    assert resnet.axes["layer2.0.downsample.0.weight"] == (s2, s1, None, None)
    assert resnet.axes["layer2.0.downsample.1.bias"] == (s2,)
    assert resnet.axes["layer2.1.bn2.weight"] == (s2,)
    assert resnet.axes["fc.weight"] == (None, s3)
    assert not any(n.endswith("num_batches_tracked") for n in resnet.axes) and "fc.bias" not in resnet.axes

    inner_only = spec_of("resnet", model("resnet"), residual=False)
    assert inner_only.sizes == inner
    assert inner_only.axes["layer2.0.conv1.weight"] == (AxisGroup("layer2.0"), None, None, None)
    assert inner_only.axes["layer2.0.conv2.weight"] == (None, AxisGroup("layer2.0"), None, None)
    assert all(e is None for e in inner_only.axes["layer2.0.downsample.0.weight"])


def test_the_resnet_spec_reads_torchvision_resnet18_and_34_names():
    """torchvision's BasicBlock ResNets have the same names (their 7×7 stem and max-pool hold no other tensors):
    four stages, a stream group each (stages 2–4 project) and an inner group per block."""
    for blocks in ([2, 2, 2, 2], [3, 4, 6, 3]):
        config = CONFIGS["resnet"] | {"widths": [64, 128, 256, 512], "blocks": blocks, "num_classes": 1000}
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in build(config).state_dict().items()}
        shapes["conv1.weight"] = (64, 3, 7, 7)
        spec = permutation_spec({"model_type": "mergesmith_resnet"}, shapes)
        assert [g for g in spec.groups if g.startswith("stage")] == ["stage1", "stage2", "stage3", "stage4"]
        assert len(spec.groups) == 4 + sum(blocks)
        assert spec.axes["fc.weight"] == (None, AxisGroup("stage4"))


def test_spec_refusals_are_one_line():
    shapes = {k: tuple(v.shape) for k, v in model("resnet").state_dict().items()}
    refusals = [
        (
            shapes | {"layer1.0.conv3.weight": (32, 8, 1, 1)},
            True,
            r"Bottleneck ResNet blocks have no permutation",
        ),
        (shapes | {"extra.weight": (5, 16)}, True, r"'extra\.weight' has no rule in the mergesmith_resnet"),
        (shapes | {"extra.weight": (5, 16)}, False, r"'extra\.weight' has no rule"),  # inner widths move too
        (shapes | {"layer2.1.bn1.bias": (15,)}, True, r"'layer2\.1\.bn1\.bias' has shape \[15\], but axis 0"),
        ({"fc.weight": (10, 4)}, True, r"not a ResNet checkpoint"),
    ]
    for tensors, residual, message in refusals:
        with pytest.raises(CheckpointError, match=message) as e:
            permutation_spec(CONFIGS["resnet"], tensors, residual)
        one_line(e)
    assert permutation_spec(CONFIGS["resnet"], shapes | {"extra.weight": (5, 7)}).sizes  # no moved width
    mlp = {k: tuple(v.shape) for k, v in model("mlp").state_dict().items()}
    with pytest.raises(CheckpointError, match=r"'layers\.1\.weight' has shape \[24, 30\]") as e:
        permutation_spec(CONFIGS["mlp"], mlp | {"layers.1.weight": (24, 30)})
    one_line(e)


@pytest.mark.parametrize(("family", "residual"), CASES)
def test_a_permuted_small_model_computes_the_same_function(family, residual):
    module = model(family)
    spec = spec_of(family, module, residual)
    assert any(g.startswith("stage") for g in spec.groups) == (residual and family == "resnet")
    perms = random_permutations(spec, seed=3)
    reference = module.state_dict()
    state = permute_state(reference, spec, perms)
    moved = {k for k, v in state.items() if not torch.equal(v, reference[k])}
    if family == "resnet":  # running statistics move with their channels; the step count does not
        assert "layer1.0.bn1.running_mean" in moved and "layer1.0.bn1.running_var" in moved
        assert ("bn1.running_mean" in moved) == residual and "bn1.num_batches_tracked" not in moved
    else:
        assert moved == {
            "layers.0.weight",
            "layers.0.bias",
            "layers.1.weight",
            "layers.1.bias",
            "layers.2.weight",
        }
    torch.testing.assert_close(outputs(twin(family, state)), outputs(module), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("family", "residual"), CASES)
def test_weight_matching_recovers_a_random_permutation_exactly(family, residual):
    module = model(family)
    spec = spec_of(family, module, residual)
    assert_weight_matching_undoes_a_shuffle(spec, module.state_dict())


@pytest.mark.parametrize(("family", "residual"), CASES)
def test_activation_matching_recovers_a_random_permutation(family, residual):
    """Correlations of the two models' activations on random images (every position of a convolution's input a
    sample, every example of a linear layer's): the shuffle's inverse for every group."""
    module = model(family)
    spec = spec_of(family, module, residual)
    points = capture_points(spec, module)
    if family == "resnet":  # conv2 reads the inner group; block conv1s, projections and fc read the streams
        assert points["layer1.0.conv2"] == ("layer1.0", 1) and "conv1" not in points
        assert ("layer2.0.downsample.0" in points) == residual and ("fc" in points) == residual
    perms = random_permutations(spec, seed=2)
    shuffled = twin(family, permute_state(module.state_dict(), spec, perms))
    batch = images(24, seed=5)
    costs = unit_correlations(spec, module, shuffled, [batch[:12], batch[12:]])
    assert set(costs) == set(spec.groups)
    for group in spec.groups:
        assert torch.equal(solve_assignment(costs[group]), invert(perms[group])), group
