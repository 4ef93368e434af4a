"""Recipes: what to merge and how. YAML files (mergekit-compatible where the concept is the same) or dicts.

```yaml
merge_method: ties
base_model: path/to/base
models:
  - model: path/to/expert_a
    parameters: {weight: 1.0, density: 0.2}
  - model: path/to/expert_b
    parameters:
      weight: [0.2, 0.8]          # a gradient: interpolated over the layers
      density:
        - {filter: self_attn, value: 0.5}   # by tensor-name substring, first match wins
        - {value: 0.2}                      # no filter: the fallback
parameters: {lambda: 1.0}        # shared parameters, also the fallback for per-model ones
dtype: float32                   # mergekit's `dtype`: output dtype unless out_dtype is given
out_dtype: bfloat16
compat: paper                    # or mergekit: every paper-vs-mergekit choice switches to mergekit's
seed: 0
```
Data-driven methods (Fisher, RegMean, AdaMerging, ...) also read ``data:`` (per model, or top-level for every model
without its own; see :mod:`mergesmith.recipe.data`), optionally a model's ``head:`` (a safetensors linear head over
mean-pooled encoder states), and ``fitted: PATH`` to replay an earlier fit instead of running it.

``slices`` (with ``sources: [{model, layer_range: [start, end)}]``) stacks or merges layer ranges.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergesmith.dtypes import DTYPE_NAMES
from mergesmith.errors import RecipeError
from mergesmith.recipe.data import DataSpec

Scalar = Union[bool, int, float, str]  # noqa: UP007 (a runtime alias pydantic reads on 3.10)


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    # some published mergekit recipes write `pattern:`; mergekit ignores it (the entry then matches every tensor),
    # mergesmith reads it as `filter:` — with a notice either way (engine.effective)
    pattern: str | None = None
    value: Scalar | list[Scalar]


ParamValue = Union[Scalar, list[Conditional], list[Scalar]]  # noqa: UP007


def _none_is_empty(value: Any) -> Any:
    """``parameters:`` with nothing under it (YAML null), as mergekit accepts it: no parameters."""
    return {} if value is None else value


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    _empty = field_validator("parameters", mode="before")(_none_is_empty)
    data: DataSpec | None = None  # data-driven methods: this model's examples (else the recipe's data:)
    head: str | None = None  # a safetensors {weight, bias} linear head over mean-pooled encoder states


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    _empty = field_validator("parameters", mode="before")(_none_is_empty)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class Slice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    _empty = field_validator("parameters", mode="before")(_none_is_empty)

    @field_validator("sources")
    @classmethod
    def _nonempty(cls, v: list[SliceSource]) -> list[SliceSource]:
        if not v:
            raise ValueError("a slice needs at least one source")
        return v


class TokenSetting(BaseModel):
    """Where one output token's embedding row comes from (mergekit's ``tokenizer.tokens`` entry)."""

    model_config = ConfigDict(extra="forbid")
    source: str | dict[str, Any] | None = (
        None  # a model, {kind: zero}, {kind: model_token, model, token|token_id}
    )
    force: bool = False

    @field_validator("source")
    @classmethod
    def _known_kind(cls, v: Any) -> Any:
        if isinstance(v, dict):
            kind = v.get("kind")
            if kind not in ("zero", "model_token"):
                raise ValueError(f"source kind must be zero or model_token, got {kind!r}")
            if kind == "model_token" and ("model" not in v or ("token" in v) == ("token_id" in v)):
                raise ValueError("a model_token source names a model and one of token or token_id")
        return v


class TokenizerBlock(BaseModel):
    """mergekit's ``tokenizer:`` block: the output vocabulary and per-token embedding sources."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"  # union | base | a model
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class AlignSpec(BaseModel):
    """``align:``: permute every model's hidden units into the reference's order before the per-tensor method
    (models trained from different initializations; Git Re-Basin weight matching)."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["weight", "activation"] = "weight"
    data: DataSpec | None = None  # activation: the inputs whose activations are correlated (unlabeled)
    reference: str | None = None  # the model the others are aligned to (default: base_model, else the first)
    residual: bool = True  # also permute the residual stream (embeddings, norms, every projection's input)
    max_iter: int = Field(default=100, ge=1)  # weight matching's sweeps at most

    @model_validator(mode="before")
    @classmethod
    def _method_alone(cls, v: Any) -> Any:
        return {"method": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _activation_needs_data(self) -> AlignSpec:
        if self.method == "activation" and self.data is None:
            raise ValueError("activation matching needs data: (a .jsonl or .csv file of texts)")
        return self


DtypeName = Literal[DTYPE_NAMES]  # type: ignore[valid-type]  # "float32", "float16", "bfloat16", "float64"


class Recipe(BaseModel):
    """A validated merge recipe."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[ModelEntry] = Field(default_factory=list)
    base_model: str | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    slices: list[Slice] | None = None
    dtype: DtypeName | None = None
    out_dtype: DtypeName | None = None
    compat: Literal["paper", "mergekit"] = "paper"
    seed: int = 0
    tokenizer_source: str | None = None
    chat_template: str | None = None  # a name (chatml, llama3, ...), a Jinja template, or auto
    tokenizer: TokenizerBlock | None = None  # mergekit's tokenizer block (instead of tokenizer_source)
    name: str | None = None
    data: DataSpec | None = None  # data-driven methods: examples for every model without its own data:
    align: AlignSpec | None = None
    fitted: str | None = (
        None  # an earlier output folder (or its mergesmith_fit.safetensors): replay, do not fit
    )

    _empty = field_validator("parameters", mode="before")(_none_is_empty)

    @field_validator("merge_method")
    @classmethod
    def _names_a_method(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a method (`mergesmith methods` lists them)")
        return v

    @field_validator("models", mode="before")
    @classmethod
    def _strings_are_models(cls, v: Any) -> Any:
        # mergekit accepts a bare path in place of {model: path}
        if isinstance(v, list):
            return [{"model": m} if isinstance(m, str) else m for m in v]
        return v

    @model_validator(mode="after")
    def _one_tokenizer_key(self) -> Recipe:
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give tokenizer_source or a tokenizer: block, not both")
        return self

    def model_paths(self) -> list[str]:
        """Every referenced model, base first, without repeats."""
        paths: list[str] = []
        candidates = [self.base_model] if self.base_model else []
        candidates += [m.model for m in self.models]
        if self.align is not None and self.align.reference:
            candidates.append(self.align.reference)
        for s in self.slices or []:
            candidates += [src.model for src in s.sources]
        for p in candidates:
            if p and p not in paths:
                paths.append(p)
        return paths

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True, exclude_defaults=False), sort_keys=False)


