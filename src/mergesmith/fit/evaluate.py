"""The evaluator: a model and a task in, metrics out, for any Hugging Face architecture.

Three kinds of task share one interface (:class:`EvalTask`): ``task.evaluate(model, params=None,
batch_size=None, progress=False) -> dict[str, float]``.

- :class:`ClassificationTask` (``accuracy``, ``loss``: mean cross-entropy, ``examples``) runs a
  :class:`~mergesmith.fit.task.TaskModel` of either form, an ``AutoModelForSequenceClassification`` (its own
  head) or an encoder (any ``AutoModel``) with a linear head over pooled states (``pooling``: ``mean``,
  ``cls`` or ``last``). Examples are batched in order of length, so batches carry little padding and the
  metrics do not depend on the batch size beyond float noise.
- :class:`PerplexityTask` (``loss``: mean token cross-entropy, ``perplexity`` = exp(loss), ``tokens``:
  predicted tokens, ``windows``) runs a causal LM over a text file. The whole file is tokenized once (with the
  tokenizer's default special tokens, so a Llama-style tokenizer puts one BOS at the start) and cut into
  consecutive, non-overlapping windows of ``max_length`` tokens (the last one shorter). Each window is scored
  on its own: every token but the window's first is predicted from the tokens before it in the window.
  Non-overlapping windows score each token once at a cost of one forward pass per window; a sliding window
  would give the early tokens of each window more context at several times the cost, and this is the number
  merges are compared by, not a leaderboard's. The default ``max_length`` is the model's context, at most 1024
  tokens.
- :class:`ExactMatchTask` (``exact_match``, ``examples``) greedily decodes at most ``max_new_tokens`` tokens
  after each prompt (stopping at the model's end-of-text token) and compares the continuation with the answer.
  The continuation is decoded without special tokens; with ``stop_at_newline`` (the default) it is cut at its
  first newline after any leading whitespace (a base model that has answered a one-line question goes on with
  the next line); both strings are then stripped of surrounding whitespace and compared exactly (case and
  punctuation count). Prompts are encoded with the tokenizer's default special tokens, as ``model.generate``
  is usually fed.

``params``: every task runs its model with a state dict of fp32 tensors (e.g. an in-memory merge) in place of
the module's own weights through ``torch.func.functional_call``, without copying the module, so many candidate
merges are scored with one loaded module. Names the dict lacks keep the module's weights; a name the module
does not have, or a shape it does not fit, is a CheckpointError. Everything runs in eval mode under
``torch.inference_mode``: the metrics are deterministic.

The loaders (:func:`load_classification`, :func:`load_perplexity`, :func:`load_exact_match`) build a task and
its model from a local Hugging Face model folder and a data file; nothing is downloaded, and every mistake is
a one-line error that names the file or folder and says what to do.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from mergesmith.errors import CheckpointError, MergeError, RecipeError
from mergesmith.fit.data import Encoded, encode_examples
from mergesmith.fit.hf import (
    load_causal_lm,
    load_classifier,
    load_encoder,
    load_tokenizer,
    quiet_transformers,
)
from mergesmith.fit.task import POOLINGS, TaskModel, eval_mode
from mergesmith.recipe.data import MAX_LENGTH, DataSpec, read_examples

MAX_WINDOW = 1024  # perplexity's default window: the model's context, at most this many tokens
MAX_NEW_TOKENS = 32
CLASSIFICATION_BATCH = 32
PERPLEXITY_BATCH = 4
# prompts per greedy batch: each decoding step reads every weight once whatever the batch, so on a CPU a step of
# 32 rows costs little more than one of 8 (prompts are batched by length, so padding stays small)
GENERATION_BATCH = 32
TOKENIZER_HINT = "give a model folder with its tokenizer files, or a tokenizer folder (--tokenizer)"


@runtime_checkable
class EvalTask(Protocol):
    """What every evaluation task offers: a ``name`` and ``evaluate(model, params, ...) -> metrics``."""

    name: str

    def evaluate(
        self,
        model: Any,
        params: Mapping[str, torch.Tensor] | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> dict[str, float]:
        """The task's metrics for ``model`` run with ``params`` (None: its own weights)."""
        ...


