"""What a merge writes besides the weights: config.json, the tokenizer files, the recipe, the manifest (inputs'
and outputs' sha256, versions, the fit) and the model card."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mergesmith.api.chat_template import resolve_template, write_template
from mergesmith.dtypes import dtype_name
from mergesmith.engine.device import describe_device
from mergesmith.engine.plan import Plan
from mergesmith.errors import RecipeError
from mergesmith.io.hf_files import TOKENIZER_FILES, copy_tokenizer_files
from mergesmith.io.hub import resolve_model
from mergesmith.io.reader import Source
from mergesmith.recipe.schema import Recipe
from mergesmith.version import __version__

RECIPE_FILE = "mergesmith_recipe.yaml"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class OutputNotes:
    """What a tool built on the merge pipeline (``mergesmith moe``) writes in place of a merge's own account: the
    manifest's ``method`` and a section ``key`` holding ``record``, extra files (name → text or bytes; in place of
    the recipe file, which describes the pipeline's internal passthrough), and the model card."""

    method: str
    key: str
    record: dict[str, Any]
    files: dict[str, str | bytes]
    card: str


def write_metadata(
    folder: Path,
    recipe: Recipe,
    model_paths: list[str],
    plan: Plan,
    input_hashes: dict[str, dict[str, str]],
    output_hashes: dict[str, str],
    seconds: float,
    resumed_shards: int,
    fit: dict[str, Any] | None = None,
    notices: tuple[str, ...] = (),
    tokenizer_dir: Path | None = None,
    chat_template: str | None = None,
    vocabulary_tokenizer: Any = None,
    alignment: dict[str, Any] | None = None,
    notes: OutputNotes | None = None,
) -> None:
    """Every non-weight file of the output folder (``notes``: a tool's own account, see :class:`OutputNotes`)."""
    if plan.config:
        config = dict(plan.config)
        dtypes = {j.dtype for j in plan.jobs if j.dtype.is_floating_point}
        if len(dtypes) == 1:
            name = dtype_name(dtypes.pop())
            for key in ("torch_dtype", "dtype"):
                if key in config or key == "dtype":
                    config[key] = name
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    config_src = plan.config_source
    if tokenizer_dir is None and config_src is not None:
        tokenizer_dir = config_src.folder
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        copy_tokenizer_files(tokenizer_dir, folder)
    if vocabulary_tokenizer is not None:  # a merged vocabulary (tokenizer_source: union, a tokenizer: block)
        vocabulary_tokenizer.save_pretrained(str(folder))
    if chat_template is not None:
        write_template(folder, chat_template)
    if notes is None:
        (folder / RECIPE_FILE).write_text(recipe.to_yaml())
    else:
        for name, content in notes.files.items():
            if isinstance(content, bytes):
                (folder / name).write_bytes(content)
            else:
                (folder / name).write_text(content)
    manifest = {
        "mergesmith_version": __version__,
        "method": recipe.merge_method if notes is None else notes.method,
        "compat": recipe.compat,
        "seed": recipe.seed,
        "wall_time_s": round(seconds, 3),
        "inputs": input_hashes,
        "output_sha256": output_hashes,
        "resumed_shards": resumed_shards,
        "torch_version": torch.__version__,
        "device": describe_device(plan.device),
    }
    if notices:
        manifest["notices"] = list(notices)
    if fit is not None:
        manifest["fit"] = fit
    if alignment is not None:  # align: its summary (the permutations are in alignment.json)
        manifest["alignment"] = alignment
    if notes is not None:
        manifest[notes.key] = notes.record
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    card = model_card(recipe, plan, model_paths) if notes is None else notes.card
    (folder / "README.md").write_text(card)


def reference_model(recipe: Recipe) -> str | None:
    """The model whose tokenizer and vocabulary the output takes by default: the base, else the first model."""
    return recipe.base_model or (recipe.models[0].model if recipe.models else None)


