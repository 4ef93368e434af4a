"""``mergesmith moe CONFIG OUT``: dense fine-tunes of one decoder → a Mixtral / Qwen2-MoE / Qwen3-MoE model.

The config is mergekit-moe's (:mod:`mergesmith.recipe.moe`). Every expert's FFN becomes one routed expert of every
layer, the base gives every other tensor, and each layer's router rows come from the experts' prompts
(:mod:`mergesmith.fit.router_init`). The output is written by the merge pipeline — streamed one tensor at a time
(:class:`mergesmith.ops.upcycle.UpcycledSource`), atomic, with a manifest (inputs' and outputs' sha256, the
config with every value in effect, the family chosen) and a model card; the config itself is saved as
``mergesmith_moe.yaml``.

Differences from mergekit-moe, on purpose: the tokenizer is the base's as it is (mergekit saves it with left
padding and BOS as the pad token, which it set to tokenize the prompts); noise (``noise_scale``) is seeded per
tensor, not drawn from the global generator in writing order; random gates are seeded (``seed``, 0 by default;
mergekit's ``--random-seed`` draws the same rows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mergesmith.api.pipeline import MergeResult, merge
from mergesmith.api.publish import OutputNotes, card_header, model_name
from mergesmith.arch import moe as layout
from mergesmith.arch.layers import num_layers
from mergesmith.dtypes import DTYPE_BY_NAME
from mergesmith.errors import CheckpointError, RecipeError
from mergesmith.fit.hf import load_tokenizer, quiet_transformers
from mergesmith.fit.router_init import PROMPT_MODES, gate_vectors
from mergesmith.io.models import open_model
from mergesmith.io.reader import Source, WrappedSource, close_sources
from mergesmith.ops.upcycle import ExpertSource, UpcycledSource
from mergesmith.recipe.moe import MoEConfig, MoEExpert, load_moe_config
from mergesmith.version import __version__

CONFIG_FILE = "mergesmith_moe.yaml"


@dataclass
class MoEPlan:
    """The resolved build: the output family, its config.json, the router rows and the output dtype."""

    family: str
    config: dict[str, Any]
    routers: torch.Tensor
    shared_routers: torch.Tensor | None
    dtype: torch.dtype | None


def build_moe(
    config: str | Path | dict[str, Any] | MoEConfig,
    out: str | Path,
    *,
    allow_all_same: bool = False,
    force: bool = False,
    allow_pickle: bool = False,
    shard_size: str | int = "5GB",
    progress: bool = True,
) -> MergeResult:
    """Build the MoE that ``config`` describes into ``out`` (see the module docstring)."""
    moe, where = load_moe_config(config, allow_all_same)
    sources: dict[str, Source] = {}
    try:
        for path in moe.model_paths():
            try:
                sources[path] = open_model(path, allow_pickle)
            except RecipeError as e:
                raise RecipeError(f"{where}: {e}") from None
        plan = plan_moe(moe, where, sources)
        base = sources[moe.base_model]
        upcycled = UpcycledSource(
            base,
            [_expert(e, sources) for e in moe.experts],
            plan.family,
            plan.config,
            plan.routers,
            [_expert(e, sources) for e in moe.shared_experts or []],
            plan.shared_routers,
            plan.dtype,
            moe.seed,
        )
        recipe = {"merge_method": "passthrough", "models": [{"model": moe.base_model}], "seed": moe.seed}
        return merge(
            recipe,
            out,
            force=force,
            allow_pickle=allow_pickle,
            shard_size=shard_size,
            progress=progress,
            transform_sources=lambda opened: _swap(opened, moe.base_model, upcycled),
            notes=_notes(moe, plan),
        )
    finally:
        close_sources(sources.values())


def _swap(opened: dict[str, Source], base: str, upcycled: Source) -> dict[str, Source]:
    """The pipeline's sources with its own opening of the base closed and replaced by the MoE checkpoint."""
    close_sources(opened.values())
    return {base: upcycled}


def _expert(expert: MoEExpert, sources: dict[str, Source]) -> ExpertSource:
    return ExpertSource(sources[expert.source_model], expert.noise_scale, expert.residual_scale)


