"""``BENCH.yaml``: the benchmark on a user's own base model and fine-tuned experts (``mergesmith bench BENCH.yaml``,
``mergesmith eval MODEL BENCH.yaml``).

A researcher has a base model and experts fine-tuned from it, each on one task, and wants the tables the built-in
zoo gives: every data-free method at its paper default and at its best validation setting, seeds for random
methods, each row's normalized average with its 95 % interval and its paired difference with task arithmetic.

    name: my-bench                      # the results' name (default: the file's stem)
    base: models/base                   # a Hugging Face model folder (any architecture)
    seeds: 3                            # runs of random methods (DARE, DELLA) at the chosen setting
    val_limit: 200                      # validation examples per task for the grids (default: all)
    methods: [task_arithmetic, ties]    # default: every data-free method of the built-in benchmark
    data_methods: [regmean, adamerging] # ``--data`` rows (default: all of the built-in data table's)
    step_scale: 0.1                     # ``--data``: fraction of the papers' step counts (default 1)
    out: bench-out                      # results folder (default: bench-out/ beside this file)
    tasks:
      sst2:                             # a sequence classifier: its own head
        expert: models/sst2
        train: data/sst2-train.jsonl    # optional: what Fisher, RegMean and Twin-Merging fit on (--data)
        val: data/sst2-val.jsonl        # JSONL or CSV
        test: data/sst2-test.csv
        text_column: sentence           # default text
        label_column: label             # default label (class ids, or the names of the expert's id2label)
      topic:                            # an encoder + a linear head file {weight, bias} over pooled states
        expert: models/topic-encoder
        head: models/topic-head.safetensors
        pooling: mean                   # mean (default), cls or last
        val: data/topic-val.jsonl
        test: data/topic-test.jsonl
      code:                             # a causal LM scored by perplexity on plain text
        expert: models/code-lm
        metric: perplexity
        val: data/code-val.txt
        test: data/code-test.txt
      arithmetic:                       # a causal LM scored by exact match of greedy answers
        expert: models/math-lm
        metric: exact_match             # JSONL of {prompt, answer}
        val: data/math-val.jsonl
        test: data/math-test.jsonl

Paths are relative to the BENCH.yaml's folder. What is merged is each expert's **backbone**: its weights under
the architecture's ``base_model_prefix`` (``bert.``, ``model.``, ``transformer.`` …), or all of them for a bare
encoder; what lies outside it (a classifier, an LM head) is the task's head and stays the expert's own, as the zoo
keeps each task's head. Every expert's backbone must have the base's tensor names and shapes. The fine-tuned row is
each expert on its own task; the zero-shot row is the base's backbone with each task's head.

Metrics: ``accuracy`` (classification, the default with a classifier or a head), ``exact_match`` and
``perplexity``. Accuracy and exact match normalize as score / the expert's score; perplexity as the expert's
perplexity / this row's (``mergesmith.bench.confidence``). Perplexity here is exp of the mean over windows of
each window's mean token loss (windows of the model's context, at most 1,024 tokens; the bootstrap resamples
windows).

``mergesmith bench BENCH.yaml --data`` adds the data-driven rows of the built-in benchmark
(:mod:`mergesmith.bench.zoo.databench`), which fit on classification tasks: Fisher, RegMean and Twin-Merging on
``train:``, AdaMerging, Concrete and DAM on the unlabeled ``test:`` inputs.

Finished rows are kept in ``<out>/runs/<name>.partial.json`` and the reference rows' outcomes in
``<out>/runs/<name>.reference.json``, both tied to a fingerprint of the file, the data and the model folders: a
stopped run resumes at the first unfinished method. Every mistake is a one-line error naming the file or key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open

from mergesmith.bench.confidence import ACCURACY, LOSS, cached_outcomes
from mergesmith.errors import CheckpointError, RecipeError
from mergesmith.fit import evaluate as ev
from mergesmith.fit.data import Encoded, encode, encode_answers, encode_prompts
from mergesmith.fit.hf import load_causal_lm, load_classifier, load_encoder, load_tokenizer
from mergesmith.fit.task import Task, TaskModel
from mergesmith.recipe.data import MAX_LENGTH, DataSpec, read_examples

MIN_TEST = 20  # test examples (windows for perplexity) a task needs for an interval that means something
MIN_VAL = 5  # validation examples the grids need
METRICS = ("accuracy", "exact_match", "perplexity")
# a prompt/answer task's training split as prompt + answer sequences (the empirical Fisher of the whole answer)
ANSWERS = "train_answers"


class TaskSpec(BaseModel):
    """One task of a BENCH.yaml: its expert, its data and its metric."""

    model_config = ConfigDict(extra="forbid")

    expert: str
    head: str | None = None
    pooling: Literal["mean", "cls", "last"] | None = None
    val: str
    test: str
    train: str | None = None  # labeled training texts: what Fisher, RegMean and Twin-Merging fit on (--data)
    metric: Literal["accuracy", "exact_match", "perplexity"] = "accuracy"
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    max_length: int | None = Field(default=None, ge=2)  # classification: tokens per text; perplexity: window
    max_new_tokens: int = Field(default=ev.MAX_NEW_TOKENS, ge=1)


class BenchSpec(BaseModel):
    """A BENCH.yaml."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    base: str
    tasks: dict[str, TaskSpec] = Field(min_length=1)
    methods: list[str] | None = None
    seeds: int = Field(default=3, ge=1)
    val_limit: int | None = Field(default=None, ge=1)
    data_methods: list[str] | None = None  # the data-driven rows of --data (default: all of them)
    step_scale: float | None = Field(default=None, gt=0, le=1)  # --data: fraction of the papers' steps (1)
    out: str | None = None