def tokenizer_folder(recipe: Recipe, sources: dict[str, Source]) -> Path | None:
    """Where the output's tokenizer comes from with ``tokenizer_source`` (None: the config model's own), checked
    before the merge: ``base`` (the base model, else the first), a model folder or a Hub id that holds tokenizer
    files, and whose vocabulary fits the merged embeddings (token ids past their rows would crash generation)."""
    spec = recipe.tokenizer_source
    if spec is None or spec == "union":  # union (and a tokenizer: block): api.vocabulary builds the tokenizer
        return None
    where = f"tokenizer_source: {spec}"
    reference = reference_model(recipe)
    if spec == "base":
        if reference is None:
            raise RecipeError(f"{where}: the recipe has no base_model or models to take it from")
        folder = sources[reference].folder
    else:
        folder = resolve_model(spec)
    if folder is None or not folder.is_dir() or not any((folder / n).exists() for n in TOKENIZER_FILES[:-2]):
        raise RecipeError(
            f"{where}: no tokenizer files there (tokenizer.json, tokenizer_config.json, vocab …)"
        )
    from transformers import AutoTokenizer

    try:
        tokens = len(AutoTokenizer.from_pretrained(str(folder)))
    except Exception as e:  # whatever transformers raises: one line naming the source
        raise RecipeError(f"{where}: not a loadable tokenizer ({type(e).__name__}: {e})") from None
    rows = sources[reference].config.get("vocab_size") if reference in sources else None
    if isinstance(rows, int) and tokens > rows:
        raise RecipeError(
            f"{where}: {tokens} tokens, but the merged embeddings have {rows} rows (vocab_size); ids from {rows} "
            "on would index past them — use the models' own tokenizer"
        )
    return folder


def chat_template_for(recipe: Recipe, sources: dict[str, Source], tokenizer: Path | None) -> str | None:
    """The recipe's ``chat_template`` resolved and checked before the merge (None: keep the tokenizer's own)."""
    if recipe.chat_template is None:
        return None
    reference = reference_model(recipe)
    output_tokenizer = tokenizer or (sources[reference].folder if reference in sources else None)
    merged_vocabulary = recipe.tokenizer is not None or recipe.tokenizer_source == "union"
    if not merged_vocabulary and (
        output_tokenizer is None or not (output_tokenizer / "tokenizer_config.json").is_file()
    ):
        raise RecipeError("chat_template: the output gets no tokenizer_config.json; set tokenizer_source")
    folders = [sources[reference].folder] if reference in sources else []
    folders += [s.folder for p, s in sources.items() if p != reference]
    return resolve_template(recipe.chat_template, folders)


def model_name(path: str) -> str:
    """How the card names a model: a Hub id as it is, a local folder or file by its name (no local paths)."""
    local = Path(path)
    if local.exists() or local.is_absolute() or path.startswith((".", "~")):
        return local.stem if local.is_file() else local.name
    return path


def card_header(models: list[str], tags: list[str], title: str) -> str:
    """A model card's front matter (its base models by name, the library, tags) and title line."""
    front = {"base_model": models, "library_name": "transformers", "tags": tags}
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + f"---\n\n# {title}\n\n"


def model_card(recipe: Recipe, plan: Plan, model_paths: list[str]) -> str:
    """The Hugging Face model card: front matter (base models, tags), the method and its paper, the recipe with
    every parameter in effect."""
    method = plan.method
    names = list(dict.fromkeys(model_name(p) for p in model_paths))
    return (
        card_header(names, ["merge", "mergesmith", recipe.merge_method], recipe.name or "Merged model")
        + f"Merged with [mergesmith](https://pypi.org/project/mergesmith/) {__version__} using **{method.name}** "
        f"({method.summary}; {method.paper}).\n\n"
        "## Models\n\n"
        + "".join(f"- {p}\n" for p in names)
        + "\n## Recipe\n\n(models by name; the output's `mergesmith_recipe.yaml` has the paths)\n\n```yaml\n"
        + _named(recipe).to_yaml()
        + "```\n"
    )


def _named(recipe: Recipe) -> Recipe:
    """The recipe with every model string shown by its name (a card is public: no local paths)."""

    def name(spec: str) -> str:
        return "+".join(model_name(part) for part in spec.split("+")) if "+" in spec else model_name(spec)

    named = recipe.model_copy(deep=True)
    if named.base_model:
        named.base_model = name(named.base_model)
    if named.tokenizer_source and named.tokenizer_source not in ("base", "union"):
        named.tokenizer_source = name(named.tokenizer_source)
    for entry in named.models:
        entry.model = name(entry.model)
    for slc in named.slices or []:
        for source in slc.sources:
            source.model = name(source.model)
    return named