def plan_moe(moe: MoEConfig, where: str, sources: dict[str, Source]) -> MoEPlan:
    """Choose the family, check the models against it, compute the router rows."""
    base = sources[moe.base_model]
    shared = moe.shared_experts or []
    types = [
        str(sources[p].config.get("model_type"))
        for p in [moe.base_model] + [e.source_model for e in moe.experts + shared]
    ]
    family = layout.select_family(moe.architecture, types, len(shared))
    prompt_gate = moe.gate_mode in PROMPT_MODES
    if family == "qwen2_moe" and prompt_gate and not shared[0].positive_prompts:
        raise RecipeError(
            f"{where}: shared_experts[0] has no positive_prompts; qwen2_moe's shared-expert gate is set from them "
            "(or use gate_mode: random)"
        )
    gated = moe.experts + [e for e in shared if e.positive_prompts or not prompt_gate]
    layers = num_layers(base.config, base.keys())
    hidden = int(base.config.get("hidden_size") or 0)
    if layers == 0 or hidden == 0:
        raise CheckpointError(f"{base.label}: config.json gives no num_hidden_layers / hidden_size")
    vectors = _gates(
        moe, base, [(e.positive_prompts or [], e.negative_prompts or []) for e in gated], layers, hidden
    )
    out_dtype = moe.dtype or base.config.get("dtype") or base.config.get("torch_dtype")
    config = layout.moe_config(base.config, family, len(moe.experts), moe.experts_per_token)
    count = len(moe.experts)
    return MoEPlan(
        family,
        config,
        vectors[:, :count].contiguous(),
        vectors[:, count:].contiguous() if family == "qwen2_moe" else None,
        DTYPE_BY_NAME.get(out_dtype) if isinstance(out_dtype, str) else None,
    )


def _gates(
    moe: MoEConfig, base: Source, prompts: list[tuple[list[str], list[str]]], layers: int, hidden: int
) -> torch.Tensor:
    if moe.gate_mode not in PROMPT_MODES:
        return gate_vectors(moe.gate_mode, prompts, layers, hidden, seed=moe.seed)
    if base.folder is None:
        raise CheckpointError(f"{base.label}: no local folder with a tokenizer to read the prompts with")
    tokenizer = load_tokenizer(base.folder, "the prompt gates need the base model's tokenizer")
    if moe.gate_mode == "cheap_embed":
        embed = base.get("model.embed_tokens.weight")
        return gate_vectors(moe.gate_mode, prompts, layers, hidden, tokenizer=tokenizer, embed=embed)
    module = _base_module(base, DTYPE_BY_NAME[moe.hidden_dtype])
    return gate_vectors(moe.gate_mode, prompts, layers, hidden, tokenizer=tokenizer, module=module)


def _base_module(base: Source, dtype: torch.dtype) -> torch.nn.Module:
    """The base as a transformers causal LM in ``dtype``, as mergekit loads it for the hidden gates: from its
    folder, or (a base read through LoRA or another wrapper) built from its config and the tensors as read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with quiet_transformers():
        if not isinstance(base, WrappedSource) and base.folder is not None:
            module = AutoModelForCausalLM.from_pretrained(base.folder, dtype=dtype, local_files_only=True)
        else:
            config = AutoConfig.for_model(**base.config)
            module = AutoModelForCausalLM.from_config(config, dtype=dtype)
            state = {name: base.get(name).to(dtype) for name in base.keys()}
            missing, _ = module.load_state_dict(state, strict=False)
            if [m for m in missing if m != "lm_head.weight"]:
                raise CheckpointError(f"{base.label}: cannot run it as a causal LM (missing {missing[0]})")
            module.tie_weights()
    return module.eval()


def _notes(moe: MoEConfig, plan: MoEPlan) -> OutputNotes:
    effective = moe.model_dump()
    record = {
        "family": plan.family,
        "architectures": plan.config.get("architectures"),
        "experts": len(moe.experts),
        "shared_experts": len(moe.shared_experts or []),
        "experts_per_token": moe.experts_per_token,
        "gate_mode": moe.gate_mode,
        "config": json.loads(json.dumps(effective)),
    }
    named = moe.model_copy(deep=True)
    named.base_model = model_name(named.base_model)
    for expert in named.experts + (named.shared_experts or []):
        expert.source_model = model_name(expert.source_model)
    names = list(dict.fromkeys(model_name(p) for p in moe.model_paths()))
    title = f"Mixture of experts ({plan.config.get('architectures', ['?'])[0]})"
    card = (
        card_header(names, ["merge", "mergesmith", "moe"], title)
        + f"Built with [mergesmith](https://pypi.org/project/mergesmith/) {__version__} `moe` from "
        f"{len(moe.experts)} dense experts (router rows: `{moe.gate_mode}`; {moe.experts_per_token} experts per "
        "token).\n\n## Config\n\n```yaml\n"
        + yaml.safe_dump(named.model_dump(exclude_none=True), sort_keys=False)
        + "```\n"
    )
    files = {CONFIG_FILE: yaml.safe_dump(effective, sort_keys=False)}
    return OutputNotes("moe", "moe", record, files, card)
