"""Tokenizer merging: ``tokenizer_source: union`` and mergekit's ``tokenizer:`` block. The output vocabulary is
built first; then every model's vocabulary-indexed tensors (input embedding, LM head) are re-indexed to it while
the merge streams, so that the per-tensor method merges row t of every model as the same token t.

The output vocabulary (mergekit's rules): ``base`` — the base model's tokenizer (the first model's without a base);
a model — that model's; ``union`` — the base's, plus every other model's tokens it lacks (regular tokens in model
order, then added tokens with their settings). Tokens whose id is at or past a model's ``vocab_size`` (padding
rows) count as absent from it. ``pad_to_multiple_of`` pads the rows (padding rows: the mean of the real ones).

A model's row for a token it lacks (mergekit's defaults, overridden per token by ``tokens:``):
- only one model has the token: that model's row, for every model;
- the base has it: the base's row;
- several models have it: the mean of their rows;
- no model has it: zeros.
``tokens: {TOKEN: {source: MODEL | {kind: zero} | {kind: model_token, model: M, token: T | token_id: I},
force: true}}`` sets a token's row explicitly; ``force`` uses it even for models that have the token.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from mergesmith.errors import RecipeError
from mergesmith.io.models import open_model
from mergesmith.io.reader import Source, WrappedSource
from mergesmith.recipe.schema import Recipe, TokenizerBlock


@dataclass
class Vocabulary:
    """The output tokenizer and, per model, where each output token's row comes from."""

    tokenizer: Any  # transformers tokenizer (saved into the output)
    size: int  # rows of the output's vocabulary tensors (padded)
    permutations: dict[str, list[int]]  # model -> old row of each output token (-1: absent)
    defaults: dict[int, Any] = field(
        default_factory=dict
    )  # token id -> its row's recipe for models without it
    forced: set[int] = field(default_factory=set)
    original_vocabs: dict[str, dict[str, int]] = field(default_factory=dict)

    def identity(self, rows: dict[str, int]) -> bool:
        """Whether no model's tensors change (same size, every token at its own row, nothing forced)."""
        return not self.forced and all(
            rows[m] == self.size and p == list(range(self.size)) for m, p in self.permutations.items()
        )


def _block(recipe: Recipe) -> TokenizerBlock | None:
    if recipe.tokenizer is not None:
        return recipe.tokenizer
    if recipe.tokenizer_source == "union":
        return TokenizerBlock(source="union")
    return None


def _vocab_rows(source: Source) -> int | None:
    value = source.config.get("vocab_size")
    return int(value) if isinstance(value, int) else None