def _format_validation_error(e: ValidationError, where: str) -> str:
    first = e.errors()[0]
    parts = [str(p) for p in first["loc"]]
    if "parameters" in parts and parts.index("parameters") + 1 < len(parts):
        i = parts.index("parameters")
        owner = ".".join(parts[:i]) or "top level"
        return (
            f"{where}: parameter '{parts[i + 1]}' ({owner}) must be a number, bool or string, a list of them "
            "(a gradient over layers), or a list of {filter, value} entries"
        )
    return describe_validation_error(e, where, _key_owner, "recipe")


def describe_validation_error(
    e: ValidationError, where: str, key_owner: Callable[[list[str]], tuple[str, Any]], top: str
) -> str:
    """pydantic's first error as one line naming the file and key: an unknown key with the known keys of the
    mapping it was found in (``key_owner(location) -> (its name, its fields)``), a missing key, or the message
    (a whole-document check is located at ``top``)."""
    first = e.errors()[0]
    parts = [str(p) for p in first["loc"]]
    loc = ".".join(parts) or top
    msg = first["msg"].removeprefix("Value error, ")  # our validators' messages are complete sentences
    if first["type"] == "extra_forbidden":
        owner, fields = key_owner(parts)
        return f"{where}: unknown key '{loc}' (known {owner} keys: {', '.join(fields)})"
    if first["type"] == "missing":
        return f"{where}: missing required key '{loc}'"
    return f"{where}: {loc}: {msg}"


def _key_owner(parts: list[str]) -> tuple[str, Any]:
    """Which mapping an unknown key was found in, and its known keys."""
    if "data" in parts[:-1]:
        return "data", DataSpec.model_fields
    if parts[:1] == ["align"]:
        return "align", AlignSpec.model_fields
    if len(parts) == 3 and parts[0] == "models":
        return "model entry", ModelEntry.model_fields
    return "top-level", Recipe.model_fields


def load_recipe(source: str | Path | dict[str, Any] | Recipe) -> Recipe:
    """Parse and validate a recipe from a YAML path, a YAML string, a dict, or a Recipe."""
    if isinstance(source, Recipe):
        return source
    data, where = read_mapping(source, "recipe", "merge_method:, models:, ...")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_validation_error(e, where)) from None


def read_mapping(source: str | Path | dict[str, Any], what: str, hint: str) -> tuple[dict[str, Any], str]:
    """A YAML mapping from a file path, a YAML string or a dict, and how errors name it (the path, or ``what``).
    One-line ``RecipeError`` for a missing or unreadable file, invalid YAML, or YAML that is not a mapping
    (``hint`` lists the keys expected)."""
    where = what
    if isinstance(source, (str, Path)) and not (isinstance(source, str) and "\n" in source):
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise RecipeError(f"{path}: {what} file not found")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"{path}: cannot read {what} ({e})") from None
        data = _parse_yaml(text, where)
    elif isinstance(source, str):
        data = _parse_yaml(source, where)
    else:
        data = source
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a {what} must be a YAML mapping ({hint})")
    return data, where


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise RecipeError(f"{where}: not valid YAML{at}") from None
