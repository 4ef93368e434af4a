"""Input Gram matrices of the linear layers, for RegMean (Jin et al., ICLR 2023).

For every ``nn.Linear`` (and Hugging Face ``Conv1D``, GPT-2's transposed linear) whose weight is mergeable, a
forward hook collects the layer's inputs x (one row per token) while the expert runs on its own examples, and
keeps G = Σ xᵀx / n_rows (the official code's running mean; the 1/n scale cancels only when every model uses the
same convention, which they do here). Sums are accumulated in fp64; the fit stores the means in fp32.

Padding tokens: the official code (``compute_grams``) counts every position, padding included, so its Grams
depend on how examples were batched. Here, by default, only positions with attention mask 1 count
(``include_padding: false``): padding states are not inputs the merged layer has to reproduce. An input whose
first two dimensions are not the batch's (batch, tokens) (e.g. a pooled vector) counts all its rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from mergesmith.fit.data import Encoded, sample_examples
from mergesmith.fit.task import FitInputs, FitResult, TaskModel, batches, eval_mode


@dataclass
class Grams:
    """Mean input Gram per linear layer, keyed by the layer's weight name (fp64), the examples they average, and
    the weights stored transposed (``Conv1D``: [in, out] instead of ``nn.Linear``'s [out, in])."""

    grams: dict[str, torch.Tensor]
    examples: int
    transposed: list[str]


def linear_layers(
    module: nn.Module, mergeable: set[str], prefix: str = ""
) -> dict[str, tuple[nn.Module, bool]]:
    """The linear layers whose weight is mergeable: weight name -> (layer, weight stored as [in, out]). Names
    are relative to ``prefix`` (a task model's backbone, :class:`~mergesmith.fit.task.TaskModel`)."""
    try:  # imported here, not at module level: importing transformers is slow and it is optional
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = None
    found: dict[str, tuple[nn.Module, bool]] = {}
    for path, layer in module.named_modules():
        full = f"{path}.weight" if path else "weight"
        if not full.startswith(prefix) or (weight_name := full[len(prefix) :]) not in mergeable:
            continue
        if isinstance(layer, nn.Linear):
            found[weight_name] = (layer, False)
        elif Conv1D is not None and isinstance(layer, Conv1D):
            found[weight_name] = (layer, True)
    return found


def gram_matrices(
    model: TaskModel,
    params: dict[str, torch.Tensor],
    data: Encoded,
    batch_size: int = 16,
    include_padding: bool = False,
    progress: bool = False,
    desc: str = "gram",
) -> Grams:
    """Mean XᵀX of the inputs of every mergeable linear layer while ``model`` runs with ``params`` on ``data``.
    A layer the forward pass never reaches gets no Gram."""
    layers = linear_layers(model.module, set(params), model.prefix)
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    current: dict[str, torch.Tensor] = {}  # the running batch's attention mask, for the hooks

    def hook_for(weight_name: str):
        def hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
            raw = args[0].detach()
            seen = current.setdefault("seen", {})
            # query, key and value read the same input tensor: one batch Gram serves all three
            if id(raw) not in seen:
                x = raw
                mask = current["mask"]
                if not include_padding and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                    x = x[mask.bool()]
                x = x.reshape(-1, x.shape[-1]).float()
                # the batch product in fp32 (fast), the running sum over batches in fp64 (no drift)
                seen[id(raw)] = (raw, (x.T @ x).double(), x.shape[0])
            _, gram, count = seen[id(raw)]
            sums[weight_name] = sums.get(weight_name, 0) + gram
            rows[weight_name] = rows.get(weight_name, 0) + count

        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, (layer, _) in layers.items()]
    try:
        with eval_mode(model.module), torch.no_grad():
            for batch in tqdm(
                batches(data, batch_size), desc=desc, disable=not progress, leave=False, dynamic_ncols=True
            ):
                current["mask"], current["seen"] = batch.attention_mask, {}
                model.logits(batch, params)
    finally:
        for handle in handles:
            handle.remove()
    grams = {name: sums[name] / rows[name] for name in sums if rows[name] > 0}
    return Grams(grams, len(data), sorted(name for name, (_, t) in layers.items() if t and name in grams))


def gram_key(model_index: int, weight_name: str) -> str:
    """Where the fit stores expert ``model_index``'s input Gram of the linear layer with weight ``weight_name``."""
    return f"gram.{model_index}.{weight_name}"


def fit_regmean(inputs: FitInputs) -> FitResult:
    """Every expert's input Grams on (a seeded sample of ``n_examples`` of) its own task's examples."""
    settings = inputs.params
    result = FitResult(
        info={
            "examples": [],
            "seconds": [],
            "layers": [],
            "transposed": [],
            "include_padding": settings["include_padding"],
        }
    )
    transposed: set[str] = set()
    for i, (task, params) in enumerate(zip(inputs.tasks, inputs.experts, strict=True)):
        start = time.perf_counter()
        data = sample_examples(task.data, settings["n_examples"], inputs.seed + i)
        grams = gram_matrices(
            task.model,
            params,
            data,
            settings["batch_size"],
            settings["include_padding"],
            inputs.progress,
            desc=f"gram ({task.name})",
        )
        result.tensors.update({gram_key(i, n): g.float() for n, g in grams.grams.items()})
        transposed.update(grams.transposed)
        result.info["examples"].append(grams.examples)
        result.info["seconds"].append(round(time.perf_counter() - start, 3))
        result.info["layers"].append(len(grams.grams))
    result.info["transposed"] = sorted(transposed)
    return result
