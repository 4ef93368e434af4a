"""Mixture-of-experts layouts: which MoE family can host a set of dense decoders, its config, and where each dense
tensor goes.

Three output families, as mergekit-moe writes them (transformers 5 layouts):

- **mixtral** (Llama or Mistral experts, no shared expert): per layer ``mlp.experts.gate_up_proj`` ``[E, 2I, H]``
  (each expert's ``gate_proj`` rows, then its ``up_proj`` rows), ``mlp.experts.down_proj`` ``[E, H, I]`` and the
  router ``mlp.gate.weight`` ``[E, H]``; the config is the base's, made a Mistral config without sliding window,
  then a Mixtral config with ``num_local_experts`` and ``num_experts_per_tok``.
- **qwen2_moe** (Llama, Mistral or Qwen2 experts, exactly one shared expert): per expert
  ``mlp.experts.{e}.{gate,up,down}_proj.weight``, the shared expert's ``mlp.shared_expert.*`` and its gate
  ``mlp.shared_expert_gate.weight`` ``[1, H]``; every layer sparse, top-k probabilities renormalised, expert and
  shared widths the dense ``intermediate_size``; q/k/v biases are zeros where the base has none.
- **qwen3_moe** (Qwen3 experts, no shared expert): fused like Mixtral; ``moe_intermediate_size`` the dense width.

Every other tensor (attention, norms, embeddings, head) is the base model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mergesmith.errors import CheckpointError

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
# mergekit-moe's `architecture:` matches its output names by prefix ("Mixtral", "Qwen MoE", "Qwen3 MoE")
_NAMES = {"mixtral": "mixtral", "qwen2_moe": "qwen moe", "qwen3_moe": "qwen3 moe"}
_HOSTS = {
    "mixtral": ("llama", "mistral"),
    "qwen2_moe": ("llama", "mistral", "qwen2"),
    "qwen3_moe": ("qwen3",),
}
_SHARED = {"mixtral": 0, "qwen2_moe": 1, "qwen3_moe": 0}
FFN = ("gate_proj", "up_proj", "down_proj")


def _unsupported(family: str, model_types: Sequence[str], shared: int) -> str | None:
    """Why ``family`` cannot host these models (None when it can)."""
    if shared != _SHARED[family]:
        wanted = "exactly one shared expert" if _SHARED[family] else "no shared experts"
        return f"{family} takes {wanted}, the config has {shared}"
    if len(set(model_types)) != 1:
        return f"{family} needs every model of one architecture, got {', '.join(sorted(set(model_types)))}"
    if model_types[0] not in _HOSTS[family]:
        return f"{family} hosts {'/'.join(_HOSTS[family])} experts, not {model_types[0]}"
    return None


def select_family(requested: str | None, model_types: Sequence[str], shared: int) -> str:
    """The output family, as mergekit-moe picks it: among those ``requested`` names (by prefix; all without it)
    the ones that can host the models, Mixtral first. ``CheckpointError`` (one line, why each candidate fails)
    when none can."""
    candidates = [f for f in FAMILIES if requested is None or _NAMES[f].startswith(requested.lower())]
    reasons = {f: _unsupported(f, model_types, shared) for f in candidates}
    fitting = [f for f in candidates if reasons[f] is None]
    if not fitting:
        why = "; ".join(str(r) for r in reasons.values()) or f"no family is called {requested!r}"
        raise CheckpointError(f"no MoE architecture can host these models: {why}")
    return fitting[0]


def moe_config(base: dict[str, Any], family: str, num_experts: int, experts_per_token: int) -> dict[str, Any]:
    """The output's config.json: the base's config turned into ``family``'s with the experts' counts (the same
    keys and values mergekit-moe writes, through the transformers config classes)."""
    import transformers  # the config classes: imported only when an MoE is built

    model_type = base.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise CheckpointError(
            f"the base model's config has model_type {model_type!r}, which transformers does not know"
        )
    source = transformers.CONFIG_MAPPING[model_type].from_dict(base)
    out: Any
    if family == "mixtral":
        if not isinstance(source, transformers.MistralConfig):
            mistral = transformers.MistralConfig(**source.to_dict())
            mistral.sliding_window = None
            mistral.max_position_embeddings = source.max_position_embeddings
            source = mistral
        out = transformers.MixtralConfig(**source.to_dict())
        out.architectures = ["MixtralForCausalLM"]
        out.num_local_experts = num_experts
        out.num_experts_per_tok = experts_per_token
        out.sliding_window = None
    elif family in ("qwen2_moe", "qwen3_moe"):
        qwen2 = family == "qwen2_moe"
        out = (transformers.Qwen2MoeConfig if qwen2 else transformers.Qwen3MoeConfig)(**source.to_dict())
        out.architectures = ["Qwen2MoeForCausalLM" if qwen2 else "Qwen3MoeForCausalLM"]
        out.num_experts = num_experts
        out.num_experts_per_tok = experts_per_token
        out.decoder_sparse_step = 1  # every layer sparse
        out.norm_topk_prob = True
        out.moe_intermediate_size = out.intermediate_size
        if qwen2:
            out.sliding_window = None
            out.use_sliding_window = False
            out.shared_expert_intermediate_size = out.intermediate_size
    else:
        raise CheckpointError(f"unknown MoE family {family!r} (choose from: {', '.join(FAMILIES)})")
    return out.to_diff_dict()  # what save_pretrained writes: the values that differ from the defaults


def dense_ffn(layer: int, part: str) -> str:
    """A dense decoder's FFN weight: ``model.layers.{layer}.mlp.{part}.weight``."""
    return f"model.layers.{layer}.mlp.{part}.weight"


def router(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.weight"


def shared_router(layer: int) -> str:
    return f"model.layers.{layer}.mlp.shared_expert_gate.weight"


def fused_experts(layer: int) -> tuple[str, str]:
    """Mixtral's and Qwen3-MoE's stacked expert tensors: ``(gate_up_proj, down_proj)``."""
    return f"model.layers.{layer}.mlp.experts.gate_up_proj", f"model.layers.{layer}.mlp.experts.down_proj"


def expert_ffn(layer: int, expert: int, part: str) -> str:
    """Qwen2-MoE's tensor of one routed expert."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{part}.weight"


def shared_ffn(layer: int, part: str) -> str:
    """Qwen2-MoE's tensor of the shared expert."""
    return f"model.layers.{layer}.mlp.shared_expert.{part}.weight"


def is_dense_ffn(name: str) -> bool:
    """A tensor the experts replace (``.mlp.``: the dense FFN); every other tensor comes from the base."""
    return ".mlp." in name
