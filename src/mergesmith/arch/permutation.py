"""Permutation specs: which axes of which tensors a permutation of hidden units moves, derived from config.json.

Two models trained from different initializations compute the same functions in permuted units. A *group* is a set
of interchangeable units — an FFN layer's hidden units, an attention layer's heads (whole heads, with their
key/value group under GQA, so RoPE still holds), or the residual stream's channels — and permuting a group's units
in every tensor that reads or writes them leaves the network's function unchanged. A spec lists, for every tensor,
the group (if any) on each axis and the *block*: how many consecutive rows one unit owns on that axis (1 for an FFN
unit, ``head_dim`` for a key/value head, ``heads_per_group × head_dim`` for the query heads that share it).

Families: Llama / Mistral / Qwen2 / Qwen3 decoders and BERT-family encoders (BERT, RoBERTa, XLM-R, ELECTRA).
Normalisation layers (RMSNorm, LayerNorm) act on the residual stream elementwise after a statistic over all its
channels, so they are permutation-equivariant and simply follow the residual permutation.

Small models trained from scratch (``mergesmith.fit.small_models``): ``mergesmith_mlp``, one group per hidden
layer; ``mergesmith_resnet`` (torchvision's BasicBlock naming, so torchvision's resnet18/34 state dicts too), a
residual-stream group per stage (``stage{s}``: the channels every block of the stage adds to, with the stem or the
stage's projection shortcut writing them) and an inner group per block (``layer{s}.{b}``: conv1's output
channels). BatchNorm is per channel (its affine parameters and running statistics follow its channels'
permutation; its step count ``num_batches_tracked`` does not move), and a convolution's kernel moves with its
output (axis 0) and input (axis 1) channels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mergesmith.errors import CheckpointError

RESIDUAL = "residual"


@dataclass(frozen=True)
class AxisGroup:
    """One axis of a tensor belongs to ``group``; each unit owns ``block`` consecutive entries of it."""

    group: str
    block: int = 1


@dataclass
class PermutationSpec:
    """Group sizes (units per group) and, per tensor name, the :class:`AxisGroup` of each axis (None: not moved)."""

    sizes: dict[str, int] = field(default_factory=dict)
    axes: dict[str, tuple[AxisGroup | None, ...]] = field(default_factory=dict)

    def add(self, tensor: str, ndim: int, **by_axis: AxisGroup) -> None:
        """Record that ``tensor`` (of ``ndim`` axes) has the given groups on axes ``a0``, ``a1``, …"""
        current = list(self.axes.get(tensor, (None,) * ndim))
        for key, value in by_axis.items():
            current[int(key[1:])] = value
        self.axes[tensor] = tuple(current)

    def members(self, group: str) -> list[tuple[str, int, int]]:
        """Every (tensor, axis, block) that ``group`` moves, in tensor-name order."""
        return [
            (name, axis, entry.block)
            for name in sorted(self.axes)
            for axis, entry in enumerate(self.axes[name])
            if entry is not None and entry.group == group
        ]

    @property
    def groups(self) -> list[str]:
        return sorted(self.sizes)

    def restricted(self, names: Iterable[str]) -> PermutationSpec:
        """The spec over the tensors present in ``names`` (groups no tensor uses are dropped)."""
        present = set(names)
        axes = {n: a for n, a in self.axes.items() if n in present}
        used = {e.group for a in axes.values() for e in a if e is not None}
        return PermutationSpec({g: s for g, s in self.sizes.items() if g in used}, axes)

    def without(self, group: str) -> PermutationSpec:
        """The same spec with ``group`` left unpermuted (e.g. the residual stream)."""
        axes = {
            n: tuple(None if e is not None and e.group == group else e for e in a)
            for n, a in self.axes.items()
        }
        return PermutationSpec({g: s for g, s in self.sizes.items() if g != group}, axes)


DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "camembert")


# the small models trained from scratch (mergesmith.fit.small_models, which arch may not import)
SMALL_TYPES = ("mergesmith_mlp", "mergesmith_resnet")
BN_MOVED = ("weight", "bias", "running_mean", "running_var")  # a BatchNorm's per-channel tensors

# Tensors of the families that never touch a permuted axis (buffers, vocabulary biases, heads on the pooler).
UNMOVED_SUFFIXES = ("position_ids", "token_type_ids", "inv_freq", ".bias", "seq_relationship.weight")


def permutation_spec(
    config: Mapping[str, Any], tensor_shapes: Mapping[str, Sequence[int]], residual: bool = True
) -> PermutationSpec:
    """The permutation spec of a model from its config.json and its tensors' shapes (the names tell the prefix,
    biases, heads present); ``residual=False`` leaves the residual stream in place (only FFN units and heads move).
    A family without a spec, or a tensor of a width the spec moves that the spec does not know (an unfamiliar
    head: moving the stream without it would change the function), is a one-line error naming it."""
    names = sorted(tensor_shapes)
    family = str(config.get("model_type", ""))
    if family in DECODER_TYPES:
        spec = _decoder_spec(config, names)
    elif family in ENCODER_TYPES:
        spec = _encoder_spec(config, names)
    elif family in SMALL_TYPES:
        return _small_spec(family, config, tensor_shapes, residual)
    else:
        known = ", ".join(DECODER_TYPES + ENCODER_TYPES + SMALL_TYPES)
        raise CheckpointError(
            f"model_type {family or '(none)'!r} has no permutation spec (supported: {known})"
        )
    spec = spec.restricted(names)
    if not residual:
        return spec.without(RESIDUAL)
    hidden = spec.sizes[RESIDUAL]
    for name in names:
        if name not in spec.axes and hidden in tensor_shapes[name] and not name.endswith(UNMOVED_SUFFIXES):
            raise CheckpointError(
                f"tensor {name!r} has no rule in the {family} permutation spec; align with residual: false"
            )
    return spec


def _require(config: Mapping[str, Any], *keys: str) -> list[int]:
    missing = [k for k in keys if not isinstance(config.get(k), int)]
    if missing:
        raise CheckpointError(f"config.json has no integer {missing[0]!r} (needed for the permutation spec)")
    return [int(config[k]) for k in keys]


def _prefix(names: list[str], marker: str, family: str) -> str:
    """The prefix before ``marker`` in the tensor names (``model.`` in a causal LM, ``bert.`` in a classifier)."""
    for name in names:
        if marker in name:
            return name[: name.index(marker)]
    raise CheckpointError(f"no tensor named like '*{marker}*': not a {family} checkpoint")


def _decoder_spec(config: Mapping[str, Any], names: list[str]) -> PermutationSpec:
    hidden, layers, heads, ffn = _require(
        config, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"
    )
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    if heads % kv:
        raise CheckpointError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    p = _prefix(names, "layers.0.", str(config.get("model_type")))
    spec = PermutationSpec({RESIDUAL: hidden})
    r = AxisGroup(RESIDUAL)
    spec.add(f"{p}embed_tokens.weight", 2, a1=r)
    spec.add(f"{p}norm.weight", 1, a0=r)
    spec.add("lm_head.weight", 2, a1=r)
    spec.add("score.weight", 2, a1=r)  # *ForSequenceClassification reads the last token's stream
    for i in range(layers):
        layer = f"{p}layers.{i}."
        attn, mlp = f"{layer}self_attn", f"{layer}mlp"
        spec.sizes[attn], spec.sizes[mlp] = kv, ffn
        query, kv_head, unit = (
            AxisGroup(attn, heads // kv * head_dim),
            AxisGroup(attn, head_dim),
            AxisGroup(mlp),
        )
        for norm in ("input_layernorm", "post_attention_layernorm"):
            spec.add(f"{layer}{norm}.weight", 1, a0=r)
        spec.add(f"{attn}.q_proj.weight", 2, a0=query, a1=r)
        spec.add(f"{attn}.q_proj.bias", 1, a0=query)
        for proj in ("k_proj", "v_proj"):
            spec.add(f"{attn}.{proj}.weight", 2, a0=kv_head, a1=r)
            spec.add(f"{attn}.{proj}.bias", 1, a0=kv_head)
        spec.add(f"{attn}.o_proj.weight", 2, a0=r, a1=query)
        spec.add(f"{attn}.o_proj.bias", 1, a0=r)
        for proj in ("gate_proj", "up_proj"):
            spec.add(f"{mlp}.{proj}.weight", 2, a0=unit, a1=r)
            spec.add(f"{mlp}.{proj}.bias", 1, a0=unit)
        spec.add(f"{mlp}.down_proj.weight", 2, a0=r, a1=unit)
        spec.add(f"{mlp}.down_proj.bias", 1, a0=r)
    return spec


def _encoder_spec(config: Mapping[str, Any], names: list[str]) -> PermutationSpec:
    hidden, layers, heads, ffn = _require(
        config, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"
    )
    if config.get("embedding_size") not in (None, hidden):  # ELECTRA's projected embeddings
        raise CheckpointError("an embedding_size other than hidden_size has no permutation spec")
    p = _prefix(names, "embeddings.word_embeddings.weight", str(config.get("model_type")))
    spec = PermutationSpec({RESIDUAL: hidden})
    r = AxisGroup(RESIDUAL)
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        spec.add(f"{p}embeddings.{table}.weight", 2, a1=r)
    _layer_norm(spec, f"{p}embeddings.LayerNorm", r)
    spec.add(f"{p}pooler.dense.weight", 2, a1=r)  # the pooler's output feeds task heads: it stays in place
    # BERT's sequence heads read the pooler (only they keep one); token, QA and RoBERTa's heads read the stream
    pooled = f"{p}pooler.dense.weight" in names and str(config.get("model_type")) in ("bert", "electra")
    spec.add("classifier.weight", 2, **({} if pooled else {"a1": r}))
    spec.add("classifier.dense.weight", 2, a1=r)  # RoBERTa: the <s> token's stream → dense → out_proj
    spec.add("classifier.out_proj.weight", 2)
    spec.add("qa_outputs.weight", 2, a1=r)
    # the masked-LM head maps the stream back to it (its decoder is tied to the word embeddings)
    for head in ("cls.predictions.transform", "lm_head"):
        spec.add(f"{head}.dense.weight", 2, a0=r, a1=r)
        spec.add(f"{head}.dense.bias", 1, a0=r)
        _layer_norm(spec, f"{head}.LayerNorm" if head != "lm_head" else "lm_head.layer_norm", r)
    spec.add("cls.predictions.decoder.weight", 2, a1=r)
    spec.add("lm_head.decoder.weight", 2, a1=r)
    for i in range(layers):
        layer = f"{p}encoder.layer.{i}."
        attn, mlp = f"{layer}attention", f"{layer}intermediate"
        spec.sizes[attn], spec.sizes[mlp] = heads, ffn
        head, unit = AxisGroup(attn, hidden // heads), AxisGroup(mlp)
        for proj in ("query", "key", "value"):
            spec.add(f"{attn}.self.{proj}.weight", 2, a0=head, a1=r)
            spec.add(f"{attn}.self.{proj}.bias", 1, a0=head)
        spec.add(f"{attn}.output.dense.weight", 2, a0=r, a1=head)
        spec.add(f"{attn}.output.dense.bias", 1, a0=r)
        _layer_norm(spec, f"{attn}.output.LayerNorm", r)
        spec.add(f"{mlp}.dense.weight", 2, a0=unit, a1=r)
        spec.add(f"{mlp}.dense.bias", 1, a0=unit)
        spec.add(f"{layer}output.dense.weight", 2, a0=r, a1=unit)
        spec.add(f"{layer}output.dense.bias", 1, a0=r)
        _layer_norm(spec, f"{layer}output.LayerNorm", r)
    return spec


def _layer_norm(spec: PermutationSpec, module: str, residual: AxisGroup) -> None:
    spec.add(f"{module}.weight", 1, a0=residual)
    spec.add(f"{module}.bias", 1, a0=residual)


def _small_spec(
    family: str, config: Mapping[str, Any], tensor_shapes: Mapping[str, Sequence[int]], residual: bool
) -> PermutationSpec:
    """The spec of a small model. Their formats are closed, so the guard is stricter than the transformers': a
    tensor the spec does not know that has any permuted width is an error whatever ``residual`` is (the inner
    groups move either way, and a ResNet's inner widths are its stage widths), and every moved axis must have its
    group's length (a checkpoint that disagrees with its config is named here, not in an indexing error)."""
    names = sorted(tensor_shapes)
    if family == "mergesmith_mlp":
        spec, unmoved = _mlp_spec(config, names)
    else:
        spec, unmoved = _resnet_spec(names, tensor_shapes, residual)
    spec = spec.restricted(names)
    for name, axes in spec.axes.items():
        shape = tuple(tensor_shapes[name])
        for axis, entry in enumerate(axes):
            if entry is not None and (
                axis >= len(shape) or shape[axis] != spec.sizes[entry.group] * entry.block
            ):
                raise CheckpointError(
                    f"tensor {name!r} has shape {list(shape)}, but axis {axis} belongs to group {entry.group!r} "
                    f"of {spec.sizes[entry.group]} units: the weights do not match the config"
                )
    moved = set(spec.sizes.values())
    for name in names:
        if name not in spec.axes and name not in unmoved and moved & set(tensor_shapes[name]):
            raise CheckpointError(
                f"tensor {name!r} has no rule in the {family} permutation spec and has a width it permutes"
            )
    return spec


def _mlp_spec(config: Mapping[str, Any], names: list[str]) -> tuple[PermutationSpec, set[str]]:
    """One group per hidden layer ``layers.{i}``: its output rows and bias, and the next layer's input columns.
    There is no residual stream (``residual`` changes nothing); the last layer's bias (the logits) stays."""
    sizes = config.get("sizes")
    if not isinstance(sizes, list) or len(sizes) < 2 or not all(isinstance(n, int) for n in sizes):
        raise CheckpointError("config.json has no list of integers 'sizes' (needed for the permutation spec)")
    spec = PermutationSpec()
    last = len(sizes) - 2  # index of the output layer
    for i in range(last):
        unit = AxisGroup(f"layers.{i}")
        spec.sizes[unit.group] = sizes[i + 1]
        spec.add(f"layers.{i}.weight", 2, a0=unit)
        spec.add(f"layers.{i}.bias", 1, a0=unit)
        spec.add(f"layers.{i + 1}.weight", 2, a1=unit)
    if last == 0:
        spec.add("layers.0.weight", 2)  # a linear model: nothing to permute, but the tensor is known
    return spec, {f"layers.{last}.bias"}


def _resnet_spec(
    names: list[str], tensor_shapes: Mapping[str, Sequence[int]], residual: bool
) -> tuple[PermutationSpec, set[str]]:
    """Stages ``layer{s}`` and their blocks from the tensor names (any depth, torchvision's naming); the stream
    groups are left out with ``residual=False``. A stage whose first block has no projection shortcut adds to the
    stream it reads, so it shares that stream's group (the stem's stream is ``stage1`` unless layer1 projects)."""
    present = set(names)
    blocks: dict[int, int] = {}
    for name in names:
        parts = name.split(".")
        if len(parts) > 2 and parts[0].startswith("layer") and parts[0][5:].isdigit() and parts[1].isdigit():
            if parts[2] == "conv3":
                raise CheckpointError(
                    f"tensor {name!r}: Bottleneck ResNet blocks have no permutation spec yet (BasicBlock only)"
                )
            s, b = int(parts[0][5:]), int(parts[1])
            blocks[s] = max(blocks.get(s, 0), b + 1)
    if "conv1.weight" not in present or not blocks or sorted(blocks) != list(range(1, len(blocks) + 1)):
        raise CheckpointError(
            "no tensors named like 'conv1.weight' and 'layer1.0.*': not a ResNet checkpoint"
        )
    spec = PermutationSpec()
    unmoved = {"fc.bias"} | {n for n in names if n.endswith(".num_batches_tracked")}

    def stream(group: str, size_from: str) -> AxisGroup | None:
        if not residual:
            return None
        spec.sizes[group] = int(tensor_shapes[size_from][0])
        return AxisGroup(group)

    def write(conv: str, bn: str, out: AxisGroup | None, into: AxisGroup | None) -> None:
        """A convolution (output channels ``out``, input channels ``into``) and the BatchNorm after it."""
        spec.add(f"{conv}.weight", 4, **_axes(out, into))
        for tensor in BN_MOVED:
            spec.add(f"{bn}.{tensor}", 1, **_axes(out, None))

    current = stream("stem" if "layer1.0.downsample.0.weight" in present else "stage1", "conv1.weight")
    write("conv1", "bn1", current, None)
    for s in range(1, len(blocks) + 1):
        for b in range(blocks[s]):
            block = f"layer{s}.{b}"
            projection = f"{block}.downsample.0.weight"
            reads = current
            if projection in present:
                current = stream(f"stage{s}", projection)
                write(f"{block}.downsample.0", f"{block}.downsample.1", current, reads)
            if f"{block}.conv1.weight" not in present:
                raise CheckpointError(f"tensor '{block}.conv1.weight' is missing: not a BasicBlock ResNet")
            inner = AxisGroup(block)
            spec.sizes[block] = int(tensor_shapes[f"{block}.conv1.weight"][0])
            write(f"{block}.conv1", f"{block}.bn1", inner, reads)
            write(f"{block}.conv2", f"{block}.bn2", current, inner)
    spec.add("fc.weight", 2, **_axes(None, current))
    return spec, unmoved


def _axes(out: AxisGroup | None, into: AxisGroup | None) -> dict[str, AxisGroup]:
    """``add``'s keyword arguments for a weight's output (axis 0) and input (axis 1) groups, where present."""
    return {k: v for k, v in (("a0", out), ("a1", into)) if v is not None}
