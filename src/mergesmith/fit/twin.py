"""Twin-Merging (Lu et al., NeurIPS 2024, "Twin-Merging: Dynamic Integration of Modular Expertise in Model
Merging", arXiv:2406.15479; official code LZY-the-boys/Twin-Merging).

Twin-Merging is not one static model but a shared model plus routed, compressed task parts:

1. **Shared expert** θ* = task arithmetic of the experts, θ₀ + λ Σ_t τ_t (:func:`shared_tensor`, also the ``twin``
   method's rule), or any merge passed as ``shared=`` (the Twin repository also offers TIES). Tensors matching ``exclude`` (official ``--exclude-param '.*classifier.*' '.*bias.*'``) are not merged:
   θ* keeps the base value there.
2. **Exclusive knowledge** δ_t = θ_t − θ* (the difference to the *merged* model, not to θ₀). Every 2-D tensor
   not excluded is compressed by truncated SVD, δ_t ≈ U_r Σ_r V_rᵀ with r = int((1 − mask_rate)·len(S)) — the
   official ``sparsify.svd`` arithmetic, so mask_rate 0.9 keeps 10 % of the singular values and mask_rate 0
   keeps δ_t exactly. Stored as two factors, ``us`` = U_r Σ_r (m×r) and ``v`` = V_r (n×r), in ``factor_dtype``
   (fp32 by default; fp16 halves the size): r·(m+n) numbers instead of m·n, i.e. 20 % of the dense fp32
   delta for a square matrix at mask_rate 0.9. 1-D tensors (biases, LayerNorm), other shapes and excluded
   tensors are kept dense.
3. **Router**: an input's embedding is the mean over its tokens of the last hidden state of the *shared* model;
   an MLP Linear(d→2d) → BN → LeakyReLU → Dropout(0.5) → Linear(2d→2d) → BN → LeakyReLU → Dropout(0.5) →
   Linear(2d→T) is trained with cross-entropy to predict which task an input comes from, on the tasks' own
   (training) texts. Defaults are the official HF-Trainer run: 50 epochs, lr 5e-4, batch 1024, AdamW without
   weight decay, linear decay to 0, gradient clipping at 1, at most 5500 examples per task.
4. **Inference**: w = softmax(router logits); θ(x) = θ* + Σ_t w_t U_t Σ_t V_tᵀ (dense parts: + Σ_t w_t δ_t);
   the task's own head reads the result (``torch.func.functional_call``, no model copy).

Routing granularity (``routing``): ``batch`` (default) merges once per batch with w = mean over the batch of the
examples' softmax weights; ``example`` merges once per example (the paper's per-input merge; one parameter set
per example, so slow for big models); ``top1`` sends each example to its argmax task (one-hot w), grouping the
batch so that it costs at most T merges.

Notes on the defaults and the official code:
- scaling: 0.3 for task arithmetic (the common TA value, METHODS.md; the official Twin config uses a tuned
  0.29). For a TIES shared expert the Twin repository's ``ties_merge.yml`` uses λ = 1.0 (also the TIES paper's
  no-validation value with dis-mean): ``shared=merge_state_dicts(base, experts, "ties", **{"lambda": 1.0})``.
- Because softmax weights sum to one, a dense part gives Σ_t w_t θ_t whatever θ* is; ``exclude`` therefore only
  changes the 2-D tensors' compression and the shared model itself (what the router reads and what is saved).
  The official code instead takes excluded tensors (biases, classifier) from the *ground-truth* task's model, an
  oracle that needs the task identity at test time; routing them here keeps the method honest. Task heads
  (``TaskModel.head`` / ``head_names``) are never merged and always belong to the evaluated task.
- The official router keeps the checkpoint with the best *test* accuracy (``load_best_model_at_end`` on the test
  set); here the router after the last epoch is kept.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mergesmith.fit.data import Encoded
from mergesmith.fit.task import FIT_FILE, FitResult, Task, TaskModel, batches
from mergesmith.io.hf_files import copy_tokenizer_files
from mergesmith.io.output import atomic_folder, file_digests
from mergesmith.io.reader import CheckpointSource
from mergesmith.ops.gta import merge_task_vectors
from mergesmith.ops.stream import TensorContext
from mergesmith.version import __version__

SHARED_FILE = "model.safetensors"
EXCLUSIVE_FILE = "twin_exclusive.safetensors"
ROUTER_FILE = "twin_router.safetensors"
META_FILE = "twin.json"
DEFAULT_EXCLUDE = (r".*classifier.*", r".*bias.*")  # the official --exclude-param
ROUTINGS = ("batch", "example", "top1")
FEATURE_BATCH = 64  # batch size when embedding texts with the shared model (no gradients)


def svd_rank(num_singular: int, mask_rate: float) -> int:
    """How many singular values the official ``sparsify.svd`` keeps: int((1 − mask_rate)·len(S))."""
    return max(0, min(num_singular, int((1 - mask_rate) * num_singular)))


def compress(
    delta: torch.Tensor, mask_rate: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of a 2-D delta: factors (U_r Σ_r, V_r) with δ ≈ (U_r Σ_r) V_rᵀ, computed in fp32."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = svd_rank(len(s), mask_rate)
    return (u[:, :r] * s[:r]).to(dtype).contiguous(), vh[:r].T.to(dtype).contiguous()


class Router(nn.Module):
    """The official router MLP: (Linear → BN → LeakyReLU → Dropout(0.5)) × 2 → Linear, widths d → 2d → 2d → T."""

    def __init__(self, dim: int, num_tasks: int, dropout: float = 0.5):
        super().__init__()
        hidden = 2 * dim
        self.fc1 = nn.Linear(dim, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.fc3 = nn.Linear(hidden, num_tasks)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.leaky_relu(self.bn1(self.fc1(features))))
        x = self.dropout(F.leaky_relu(self.bn2(self.fc2(x))))
        return self.fc3(x)


def train_router(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_tasks: int,
    *,
    epochs: int = 50,
    lr: float = 5e-4,
    batch_size: int = 1024,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Router, dict[str, Any]]:
    """Fit a :class:`Router` on (embedding, task id) pairs as the official HF Trainer run does: AdamW (no weight
    decay), linear decay of the learning rate to 0, gradient-norm clipping at 1. Seeded: initialisation, shuffling
    and dropout draw from ``seed`` only (the global RNG state is restored afterwards)."""
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # module init and dropout masks
        order_gen = torch.Generator().manual_seed(seed)
        router = Router(features.shape[1], num_tasks)
        opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1 - step / total))
        router.train()
        loss_value = math.nan
        bar = tqdm(range(epochs), desc="twin router", unit="epoch", leave=False, disable=not progress)
        for _ in bar:
            order = torch.randperm(len(labels), generator=order_gen)
            for start in range(0, len(labels), batch_size):
                index = order[start : start + batch_size]
                if len(index) < 2:  # BatchNorm needs two examples to train
                    continue
                loss = F.cross_entropy(router(features[index]), labels[index])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(router.parameters(), 1.0)
                opt.step()
                sched.step()
                loss_value = float(loss.detach())
            bar.set_postfix(loss=f"{loss_value:.3f}")
    router.eval()
    with torch.no_grad():
        train_acc = float((router(features).argmax(1) == labels).float().mean()) if len(labels) else math.nan
    return router, {"final_loss": loss_value, "train_accuracy": train_acc, "steps": epochs * steps_per_epoch}


def shared_features(
    model: TaskModel, data: Encoded, shared: Mapping[str, torch.Tensor], batch_size: int = FEATURE_BATCH
) -> torch.Tensor:
    """The router's input: mean over tokens of the shared model's last hidden state, (examples, d), fp32."""
    was_training = model.module.training
    model.module.eval()  # no dropout in the embedding
    try:
        with torch.no_grad():
            parts = [model.features(b, params=shared) for b in batches(data, batch_size)]
    finally:
        model.module.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0, 0)


@dataclass
class TwinMerge:
    """A built Twin-Merging model: shared weights θ*, per-task compressed δ_t, and the router.

    ``factors[t][name] = (U_r Σ_r, V_r)`` for compressed tensors, ``dense[t][name] = δ_t`` for the others.
    """

    task_names: list[str]
    shared: dict[str, torch.Tensor]
    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    dense: list[dict[str, torch.Tensor]]
    router: Router
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def router_probs(self, batch: Encoded, model: TaskModel) -> torch.Tensor:
        """softmax(router(embedding)) per example: (batch, T)."""
        self.router.eval()
        with torch.no_grad():
            return self.router(shared_features(model, batch, self.shared)).softmax(-1)

    def routing_weights(self, batch: Encoded, model: TaskModel, routing: str = "batch") -> torch.Tensor:
        """The merge weights of each example, (batch, T): ``batch`` repeats the batch mean of the softmax weights
        in every row, ``example`` gives each example its own softmax weights, ``top1`` one-hot argmax rows.
        ``model`` is any task's model: only its shared module is run, with θ*."""
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {list(ROUTINGS)}, got {routing!r}")
        probs = self.router_probs(batch, model)
        if routing == "batch":
            return probs.mean(0, keepdim=True).expand_as(probs)
        if routing == "top1":
            return F.one_hot(probs.argmax(1), self.num_tasks).to(probs.dtype)
        return probs

    def params_for(self, weights: torch.Tensor | Sequence[float]) -> dict[str, torch.Tensor]:
        """θ* + Σ_t w_t U_t Σ_t V_tᵀ (+ Σ_t w_t δ_t for dense parts), fp32, for one weight vector w ∈ ℝ^T."""
        w = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        if len(w) != self.num_tasks:
            raise ValueError(f"need {self.num_tasks} routing weights, got {len(w)}")
        out: dict[str, torch.Tensor] = {}
        for name, value in self.shared.items():
            if name in self.factors[0]:
                # Σ_t w_t A_t B_tᵀ as one product of the rank-concatenated factors
                us = torch.cat([f[name][0].float() * w[t] for t, f in enumerate(self.factors)], dim=1)
                v = torch.cat([f[name][1].float() for f in self.factors], dim=1)
                out[name] = value + us @ v.T
            else:
                out[name] = value + sum(w[t] * d[name].float() for t, d in enumerate(self.dense))
        return out

    def logits(self, task_model: TaskModel, batch: Encoded, routing: str = "batch") -> torch.Tensor:
        """Class logits of ``task_model``'s head on the dynamically merged weights, (batch, classes). Examples
        with identical routing weights share one merge (``batch``: one; ``top1``: at most T)."""
        weights = self.routing_weights(batch, task_model, routing)
        groups = (
            [torch.arange(len(weights))]
            if routing == "batch"
            else [torch.nonzero((weights == row).all(1)).flatten() for row in weights.unique(dim=0)]
        )
        out: torch.Tensor | None = None
        with torch.no_grad():
            for index in groups:
                part = task_model.logits(
                    batch.batch(index) if len(groups) > 1 else batch,
                    params=self.params_for(weights[index[0]]),
                )
                if out is None:
                    out = part.new_empty(len(weights), part.shape[1])
                out[index] = part
        assert out is not None
        return out

    def save(self, folder: str | Path, config_source: str | Path | None = None, force: bool = False) -> Path:
        """Write the artifact folder: ``model.safetensors`` (θ*), ``twin_exclusive.safetensors`` (factors and dense
        parts), ``twin_router.safetensors``, ``twin.json`` and ``manifest.json`` (the files' sha256, so ``mergesmith
        verify`` checks it). With ``config_source`` (an HF model folder of the same architecture) its config and
        tokenizer files are copied and its tensors that θ* lacks (buffers, task heads) are added, so that
        ``transformers`` loads the folder as the shared model. Written like a merge's output: the folder appears
        only complete (a hidden partial folder renamed at the end; removed on error)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        shared = {n: t.contiguous() for n, t in self.shared.items()}
        with atomic_folder(folder, force=force) as partial:
            if config_source is not None:
                source = Path(config_source)
                shared = {**_read_tensors(source, set(shared)), **shared}
                copy_tokenizer_files(source, partial, with_config=True)
            save_file(shared, str(partial / SHARED_FILE), metadata={"format": "pt"})
            save_file(self._exclusive_tensors(), str(partial / EXCLUSIVE_FILE))
            save_file(
                {k: v.contiguous() for k, v in self.router.state_dict().items()}, str(partial / ROUTER_FILE)
            )
            (partial / META_FILE).write_text(json.dumps(self._meta(), indent=2) + "\n")
            manifest = {
                "mergesmith_version": __version__,
                "method": "twin",
                "artifact": "twin_merging",
                "task_names": self.task_names,
                "output_sha256": file_digests(partial),
                "torch_version": torch.__version__,
            }
            (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TwinMerge:
        """Read a folder written by :meth:`save`, or the output folder of a ``twin`` merge (``mergesmith merge``:
        the shared weights plus ``mergesmith_fit.safetensors``)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / META_FILE).exists() and (folder / FIT_FILE).exists():
            return cls.from_fit(_read_tensors(folder), FitResult.load(folder / FIT_FILE))
        meta = json.loads((folder / META_FILE).read_text())
        return cls._assemble(
            load_file(folder / SHARED_FILE),
            load_file(folder / EXCLUSIVE_FILE),
            load_file(folder / ROUTER_FILE),
            meta,
        )

    def to_fit(self) -> FitResult:
        """The exclusive parts and the router as a :class:`FitResult` (what the registered ``twin`` method's fit
        returns; θ* is the merged model itself)."""
        tensors = {f"exclusive.{k}": v for k, v in self._exclusive_tensors().items()}
        tensors.update({f"router.{k}": v.contiguous() for k, v in self.router.state_dict().items()})
        return FitResult(tensors, self._meta())

    @classmethod
    def from_fit(cls, shared: Mapping[str, torch.Tensor], fitted: FitResult) -> TwinMerge:
        """Rebuild from the shared weights (the ``twin`` merge's output) and its fit result."""

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in fitted.tensors.items() if k.startswith(prefix)}

        return cls._assemble(shared, part("exclusive."), part("router."), dict(fitted.info))

    def _meta(self) -> dict[str, Any]:
        return {"task_names": self.task_names, "router_dim": self.router.fc1.in_features, **self.info}

    def _exclusive_tensors(self) -> dict[str, torch.Tensor]:
        """Keys ``{task index}.us.{name}``, ``{task index}.v.{name}`` (factors) and ``{task index}.dense.{name}``."""
        out: dict[str, torch.Tensor] = {}
        for t in range(self.num_tasks):
            for name, (us, v) in self.factors[t].items():
                out[f"{t}.us.{name}"] = us.contiguous()
                out[f"{t}.v.{name}"] = v.contiguous()
            for name, delta in self.dense[t].items():
                out[f"{t}.dense.{name}"] = delta.contiguous()
        return out

    @classmethod
    def _assemble(
        cls,
        shared: Mapping[str, torch.Tensor],
        exclusive: Mapping[str, torch.Tensor],
        router_state: Mapping[str, torch.Tensor],
        meta: dict[str, Any],
    ) -> TwinMerge:
        meta = dict(meta)
        names = list(meta.pop("task_names"))
        router = Router(int(meta.pop("router_dim")), len(names))
        router.load_state_dict(dict(router_state))
        router.eval()
        pairs: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in names]  # name -> {'us': .., 'v': ..}
        dense: list[dict[str, torch.Tensor]] = [{} for _ in names]
        for key, tensor in exclusive.items():
            t, kind, name = key.split(".", 2)
            if kind == "dense":
                dense[int(t)][name] = tensor
            else:
                pairs[int(t)].setdefault(name, {})[kind] = tensor
        factors = [{n: (p["us"], p["v"]) for n, p in f.items()} for f in pairs]
        # θ* is every tensor that has an exclusive part (a saved HF folder also holds buffers and heads)
        mergeable = set(factors[0]) | set(dense[0])
        return cls(
            names, {n: shared[n].float() for n in shared if n in mergeable}, factors, dense, router, meta
        )


