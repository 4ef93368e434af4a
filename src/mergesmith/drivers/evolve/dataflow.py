"""The data-flow space (Akiba et al.'s DFS merging): a genome → an inference path through the source models'
layers, written as a plain layer-stacking recipe.

N source decoders of one family (Llama / Mistral / Qwen2, one shape and vocabulary) have L_1 … L_N layers. Their
layers, concatenated, are M = ΣL_n layer *kinds* (kind j = model m(j)'s layer l(j)); the sequence repeated r times
gives T = M·r *slots*. The genome holds one indicator per slot (the slot's layer is in the path iff its indicator
> 0) and the scales: whenever the path goes from layer i to layer j, the hidden state fed into j is multiplied by
W_ij. The path's model is h = embed(x); h = layer(W_ij · h) along the path; logits = lm_head(norm(h)).

Genome layout (length T + N² + M): the T indicators, slot by slot; then u, an N×N matrix (row-major); then v, one
value per layer kind.

Decisions (docs/evolve.md):

- **Compact W.** The paper's W is M×M; here log W_ij = u[m(i), m(j)] + v[j]: a term for the pair of source
  models the transition joins and one for the layer entered. The step out of the embedding counts as a step
  within the first layer's model. All-zero log-scales are W = 1 (no rescaling).
- **Clamping.** Each log W_ij (the sum) is clamped to [−log 4, log 4]: a scale lies in [1/4, 4].
- **Initial genome.** Indicators +0.3 on model ``start``'s layers in the first repetition, −0.3 elsewhere, all
  log-scales 0: the path is model ``start`` itself.
- **Empty path.** A genome with no indicator > 0 decodes to no steps; its recipe is a RecipeError (the search
  ranks such a candidate last).
- **The path is a recipe.** ``path_recipe`` writes it as mergekit-style layer stacking (``passthrough``, one
  slice per step), so the output goes through the normal merge and the recipe runs anywhere: embeddings come
  from the first step's model, the final norm and LM head from the last step's (as in any sliced recipe).
- **Scales folded into the weights.** A pre-norm layer L(h) = h + f(norm₁(h)) + g(norm₂(h + f(…))) with RMSNorm is
  blind to the scale of its input, so L(s·h) = s·L'(h), where L' has its branch outputs (``self_attn.o_proj`` and
  ``mlp.down_proj`` weights and biases) multiplied by 1/s. With the cumulative scale C_k = s_1·…·s_k, output
  layer k gets its branch outputs multiplied by 1/C_k (passthrough's ``scale`` on those tensors) and carries
  h_k / C_k; the final RMSNorm is blind to C_K. This is exact up to RMSNorm's eps: the folded model computes
  norm(y) with eps where the scaled path computes norm(C·y) with eps, i.e. norm(y) with eps/C². Only pre-norm
  RMSNorm families whose residual branches end in those projections are accepted (Gemma-2's post-branch norms,
  GPT-2's blocks and others would make the fold wrong).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from mergesmith.errors import RecipeError

MAX_LOG_SCALE = math.log(4.0)
INITIAL_INDICATOR = 0.3
# the log-scales' initial spread as a share of σ0: σ0 = 1/6 on every one of them varies each layer's input by ~±25 %,
# compounding along the residual stream, and broke every sample of a 135M path search (docs/evolve.md)
SCALE_SPREAD = 0.1
# pre-norm RMSNorm decoders whose residual branches end in these projections (the fold is exact for them)
FOLDABLE_FAMILIES = ("llama", "mistral", "qwen2")
BRANCH_OUTPUTS = (".self_attn.o_proj.", ".mlp.down_proj.")  # weights and biases: name filters
# the config keys that fix a layer's tensor shapes and the embeddings: a path's layers must agree on them
SHAPE_KEYS = (
    "hidden_size",
    "vocab_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "layer_types",
)


@dataclass(frozen=True)
class PathStep:
    """One layer of the inference path: source ``model``'s ``layer``, with ``scale`` the factor on the hidden
    state fed into it."""

    model: int
    layer: int
    scale: float


class DataflowSpace:
    """The genome of a data-flow search over models of ``num_layers`` layers, their layers repeated ``repeats``
    times; the initial genome is model ``start``'s layers."""

    def __init__(self, num_layers: Sequence[int], repeats: int = 3, start: int = 0):
        self.num_layers = tuple(int(n) for n in num_layers)
        if not self.num_layers or any(n < 1 for n in self.num_layers):
            raise RecipeError(
                f"data-flow space: the models' layer counts {list(self.num_layers)} must be one or more "
                "positive numbers"
            )
        if repeats < 1:
            raise RecipeError(f"data-flow space: repeats is {repeats}; give 1 or more")
        if not 0 <= start < len(self.num_layers):
            raise RecipeError(
                f"data-flow space: start is {start}, but there are {len(self.num_layers)} models "
                f"(give 0 to {len(self.num_layers) - 1})"
            )
        self.repeats = repeats
        self.start = start
        # kind j → (source model, its layer), models' layers concatenated in order
        self.kinds: tuple[tuple[int, int], ...] = tuple(
            (model, layer) for model, count in enumerate(self.num_layers) for layer in range(count)
        )

    @property
    def num_models(self) -> int:
        """N."""
        return len(self.num_layers)

    @property
    def num_kinds(self) -> int:
        """M = ΣL_n: the distinct layers."""
        return len(self.kinds)

    @property
    def slots(self) -> int:
        """T = M·r: the layers the path can pass through, in order."""
        return self.num_kinds * self.repeats

    @property
    def size(self) -> int:
        """The genome's length: T indicators, the N×N model-pair log-scales u, the M layer log-scales v."""
        return self.slots + self.num_models**2 + self.num_kinds

    def kind_of(self, slot: int) -> tuple[int, int]:
        """The (source model, layer) that ``slot`` holds."""
        return self.kinds[slot % self.num_kinds]

    def split(self, x: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The genome's parts: indicators (T,), u (N, N), v (M,)."""
        genome = np.asarray(x, dtype=np.float64).reshape(-1)
        if genome.size != self.size:
            raise RecipeError(
                f"data-flow genome has {genome.size} values; this space needs {self.size} ({self.slots} "
                f"indicators + {self.num_models}² + {self.num_kinds} log-scales)"
            )
        if not np.all(np.isfinite(genome)):
            raise RecipeError("data-flow genome has a NaN or infinite value; give finite numbers")
        n, t = self.num_models, self.slots
        return genome[:t], genome[t : t + n * n].reshape(n, n), genome[t + n * n :]

    def initial(self) -> np.ndarray:
        """The search's starting mean: model ``start``'s layers in order (first repetition), every scale 1."""
        genome = np.zeros(self.size)
        genome[: self.slots] = -INITIAL_INDICATOR
        for kind, (model, _) in enumerate(self.kinds):
            if model == self.start:
                genome[kind] = INITIAL_INDICATOR
        return genome

    def initial_spread(self, sigma0: float) -> np.ndarray:
        """Per-coordinate multipliers of σ0 for CMA-ES's first samples (pycma's ``CMA_stds``): the indicators so
        that about one slot of the T flips per sample (P(flip) = 1/T from ±``INITIAL_INDICATOR``; at most σ0
        itself), the log-scales ``SCALE_SPREAD``: the first generation explores paths near the start, whose scores
        are not all those of a broken model."""
        z = NormalDist().inv_cdf(1 - 1 / max(self.slots, 2))
        spread = np.full(self.size, SCALE_SPREAD)
        spread[: self.slots] = min(1.0, INITIAL_INDICATOR / (z * sigma0))
        return spread

    def decode(self, x: Sequence[float] | np.ndarray) -> list[PathStep]:
        """The path: the slots whose indicator is > 0, in order, each with the scale of the transition into it
        (from the previous layer of the path; the first from its own model's embedding)."""
        indicators, u, v = self.split(x)
        steps: list[PathStep] = []
        previous_model = None
        for slot in np.flatnonzero(indicators > 0):
            kind = int(slot) % self.num_kinds
            model, layer = self.kinds[kind]
            previous_model = model if previous_model is None else previous_model
            log_scale = min(max(float(u[previous_model, model] + v[kind]), -MAX_LOG_SCALE), MAX_LOG_SCALE)
            steps.append(PathStep(model, layer, math.exp(log_scale)))
            previous_model = model
        return steps

    @staticmethod
    def describe(steps: Sequence[PathStep]) -> str:
        """A compact account of a path: runs of consecutive layers of one model, then the scales
        (``0:0-5, 1:3, 0:6-11 (scales 1 1.2 …)``)."""
        if not steps:
            return "(empty path)"
        runs: list[list[int]] = []  # [model, first layer, last layer]
        for step in steps:
            if runs and runs[-1][0] == step.model and runs[-1][2] + 1 == step.layer:
                runs[-1][2] = step.layer
            else:
                runs.append([step.model, step.layer, step.layer])
        path = ", ".join(f"{m}:{a}" if a == b else f"{m}:{a}-{b}" for m, a, b in runs)
        if all(math.isclose(step.scale, 1.0) for step in steps):
            return f"{path} (scales all 1)"
        return f"{path} (scales {' '.join(f'{step.scale:.3g}' for step in steps)})"


def check_sources(configs: Sequence[Mapping[str, Any]], models: Sequence[str]) -> None:
    """RecipeError unless the models are of one foldable family and one shape."""
    families = [str(config.get("model_type") or "(none)") for config in configs]
    for name, family in zip(models, families, strict=True):
        if family not in FOLDABLE_FAMILIES:
            raise RecipeError(
                f"{name}: model_type {family!r} has layers that are not pre-norm RMSNorm blocks ending in "
                f"self_attn.o_proj / mlp.down_proj to fold a path's scales into; use "
                f"{', '.join(FOLDABLE_FAMILIES)} models"
            )
    if len(set(families)) > 1:
        raise RecipeError(
            f"data-flow search: the models are of different families ({', '.join(families)}); give models of one"
        )
    for key in SHAPE_KEYS:
        values = [config.get(key) for config in configs]
        if any(value != values[0] for value in values):
            listed = ", ".join(f"{name}: {value}" for name, value in zip(models, values, strict=True))
            raise RecipeError(
                f"data-flow search: the models differ in {key} ({listed}); give models of one shape"
            )


def path_recipe(steps: Sequence[PathStep], models: Sequence[str], dtype: str = "float32") -> dict[str, Any]:
    """The path as a layer-stacking recipe: one ``passthrough`` slice per step (``models[step.model]``'s layer
    ``step.layer``), its branch outputs scaled by 1/C_k, the inverse cumulative scale (module docstring)."""
    if not steps:
        raise RecipeError("the data-flow path is empty (no slot's indicator is > 0)")
    slices = []
    cumulative = 1.0
    for step in steps:
        cumulative *= step.scale
        source: dict[str, Any] = {"model": models[step.model], "layer_range": [step.layer, step.layer + 1]}
        if cumulative != 1.0:
            inverse = 1.0 / cumulative
            source["parameters"] = {
                "scale": [{"filter": f, "value": inverse} for f in BRANCH_OUTPUTS] + [{"value": 1.0}]
            }
        slices.append({"sources": [source]})
    return {"merge_method": "passthrough", "slices": slices, "dtype": dtype}
