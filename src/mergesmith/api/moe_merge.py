"""``mergesmith moe merge MODEL OUT --data FILE``: fewer experts per layer (MC-SMoE's M-SMoE, and its baselines).

Router statistics on the calibration texts (:mod:`mergesmith.fit.moe_routing`) give each layer's usage
frequencies and router-logit similarities; :mod:`mergesmith.fit.mc_smoe` groups the experts (a fixed count per
layer, ``groups``, or MC-SMoE's adaptive global threshold, ``average_groups``); :mod:`mergesmith.ops.expert_merge`
aligns and merges each group. Methods (the paper's comparisons, in one code path):

- ``m-smoe``: frequency-weighted merge of aligned experts (MC-SMoE's merge stage);
- ``m-smoe-no-align``: the same without the alignment step;
- ``uniform``: the same groups, plain average of aligned experts;
- ``frequency-prune``: keep the most used experts, drop the rest;
- ``random-drop``: keep a seeded random choice of experts.

Two output forms: ``remapped`` (default: one stored expert per group — the smaller model — and the router remapped,
:func:`mergesmith.fit.mc_smoe.remapped_router`; layers of fewer groups than the widest layer hold copies of their
most used groups, since a transformers MoE has one expert count) and ``bound`` (the official code's model exactly:
every original expert's slot holds its group's merged expert and the router is unchanged — the function MC-SMoE
evaluates; as large on disk as the input). The output goes through the merge pipeline (atomic, manifest with the
groups, frequencies and routing agreement, model card).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from mergesmith.api.moe_inspect import calibration_batches
from mergesmith.api.pipeline import MergeResult, merge
from mergesmith.api.publish import OutputNotes, card_header, model_name
from mergesmith.errors import CheckpointError, RecipeError
from mergesmith.fit.distill import distill, teacher_logits
from mergesmith.fit.evaluate import model_folder
from mergesmith.fit.hf import causal_lm_from_state, load_causal_lm
from mergesmith.fit.mc_smoe import (
    LayerGroups,
    adaptive_group_counts,
    group_experts,
    logit_similarity,
    remapped_router,
    slots_for,
    usage_frequencies,
)
from mergesmith.fit.moe_routing import RouterStats, named_routers, router_statistics
from mergesmith.io.reader import Source, WrappedSource
from mergesmith.ops.expert_merge import merge_group
from mergesmith.version import __version__

METHODS = ("m-smoe", "m-smoe-no-align", "uniform", "frequency-prune", "random-drop")
FORMS = ("remapped", "bound")
COUNT_KEYS = ("num_local_experts", "num_experts")  # Mixtral's, Qwen-MoE's
ROUTER_INPUTS = 4096  # calibration tokens whose router inputs fit the remapped routers


class RewrittenSource(WrappedSource):
    """A checkpoint read as ``tensors`` (every tensor the output holds) with ``config``; its files (hashed in the
    manifest) are the original's."""

    def __init__(self, inner: Source, tensors: Mapping[str, torch.Tensor], config: dict[str, Any]):
        super().__init__(inner, config=config)
        self.tensors = dict(tensors)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.tensors[name].dtype, tuple(self.tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def plan_groups(
    stats: RouterStats, method: str, groups: int | None, average_groups: int | None, seed: int = 0
) -> tuple[list[LayerGroups], list[torch.Tensor]]:
    """Each MoE layer's grouping under ``method`` and its usage frequencies."""
    frequencies = [usage_frequencies(logits, stats.k) for logits in stats.logits]
    experts = len(frequencies[0])
    if (groups is None) == (average_groups is None):
        raise RecipeError("give --groups N (every layer) or --average-groups N (MC-SMoE's adaptive counts)")
    try:
        counts = (
            [groups] * len(frequencies)
            if groups is not None
            else adaptive_group_counts(frequencies, average_groups or 0)
        )
        if not all(1 <= c <= experts for c in counts):
            raise ValueError(
                f"the group count must be between 1 and {experts}, got {groups or average_groups}"
            )
    except ValueError as e:
        raise RecipeError(f"moe merge: {e}") from None
    generator = torch.Generator().manual_seed(seed)
    plans = []
    for f, logits, count in zip(frequencies, stats.logits, counts):
        if method in ("frequency-prune", "random-drop"):
            if method == "frequency-prune":
                kept = torch.argsort(f, descending=True, stable=True)[:count].tolist()
            else:
                kept = sorted(torch.randperm(experts, generator=generator)[:count].tolist())
            labels = [kept.index(e) if e in kept else -1 for e in range(experts)]
            plans.append(LayerGroups(labels, kept))
        else:
            plans.append(group_experts(f, logit_similarity(logits), count))
    return plans, frequencies


def merge_moe_experts(
    model: str | Path,
    out: str | Path,
    data: str | Path,
    *,
    groups: int | None = None,
    average_groups: int | None = None,
    method: str = "m-smoe",
    form: str = "remapped",
    limit: int = 256,
    max_length: int = 256,
    seed: int = 0,
    recover_steps: int = 0,
    lr: float = 2e-4,
    force: bool = False,
    progress: bool = True,
) -> MergeResult:
    """Write ``model`` with its experts merged into ``out`` (the module docstring); ``recover_steps`` > 0 then
    fine-tunes the merged experts and routers by distillation from the unmerged model on the calibration texts
    (:mod:`mergesmith.fit.distill`)."""
    if method not in METHODS:
        raise RecipeError(f"moe merge: method '{method}' is not one of {', '.join(METHODS)}")
    if form not in FORMS:
        raise RecipeError(f"moe merge: form '{form}' is not one of {', '.join(FORMS)}")
    if form == "bound" and recover_steps:
        raise RecipeError(
            "moe merge: recovery fine-tuning would untie the bound form's copies (use form remapped)"
        )
    if form == "bound" and method in ("frequency-prune", "random-drop"):
        raise RecipeError(
            f"moe merge: {method} drops experts, which the bound form cannot (use form remapped)"
        )
    folder = model_folder(model)
    module = load_causal_lm(folder)
    config = json.loads((folder / "config.json").read_text())
    count_key = next((k for k in COUNT_KEYS if isinstance(config.get(k), int)), None)
    if count_key is None:
        raise CheckpointError(
            f"{folder}: config.json has no num_local_experts / num_experts: not an MoE model"
        )
    batches = calibration_batches(folder, data, limit, max_length)
    stats = router_statistics(module, batches, ROUTER_INPUTS)
    plans, frequencies = plan_groups(stats, method, groups, average_groups, seed)
    state = model_state(module, config)
    slots = config[count_key] if form == "bound" else max(p.count for p in plans)
    agreement = {}
    found = named_routers(module)
    layers = zip(found, plans, frequencies, stats.inputs, stats.logits, strict=True)
    for (layer, name, router), plan, f, x, logits in layers:
        prefix = name.removesuffix(".gate")
        gate_up, down = state[f"{prefix}.experts.gate_up_proj"], state[f"{prefix}.experts.down_proj"]
        weights = torch.ones_like(f) if method == "uniform" else f
        merged = [
            merge_group(
                gate_up, down, plan.members(g), plan.centers[g], weights, align=method != "m-smoe-no-align"
            )
            for g in range(plan.count)
        ]
        if form == "bound":
            slot_groups = plan.labels
            rows = router.weight.detach()
        else:
            slot_groups = slots_for(plan, slots, f)
            rows = remapped_router(router.weight.detach(), x, plan, slot_groups)
            agreement[layer] = routing_agreement(logits[: len(x)], x @ rows.float().T, plan, slot_groups)
        state[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [merged[g][0] for g in slot_groups]
        ).contiguous()
        state[f"{prefix}.experts.down_proj"] = torch.stack([merged[g][1] for g in slot_groups]).contiguous()
        state[f"{prefix}.gate.weight"] = rows.contiguous()
    new_config = {**config, count_key: slots}
    if int(config.get("num_experts_per_tok") or 0) > slots:  # top-k cannot pick more experts than remain
        new_config["num_experts_per_tok"] = slots
    recovery = None
    if recover_steps:
        student = causal_lm_from_state(new_config, state)
        trainable = [
            p
            for name, p in student.named_parameters()
            if ".experts." in name or name.endswith("mlp.gate.weight")
        ]
        losses = distill(student, batches, teacher_logits(module, batches), recover_steps, trainable, lr)
        state = model_state(student, config)
        recovery = {"steps": recover_steps, "lr": lr, "losses": [round(x, 6) for x in losses]}
    record = {
        "recovery": recovery,
        "method": method,
        "form": form,
        "experts_before": config[count_key],
        "experts_stored": slots,
        "experts_per_token": new_config.get("num_experts_per_tok"),
        "groups_per_layer": [p.count for p in plans],
        "labels": [p.labels for p in plans],
        "centers": [p.centers for p in plans],
        "usage_frequency": [[round(float(v), 6) for v in f] for f in frequencies],
        "calibration_tokens": stats.tokens,
        "routing_agreement": agreement,
        "unique_expert_parameters": _unique_parameters(state, plans, found),
        "data": str(data),
        "seed": seed,
    }
    return write_rewritten(folder, out, state, new_config, _notes(folder, record), seed, force, progress)


def model_state(module: torch.nn.Module, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A loaded model's tensors as the output stores them (a tied head is not stored twice)."""
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    return state


def write_rewritten(
    folder: Path,
    out: str | Path,
    state: Mapping[str, torch.Tensor],
    config: dict[str, Any],
    notes: OutputNotes,
    seed: int,
    force: bool,
    progress: bool,
) -> MergeResult:
    """``folder``'s model rewritten as ``state`` and ``config``, written by the merge pipeline into ``out`` (atomic,
    the original's files hashed in the manifest, ``notes`` for the account of what was done)."""
    recipe = {"merge_method": "passthrough", "models": [{"model": str(folder)}], "seed": seed}
    return merge(
        recipe,
        out,
        force=force,
        progress=progress,
        transform_sources=lambda opened: {str(folder): RewrittenSource(opened[str(folder)], state, config)},
        notes=notes,
    )


def routing_agreement(
    original: torch.Tensor, remapped: torch.Tensor, plan: LayerGroups, slot_groups: list[int]
) -> float:
    """The share of tokens whose top-1 group under the remapped router is the group of their original top-1
    expert (a dropped expert's tokens count as disagreeing)."""
    before = torch.tensor(plan.labels)[original.argmax(dim=1)]
    after = torch.tensor(slot_groups)[remapped.argmax(dim=1)]
    return round(float((before == after).double().mean()), 6)


def _unique_parameters(
    state: Mapping[str, torch.Tensor],
    plans: list[LayerGroups],
    found: list[tuple[int, str, Any]],
) -> dict[str, int]:
    """Expert parameters before and after (distinct merged experts only: the bound form's copies count once)."""
    before = after = 0
    for (_, name, _), plan in zip(found, plans):
        prefix = name.removesuffix(".gate")
        per_expert = (
            state[f"{prefix}.experts.gate_up_proj"][0].numel()
            + state[f"{prefix}.experts.down_proj"][0].numel()
        )
        before += per_expert * len(plan.labels)
        after += per_expert * plan.count
    return {"before": before, "after": after}


def _notes(folder: Path, record: dict[str, Any]) -> OutputNotes:
    name = model_name(str(folder))
    summary = {
        k: record[k] for k in ("method", "form", "experts_before", "experts_stored", "groups_per_layer")
    }
    card = (
        card_header(
            [name], ["merge", "mergesmith", "moe", "mc-smoe"], f"{name}, experts merged ({record['method']})"
        )
        + f"Made with [mergesmith](https://pypi.org/project/mergesmith/) {__version__} `moe merge` (MC-SMoE: Li et al., "
        "ICLR 2024, routing-guided grouping and frequency-weighted merging).\n\n```yaml\n"
        + yaml.safe_dump(summary, sort_keys=False)
        + "```\n"
    )
    return OutputNotes(
        "moe-merge",
        "moe_merge",
        record,
        {"mergesmith_moe_merge.json": json.dumps(record, indent=1) + "\n"},
        card,
    )