def _validation_message(e: ValidationError, where: Path) -> str:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "file"
    if first["type"] == "extra_forbidden":
        owner = TaskSpec if len(first["loc"]) == 3 and first["loc"][0] == "tasks" else BenchSpec
        return f"{where}: unknown key '{loc}' (known keys: {', '.join(owner.model_fields)})"
    if first["type"] == "missing":
        return f"{where}: missing required key '{loc}'"
    return f"{where}: {loc}: {first['msg']}"


def read_bench_file(path: str | Path) -> BenchSpec:
    """Parse and validate a BENCH.yaml (one-line RecipeErrors)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: BENCH file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{at}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a BENCH file is a YAML mapping (base:, tasks:, ...)")
    try:
        return BenchSpec.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(_validation_message(e, path)) from None


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: tensors read from the folders, split into backbone and head


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder's safetensors files, fp32."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors weights here (save the model with safetensors)")
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                out[name] = tensor.float() if tensor.is_floating_point() else tensor
    return out


def backbone(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix.`` with it stripped, or all of them when none is (a bare ``AutoModel``)."""
    dotted = prefix + "."
    if prefix and any(name.startswith(dotted) for name in tensors):
        return {name[len(dotted) :]: t for name, t in tensors.items() if name.startswith(dotted)}
    return dict(tensors)