def check_params(module: nn.Module, params: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``params`` checked against ``module`` (every name one of its parameters or buffers, every shape the
    same) and moved to its tensors' device and floating dtype; ``{}`` for None. CheckpointError on a
    mismatch."""
    if not params:
        return {}
    own = dict(module.named_parameters(remove_duplicate=False))
    own.update(module.named_buffers(remove_duplicate=False))
    unknown = [n for n in params if n not in own]
    if unknown:
        raise CheckpointError(
            f"params: {len(unknown)} name(s) that {type(module).__name__} does not have, "
            f"e.g. '{unknown[0]}' (give its own parameter names, as in its state_dict)"
        )
    out = {}
    for name, value in params.items():
        target = own[name]
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(
                f"params: '{name}' has shape {tuple(value.shape)}, {type(module).__name__} "
                f"needs {tuple(target.shape)}"
            )
        dtype = target.dtype if value.is_floating_point() and target.is_floating_point() else value.dtype
        out[name] = value.to(device=target.device, dtype=dtype)
    return out


def as_task_model(model: TaskModel | nn.Module) -> TaskModel:
    """``model`` as a TaskModel: a bare module is taken to be a sequence classifier (its own head)."""
    return model if isinstance(model, TaskModel) else TaskModel(model)


def module_of(model: TaskModel | nn.Module) -> nn.Module:
    """The network inside ``model`` (a TaskModel's shared module, or the module itself)."""
    return model.module if isinstance(model, TaskModel) else model


def run(module: nn.Module, weights: Mapping[str, torch.Tensor], **kwargs: Any) -> Any:
    """``module(**kwargs)`` with ``weights`` in place of its own (``functional_call``; none: a plain call)."""
    if not weights:
        return module(**kwargs)
    return functional_call(module, dict(weights), args=(), kwargs=kwargs, strict=False)


def length_order(lengths: torch.Tensor) -> torch.Tensor:
    """Example indices sorted by length (stable): consecutive batches of this order carry little padding."""
    return torch.argsort(lengths, stable=True)


@dataclass
class ClassificationTask:
    """Classification of an encoded split: accuracy, mean cross-entropy loss and the number of examples."""

    data: Encoded
    name: str = "classification"

    def logits(
        self,
        model: TaskModel | nn.Module,
        params: Mapping[str, torch.Tensor] | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Class logits (examples, classes), fp32 on the CPU, in the data's order; computed in length-sorted
        batches on the module's device."""
        task_model = as_task_model(model)
        weights = check_params(task_model.module, params)
        device = next(task_model.module.parameters()).device
        size = batch_size or CLASSIFICATION_BATCH
        order = length_order(self.data.attention_mask.sum(1))
        outs = []
        with eval_mode(task_model.module), torch.inference_mode():
            starts = range(0, len(self.data), size)
            for start in tqdm(starts, desc=self.name, leave=False, disable=not progress):
                b = self.data.batch(order[start : start + size])
                b = Encoded(b.input_ids.to(device), b.attention_mask.to(device), b.labels)
                outs.append(task_model.logits(b, weights).cpu())
        if not outs:
            return torch.zeros(0, 0)
        result = torch.empty(len(self.data), outs[0].shape[1])
        result[order] = torch.cat(outs)
        return result

    def evaluate(
        self,
        model: TaskModel | nn.Module,
        params: Mapping[str, torch.Tensor] | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> dict[str, float]:
        """``accuracy`` (argmax = label), ``loss`` (mean cross-entropy) and ``examples`` of ``model``."""
        logits = self.labeled_logits(model, params, batch_size, progress)
        labels = self.data.labels
        if not len(labels):
            return {"accuracy": math.nan, "loss": math.nan, "examples": 0}
        return {
            "accuracy": float((logits.argmax(1) == labels).float().mean()),
            "loss": float(F.cross_entropy(logits.double(), labels)),
            "examples": len(labels),
        }

    def outcomes(
        self,
        model: TaskModel | nn.Module,
        params: Mapping[str, torch.Tensor] | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Whether each example is classified correctly (bool, in the data's order): what a bootstrap confidence
        interval resamples (``mergesmith.bench.confidence``); its mean is ``evaluate``'s accuracy."""
        return self.labeled_logits(model, params, batch_size, progress).argmax(1) == self.data.labels

    def labeled_logits(
        self,
        model: TaskModel | nn.Module,
        params: Mapping[str, torch.Tensor] | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """:meth:`logits`, after checking that the examples have labels the model's classes cover."""
        labels = self.data.labels
        if len(labels) and int(labels.min()) < 0:
            raise MergeError(f"{self.name}: the examples have no labels (classification needs labeled data)")
        logits = self.logits(model, params, batch_size, progress)
        if len(labels) and int(labels.max()) >= logits.shape[1]:
            raise CheckpointError(
                f"{self.name}: label {int(labels.max())} but the model has "
                f"{logits.shape[1]} classes (labels are class ids from 0; string labels "
                "get ids in sorted order)"
            )
        return logits


@dataclass
class PerplexityTask:
    """Causal-LM perplexity of a token stream cut into non-overlapping windows of ``max_length`` tokens."""

    ids: torch.Tensor  # (tokens,) the whole text's token ids
    max_length: int = MAX_WINDOW
    name: str = "perplexity"

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise RecipeError(
                f"{self.name}: max_length {self.max_length} is too short (a window needs 2 tokens)"
            )

    @classmethod
    def from_text(
        cls, text: str, tokenizer: Any, max_length: int = MAX_WINDOW, name: str = "perplexity"
    ) -> PerplexityTask:
        """The task on ``text``, tokenized once as a whole (the tokenizer's default special tokens)."""
        with quiet_transformers():  # no "longer than the maximum length" warning: it is cut into windows
            ids = tokenizer(text, truncation=False)["input_ids"]
        return cls(torch.tensor(ids, dtype=torch.long), max_length, name)

    def windows(self) -> list[torch.Tensor]:
        """The consecutive windows of ``max_length`` tokens (the last one shorter; one of a single token,
        which predicts nothing, is dropped)."""
        out = list(torch.split(self.ids, self.max_length))
        return [w for w in out if len(w) >= 2]

    def evaluate(
        self,
        model: TaskModel | nn.Module,
        params: Mapping[str, torch.Tensor] | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> dict[str, float]:
        """``loss`` (mean cross-entropy over every predicted token), ``perplexity`` = exp(loss), ``tokens``
        (the predicted ones) and ``windows``."""
        sums, counts = self.window_sums(model, params, batch_size, progress)
        total, count = float(sums.sum()), int(counts.sum())
        loss = total / count if count else math.nan
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if count else math.nan,
            "tokens": count,
            "windows": len(counts),
        }

    def outcomes(
        self,
        model: TaskModel | nn.Module,
        params: Mapping[str, torch.Tensor] | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Each window's mean token cross-entropy (float64, in text order): what a bootstrap over windows
        resamples (the windows are equally long but the last, so their mean is close to ``loss``)."""
        sums, counts = self.window_sums(model, params, batch_size, progress)
        return sums / counts

    def window_sums(
        self,
        model: TaskModel | nn.Module,
        params: Mapping[str, torch.Tensor] | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per window, in text order: the summed token cross-entropy (float64) and the predicted tokens."""
        module = module_of(model)
        weights = check_params(module, params)
        windows = self.windows()
        size = batch_size or PERPLEXITY_BATCH
        groups: list[list[int]] = []  # windows of one length batched together: no padding
        for i, w in enumerate(windows):
            if groups and len(groups[-1]) < size and len(windows[groups[-1][0]]) == len(w):
                groups[-1].append(i)
            else:
                groups.append([i])
        sums = torch.zeros(len(windows), dtype=torch.float64)
        counts = torch.tensor([len(w) - 1 for w in windows], dtype=torch.float64)
        with eval_mode(module), torch.inference_mode():
            for group in tqdm(groups, desc=self.name, leave=False, disable=not progress):
                ids = torch.stack([windows[i] for i in group]).to(next(module.parameters()).device)
                logits = run(module, weights, input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                losses = F.cross_entropy(
                    logits[:, :-1].transpose(1, 2).double(), ids[:, 1:], reduction="none"
                ).sum(1)
                sums[group] = losses.cpu()
        return sums, counts


def normalize_answer(text: str, stop_at_newline: bool = True) -> str:
    """The text compared for exact match: cut at the first newline after any leading whitespace (with
    ``stop_at_newline``), then stripped of surrounding whitespace."""
    if stop_at_newline:
        text = text.lstrip().split("\n", 1)[0]
    return text.strip()


@dataclass
class ExactMatchTask:
    """Exact match of greedy continuations with answers: ``exact_match`` (the fraction equal) and
    ``examples``.

    ``prompts`` are token ids; ``max_prompt_length`` keeps the last tokens of a longer prompt (so that the
    prompt and the continuation fit the model's context)."""

    prompts: list[list[int]]
    answers: list[str]
    tokenizer: Any
    max_new_tokens: int = MAX_NEW_TOKENS
    stop_at_newline: bool = True
    max_prompt_length: int | None = None
    name: str = "exact-match"

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.answers):
            raise MergeError(f"{self.name}: {len(self.prompts)} prompts but {len(self.answers)} answers")
        if self.max_new_tokens < 1:
            raise RecipeError(f"{self.name}: max_new_tokens must be at least 1, got {self.max_new_tokens}")
        empty = [i for i, p in enumerate(self.prompts) if not p]
        if empty:
            raise RecipeError(
                f"{self.name}: prompt {empty[0] + 1} encodes to no tokens (give a non-empty prompt)"
            )

    @classmethod
    def from_texts(
        cls, prompts: Sequence[str], answers: Sequence[str], tokenizer: Any, **options: Any
    ) -> ExactMatchTask:
        """The task on prompt texts, encoded with the tokenizer's default special tokens; ``options`` are the
        dataclass's other fields."""
        with quiet_transformers():
            ids = [tokenizer(p)["input_ids"] for p in prompts]
        return cls(ids, list(answers), tokenizer, **options)

    def first_line_done(self, tokens: list[int]) -> bool:
        """Whether the continuation so far has a newline after its leading whitespace: its compared text (the
        first line) can no longer change, so generating more only costs time. Exact for byte-level and
        SentencePiece decoders: the text before a newline does not depend on the tokens after it."""
        return "\n" in self.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()

    def eos_ids(self, module: nn.Module) -> list[int]:
        """The tokens that end a continuation: the generation config's ``eos_token_id`` (an id or a list),
        else the model config's, else the tokenizer's."""
        for source in (getattr(module, "generation_config", None), getattr(module, "config", None)):
            value = getattr(source, "eos_token_id", None)
            if value is not None:
                return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return [int(eos)] if eos is not None else []

    def generate(
        self,
        model: TaskModel | nn.Module,
        params: Mapping[str, torch.Tensor] | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> list[str]:
        """Each prompt's greedy continuation (up to ``max_new_tokens``, without the end-of-text token),
        decoded without special tokens, in the prompts' order.

        Prompts are batched in order of length, left-padded, with position ids counted from each prompt's
        first token (as ``generate`` does); a model whose forward takes no ``position_ids`` is only batched
        with prompts of the same length."""
        module = module_of(model)
        weights = check_params(module, params)
        keep = self.max_prompt_length
        prompts = [p[-keep:] if keep else p for p in self.prompts]
        size = batch_size or GENERATION_BATCH
        with_positions = "position_ids" in forward_parameters(module)
        order = length_order(torch.tensor([len(p) for p in prompts], dtype=torch.long)).tolist()
        groups: list[list[int]] = []
        for i in order:
            last = groups[-1] if groups else None
            same_length = last is not None and len(prompts[last[0]]) == len(prompts[i])
            if last is not None and len(last) < size and (with_positions or same_length):
                last.append(i)
            else:
                groups.append([i])
        eos = self.eos_ids(module)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = eos[0] if eos else 0
        out = [""] * len(prompts)
        with eval_mode(module), torch.inference_mode():
            for group in tqdm(groups, desc=self.name, leave=False, disable=not progress):
                tokens = greedy(
                    module,
                    weights,
                    [prompts[i] for i in group],
                    self.max_new_tokens,
                    eos,
                    pad,
                    with_positions,
                    self.first_line_done if self.stop_at_newline else None,
                )
                for i, row in zip(group, tokens):
                    out[i] = self.tokenizer.decode(row, skip_special_tokens=True)
        return out

    def evaluate(
        self,
        model: TaskModel | nn.Module,
        params: Mapping[str, torch.Tensor] | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> dict[str, float]:
        """``exact_match``: the fraction of normalized continuations equal to the stripped answers."""
        hits = self.outcomes(model, params, batch_size, progress)
        n = len(self.answers)
        return {"exact_match": float(hits.sum()) / n if n else math.nan, "examples": n}

    def outcomes(
        self,
        model: TaskModel | nn.Module,
        params: Mapping[str, torch.Tensor] | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Whether each prompt's normalized continuation equals its stripped answer (bool, prompts' order)."""
        continuations = self.generate(model, params, batch_size, progress)
        return torch.tensor(
            [
                normalize_answer(c, self.stop_at_newline) == a.strip()
                for c, a in zip(continuations, self.answers)
            ],
            dtype=torch.bool,
        )


def forward_parameters(module: nn.Module) -> set[str]:
    """The argument names of ``module.forward``."""
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()


def greedy(
    module: nn.Module,
    weights: Mapping[str, torch.Tensor],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos: Sequence[int],
    pad: int,
    with_positions: bool = True,
    finished: Callable[[list[int]], bool] | None = None,
) -> list[list[int]]:
    """Greedy decoding of a batch of prompts (left-padded, with the model's KV cache when its forward takes
    one, else rerunning the whole sequence each step): each row's new tokens up to, not including, its first
    end-of-text token, or up to and including the token after which ``finished(tokens so far)`` holds (what
    follows cannot change the result: exact match's first line is complete). Finished rows are fed padding until
    every row is done."""
    device = next(module.parameters()).device
    accepted = forward_parameters(module)
    # the KV cache argument ("past_key_values", renamed "cache" in transformers 5)
    cache_name = next((n for n in ("cache", "past_key_values") if n in accepted), None)
    # only the last position's logits are read: a forward that can skip the others saves the LM head's product
    # over every prompt token (a quarter of a 135M model's prefill, with a 49k vocabulary)
    keep_name = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in accepted), None)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # counted from each prompt's first token, as generate does
    stop = torch.tensor(list(eos), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    lengths = [max_new_tokens] * len(prompts)  # where ``finished`` stopped a row
    steps: list[torch.Tensor] = []
    inputs, input_positions, cache = ids, positions, None
    for _ in range(max_new_tokens):
        kwargs: dict[str, Any] = {"input_ids": inputs, "attention_mask": mask}
        if keep_name is not None:
            kwargs[keep_name] = 1
        if cache_name is not None:
            kwargs["use_cache"] = True
            if cache is not None:
                kwargs[cache_name] = cache
        if with_positions:
            kwargs["position_ids"] = input_positions
        out = run(module, weights, **kwargs)
        token = out.logits[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        steps.append(token)
        done |= torch.isin(token, stop)
        if finished is not None:
            so_far = torch.stack(steps, 1).tolist()
            for row in (~done).nonzero().flatten().tolist():
                if finished(so_far[row]):
                    done[row], lengths[row] = True, len(steps)
        if bool(done.all()):
            break
        cache = getattr(out, cache_name, None) if cache_name is not None else None
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(token[:, None])], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
        inputs, input_positions = (ids, positions) if cache is None else (ids[:, -1:], positions[:, -1:])
    stops = set(stop.tolist())
    rows = []
    for row, length in zip(torch.stack(steps, 1).tolist(), lengths):
        cut = next((k for k, t in enumerate(row) if t in stops), len(row))
        rows.append(row[: min(cut, length)])
    return rows


def model_context(module: nn.Module) -> int | None:
    """The longest input the model's positions allow (``max_position_embeddings``, ``n_positions``, ...), if
    its config says."""
    config = getattr(module, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_folder(folder: str | Path) -> Path:
    """``folder`` checked to be a local Hugging Face model folder (nothing is downloaded)."""
    path = Path(folder)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: no such model folder (give a local Hugging Face model folder; nothing is downloaded)"
        )
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: no config.json here (give a Hugging Face model folder, as save_pretrained writes)"
        )
    return path


def data_file(path: str | Path, suffixes: Sequence[str], what: str) -> tuple[Path, str]:
    """The text of a data file, checked: it exists, has one of ``suffixes``, is UTF-8 and is not blank."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise RecipeError(f"{path}: {what} data must be a {' or '.join(suffixes)} file, not '{path.suffix}'")
    if not path.is_file():
        raise RecipeError(f"{path}: data file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the data file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise RecipeError(f"{path}: no examples (the file is empty)")
    return path, text


def load_head(path: str | Path, width: int | None = None) -> dict[str, torch.Tensor]:
    """A linear head ``{weight (classes, width), bias (classes)}`` from a safetensors file (no bias: zeros),
    fp32; ``width``, when given, is the hidden size it must read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: head file not found (a safetensors file with 'weight' and 'bias')")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    weight = tensors.get("weight")
    if weight is None or weight.dim() != 2:
        found = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()) or "nothing"
        raise CheckpointError(f"{path}: a head needs a 2-D 'weight' (classes, hidden); it has {found}")
    bias = tensors.get("bias", torch.zeros(weight.shape[0]))
    if tuple(bias.shape) != (weight.shape[0],):
        raise CheckpointError(
            f"{path}: 'bias' has shape {tuple(bias.shape)}, the head needs ({weight.shape[0]},)"
        )
    if width is not None and weight.shape[1] != width:
        raise CheckpointError(
            f"{path}: the head reads {weight.shape[1]} features but the model's hidden "
            f"size is {width} (a head for another model?)"
        )
    return {"weight": weight.float(), "bias": bias.float()}


def padded_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, set to pad on the right (encoded splits are trimmed on the right, and ``cls`` /
    sequence classifiers read positions from the left); one without a padding token pads with its end-of-text
    token."""
    tokenizer = load_tokenizer(folder, TOKENIZER_HINT)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise CheckpointError(
                f"{folder}: the tokenizer has neither a padding nor an end-of-text token "
                "to pad batches with (add a pad_token to its tokenizer_config.json)"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_task_model(
    folder: str | Path, head: str | Path | None = None, pooling: str | None = None
) -> TaskModel:
    """The model of a classification task. With ``head`` (a safetensors linear head): the folder's encoder
    (``AutoModel``, any architecture) with that head over pooled states (``pooling``, default ``mean``).
    Without: the folder's ``AutoModelForSequenceClassification`` with its own, trained, head."""
    path = model_folder(folder)
    if pooling is not None and pooling not in POOLINGS:
        raise MergeError(f"unknown pooling '{pooling}' (use one of {', '.join(POOLINGS)})")
    if head is None:
        if pooling is not None:
            raise MergeError(
                f"{path}: pooling goes with a linear head (give a head file); a sequence "
                "classifier pools as its architecture does"
            )
        hint = "give a linear head file (--head) for an encoder, or a sequence-classification checkpoint"
        return TaskModel(load_classifier(path, require_head=True, hint=hint))
    module = load_encoder(path)
    width = getattr(module.config, "hidden_size", None)
    linear = load_head(head, width if isinstance(width, int) else None)
    return TaskModel(module, linear, pooling=pooling or "mean")


def read_classification(
    path: str | Path,
    tokenizer: Any,
    text_column: str = "text",
    label_column: str = "label",
    max_length: int = MAX_LENGTH,
    limit: int | None = None,
) -> ClassificationTask:
    """A classification task from a JSONL or CSV file of texts and labels (see :mod:`mergesmith.recipe.data`:
    int class ids, or string labels that get ids in sorted order), each text cut at ``max_length`` tokens."""
    if max_length < 1 or (limit is not None and limit < 1):
        raise RecipeError(f"{path}: max_length and limit must be at least 1, got {max_length} and {limit}")
    spec = DataSpec(
        path=str(path), text_column=text_column, label_column=label_column, max_length=max_length, limit=limit
    )
    examples = read_examples(spec, need_labels=True)
    return ClassificationTask(encode_examples(examples, tokenizer, max_length), name=Path(path).stem)


def read_prompts(
    path: str | Path, prompt_column: str = "prompt", answer_column: str = "answer", limit: int | None = None
) -> tuple[list[str], list[str]]:
    """Prompts and answers from a JSONL file (one object per line, blank lines skipped); answers that are
    numbers become their text. RecipeError naming the file and line on a problem."""
    path, text = data_file(path, (".jsonl",), "exact-match")
    prompts, answers = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise RecipeError(
                f"{path}: line {number} is not a JSON object "
                f'({{"{prompt_column}": ..., "{answer_column}": ...}})'
            )
        for column, flag in ((prompt_column, "--prompt-column"), (answer_column, "--answer-column")):
            if column not in row:
                raise RecipeError(
                    f"{path}: line {number} has no '{column}' column (columns: "
                    f"{', '.join(map(str, row)) or 'none'}); name the column ({flag})"
                )
        prompt, answer = row[prompt_column], row[answer_column]
        if not isinstance(prompt, str) or not prompt:
            raise RecipeError(
                f"{path}: line {number}: '{prompt_column}' must be a non-empty string, got {prompt!r}"
            )
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise RecipeError(
                f"{path}: line {number}: '{answer_column}' must be a string or a number, got {answer!r}"
            )
        prompts.append(prompt)
        answers.append(str(answer))
    if limit is not None:
        prompts, answers = prompts[:limit], answers[:limit]
    return prompts, answers


def load_classification(
    folder: str | Path,
    data: str | Path,
    head: str | Path | None = None,
    pooling: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    max_length: int = MAX_LENGTH,
    limit: int | None = None,
    tokenizer: str | Path | None = None,
) -> tuple[ClassificationTask, TaskModel]:
    """A classification task on ``data`` (JSONL or CSV) and its model from ``folder`` (see
    :func:`load_task_model`); the tokenizer is the folder's unless ``tokenizer`` names another folder. A
    decoder classifier without a ``pad_token_id`` gets the tokenizer's (it finds each text's last token by
    it)."""
    path = model_folder(folder)
    tok = padded_tokenizer(Path(tokenizer) if tokenizer is not None else path)
    task = read_classification(data, tok, text_column, label_column, max_length, limit)
    model = load_task_model(path, head, pooling)
    config = getattr(model.module, "config", None)
    if head is None and config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tok.pad_token_id
    return task, model


def load_perplexity(
    folder: str | Path, data: str | Path, max_length: int | None = None, tokenizer: str | Path | None = None
) -> tuple[PerplexityTask, nn.Module]:
    """A perplexity task on a plain text file and the folder's causal LM; ``max_length`` (window) defaults to
    the model's context, at most 1024 tokens, and may not exceed it."""
    path = model_folder(folder)
    file, text = data_file(data, (".txt", ".text", ".md"), "perplexity")
    tok = load_tokenizer(Path(tokenizer) if tokenizer is not None else path, TOKENIZER_HINT)
    module = load_causal_lm(path)
    context = model_context(module)
    if max_length is None:
        max_length = min(context or MAX_WINDOW, MAX_WINDOW)
    elif context is not None and max_length > context:
        raise RecipeError(
            f"{file}: max_length {max_length} is longer than the model's context ({context} tokens)"
        )
    task = PerplexityTask.from_text(text, tok, max_length, name=file.stem)
    if len(task.ids) < 2:
        raise RecipeError(f"{file}: {len(task.ids)} token(s); perplexity needs at least 2")
    return task, module


def load_exact_match(
    folder: str | Path,
    data: str | Path,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    max_new_tokens: int = MAX_NEW_TOKENS,
    stop_at_newline: bool = True,
    limit: int | None = None,
    tokenizer: str | Path | None = None,
) -> tuple[ExactMatchTask, nn.Module]:
    """An exact-match task on a JSONL file of prompts and answers and the folder's causal LM. Prompts longer
    than the model's context minus ``max_new_tokens`` keep their last tokens."""
    path = model_folder(folder)
    prompts, answers = read_prompts(data, prompt_column, answer_column, limit)
    tok = load_tokenizer(Path(tokenizer) if tokenizer is not None else path, TOKENIZER_HINT)
    module = load_causal_lm(path)
    context = model_context(module)
    keep = None
    if context is not None:
        keep = context - max_new_tokens
        if keep < 1:
            raise RecipeError(
                f"{data}: max_new_tokens {max_new_tokens} leaves no room for the prompt in the "
                f"model's context ({context} tokens)"
            )
    task = ExactMatchTask.from_texts(
        prompts,
        answers,
        tok,
        max_new_tokens=max_new_tokens,
        stop_at_newline=stop_at_newline,
        max_prompt_length=keep,
        name=Path(data).stem,
    )
    return task, module
