"""The method interface: a typed parameter schema, a per-tensor rule, and optional hooks.

A method is a :class:`Rule` — a pure function ``rule(base, experts, params, ctx) -> Tensor`` over fp32 (or fp64)
tensors — plus a schema of its parameters. Shared parameters arrive as scalars; per-model parameters as lists
aligned with ``experts``. Everything else a method may need is an optional hook, each a small typed object with
one job:

- :class:`ModelStats`: statistics of the whole model before the merge pass (TIES' global trim); the engine calls it
  with a way to stream every tensor once per pass, and what it returns reaches the rule as ``ctx.state``;
- :class:`TensorStats`: statistics of one tensor over its row blocks before they are merged (a per-tensor top-k
  threshold), reaching the rule as ``ctx.tensor_state``;
- :class:`Fit`: a data-driven fit (statistics or learned coefficients, :mod:`mergesmith.fit`) run before the merge;
  its :class:`~mergesmith.fit.task.FitResult` reaches the rule as ``ctx.fitted``;
- :class:`Artifacts`: extra files the method writes into the output folder from its fit.

The engine and the api read these hooks; neither names a method. The registry is :mod:`mergesmith.methods.registry`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import torch

from mergesmith.errors import RecipeError
from mergesmith.fit.task import FitInputs, FitResult
from mergesmith.ops.stream import TensorContext, TensorStream
from mergesmith.recipe.schema import Recipe

REQUIRED = object()


class BasePolicy(str, Enum):
    """How a method uses ``base_model``."""

    REQUIRED = "required"  # task-vector methods: experts are models minus the base
    OPTIONAL = "optional"  # used when given (nuslerp)
    IGNORED = "ignored"  # linear, karcher: every listed model is an input, the base is not special


@dataclass(frozen=True)
class Param:
    """One parameter of a method.

    ``mergekit`` is the value that ``compat: mergekit`` uses when the recipe does not set the parameter; it is
    how every paper-vs-mergekit difference is switched in one place.

    ``global_over`` marks a scope parameter (``global`` | ``tensor``): the parameters it names must be constant
    over the tensors when the scope is global (one statistic over the whole network).
    """

    name: str
    type: type
    default: Any = REQUIRED
    help: str = ""
    per_model: bool = False
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    mergekit: Any = REQUIRED
    global_over: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def default_for(self, compat: str) -> Any:
        if compat == "mergekit" and self.mergekit is not REQUIRED:
            return self.mergekit
        return self.default

    def validate(self, value: Any, where: str) -> Any:
        """Coerce and range-check one value; ``where`` names the recipe location for the error."""
        try:
            if self.type is bool:
                if isinstance(value, str) and value.lower() in ("true", "false"):
                    value = value.lower() == "true"
                if not isinstance(value, (bool, int)) or (isinstance(value, int) and value not in (0, 1)):
                    raise ValueError
                value = bool(value)
            elif self.type is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
            elif self.type is int:
                if isinstance(value, bool) or float(value) != int(float(value)):
                    raise ValueError
                value = int(float(value))
            else:
                value = self.type(value)
        except (TypeError, ValueError):
            raise RecipeError(
                f"{where}: parameter '{self.name}' must be {self.type.__name__}, got {value!r}"
            ) from None
        if self.choices is not None and value not in self.choices:
            raise RecipeError(
                f"{where}: parameter '{self.name}' must be one of {list(self.choices)}, got {value!r}"
            )
        if self.low is not None and value < self.low:
            raise RecipeError(f"{where}: parameter '{self.name}' must be >= {self.low}, got {value!r}")
        if self.high is not None and value > self.high:
            raise RecipeError(f"{where}: parameter '{self.name}' must be <= {self.high}, got {value!r}")
        return value


# what a mergekit recipe may carry that changes nothing here (every method accepts it, with a notice)
MERGEKIT_NOOPS = {
    "int8_mask": "a mergekit memory option (int8 masks); mergesmith merges in fp32 blocks and needs none",
}
# every parameter name of mergekit's methods (0.1.5, and older ones seen in published recipes): a recipe often
# carries some its method does not read (``normalize`` on sce), which mergekit ignores; so does mergesmith, with
# a notice. Any other unknown name stays an error (a typo).
MERGEKIT_PARAMETERS = frozenset(
    {
        "alpha", "allow_negative_weights", "density", "eps", "epsilon", "filter_wise", "gamma", "int8_mask",
        "lambda", "max_iter", "normalize", "normalize_weights", "nuslerp_flatten", "nuslerp_row_wise", "r",
        "rescale", "scale", "select_topk", "smooth", "t", "tol", "weight",
    }
)  # fmt: skip

RuleFn = Callable[[torch.Tensor | None, list[torch.Tensor], dict[str, Any], TensorContext], torch.Tensor]
ParamsTest = Callable[[dict[str, Any]], bool]


def _always(params: dict[str, Any]) -> bool:
    return True


@dataclass(frozen=True)
class Rule:
    """The per-tensor rule and what the engine may assume about it.

    ``elementwise`` (or a test of the resolved parameters): the output at a position depends only on the inputs
    at that position (plus the hooks' statistics), so the engine may merge a large tensor in row blocks.
    ``reads``: ``all`` hands the rule every model's tensor in fp32 (fp64 for fp64 inputs); ``first`` hands it only
    the first model's tensor, unconverted (passthrough copies: no other model is read, no round trip through fp32).
    """

    fn: RuleFn
    elementwise: bool | ParamsTest = False
    reads: Literal["all", "first"] = "all"

    def __call__(
        self,
        base: torch.Tensor | None,
        experts: list[torch.Tensor],
        params: dict[str, Any],
        ctx: TensorContext,
    ) -> torch.Tensor:
        return self.fn(base, experts, params, ctx)

    def blockwise(self, params: dict[str, Any]) -> bool:
        """Whether a large tensor with these parameters may be merged in row blocks."""
        flag = self.elementwise
        return self.reads == "all" and bool(flag(params) if callable(flag) else flag)


@dataclass(frozen=True)
class ModelStats:
    """Whole-model statistics before the merge pass: ``compute(stream, shared params, seed) -> ctx.state``. The stream
    yields every merged tensor's inputs (row blocks for block-merged tensors) and may be walked several times."""

    compute: Callable[[TensorStream, dict[str, Any], int], Any]

    def __call__(self, stream: TensorStream, params: dict[str, Any], seed: int) -> Any:
        return self.compute(stream, params, seed)


@dataclass(frozen=True)
class TensorStats:
    """Per-tensor statistics over the tensor's row blocks, before its blocks are merged: ``compute(stream of this
    tensor's blocks, params, ctx) -> ctx.tensor_state``, when ``needed(params)``."""

    compute: Callable[[TensorStream, dict[str, Any], TensorContext], Any]
    needed: ParamsTest = _always

    def __call__(self, stream: TensorStream, params: dict[str, Any], ctx: TensorContext) -> Any:
        return self.compute(stream, params, ctx)


class DataNeed(str, Enum):
    """What data a data-driven method's fit needs per expert."""

    LABELED = "labeled"  # Fisher (empirical) and Twin-Merging's router: texts with labels (or task identity)
    UNLABELED = "unlabeled"  # RegMean, exact Fisher, AdaMerging, Concrete, DAM: input texts only


@dataclass(frozen=True)
class Fit:
    """A data-driven fit run before the merge: ``run(FitInputs) -> FitResult`` (statistics, learned coefficients or
    masks; :mod:`mergesmith.fit`), on ``data`` examples of each expert's task."""

    run: Callable[[FitInputs], FitResult]
    data: DataNeed = DataNeed.UNLABELED

    def __call__(self, inputs: FitInputs) -> FitResult:
        return self.run(inputs)


@dataclass(frozen=True)
class Artifacts:
    """Extra files a method writes into the output folder from its fit: ``write(fitted, recipe, folder)`` returns
    what the manifest's ``fit`` section records about them (e.g. AdaMerging's replayable ``learned_recipe.yaml``)."""

    write: Callable[[FitResult, Recipe, Path], dict[str, Any]]

    def __call__(self, fitted: FitResult, recipe: Recipe, folder: Path) -> dict[str, Any]:
        return self.write(fitted, recipe, folder)


@dataclass(frozen=True)
class MergeMethod:
    """A registry entry: name, paper, parameter schema, base policy, the per-tensor rule and its optional hooks."""

    name: str
    rule: Rule
    summary: str
    paper: str
    params: tuple[Param, ...] = ()
    base: BasePolicy = BasePolicy.REQUIRED
    min_experts: int = 1
    max_experts: int | None = None
    # recipe key -> (parameter, {recipe value: parameter value}); e.g. mergekit's `normalize` for TIES
    aliases: dict[str, tuple[str, dict[Any, Any]]] = field(default_factory=dict)
    random: bool = False  # the rule draws random numbers (seeded per tensor): results vary with the seed
    model_stats: ModelStats | None = None
    tensor_stats: TensorStats | None = None
    fit: Fit | None = None
    artifacts: Artifacts | None = None
    # recipe keys that change nothing here (mergekit's memory options, …) -> why; accepted with a notice
    ignored: dict[str, str] = field(default_factory=lambda: dict(MERGEKIT_NOOPS))

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def ignored_reason(self, key: str) -> str | None:
        """Why a recipe key changes nothing for this method (None: it is read, or unknown)."""
        if key in self.ignored:
            return self.ignored[key]
        if key in MERGEKIT_PARAMETERS and key not in self.param_names and key not in self.aliases:
            return f"not a parameter of {self.name} (mergekit ignores it too)"
        return None

    def check_param_name(self, key: str, where: str) -> None:
        known = list(dict.fromkeys(self.param_names + list(self.aliases)))
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else f"; known: {', '.join(known) or 'none'}"
            raise RecipeError(f"{where}: unknown parameter '{key}' for method '{self.name}'{extra}")

    def check_expert_count(self, count: int) -> None:
        if count < self.min_experts:
            noun = "model" if self.base is BasePolicy.IGNORED else "model besides the base"
            raise RecipeError(
                f"method '{self.name}' needs at least {self.min_experts} {noun}(s), got {count}"
            )
        if self.max_experts is not None and count > self.max_experts:
            noun = "model" if self.base is BasePolicy.IGNORED else "model besides the base"
            raise RecipeError(f"method '{self.name}' takes at most {self.max_experts} {noun}(s), got {count}")


def resolve_method_params(
    method: MergeMethod,
    raw: dict[str, Any],
    per_model_raw: Sequence[dict[str, Any]],
    compat: str = "paper",
    where: str = "parameters",
) -> dict[str, Any]:
    """Validate scalar parameter values (already resolved for one tensor) and fill defaults.

    ``raw`` holds shared settings, ``per_model_raw[i]`` the settings of expert i (a per-model parameter falls
    back to the shared setting, then to the default, as in mergekit). Returns a flat dict in which per-model
    parameters are lists.
    """

    def apply_aliases(settings: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in settings.items() if method.ignored_reason(k) is None}
        for key, (target, mapping) in method.aliases.items():
            if key in out:
                value = out.pop(key)
                if target not in out:
                    if value not in mapping:
                        raise RecipeError(
                            f"{where}: parameter '{key}' must be one of {list(mapping)}, got {value!r}"
                        )
                    out[target] = mapping[value]
        return out

    shared = apply_aliases(raw)
    models = [apply_aliases(m) for m in per_model_raw]
    for key in shared:
        method.check_param_name(key, where)
    for i, m in enumerate(models):
        for key in m:
            method.check_param_name(key, f"{where} (model {i})")
    out: dict[str, Any] = {}
    for p in method.params:
        if p.per_model:
            values = []
            for i, m in enumerate(models):
                if p.name in m:
                    value = m[p.name]
                elif p.name in shared:
                    value = shared[p.name]
                else:
                    value = p.default_for(compat)
                    if value is REQUIRED:
                        raise RecipeError(f"{where}: model {i} is missing required parameter '{p.name}'")
                values.append(p.validate(value, where))
            out[p.name] = values
        else:
            if p.name in shared:
                value = shared[p.name]
            else:
                value = p.default_for(compat)
                if value is REQUIRED:
                    raise RecipeError(f"{where}: missing required parameter '{p.name}'")
            out[p.name] = p.validate(value, where)
    return out