@dataclass
class SuiteTask:
    """A loaded task: the module that runs it (the expert, head included), how merged backbone names map onto
    the module's, and its evaluator tasks per split."""

    name: str
    spec: TaskSpec
    model: Any  # TaskModel or nn.Module
    prefix: str  # what backbone names get in the module ("bert." …, or "" for a bare encoder)
    backbone: dict[str, torch.Tensor]  # the expert's backbone, as the folder has it (what is merged)
    splits: dict[str, Any]  # split -> evaluator task
    module_names: frozenset[str]  # the module's weights: a merged tensor it lacks (BERT's pooler) is skipped
    fit_data: dict[str, Encoded] = field(default_factory=dict)  # exact match: split -> prompts for the fits

    @property
    def fit_model(self) -> TaskModel:
        """The task's model as data-driven fits run it: parameters named as the merged backbone (a causal LM:
        its next token after the prompt, over the vocabulary)."""
        if self.spec.metric == "exact_match":
            return TaskModel(self.model, prefix=self.prefix, next_token=True)
        return replace(self.model, prefix=self.prefix)

    @property
    def kind(self) -> str:
        return LOSS if self.spec.metric == "perplexity" else ACCURACY

    def params(self, state: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """A merged backbone as the module's parameter names (None: the expert's own weights)."""
        if state is None:
            return None
        return {
            self.prefix + name: tensor
            for name, tensor in state.items()
            if self.prefix + name in self.module_names
        }

    def outcomes(self, state: Mapping[str, torch.Tensor] | None, split: str, limit: int | None = None):
        """Per-example outcomes of the split's first ``limit`` examples (a perplexity task: every window)."""
        return self.split(split, limit).outcomes(self.model, self.params(state))

    def split(self, split: str, limit: int | None = None) -> Any:
        """The split's evaluator task, cut to its first ``limit`` examples (classification, exact match)."""
        task = self.splits[split]
        if limit is None:
            return task
        if self.spec.metric == "accuracy" and limit < len(task.data):
            return ev.ClassificationTask(task.data.batch(slice(0, limit)), task.name)
        if self.spec.metric == "exact_match" and limit < len(task.prompts):
            return replace(task, prompts=task.prompts[:limit], answers=task.answers[:limit])
        return task


class Suite:
    """A BENCH.yaml loaded and checked: the base's backbone, each expert's, and the tasks that score a merge.
    It offers what the bench runs on (the built-in zoo offers the same): ``name``, ``tasks``, ``kinds``,
    ``identity``, ``base_state()``, ``expert_states()``, ``outcomes()`` and ``reference_outcomes()``."""

    def __init__(self, path: str | Path, progress: bool = True):
        self.path = Path(path)
        self.spec = read_bench_file(self.path)
        self.root = self.path.parent
        self.name = self.spec.name or self.path.stem
        self.progress = progress
        self.out = self._resolve(self.spec.out) if self.spec.out else self.root / "bench-out"
        base_folder = ev.model_folder(self._resolve(self.spec.base))
        self.base_folder = base_folder
        self._tasks: dict[str, SuiteTask] = {}
        for name, spec in self.spec.tasks.items():
            self._tasks[name] = self._load_task(name, spec)
        self.tasks: list[str] = list(self._tasks)
        self.kinds = {t: task.kind for t, task in self._tasks.items()}
        # prompt/answer tasks: the data-driven fits predict a causal LM's next token (databench.for_suite)
        self.generative = any(task.spec.metric == "exact_match" for task in self._tasks.values())
        # classification tasks score the base with each expert's head: the zero-shot row's name says so
        self.heads = any(task.spec.metric == "accuracy" for task in self._tasks.values())
        self._base = self._base_backbone()
        self.identity = {"fingerprint": self._fingerprint()}
        self._extra_references: dict[str, dict[str, torch.Tensor]] = {}

    def _resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.root / path

    # -- loading ---------------------------------------------------------------------------------------
    def _load_task(self, name: str, spec: TaskSpec) -> SuiteTask:
        where = f"{self.path}: tasks.{name}"
        folder = ev.model_folder(self._resolve(spec.expert))
        fit_data: dict[str, Encoded] = {}  # exact match: the prompts the data-driven fits read
        if spec.metric == "accuracy":
            model, tokenizer = self._classifier(where, folder, spec)
            module = model.module
            prefix = self._prefix(module, folder, head_file=spec.head is not None)
            given = ("train", "val", "test") if spec.train is not None else ("val", "test")
            splits = {split: self._classification(where, split, spec, tokenizer, model) for split in given}
        else:
            if spec.head is not None or spec.pooling is not None:
                raise RecipeError(f"{where}: head and pooling go with metric accuracy, not {spec.metric}")
            if spec.train is not None and spec.metric == "perplexity":
                raise RecipeError(
                    f"{where}: train: goes with metric accuracy or exact_match (the data-driven rows fit on "
                    "classification and prompt/answer tasks); remove it"
                )
            model = module = load_causal_lm(folder)
            tokenizer = load_tokenizer(folder, ev.TOKENIZER_HINT)
            prefix = self._prefix(module, folder, head_file=False)
            splits = {
                split: self._generative(where, split, spec, tokenizer, model) for split in ("val", "test")
            }
            if spec.metric == "exact_match":
                given = ("train", "val", "test") if spec.train is not None else ("val", "test")
                fit_data = {split: self._prompts(split, spec, tokenizer, module) for split in given}
                if spec.train is not None:  # the empirical Fisher's: the training answers after their prompts
                    fit_data[ANSWERS] = self._prompts("train", spec, tokenizer, module, answers=True)
        self.arch_prefix = getattr(module, "base_model_prefix", "")
        tensors = backbone(folder_tensors(folder), self.arch_prefix)
        names = frozenset(module.state_dict())
        return SuiteTask(name, spec, model, prefix, tensors, splits, names, fit_data)

    def _classifier(self, where: str, folder: Path, spec: TaskSpec) -> tuple[TaskModel, Any]:
        tokenizer = ev.padded_tokenizer(folder)
        if spec.head is not None:
            head_path = self._resolve(spec.head)
            module = load_encoder(folder)
            width = getattr(module.config, "hidden_size", None)
            head = ev.load_head(head_path, width if isinstance(width, int) else None)
            return TaskModel(module, head, pooling=spec.pooling or "mean"), tokenizer
        if spec.pooling is not None:
            raise RecipeError(f"{where}: pooling goes with a head file (a sequence classifier pools itself)")
        hint = "give an AutoModelForSequenceClassification folder, or an encoder folder with head:"
        module = load_classifier(folder, require_head=True, hint=hint)
        if getattr(module.config, "pad_token_id", None) is None:
            module.config.pad_token_id = tokenizer.pad_token_id
        return TaskModel(module), tokenizer

    @staticmethod
    def _prefix(module: torch.nn.Module, folder: Path, head_file: bool) -> str:
        """What the module calls its backbone's weights: ``<base_model_prefix>.`` for a model with a head,
        nothing for a bare encoder (an ``AutoModel``, which a head file goes with)."""
        if head_file:
            return ""
        prefix = getattr(module, "base_model_prefix", "")
        names = {n for n, _ in module.named_parameters()}
        if not prefix or not any(n.startswith(prefix + ".") for n in names):
            raise CheckpointError(
                f"{folder}: cannot tell the backbone from the head ({type(module).__name__} has no "
                f"'{prefix}.' weights)"
            )
        return prefix + "."

    def _classification(self, where: str, split: str, spec: TaskSpec, tokenizer: Any, model: TaskModel):
        file = self._resolve(getattr(spec, split))
        data = DataSpec(path=str(file), text_column=spec.text_column, label_column=spec.label_column)
        examples = read_examples(data, need_labels=True, where=f"{where}.{split}")
        labels = self._class_ids(where, file, examples, model)
        self._check_size(where, split, file, len(labels))
        encoded = encode(tokenizer, examples.texts, labels, spec.max_length or MAX_LENGTH)
        return ev.ClassificationTask(encoded, f"{self.path.stem}:{split}")

    @staticmethod
    def _class_ids(where: str, file: Path, examples: Any, model: TaskModel) -> list[int]:
        """Class ids; string labels map through the expert's ``label2id`` when it names its classes (else, as
        in recipes, ids in sorted order). A label outside the head's classes is an error here, not later."""
        config = getattr(model.module, "config", None)
        classes = int(model.head["weight"].shape[0]) if model.head is not None else int(config.num_labels)
        labels = list(examples.labels)
        if examples.label_names is not None:
            label2id = dict(getattr(config, "label2id", None) or {}) if model.head is None else {}
            named = label2id and not all(k.startswith("LABEL_") for k in label2id)
            if named:
                unknown = [n for n in examples.label_names if n not in label2id]
                if unknown:
                    raise RecipeError(
                        f"{where}: {file}: label '{unknown[0]}' is not one of the expert's classes "
                        f"({', '.join(label2id)}; config.json label2id)"
                    )
                labels = [int(label2id[examples.label_names[i]]) for i in labels]
        bad = [y for y in labels if not 0 <= y < classes]
        if bad:
            raise RecipeError(
                f"{where}: {file}: label {bad[0]} is outside the expert's {classes} classes (0..{classes - 1}); "
                "fix the data or point expert: at the right model"
            )
        return labels

    def _generative(self, where: str, split: str, spec: TaskSpec, tokenizer: Any, model: torch.nn.Module):
        file = self._resolve(getattr(spec, split))
        context = ev.model_context(model)
        if spec.metric == "perplexity":
            _, text = ev.data_file(file, (".txt", ".text", ".md"), "perplexity")
            window = spec.max_length or min(context or ev.MAX_WINDOW, ev.MAX_WINDOW)
            task = ev.PerplexityTask.from_text(text, tokenizer, window, name=f"{where}.{split}")
            self._check_size(where, split, file, len(task.windows()), "windows")
            return task
        prompts, answers = ev.read_prompts(file, spec.prompt_column, spec.answer_column)
        self._check_size(where, split, file, len(prompts))
        keep = context - spec.max_new_tokens if context is not None else None
        return ev.ExactMatchTask.from_texts(
            prompts,
            answers,
            tokenizer,
            max_new_tokens=spec.max_new_tokens,
            max_prompt_length=keep,
            name=f"{where}.{split}",
        )

    def _prompts(
        self, split: str, spec: TaskSpec, tokenizer: Any, module: torch.nn.Module, answers: bool = False
    ) -> Encoded:
        """A prompt/answer split as the data-driven fits read it: each prompt, its first answer token as label
        (``answers``: each prompt followed by its answer, per-position labels)."""
        file = self._resolve(getattr(spec, split))
        prompts, replies = ev.read_prompts(file, spec.prompt_column, spec.answer_column)
        context = min(ev.model_context(module) or ev.MAX_WINDOW, ev.MAX_WINDOW)
        encode = encode_answers if answers else encode_prompts
        return encode(tokenizer, prompts, replies, context - spec.max_new_tokens)

    @staticmethod
    def _check_size(where: str, split: str, file: Path, n: int, unit: str = "examples") -> None:
        need = MIN_TEST if split == "test" else MIN_VAL
        if n < need:
            raise RecipeError(
                f"{where}.{split}: {file} has {n} {unit}; a {split} split needs at least {need} for its "
                "interval to mean something (add data, or for perplexity a longer text or a shorter max_length)"
            )

    def _base_backbone(self) -> dict[str, torch.Tensor]:
        """The base's weights under the experts' backbone names; every expert must have the same names and
        shapes (one architecture), and the base must have them all."""
        first_name, first = next(iter(self._tasks.items()))
        shapes = {n: tuple(t.shape) for n, t in first.backbone.items()}
        for name, task in self._tasks.items():
            other = {n: tuple(t.shape) for n, t in task.backbone.items()}
            if other != shapes:
                diff = sorted(set(other) ^ set(shapes)) or [n for n in shapes if other[n] != shapes[n]]
                raise CheckpointError(
                    f"{self.path}: experts '{first_name}' and '{name}' have different backbones (first "
                    f"difference: '{diff[0]}'); every expert must be fine-tuned from the same base architecture"
                )
        base = backbone(folder_tensors(self.base_folder), self.arch_prefix)
        missing = [n for n in shapes if n not in base]
        if missing:
            raise CheckpointError(
                f"{self.base_folder}: the base has no '{missing[0]}' that the experts' backbones have "
                f"({len(missing)} missing); give the base the experts were fine-tuned from"
            )
        wrong = [n for n in shapes if tuple(base[n].shape) != shapes[n]]
        if wrong:
            raise CheckpointError(
                f"{self.base_folder}: '{wrong[0]}' is {tuple(base[wrong[0]].shape)} in the base but "
                f"{shapes[wrong[0]]} in the experts; give the base the experts were fine-tuned from"
            )
        return {n: base[n] for n in shapes}

    def _fingerprint(self) -> str:
        """What the cached rows depend on: the file, the data files' bytes and the model folders' weights
        (sizes and modification times, so that big checkpoints are not hashed on every run)."""
        h = hashlib.sha256(self.path.read_bytes())
        folders = [self.base_folder] + [self._resolve(s.expert) for s in self.spec.tasks.values()]
        for folder in folders:
            for file in sorted(folder.glob("*.safetensors")):
                stat = file.stat()
                h.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        for spec in self.spec.tasks.values():
            for value in (spec.val, spec.test, spec.head, spec.train):
                if value is not None:
                    h.update(self._resolve(value).read_bytes())
        return h.hexdigest()

    # -- what the bench runs on --------------------------------------------------------------------------
    def base_state(self) -> dict[str, torch.Tensor]:
        return self._base

    def expert_states(self) -> list[dict[str, torch.Tensor]]:
        return [task.backbone for task in self._tasks.values()]

    # -- what the data-driven rows fit on (``mergesmith bench BENCH.yaml --data``) ----------------------------
    def check_data_rows(self, splits: Sequence[str], methods: Sequence[str] = ()) -> None:
        """The data-driven rows fit on classification and prompt/answer tasks (``splits``: the ones the chosen
        rows read; ``methods``: their methods): no task may be scored by perplexity, Twin-Merging's router needs
        classification tasks, and rows that fit on training texts need ``train:``."""
        for name, task in self._tasks.items():
            if task.spec.metric == "perplexity":
                raise RecipeError(
                    f"{self.path}: tasks.{name}: the data-driven rows fit on classification or prompt/answer "
                    "tasks, and this one is scored by perplexity; run --data on a BENCH file without it"
                )
            if task.spec.metric == "exact_match" and "twin" in methods:
                raise RecipeError(
                    f"{self.path}: tasks.{name}: Twin-Merging routes classification tasks, not generation; "
                    "leave twin out with data_methods:"
                )
            available = task.fit_data if task.spec.metric == "exact_match" else task.splits
            if {"train", ANSWERS} & set(splits) and "train" not in available:
                raise RecipeError(
                    f"{self.path}: tasks.{name}: Fisher, RegMean and Twin-Merging fit on labeled training "
                    "texts; add train: FILE (JSONL or CSV, the task's columns), or leave those rows out with "
                    "data_methods:"
                )

    def split(self, task: str, split: str, limit: int | None = None, offset: int = 0) -> Encoded:
        """Examples ``offset`` … ``offset + limit`` of a classification task's split (as the zoo's ``split``)."""
        owner = self._tasks[task]
        data = owner.fit_data[split] if owner.spec.metric == "exact_match" else owner.splits[split].data
        if offset == 0 and (limit is None or limit >= len(data)):
            return data
        return data.batch(slice(offset, None if limit is None else offset + limit))

    def task(
        self, task: str, split: str = "train", limit: int | None = None, labeled: bool = True, offset: int = 0
    ) -> Task:
        """A classification task as data-driven fits see it (as the zoo's ``task``): its expert's model named as
        the merged backbone, with the split's examples (labels hidden, -1, with ``labeled=False``)."""
        data = self.split(task, split, limit, offset)
        if not labeled:
            data = Encoded(data.input_ids, data.attention_mask, torch.full_like(data.labels, -1))
        return Task(task, self._tasks[task].fit_model, data, labeled)

    def finetuned_accuracy(self, split: str = "test") -> dict[str, float]:
        """Each expert's score on its own task (the test split's: what rows are normalized by)."""
        if split != "test":
            raise ValueError("the experts' reference scores are kept for the test split")
        finetuned = self.reference_outcomes()["finetuned"]
        return {t: float(o.double().mean()) for t, o in finetuned.items()}

    def outcomes(
        self, state: Mapping[str, torch.Tensor] | None, split: str = "test", limit: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Per task, per-example outcomes of a merged backbone with the task's own head (hits, or window
        losses for perplexity); ``None``: each expert as it is."""
        return {t: task.outcomes(state, split, limit) for t, task in self._tasks.items()}

    def module_outcomes(
        self, module: torch.nn.Module, split: str = "val", limit: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Per task, outcomes of a whole causal LM of its own architecture (a search's layer path), which only
        the causal-LM tasks can run."""
        heads = [t for t, task in self._tasks.items() if task.spec.metric == "accuracy"]
        if heads:
            raise RecipeError(
                f"{self.path}: task '{heads[0]}' classifies with the expert's head; a model of another "
                "architecture is scored on exact-match and perplexity tasks only"
            )
        return {t: task.split(split, limit).outcomes(module) for t, task in self._tasks.items()}

    def task_outcomes(
        self,
        task: str,
        state: Mapping[str, torch.Tensor] | None,
        split: str = "test",
        limit: int | None = None,
    ) -> torch.Tensor:
        """One task's per-example outcomes of a merged backbone (``outcomes`` for one task only)."""
        return self._tasks[task].outcomes(state, split, limit)

    def reference_outcomes(self, progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """``finetuned`` (each expert on its task) and ``zeroshot`` (the base's backbone with each task's
        head), kept in ``<out>/runs/<name>.reference.json`` under the suite's fingerprint."""

        def compute() -> dict[str, dict[str, torch.Tensor]]:
            rows = {"zeroshot": self.outcomes(self._base), "finetuned": self.outcomes(None)}
            for t, values in rows["finetuned"].items():
                if self.kinds[t] == ACCURACY and not bool(values.any()):
                    raise RecipeError(
                        f"{self.path}: tasks.{t}: the expert scores 0 on its own test data, so no score can be "
                        "normalized by it; check expert:, the data's labels or answers, and metric:"
                    )
            return rows

        rows = cached_outcomes(self.out / "runs" / f"{self.name}.reference.json", self.identity, compute)
        return rows | self._extra_references

    def add_reference(self, name: str, outcomes: Mapping[str, torch.Tensor]) -> None:
        """A reference row scored elsewhere on this suite's test data, in its order (the LLM zoo's multi-task
        fine-tune, whose outcomes the zoo's build keeps): shown and bootstrapped like the zero-shot row."""
        if name in ("zeroshot", "finetuned"):
            raise RecipeError(f"{self.path}: reference row '{name}' is the suite's own; choose another name")
        if set(outcomes) != set(self.tasks):
            raise RecipeError(
                f"{self.path}: reference row '{name}' scores tasks {sorted(outcomes)}, the suite has {self.tasks}"
            )
        for task, values in outcomes.items():
            owner = self._tasks[task]
            split, metric = owner.splits["test"], owner.spec.metric
            if metric == "exact_match":
                size = len(split.prompts)
            elif metric == "accuracy":
                size = len(split.data)
            else:  # perplexity windows are only counted when scored: their number is not checked here
                continue
            if values.shape != (size,):
                raise RecipeError(
                    f"{self.path}: reference row '{name}': task '{task}' has {len(values)} test outcomes, the "
                    f"suite's test split {size}"
                )
        self._extra_references[name] = dict(outcomes)


def check_methods(methods: Sequence[str] | None, known: Mapping[str, Any], where: Path) -> None:
    unknown = [m for m in methods or [] if m not in known]
    if unknown:
        raise RecipeError(
            f"{where}: methods: '{unknown[0]}' is not in the benchmark (choose from {', '.join(known)})"
        )
