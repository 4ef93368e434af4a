"""What a merge writes besides the weights: config.json, the tokenizer files, the recipe, the manifest (inputs'
and outputs' sha256, versions, the fit) and the model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from mergesmith.dtypes import dtype_name
from mergesmith.engine.plan import Plan
from mergesmith.io.hf_files import copy_tokenizer_files
from mergesmith.io.hub import resolve_model
from mergesmith.recipe.schema import Recipe
from mergesmith.version import __version__

RECIPE_FILE = "mergesmith_recipe.yaml"
MANIFEST_FILE = "manifest.json"


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
) -> None:
    """Every non-weight file of the output folder."""
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
    tokenizer_dir = (
        resolve_model(recipe.tokenizer_source)
        if recipe.tokenizer_source
        else (config_src.folder if config_src is not None else None)
    )
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        copy_tokenizer_files(tokenizer_dir, folder)
    (folder / RECIPE_FILE).write_text(recipe.to_yaml())
    manifest = {
        "mergesmith_version": __version__,
        "method": recipe.merge_method,
        "compat": recipe.compat,
        "seed": recipe.seed,
        "wall_time_s": round(seconds, 3),
        "inputs": input_hashes,
        "output_sha256": output_hashes,
        "resumed_shards": resumed_shards,
        "torch_version": torch.__version__,
    }
    if notices:
        manifest["notices"] = list(notices)
    if fit is not None:
        manifest["fit"] = fit
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(recipe, plan, model_paths))


def model_name(path: str) -> str:
    """How the card names a model: a Hub id as it is, a local folder or file by its name (no local paths)."""
    local = Path(path)
    if local.exists() or local.is_absolute() or path.startswith((".", "~")):
        return local.stem if local.is_file() else local.name
    return path


def model_card(recipe: Recipe, plan: Plan, model_paths: list[str]) -> str:
    """The Hugging Face model card: front matter (base models, tags), the method and its paper, the recipe with
    every parameter in effect."""
    method = plan.method
    names = list(dict.fromkeys(model_name(p) for p in model_paths))
    front = {
        "base_model": names,
        "library_name": "transformers",
        "tags": ["merge", "mergesmith", recipe.merge_method],
    }
    return (
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n"
        f"# {recipe.name or 'Merged model'}\n\n"
        f"Merged with [mergesmith](https://pypi.org/project/mergesmith/) {__version__} using **{method.name}** "
        f"({method.summary}; {method.paper}).\n\n"
        "## Models\n\n"
        + "".join(f"- {p}\n" for p in names)
        + "\n## Recipe\n\n```yaml\n"
        + recipe.to_yaml()
        + "```\n"
    )
