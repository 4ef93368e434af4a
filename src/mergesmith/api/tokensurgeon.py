"""``mergesmith tokensurgeon MODEL DONOR OUT``: MODEL with DONOR's tokenizer (mergekit-tokensurgeon's job), so that
models with different vocabularies can then be merged.

Tokens are matched across the two vocabularies after normalisation (a word-start marker, ``Ġ`` or ``▁``, read as
one marker; special tokens by their role: bos, eos, unk, pad, …). A DONOR token that MODEL has keeps MODEL's row.
For the others, mergekit's default approximation, orthogonal matching pursuit (OMP): the token's row in DONOR's
matrix is written as a k-sparse combination of DONOR's rows of the shared tokens (greedy selection of the most
correlated row, least squares on the selected set, k steps), and the same combination of MODEL's rows of those
shared tokens is its new row:

    e_DONOR(t) ≈ Σ_{j∈S} c_j e_DONOR(s_j)   ⇒   e_MODEL(t) := Σ_{j∈S} c_j e_MODEL(s_j),   |S| = k (default 64).

The input embedding uses DONOR's input embedding as the dictionary, an untied LM head DONOR's head (its
embedding when DONOR ties them). Every other tensor is MODEL's, streamed through the merge engine; the output has
DONOR's tokenizer files and ``vocab_size``. Exact when a new token's DONOR row is a combination of ≤ k shared rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergesmith.api.pipeline import MergeResult, merge
from mergesmith.api.vocabulary import vocabulary_names
from mergesmith.errors import CheckpointError, RecipeError
from mergesmith.io.models import open_model
from mergesmith.io.reader import Source, WrappedSource

STOP = 1e-6  # relative residual at which a row counts as reproduced (inputs are fp32 or coarser)


def omp(targets: torch.Tensor, atoms: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit for each row of ``targets`` (B × D) over ``atoms`` (N × D): the k selected
    atoms' indices (B × k) and their least-squares coefficients (B × k), in fp64."""
    targets, atoms = targets.double(), atoms.double()
    k = min(k, atoms.shape[0])
    chosen = torch.zeros(targets.shape[0], k, dtype=torch.long)
    coefficients = torch.zeros(targets.shape[0], k, dtype=torch.float64)
    for b in range(targets.shape[0]):
        residual = targets[b].clone()
        selected: list[int] = []
        solution = torch.zeros(0, dtype=torch.float64)
        for _ in range(k):
            scores = (atoms @ residual).abs()
            if selected:
                scores[selected] = -1.0
            selected.append(int(scores.argmax()))
            basis = atoms[selected].T  # D × |S|
            solution = torch.linalg.lstsq(basis, targets[b].unsqueeze(1)).solution.squeeze(1)
            residual = targets[b] - basis @ solution
            if float(residual.norm()) <= STOP * max(float(targets[b].norm()), 1e-12):
                break
        chosen[b, : len(selected)] = torch.tensor(selected)
        coefficients[b, : len(selected)] = solution
    return chosen, coefficients


def _normalized_vocab(tokenizer: Any, rows: int) -> dict[Any, int]:
    vocab = tokenizer.get_vocab()
    marker = "Ġ" if any(t.startswith("Ġ") for t in vocab) else "▁"
    roles = {}
    for role, value in tokenizer.special_tokens_map.items():
        for token in [value] if isinstance(value, str) else value:
            roles.setdefault(token, role)
    out: dict[Any, int] = {}
    for token, index in vocab.items():
        if index >= rows:
            continue
        if token in roles:
            key: Any = ("special", roles[token])
        elif token.startswith(marker):
            key = ("word", token[len(marker) :])
        else:
            key = token
        out.setdefault(key, index)
    return out


@dataclass
class SurgeryPlan:
    rows: int  # the output's vocabulary rows (DONOR's)
    tensors: dict[str, torch.Tensor]  # MODEL's tensor name -> its new rows
    exact: int
    approximated: int


def plan_surgery(model: Source, donor: Source, k: int) -> SurgeryPlan:
    from transformers import AutoTokenizer

    if model.folder is None or donor.folder is None:
        raise RecipeError("tokensurgeon needs model folders with tokenizers")
    names, donor_names = sorted(vocabulary_names(model)), sorted(vocabulary_names(donor))
    embed = next((n for n in names if "lm_head" not in n), None)
    donor_embed = next((n for n in donor_names if "lm_head" not in n), None)
    if embed is None or donor_embed is None:
        raise CheckpointError(
            f"{model.label} or {donor.label}: no input embedding with vocab_size rows found"
        )
    model_vocab = _normalized_vocab(AutoTokenizer.from_pretrained(str(model.folder)), model.info(embed)[1][0])
    donor_rows = donor.info(donor_embed)[1][0]
    donor_vocab = _normalized_vocab(AutoTokenizer.from_pretrained(str(donor.folder)), donor_rows)
    shared = sorted(set(model_vocab) & set(donor_vocab), key=lambda t: donor_vocab[t])
    new = sorted(set(donor_vocab) - set(model_vocab), key=lambda t: donor_vocab[t])
    if not shared:
        raise RecipeError(
            f"{model.label} and {donor.label} share no token: nothing to anchor the new rows on"
        )
    out = {}
    for name in names:
        dictionary_name = name if name in donor_names and "lm_head" in name else donor_embed
        dictionary = donor.get(dictionary_name).double()
        mine = model.get(name).double()
        rows = torch.zeros(donor_rows, mine.shape[1], dtype=torch.float64)
        for token in shared:
            rows[donor_vocab[token]] = mine[model_vocab[token]]
        if new:
            atoms = dictionary[[donor_vocab[t] for t in shared]]
            targets = dictionary[[donor_vocab[t] for t in new]]
            index, coefficients = omp(targets, atoms, k)
            anchors = mine[[model_vocab[t] for t in shared]]
            estimates = torch.einsum("bk,bkd->bd", coefficients, anchors[index])
            rows[[donor_vocab[t] for t in new]] = estimates
        out[name] = rows.to(model.info(name)[0])
    return SurgeryPlan(donor_rows, out, len(shared), len(new))


class SurgeonSource(WrappedSource):
    """MODEL with its vocabulary tensors replaced by the surgery's."""

    def __init__(self, source: Source, plan: SurgeryPlan):
        super().__init__(source, config={**source.config, "vocab_size": plan.rows})
        self.plan = plan

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if name in self.plan.tensors:
            t = self.plan.tensors[name]
            return t.dtype, tuple(t.shape)
        return self.inner.info(name)

    def get(self, name: str) -> torch.Tensor:
        return self.plan.tensors[name] if name in self.plan.tensors else self.inner.get(name)


def tokensurgeon(
    model: str, donor: str, out: str | Path, k: int = 64, **options: Any
) -> tuple[MergeResult, SurgeryPlan]:
    """MODEL with DONOR's tokenizer written to ``out`` (an HF folder, through the merge engine: atomic, manifest,
    model card)."""
    if k < 1:
        raise RecipeError(f"--k must be at least 1, got {k}")
    donor_source = open_model(donor)
    found: dict[str, SurgeryPlan] = {}

    def transform(sources: dict[str, Source]) -> dict[str, Source]:
        found["plan"] = plan_surgery(sources[model], donor_source, k)
        return {model: SurgeonSource(sources[model], found["plan"])}

    try:
        recipe = {"merge_method": "passthrough", "models": [model], "tokenizer_source": donor}
        result = merge(recipe, out, transform_sources=transform, **options)
    finally:
        close = getattr(donor_source, "close", None)
        if close is not None:
            close()
    return result, found["plan"]
