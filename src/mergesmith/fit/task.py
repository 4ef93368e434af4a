"""What data-driven methods see: tasks (a model that maps a batch to logits, plus examples) and fit inputs.

Every data-driven method (Fisher, RegMean, AdaMerging, Concrete, Twin-Merging, DAM) has a ``fit`` step that runs
models on data and returns a :class:`FitResult`: named tensors (Fisher diagonals, Gram matrices, masks, learned
coefficients) plus JSON-able facts (losses, seconds, examples used). The final merge is still the per-tensor
rule run by the streaming engine; the rule reads what it needs from ``ctx.fitted``. A fit result is saved next
to the merged weights (``mergesmith_fit.safetensors``) and a recipe can replay it with ``fitted: PATH`` instead
of fitting again.

Weights are passed explicitly (``params``): one module instance is shared by every task and
``torch.func.functional_call`` runs it with whichever weights (an expert's, or a merge being learned), so a fit
holds one module plus the experts' parameter dicts in memory.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mergesmith.errors import CheckpointError, MergeError
from mergesmith.fit.data import Encoded, mean_pool

FIT_FILE = "mergesmith_fit.safetensors"
Pooling = Literal["mean", "cls", "last"]
POOLINGS: tuple[str, ...] = get_args(Pooling)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """One vector per example (batch, d), fp32, from token states (batch, tokens, d) and the attention mask:
    ``mean`` over the unmasked tokens, ``cls`` the first token (BERT's [CLS], RoBERTa's <s>; right padding),
    or ``last`` the last unmasked token (what a decoder has read the whole text at; either padding side)."""
    if pooling == "mean":
        return mean_pool(hidden.float(), mask)
    if pooling == "cls":
        return hidden[:, 0].float()
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * (mask != 0)).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    raise MergeError(f"unknown pooling '{pooling}' (use one of {', '.join(POOLINGS)})")


@dataclass
class TaskModel:
    """A network with its task head: ``logits(batch, params)``.

    Two forms: an encoder (``AutoModel``) whose token states are pooled (``pooling``: ``mean``, the text8
    zoo's form and the default; ``cls``, the first token; ``last``, the last non-padding token, for decoders)
    and fed to a linear ``head`` (``{'weight', 'bias'}``), or, with ``head=None``, a model whose output has
    ``.logits`` (``AutoModelForSequenceClassification``, which pools as its architecture does); its classifier
    parameters (``head_names``) belong to the task and are never merged.

    ``autocast`` runs the module (not the pooling or the head) under ``torch.autocast`` in that dtype (the
    zoo's bf16 evaluation); None runs it as loaded.

    ``next_token``: the module is a causal LM (``...ForCausalLM``, ``head=None``) and the task is its next token
    after each prompt: ``logits`` are the LM's logits at each example's last token, over the vocabulary
    (right-padded batches, :func:`mergesmith.fit.data.encode_prompts`). The data-driven fits then run on LLM
    tasks as on classifiers: RegMean on the prompts' layer inputs, AdaMerging on the entropy of the next-token
    distribution, Fisher on the first answer token's log-likelihood — or, on prompt + answer sequences
    (per-position labels), on the whole answer's (:meth:`answer_log_likelihood`).

    ``prefix`` names the parameters relative to a submodule (``"bert."``: the backbone of a BERT classifier):
    ``merge_names``, ``params`` and every ``params=`` argument then use the backbone's own names, so that tasks
    of different forms (a classifier's backbone and a bare encoder with a head file) share one name space; the
    parameters outside the prefix (the classifier) are the task's head and are never merged.
    """

    module: nn.Module
    head: dict[str, torch.Tensor] | None = None
    head_names: frozenset[str] = frozenset()
    own_head_params: dict[str, torch.Tensor] = field(default_factory=dict)
    pooling: Pooling = "mean"
    autocast: torch.dtype | None = None
    prefix: str = ""
    next_token: bool = False
    _module_names: frozenset[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise MergeError(f"unknown pooling '{self.pooling}' (use one of {', '.join(POOLINGS)})")

    def module_names(self) -> frozenset[str]:
        """Every parameter and buffer name of the module (cached: looked up on every forward)."""
        if self._module_names is None:
            self._module_names = frozenset(n for n, _ in self.module.named_parameters()) | frozenset(
                n for n, _ in self.module.named_buffers()
            )
        return self._module_names

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """The module's parameters under ``prefix``, by their names relative to it."""
        cut = len(self.prefix)
        return {n[cut:]: p for n, p in self.module.named_parameters() if n.startswith(self.prefix)}

    def merge_names(self) -> list[str]:
        """The floating-point parameters a merge combines (module parameters minus the task head)."""
        return [
            n
            for n, p in self.named_parameters().items()
            if self.prefix + n not in self.head_names and p.is_floating_point()
        ]

    def params(self) -> dict[str, torch.Tensor]:
        """Detached fp32 copies of the mergeable parameters currently in the module."""
        named = self.named_parameters()
        return {n: named[n].detach().float().clone() for n in self.merge_names()}

    def embedding_name(self) -> str:
        """The parameter name of the input token embedding (where DAM adds its learned perturbation)."""
        emb = self.module.get_input_embeddings().weight
        for n, p in self.named_parameters().items():
            if p is emb:
                return n
        raise KeyError("input embedding not found among the parameters")

    def hidden(
        self,
        batch: Encoded,
        params: Mapping[str, torch.Tensor] | None = None,
        embeds_delta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states (batch, tokens, d). ``embeds_delta`` (tokens_max, d) is added to the token
        embeddings of every example (DAM's input perturbation, the text analogue of an image-space trigger)."""
        return self._call(batch, params, embeds_delta, want_logits=False)

    def features(self, batch: Encoded, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean-pooled last hidden state (batch, d): what Twin-Merging's router reads."""
        return mean_pool(self.hidden(batch, params).float(), batch.attention_mask)

    def pooled(
        self,
        batch: Encoded,
        params: Mapping[str, torch.Tensor] | None = None,
        embeds_delta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last hidden state pooled as ``pooling`` says (batch, d), fp32: what the linear head reads."""
        hidden = self._call(batch, params, embeds_delta, want_logits=False)
        return pool(hidden, batch.attention_mask, self.pooling)

    def logits(
        self,
        batch: Encoded,
        params: Mapping[str, torch.Tensor] | None = None,
        embeds_delta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class logits (batch, classes), fp32, differentiable with respect to ``params`` and ``embeds_delta``."""
        if self.head is None:
            logits = self._call(batch, params, embeds_delta, want_logits=True).float()
            if self.next_token:  # the LM's prediction after each prompt's last token (right padding)
                last = batch.attention_mask.sum(1) - 1
                return logits[torch.arange(len(last)), last]
            return logits
        return F.linear(self.pooled(batch, params, embeds_delta), self.head["weight"], self.head["bias"])

    def answer_log_likelihood(
        self, batch: Encoded, params: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """A causal LM's log p(answer | prompt) per example (batch,), fp32: Σ_j log softmax(logits[n, j])
        at ``labels[n, j]`` over the positions whose next token is the answer's
        (:func:`mergesmith.fit.data.encode_answers`)."""
        logits = self._call(batch, params, None, want_logits=True).float()
        targets = batch.labels
        picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * (targets >= 0)).sum(-1)

    def _call(
        self,
        batch: Encoded,
        params: Mapping[str, torch.Tensor] | None,
        embeds_delta: torch.Tensor | None,
        want_logits: bool,
    ) -> torch.Tensor:
        # a weight the module lacks (BERT's pooler, for a task that pools the tokens itself) does not reach it
        known = self.module_names()
        weights = {self.prefix + n: v for n, v in (params or {}).items() if self.prefix + n in known}
        weights.update(self.own_head_params)
        kwargs: dict[str, Any] = {"attention_mask": batch.attention_mask}
        if not want_logits and self.head is None:
            # a model with its own classifier (…ForSequenceClassification) returns logits, not token states:
            # its last hidden layer is what Twin-Merging's router and pooled features read
            kwargs["output_hidden_states"] = True
        if embeds_delta is None:
            kwargs["input_ids"] = batch.input_ids
        else:
            name = self.embedding_name()
            table = weights.get(self.prefix + name, self.named_parameters()[name])
            width = batch.input_ids.shape[1]
            kwargs["inputs_embeds"] = F.embedding(batch.input_ids, table) + embeds_delta[:width].to(
                table.dtype
            )
        autocast = (
            torch.autocast(batch.input_ids.device.type, dtype=self.autocast)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with autocast:
            out = (
                functional_call(self.module, weights, args=(), kwargs=kwargs, strict=False)
                if weights
                else self.module(**kwargs)
            )
        if want_logits:
            return out.logits
        return out.last_hidden_state if self.head is not None else out.hidden_states[-1]


@dataclass
class Task:
    """One expert's task: its model (head) and examples. ``labeled`` is False for unlabeled inputs (labels -1)."""

    name: str
    model: TaskModel
    data: Encoded
    labeled: bool = True


@dataclass
class FitInputs:
    """What a method's ``fit`` receives.

    ``base`` and ``experts`` are the mergeable parameters (fp32, same names), ``tasks[i]`` is expert i's task
    (its head and examples), ``params`` the method's resolved shared parameters (per-model ones as lists),
    ``seed`` seeds every random step.
    """

    base: dict[str, torch.Tensor] | None
    experts: list[dict[str, torch.Tensor]]
    tasks: list[Task]
    params: dict[str, Any]
    seed: int = 0
    progress: bool = False


@dataclass
class FitResult:
    """What ``fit`` learned or measured: named tensors for the per-tensor rule, and JSON-able facts."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        """Write the tensors and, as JSON in the safetensors metadata, the facts to ``path``."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous() for k, v in self.tensors.items()}
        save_file(tensors, str(path), metadata={"info": json.dumps(self.info)})

    @classmethod
    def load(cls, path: str | Path) -> FitResult:
        """A saved fit (``path``: a fit file, or a merge's output folder holding one), else a
        CheckpointError."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / FIT_FILE
        if not path.exists():
            raise CheckpointError(
                f"{path}: no saved fit here (a merge of a data-driven method writes {FIT_FILE})"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get("info", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable fit file ({e})") from None
        return cls(tensors, info)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Run ``modules`` in eval mode (no dropout: statistics and fits are deterministic given their seed), then
    restore each one's mode."""
    unique = {id(m): m for m in modules}
    was_training = {key: m.training for key, m in unique.items()}
    for m in unique.values():
        m.eval()
    try:
        yield
    finally:
        for key, m in unique.items():
            m.train(was_training[key])


def batches(data: Encoded, batch_size: int, generator: torch.Generator | None = None) -> list[Encoded]:
    """``data`` cut into batches (shuffled when a generator is given), each trimmed to its longest example."""
    order = (
        torch.randperm(len(data), generator=generator) if generator is not None else torch.arange(len(data))
    )
    return [data.batch(order[i : i + batch_size]) for i in range(0, len(data), batch_size)]


def cycle_batches(data: Encoded, batch_size: int, generator: torch.Generator):
    """An endless stream of shuffled batches (a fresh permutation per epoch): test-time adaptation loops."""
    while True:
        yield from batches(data, batch_size, generator)


def task_vectors(
    base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]]
) -> list[dict[str, torch.Tensor]]:
    """τ_i = θ_i − θ_0 for every mergeable name."""
    return [{n: e[n] - base[n] for n in base} for e in experts]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax of ``logits`` (AdaMerging's test-time objective)."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()
