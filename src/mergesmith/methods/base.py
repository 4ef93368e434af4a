"""The method interface: a typed parameter schema, a per-tensor rule, and the registry.

A method is a pure function ``rule(base, experts, params, ctx) -> Tensor`` over fp32 (or fp64) tensors, plus a
schema of its parameters. Shared parameters arrive as scalars; per-model parameters as lists aligned with
``experts``. Methods that need a statistic of the whole model (TIES' global trim) also define ``prepare``, which
the engine calls with a way to stream every tensor once per pass; what it returns reaches the rule as
``ctx.state``.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from mergesmith.errors import RecipeError

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


@dataclass
class TensorContext:
    """What a rule may know about the tensor it merges besides the values."""

    name: str
    seed: int = 0
    state: Any = None  # what the method's prepare() returned
    fitted: Any = None  # a data-driven method's FitResult (mergesmith.learn.task): statistics, masks, coefficients
    rows: tuple[int, int] | None = None  # the row block being merged (elementwise methods, large tensors)
    tensor_state: Any = None  # what the method's tensor_stats() returned for this tensor
    layer: int | None = None
    num_layers: int | None = None

    def generator(self, salt: str = "") -> torch.Generator:
        """A generator seeded from (seed, tensor name, salt): random rules are reproducible and independent
        of the order (or thread) in which tensors are merged."""
        gen = torch.Generator()
        gen.manual_seed(self.seed_for(salt))
        return gen

    def seed_for(self, salt: str = "") -> int:
        """The 63-bit seed of (seed, tensor name, salt, row block) that ``generator`` uses."""
        block = f"\0rows{self.rows[0]}" if self.rows is not None else ""  # each row block draws its own bits
        digest = hashlib.sha256(f"{self.seed}\0{self.name}\0{salt}{block}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class TensorInputs:
    """One tensor's inputs as streamed to ``prepare``: fp32 values and the resolved parameters."""

    name: str
    base: torch.Tensor | None
    experts: list[torch.Tensor]
    params: dict[str, Any]
    rows: tuple[int, int] | None = None  # the row block, when a large tensor of an elementwise method is split


# A pass over the model: calling it yields each mergeable tensor's inputs once.
TensorStream = Callable[[], Iterator[TensorInputs]]
Rule = Callable[[torch.Tensor | None, list[torch.Tensor], dict[str, Any], TensorContext], torch.Tensor]
Prepare = Callable[[TensorStream, dict[str, Any], int], Any]  # (stream, params, seed) -> state
Fit = Callable[[Any], Any]  # (learn.task.FitInputs) -> learn.task.FitResult


class DataNeed(str, Enum):
    """What data a data-driven method's ``fit`` needs per expert."""

    NONE = "none"
    LABELED = "labeled"  # Fisher (empirical) and Twin-Merging's router: texts with labels (or task identity)
    UNLABELED = "unlabeled"  # RegMean, exact Fisher, AdaMerging, Concrete, DAM: input texts only


@dataclass(frozen=True)
class MergeMethod:
    """A registry entry: name, paper, parameter schema, base policy and the per-tensor rule."""

    name: str
    rule: Rule
    summary: str
    paper: str
    params: tuple[Param, ...] = ()
    base: BasePolicy = BasePolicy.REQUIRED
    min_experts: int = 1
    max_experts: int | None = None
    prepare: Prepare | None = None
    # recipe key -> (parameter, {recipe value: parameter value}); e.g. mergekit's `normalize` for TIES
    aliases: dict[str, tuple[str, dict[Any, Any]]] = field(default_factory=dict)
    random: bool = False
    # Only one input tensor is used by the rule (passthrough): the engine does not read the others.
    structural: bool = False
    # Data-driven methods: ``fit`` runs the models on each expert's data before the streaming merge; its
    # FitResult reaches the rule as ``ctx.fitted``.
    fit: Fit | None = None
    data: DataNeed = DataNeed.NONE
    # True (or a function of the resolved parameters) when the output at a position depends only on the inputs at
    # that position (plus prepare/tensor_stats/fit results): the engine then merges large tensors in row blocks.
    elementwise: bool | Callable[[dict[str, Any]], bool] = False
    # Per-tensor statistics over the tensor's blocks, before its blocks are merged (a per-tensor top-k threshold):
    # (stream of this tensor's blocks, params, ctx) -> ctx.tensor_state.
    tensor_stats: Callable[[TensorStream, dict[str, Any], TensorContext], Any] | None = None
    uses_tensor_stats: Callable[[dict[str, Any]], bool] = lambda params: True

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def check_param_name(self, key: str, where: str) -> None:
        known = self.param_names + list(self.aliases)
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


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    from mergesmith import methods as _load_all  # noqa: F401  (registers every module)

    try:
        return _REGISTRY[name]
    except KeyError:
        hint = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        extra = f"; did you mean '{hint[0]}'?" if hint else ""
        raise RecipeError(
            f"unknown merge_method '{name}'{extra} (run `mergesmith methods` for the list)"
        ) from None


def all_methods() -> list[MergeMethod]:
    from mergesmith import methods as _load_all  # noqa: F401

    return sorted(_REGISTRY.values(), key=lambda m: m.name)


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
        out = dict(settings)
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