def _read_tensors(folder: Path, skip: frozenset[str] | set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The tensors of an HF folder (single file or sharded), except ``skip``, as owned copies."""
    reader = CheckpointSource(folder)
    try:
        return {n: reader.get(n).clone() for n in reader.keys() if n not in skip}
    finally:
        reader.close()


def is_excluded(name: str, exclude: Sequence[str]) -> bool:
    """Whether a tensor is kept out of the shared merge and the SVD (``re.match`` of any pattern)."""
    return any(re.match(pattern, name) for pattern in exclude)


def shared_tensor(
    name: str,
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    scaling: float,
    exclude: Sequence[str],
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    """The shared expert θ* for one tensor — the one definition, used by :func:`build_twin` and by the ``twin``
    method's rule: task arithmetic θ₀ + λ Σ_t (θ_t − θ₀), or the base value for an excluded tensor."""
    if is_excluded(name, exclude):
        return base.clone()
    params = {"weight": [1.0] * len(experts), "lambda": scaling}
    return merge_task_vectors(base, list(experts), params, ctx or TensorContext(name))


def build_twin(
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    tasks: Sequence[Task],
    *,
    scaling: float = 0.3,
    shared: Mapping[str, torch.Tensor] | None = None,
    mask_rate: float = 0.9,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    factor_dtype: torch.dtype = torch.float32,
    router_epochs: int = 50,
    router_lr: float = 5e-4,
    router_batch_size: int = 1024,
    max_router_examples: int | None = 5500,
    seed: int = 0,
    progress: bool = False,
) -> TwinMerge:
    """Build Twin-Merging from a base, the experts and one task per expert (its head and its training texts).

    The shared expert θ* is :func:`shared_tensor` with λ = ``scaling`` (task arithmetic; excluded tensors keep the
    base value), unless ``shared`` gives θ* from any other merge (e.g. TIES through
    ``mergesmith.merge_state_dicts``; its excluded tensors are still taken from the base). ``exclude`` are regular
    expressions (``re.match``) of tensor names kept out of the shared merge and of the SVD. The router learns on
    the first ``max_router_examples`` texts of each task, labelled with the task's index.
    """
    if len(tasks) != len(experts):
        raise ValueError(f"need one task per expert: got {len(tasks)} tasks for {len(experts)} experts")
    if not 0 <= mask_rate <= 1:
        raise ValueError(f"mask_rate must be in [0, 1], got {mask_rate}")
    started = time.perf_counter()
    names = [n for n in tasks[0].model.merge_names() if n in experts[0] and n in base]
    excluded = {n for n in names if is_excluded(n, exclude)}

    # 1. the shared expert θ*; excluded tensors keep the base value
    if shared is None:  # shared_tensor returns new tensors
        shared_model = {
            n: shared_tensor(n, base[n].float(), [e[n].float() for e in experts], scaling, exclude)
            for n in names
        }
    else:
        shared_model = {n: (base[n] if n in excluded else shared[n]).float().clone() for n in names}

    # 2. exclusive knowledge δ_t = θ_t − θ*, 2-D tensors compressed by truncated SVD
    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in experts]
    dense: list[dict[str, torch.Tensor]] = [{} for _ in experts]
    ranks: dict[str, int] = {}
    stored = 0
    for name in tqdm(names, desc="twin exclusive (svd)", leave=False, disable=not progress):
        for t, expert in enumerate(experts):
            delta = expert[name].float() - shared_model[name]
            if delta.dim() == 2 and name not in excluded:
                us, v = compress(delta, mask_rate, factor_dtype)
                factors[t][name] = (us, v)
                ranks[name] = us.shape[1]
                stored += (us.numel() + v.numel()) * us.element_size()
            else:
                dense[t][name] = delta
                stored += delta.numel() * delta.element_size()

    # 3. the router, on the shared model's embeddings of every task's texts
    feats, labels = [], []
    for t, task in enumerate(tqdm(tasks, desc="twin router data", leave=False, disable=not progress)):
        data = task.data
        if max_router_examples is not None and len(data) > max_router_examples:
            data = data.batch(slice(0, max_router_examples))
        feats.append(shared_features(task.model, data, shared_model))
        labels.append(torch.full((len(data),), t, dtype=torch.long))
    router, router_info = train_router(
        torch.cat(feats),
        torch.cat(labels),
        len(tasks),
        epochs=router_epochs,
        lr=router_lr,
        batch_size=router_batch_size,
        seed=seed,
        progress=progress,
    )
    dense_bytes = sum(shared_model[n].numel() * 4 for n in names) * len(experts)
    info = {
        "method": "twin_merging",
        "shared_method": "task_arithmetic" if shared is None else "given",
        "scaling": scaling,
        "mask_rate": mask_rate,
        "exclude": list(exclude),
        "excluded": sorted(excluded),
        "factor_dtype": str(factor_dtype).removeprefix("torch."),
        "ranks": ranks,
        "exclusive_bytes": stored,
        "exclusive_fraction_of_fp32_experts": stored / max(1, dense_bytes),
        "router": {
            "epochs": router_epochs,
            "lr": router_lr,
            "batch_size": router_batch_size,
            "max_examples_per_task": max_router_examples,
            "examples": int(sum(len(x) for x in labels)),
            **router_info,
        },
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return TwinMerge([task.name for task in tasks], shared_model, factors, dense, router, info)


def evaluate(
    twin: TwinMerge,
    tasks: Sequence[Task],
    *,
    batch_size: int = 32,
    routing: str = "batch",
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy of the dynamically merged model on each task, one task's batches at a time (routing a mixed
    stream per batch would blend tasks), its per-example correctness (``outcomes``, in data order: what a
    bootstrap interval resamples), and the router's per-example accuracy (argmax = the task's index in
    ``twin.task_names``; None for a task the router does not know)."""
    accuracy: dict[str, float] = {}
    outcomes: dict[str, torch.Tensor] = {}
    router_accuracy: dict[str, float | None] = {}
    for task in tqdm(tasks, desc="twin eval", leave=False, disable=not progress):
        hits = []
        routed = 0
        index = twin.task_names.index(task.name) if task.name in twin.task_names else None
        for batch in batches(task.data, batch_size):
            hits.append(twin.logits(task.model, batch, routing).argmax(1) == batch.labels)
            if index is not None:
                routed += int((twin.router_probs(batch, task.model).argmax(1) == index).sum())
        n = len(task.data)
        outcomes[task.name] = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)
        accuracy[task.name] = float(outcomes[task.name].sum()) / n if n else math.nan
        router_accuracy[task.name] = (routed / n if n else math.nan) if index is not None else None
    known = [v for v in router_accuracy.values() if v is not None]
    return {
        "accuracy": accuracy,
        "outcomes": outcomes,
        "average": sum(accuracy.values()) / len(accuracy) if accuracy else math.nan,
        "router_accuracy": router_accuracy,
        "router_average": sum(known) / len(known) if known else None,
        "routing": routing,
    }
