"""MoE configs: mergekit-moe's YAML, read as it is, for ``mergesmith moe CONFIG OUT``.

```yaml
base_model: path/to/base            # attention, embeddings and norms come from here
gate_mode: hidden                   # hidden | hidden_avg | hidden_last | cheap_embed | random | uniform_random
dtype: bfloat16                     # output dtype (default: the base's)
experts_per_token: 2
experts:
  - source_model: path/to/math_expert      # its MLP becomes expert 0 of every layer
    positive_prompts: ["Solve", "How many"]
    negative_prompts: ["Write a poem"]     # optional: subtracted from the router row
    noise_scale: 0.01                      # optional: Gaussian noise added to its MLP weights
    residual_scale: 0.5                    # optional: scales its down_proj (what it adds to the residual stream)
  - source_model: path/to/code_expert
    positive_prompts: ["def ", "import"]
shared_experts:                      # Qwen2-MoE only: exactly one, always active beside the routed ones
  - source_model: path/to/base
    positive_prompts: ["Hello"]
architecture: mixtral                # mixtral | qwen (Qwen2-MoE) | qwen3 (Qwen3-MoE); default: chosen from the models
```

mergesmith's own keys (mergekit does not read them): ``seed`` (the random gates and the noise; default 0) and
``hidden_dtype`` (what the hidden gate modes run the base model in: ``bfloat16`` as mergekit does, by default, or
``float32``).

Checks, as one-line errors naming the config file and key: everything mergekit-moe's ``is_bad_config`` refuses
(``experts_per_token`` < 1 or above the number of experts; a prompt gate with an expert without
``positive_prompts``; the same prompts for every expert; every expert the same model, unless
``allow_all_same``), and unknown keys or gate modes, which mergekit ignores or fails on later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from mergesmith.dtypes import DTYPE_NAMES
from mergesmith.errors import RecipeError
from mergesmith.recipe.schema import describe_validation_error, read_mapping

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
PROMPT_GATES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")  # the modes that read the prompts
ARCHITECTURES = (
    "mixtral",
    "qwen",
    "qwen3",
)  # mergekit's names match by prefix: "Mixtral", "Qwen MoE", "Qwen3 MoE"


class MoEExpert(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None

    def prompts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(self.positive_prompts or ()), tuple(self.negative_prompts or ())


class MoEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_model: str
    experts: list[MoEExpert]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[MoEExpert] | None = None
    architecture: str | None = None
    seed: int = 0
    hidden_dtype: Literal["bfloat16", "float32"] = "bfloat16"

    def check(self, where: str, allow_all_same: bool = False) -> None:
        """The checks of the module docstring, as one-line ``RecipeError``s."""
        if self.gate_mode not in GATE_MODES:
            raise RecipeError(f"{where}: gate_mode '{self.gate_mode}' is not one of {', '.join(GATE_MODES)}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise RecipeError(f"{where}: dtype '{self.dtype}' is not one of {', '.join(DTYPE_NAMES)}")
        if self.architecture is not None and not any(
            name.startswith(self.architecture.lower()) for name in ARCHITECTURES
        ):
            raise RecipeError(
                f"{where}: architecture '{self.architecture}' is not one of {', '.join(ARCHITECTURES)}"
            )
        if not self.experts:
            raise RecipeError(f"{where}: experts is empty; list at least {max(self.experts_per_token, 1)}")
        if self.experts_per_token < 1:
            raise RecipeError(f"{where}: experts_per_token must be at least 1, got {self.experts_per_token}")
        if len(self.experts) < self.experts_per_token:
            raise RecipeError(
                f"{where}: experts_per_token is {self.experts_per_token} but there are only "
                f"{len(self.experts)} experts"
            )
        if self.gate_mode in PROMPT_GATES:
            for i, expert in enumerate(self.experts):
                if not expert.positive_prompts:
                    raise RecipeError(
                        f"{where}: experts[{i}] ({expert.source_model}) has no positive_prompts, which gate_mode "
                        f"{self.gate_mode} routes by (or use gate_mode: random)"
                    )
            if len(self.experts) > 1 and len({e.prompts() for e in self.experts}) == 1:
                raise RecipeError(
                    f"{where}: every expert has the same prompts, so the router could not tell them apart; give "
                    "each expert prompts of what should reach it"
                )
            shared = self.shared_experts or []
            if shared and len({bool(e.positive_prompts) for e in shared}) > 1:
                raise RecipeError(f"{where}: give prompts for all shared_experts or for none")
        if not allow_all_same and len(self.experts) > 1 and len({e.source_model for e in self.experts}) == 1:
            raise RecipeError(
                f"{where}: every expert is {self.experts[0].source_model}: the MoE would compute what that model "
                "does at a higher cost; pass --i-understand-this-is-not-useful-without-training to build it anyway"
            )

    def model_paths(self) -> list[str]:
        """The base, then every expert's and shared expert's model, without repeats."""
        models = [self.base_model] + [e.source_model for e in self.experts + (self.shared_experts or [])]
        return list(dict.fromkeys(models))


def _key_owner(parts: list[str]) -> tuple[str, Any]:
    if parts[:1] in (["experts"], ["shared_experts"]) and len(parts) >= 3:
        return "expert", MoEExpert.model_fields
    return "top-level", MoEConfig.model_fields


def load_moe_config(
    source: str | Path | dict[str, Any] | MoEConfig, allow_all_same: bool = False
) -> tuple[MoEConfig, str]:
    """Parse and check an MoE config (a YAML path or string, a dict, or a config); returns it and how errors name
    it."""
    if isinstance(source, MoEConfig):
        source.check("moe config", allow_all_same)
        return source, "moe config"
    data, where = read_mapping(source, "moe config", "base_model:, experts:, gate_mode:, ...")
    try:
        config = MoEConfig.model_validate(data)
    except ValidationError as e:
        raise RecipeError(describe_validation_error(e, where, _key_owner, "config")) from None
    config.check(where, allow_all_same)
    return config, where
