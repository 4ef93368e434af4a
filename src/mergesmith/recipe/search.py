"""SEARCH.yaml: what ``mergesmith evolve`` searches, how, and what it scores (Akiba et al.'s evolutionary merge).

```yaml
space: parameter                 # or dataflow (a layer path through decoder LMs)
merge_method: dare_ties          # any data-free per-tensor method
base_model: path/to/base
models: [path/to/a, path/to/b]
layer_granularity: 4             # one parameter set per block of 4 layers (0: one block for all layers)
filters: [self_attn, mlp]        # optional: separate values for tensors whose names contain these
smooth: false                    # true: the blocks' values become a gradient over the layers
search: [weight, density]        # the searched parameters (default: the method's per-model weight/density/t)
ranges: {weight: [0.0, 1.0], density: [0.1, 1.0]}
initial: {weight: 0.5}           # the search's mean at the start (default: weight 1/n, density 1.0, t 0.5)
parameters: {normalize: true}    # fixed parameters of every candidate
optimizer: {budget: 100, popsize: null, sigma0: 0.1667}
fitness:                         # one or more evaluators, averaged with their weights; higher is better
  - {kind: exact_match, data: skills/val.jsonl, limit: 100}
seed: 0
```

Each searched coordinate lives in [0, 1] and maps linearly onto its range (values outside are clipped), so
CMA-ES's step size (sigma0 = 1/6, mergekit-evolve's) means the same for every parameter.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergesmith.dtypes import DTYPE_NAMES
from mergesmith.errors import RecipeError
from mergesmith.recipe.schema import Scalar, describe_validation_error, read_mapping

DtypeName = Literal[DTYPE_NAMES]  # type: ignore[valid-type]


class OptimizerSpec(BaseModel):
    """CMA-ES settings: at most ``budget`` evaluations, in whole generations of ``popsize`` candidates."""

    model_config = ConfigDict(extra="forbid")
    budget: int = Field(default=100, ge=2)
    popsize: int | None = Field(default=None, ge=2)  # None: CMA-ES's 4 + ⌊3 ln n⌋
    sigma0: float = Field(default=1 / 6, gt=0, le=1)


class FitnessSpec(BaseModel):
    """One evaluator: ``kind`` names it (see ``mergesmith.drivers.evolve.fitness``), the rest are its settings."""

    model_config = ConfigDict(extra="allow")
    kind: str
    weight: float = Field(default=1.0, gt=0)

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in (self.model_extra or {}).items()}


class DataflowSpec(BaseModel):
    """The layer-path space: every source layer, repeated ``repeats`` times, each slot in or out of the path."""

    model_config = ConfigDict(extra="forbid")
    repeats: int = Field(default=3, ge=1)
    start: int = Field(default=0, ge=0)  # the initial path: this model's layers in order


class SearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    space: Literal["parameter", "dataflow"] = "parameter"
    merge_method: str | None = None
    base_model: str | None = None
    models: list[str]
    layer_granularity: int = Field(default=0, ge=0)
    filters: list[str] = Field(default_factory=list)
    smooth: bool = False
    search: list[str] | None = None
    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)
    initial: dict[str, float] = Field(default_factory=dict)
    parameters: dict[str, Scalar] = Field(default_factory=dict)
    allow_negative_weights: bool = False
    dtype: DtypeName = "float32"
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    fitness: list[FitnessSpec]
    dataflow: DataflowSpec = Field(default_factory=DataflowSpec)
    seed: int = 0

    @field_validator("fitness", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    @field_validator("ranges")
    @classmethod
    def _ordered(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for name, (low, high) in v.items():
            if not (math.isfinite(low) and math.isfinite(high)) or low > high:
                raise ValueError(f"ranges.{name} must be [low, high] with low <= high, got [{low}, {high}]")
        return v

    @model_validator(mode="after")
    def _space_needs(self) -> SearchSpec:
        if not self.models:
            raise ValueError("models: lists no model")
        if not self.fitness:
            raise ValueError("fitness: names no evaluator")
        if self.space == "parameter" and not self.merge_method:
            raise ValueError("a parameter-space search needs merge_method:")
        if self.space == "dataflow":
            if self.merge_method or self.base_model:
                raise ValueError(
                    "a dataflow search reads layers of models: as they are; remove merge_method/base_model "
                    "(for PS + DFS, search the parameter space first and list its output among models:)"
                )
            if self.dataflow.start >= len(self.models):
                raise ValueError(
                    f"dataflow.start is {self.dataflow.start}, but models: lists {len(self.models)}"
                )
        return self

    def resolved(self, root: Path) -> SearchSpec:
        """Model and data paths relative to the SEARCH.yaml's folder, made absolute (Hub ids stay as they are)."""

        def fix(value: str) -> str:
            path = Path(value).expanduser()
            if path.is_absolute() or not (root / path).exists():
                return value
            return str((root / path).resolve())

        fitness = []
        for f in self.fitness:
            settings = f.settings()
            for key in ("data", "model", "head", "tokenizer", "include_path", "bench", "zoo"):
                if isinstance(settings.get(key), str):
                    settings[key] = fix(settings[key])
            fitness.append(FitnessSpec(kind=f.kind, weight=f.weight, **settings))
        return self.model_copy(
            update={
                "models": [fix(m) for m in self.models],
                "base_model": fix(self.base_model) if self.base_model else None,
                "fitness": fitness,
            }
        )


def _key_owner(parts: list[str]) -> tuple[str, Any]:
    """Which mapping of a search file an unknown key was found in, and its known keys."""
    if parts[:1] == ["optimizer"]:
        return "optimizer", OptimizerSpec.model_fields
    if parts[:1] == ["dataflow"]:
        return "dataflow", DataflowSpec.model_fields
    return "top-level", SearchSpec.model_fields


def load_search(source: str | Path | dict[str, Any]) -> SearchSpec:
    """Parse a SEARCH.yaml (a path, a YAML string or a dict); one-line RecipeError naming the file and key on any
    mistake. Relative paths are relative to the file's folder (else to the working directory)."""
    data, where = read_mapping(source, "search", "space:, models:, fitness:, ...")
    try:
        spec = SearchSpec.model_validate(data)
    except ValidationError as e:
        raise RecipeError(describe_validation_error(e, where, _key_owner, "search")) from None
    root = Path(where).parent if where != "search" else Path.cwd()
    return spec.resolved(root)