def build_vocabulary(recipe: Recipe, sources: dict[str, Source]) -> Vocabulary | None:
    """The output vocabulary of a recipe with ``tokenizer_source: union`` or a ``tokenizer:`` block (else None)."""
    block = _block(recipe)
    if block is None:
        return None
    from transformers import AutoTokenizer

    base = recipe.base_model or recipe.model_paths()[0]
    tokenizers: dict[str, Any] = {}
    vocabs: dict[str, dict[str, int]] = {}
    for path, source in sources.items():
        rows = _vocab_rows(source)
        if source.folder is None:
            raise RecipeError(f"tokenizer merge: {path} has no folder with a tokenizer")
        try:
            tokenizers[path] = AutoTokenizer.from_pretrained(str(source.folder))
        except Exception as e:  # whatever transformers raises: one line naming the model
            raise RecipeError(
                f"tokenizer merge: {path} has no loadable tokenizer ({type(e).__name__})"
            ) from None
        vocabs[path] = {t: i for t, i in tokenizers[path].get_vocab().items() if rows is None or i < rows}
    if block.source == "union":
        tokenizer = _union(tokenizers[base], base, tokenizers, vocabs)
    elif block.source == "base":
        tokenizer = tokenizers[base]
    else:
        if block.source not in sources:
            tokenizer = AutoTokenizer.from_pretrained(str(open_model(block.source).folder))
        else:
            tokenizer = tokenizers[block.source]
    out_vocab = tokenizer.get_vocab()
    size = len(out_vocab)
    if block.pad_to_multiple_of and size % block.pad_to_multiple_of:
        size = (size // block.pad_to_multiple_of + 1) * block.pad_to_multiple_of
    permutations = {}
    for path in sources:
        order = [-1] * len(out_vocab)
        for token, new in out_vocab.items():
            order[new] = vocabs[path].get(token, -1)
        permutations[path] = order
    vocabulary = Vocabulary(tokenizer, size, permutations, original_vocabs=vocabs)
    _assign_defaults(vocabulary, out_vocab, block, base, list(sources))
    return vocabulary


def _union(base_tok: Any, base: str, tokenizers: dict[str, Any], vocabs: dict[str, dict[str, int]]) -> Any:
    import copy

    result = copy.deepcopy(base_tok)
    base_vocab = base_tok.get_vocab()
    added: dict[str, Any] = {}
    regular: list[str] = []
    seen: set[str] = set()
    for path, tok in tokenizers.items():
        specials = {info.content: info for info in tok.added_tokens_decoder.values()}
        for token, _ in sorted(vocabs[path].items(), key=lambda kv: kv[1]):
            if token in specials:
                added.setdefault(token, specials[token])
            elif token not in seen:
                seen.add(token)
                regular.append(token)
    result.add_tokens([t for t in regular if t not in base_vocab and t not in added])
    result.add_tokens([info for token, info in added.items() if token not in base_vocab])
    return result


def _assign_defaults(
    vocabulary: Vocabulary, out_vocab: dict[str, int], block: TokenizerBlock, base: str, models: list[str]
) -> None:
    configs = dict(block.tokens or {})
    for token, setting in configs.items():
        if token not in out_vocab:
            raise RecipeError(f"tokenizer.tokens: '{token}' is not in the output vocabulary")
        vocabulary.defaults[out_vocab[token]] = setting.source
        if setting.force:
            vocabulary.forced.add(out_vocab[token])
    for token, new in out_vocab.items():
        if token in configs:
            continue
        present = [m for m in models if vocabulary.permutations[m][new] >= 0]
        if len(present) == len(models):
            continue
        if len(present) == 1:
            vocabulary.defaults[new] = present[0]
        elif not present:
            vocabulary.defaults[new] = {"kind": "zero"}
        elif base in present:
            vocabulary.defaults[new] = base
        else:
            vocabulary.defaults[new] = {"kind": "mean", "models": present}


class VocabularyRows:
    """Every model's re-indexed vocabulary tensor of one name, computed once for all models (the defaults need
    other models' rows) and handed out per model; at most a few names are held at a time."""

    def __init__(self, vocabulary: Vocabulary, sources: dict[str, Source]):
        self.vocabulary = vocabulary
        self.sources = sources
        self._cache: dict[str, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def rows(self, name: str, model: str) -> torch.Tensor:
        with self._lock:
            if name not in self._cache:
                if len(self._cache) >= 2:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[name] = self._compute(name)
            return self._cache[name][model]

    def _compute(self, name: str) -> dict[str, torch.Tensor]:
        vocab = self.vocabulary
        tensors = {m: s.get(name) for m, s in self.sources.items() if s.has(name)}
        dtype = next(iter(tensors.values())).dtype
        for t in tensors.values():
            dtype = torch.promote_types(dtype, t.dtype)
        width = next(iter(tensors.values())).shape[1:]
        default_rows: dict[int, torch.Tensor] = {}
        for new, setting in vocab.defaults.items():
            default_rows[new] = self._default(setting, new, tensors, width, dtype)
        real = len(vocab.permutations[next(iter(tensors))])
        out = {}
        for model, tensor in tensors.items():
            order = vocab.permutations[model]
            rows = torch.zeros((vocab.size, *width), dtype=dtype)
            for new in range(real):
                old = order[new]
                if old >= 0 and new not in vocab.forced:
                    rows[new] = tensor[old]
                elif new in default_rows:
                    rows[new] = default_rows[new]
            if vocab.size > real:
                rows[real:] = rows[:real].mean(dim=0)
            out[model] = rows
        return out

    def _default(
        self, setting: Any, new: int, tensors: dict[str, torch.Tensor], width, dtype
    ) -> torch.Tensor:
        vocab = self.vocabulary
        if isinstance(setting, dict) and setting.get("kind") == "zero":
            return torch.zeros(width, dtype=dtype)
        if isinstance(setting, dict) and setting.get("kind") == "mean":
            rows = [
                tensors[m][vocab.permutations[m][new]].to(dtype) for m in setting["models"] if m in tensors
            ]
            return torch.stack(rows).mean(0)
        if isinstance(setting, dict) and setting.get("kind") == "model_token":
            model = setting["model"]
            index = setting.get("token_id")
            if index is None:
                index = vocab.original_vocabs.get(model, {}).get(setting.get("token"), -1)
            if model not in tensors or not 0 <= index < tensors[model].shape[0]:
                raise RecipeError(f"tokenizer.tokens: {setting} names no row of {model}")
            return tensors[model][index].to(dtype)
        model = setting if isinstance(setting, str) else getattr(setting, "model", None)
        if model not in tensors or vocab.permutations[model][new] < 0:
            raise RecipeError(f"tokenizer.tokens: token id {new} is not in {model}; give another source")
        return tensors[model][vocab.permutations[model][new]].to(dtype)


class VocabularySource(WrappedSource):
    """A model whose vocabulary-indexed tensors read as re-indexed to the output vocabulary."""

    def __init__(self, source: Source, model: str, names: set[str], rows: VocabularyRows, size: int):
        super().__init__(source, config={**source.config, "vocab_size": size})
        self.model = model
        self.names = names
        self.shared = rows
        self.size = size

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype, shape = self.inner.info(name)
        return (dtype, (self.size, *shape[1:])) if name in self.names else (dtype, shape)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.names:
            return self.inner.get(name)
        return self.shared.rows(name, self.model).to(self.inner.info(name)[0])


def vocabulary_names(source: Source) -> set[str]:
    """The tensors indexed by token: 2-D, as many rows as the model's vocab_size, an embedding or an output head."""
    rows = _vocab_rows(source)
    names = set()
    for name in source.keys():
        shape = source.info(name)[1]
        looks = any(k in name for k in ("embed_tokens", "wte", "word_embeddings", "lm_head", "embed_out"))
        if len(shape) == 2 and looks and (rows is None or shape[0] == rows):
            names.add(name)
    return names


def reindexed_sources(
    recipe: Recipe, sources: dict[str, Source]
) -> tuple[dict[str, Source], Vocabulary | None]:
    """The sources with their vocabulary tensors re-indexed to the recipe's merged tokenizer (unchanged without
    one, or when every model already has the output vocabulary)."""
    vocabulary = build_vocabulary(recipe, sources)
    if vocabulary is None:
        return sources, None
    rows = {m: _vocab_rows(s) or vocabulary.size for m, s in sources.items()}
    if vocabulary.identity(rows):
        return sources, vocabulary
    shared = VocabularyRows(vocabulary, sources)
    wrapped: dict[str, Source] = {
        m: VocabularySource(s, m, vocabulary_names(s), shared, vocabulary.size) for m, s in sources.items()
    }
    return wrapped, vocabulary
