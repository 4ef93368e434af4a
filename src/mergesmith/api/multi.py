"""``mergesmith multi FILE.yaml --intermediate-dir DIR [--out OUT]``: several merges that build on each other
(mergekit-multi's file), run in dependency order, each cached.

The file holds one YAML document per merge, each a recipe plus ``name:``; any model field of a later recipe
(``base_model``, ``models``, slice sources, ``tokenizer_source``, either side of ``BASE+ADAPTER``) may name an
earlier merge, which then stands for its output folder ``DIR/NAME``. At most one document has no name: the final
merge, written to ``--out``. A document may instead give ``out_path:`` (mergekit-mega's form): it is written
there, and later documents read it by that path. A merge is reused (not redone) when its folder holds a finished mergesmith output of the
same recipe and none of the merges it reads was redone in this run; with ``lazy=False`` every merge runs again.
Unknown names are just paths; a cycle, a repeated name or two unnamed documents are one-line errors before any merge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergesmith.api.pipeline import MergeResult, merge
from mergesmith.api.publish import MANIFEST_FILE, RECIPE_FILE
from mergesmith.engine.effective import effective_recipe
from mergesmith.errors import MergeError, RecipeError
from mergesmith.io.models import split_adapter
from mergesmith.methods.registry import get_method
from mergesmith.recipe.schema import load_recipe


@dataclass
class Step:
    """One document: its name (None: the final merge), its recipe and the merges it reads."""

    name: str | None
    recipe: dict[str, Any]
    needs: list[str] = field(default_factory=list)  # labels of the steps it reads
    out_path: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.out_path or "(final)"


def _model_fields(recipe: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(container, key) of every model string in a recipe dict, to read or replace."""
    places: list[tuple[Any, Any]] = []
    for key in ("base_model", "tokenizer_source"):
        if isinstance(recipe.get(key), str):
            places.append((recipe, key))
    for i, entry in enumerate(recipe.get("models") or []):
        places.append((entry, "model") if isinstance(entry, dict) else (recipe["models"], i))
    for slc in recipe.get("slices") or []:
        for source in slc.get("sources") or []:
            places.append((source, "model"))
    return places


def _parts(spec: str) -> list[str]:
    pair = split_adapter(spec)
    return list(pair) if pair else [spec]


def read_steps(path: Path) -> list[Step]:
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not a readable YAML file ({type(e).__name__})") from None
    if not documents or not all(isinstance(d, dict) for d in documents):
        raise RecipeError(f"{path}: a multi-merge file is YAML documents (---), each a recipe with name:")
    steps = [Step(d.pop("name", None), d, out_path=d.pop("out_path", None)) for d in documents]
    names = [s.name for s in steps if s.name is not None]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise RecipeError(f"{path}: the name '{repeated[0]}' is used by two merges")
    if sum(s.name is None and s.out_path is None for s in steps) > 1:
        raise RecipeError(f"{path}: more than one merge has no name: (only the final merge may omit it)")
    written = {str(Path(s.out_path).resolve()): s.label for s in steps if s.out_path is not None}
    for step in steps:
        for container, key in _model_fields(step.recipe):
            for part in _parts(container[key]):
                label = part if part in names else written.get(str(Path(part).resolve()))
                if label is not None and label not in step.needs and label != step.label:
                    step.needs.append(label)
    return _ordered(steps, path)


def _ordered(steps: list[Step], path: Path) -> list[Step]:
    """Dependency order (a merge after those it reads; otherwise as in the file); a cycle is an error."""
    by_label = {s.label: s for s in steps}
    done: list[Step] = []
    state: dict[int, str] = {}

    def visit(step: Step, trail: list[str]) -> None:
        if state.get(id(step)) == "done":
            return
        label = step.label
        if state.get(id(step)) == "active":
            raise RecipeError(f"{path}: the merges form a cycle: {' -> '.join([*trail, label])}")
        state[id(step)] = "active"
        for need in step.needs:
            visit(by_label[need], [*trail, label])
        state[id(step)] = "done"
        done.append(step)

    for step in steps:
        visit(step, [])
    return done


def _resolved(step: Step, folder: Path, names: set[str]) -> dict[str, Any]:
    """The recipe with every earlier merge's name replaced by its output folder (``out_path`` merges are read by
    their path already)."""
    recipe = yaml.safe_load(yaml.safe_dump(step.recipe))  # a deep copy
    for container, key in _model_fields(recipe):
        parts = [str(folder / p) if p in step.needs and p in names else p for p in _parts(container[key])]
        container[key] = "+".join(parts)
    return recipe


def _finished(out: Path, recipe: dict[str, Any]) -> bool:
    """A finished mergesmith output of this recipe (its saved recipe is this one with its parameters in effect)."""
    if not (out / MANIFEST_FILE).exists() or not (out / RECIPE_FILE).exists():
        return False
    parsed = load_recipe(recipe)
    expected, _ = effective_recipe(parsed, get_method(parsed.merge_method))
    return (out / RECIPE_FILE).read_text() == expected.to_yaml()


def run_multi(
    path: str | Path,
    intermediate_dir: str | Path,
    out: str | Path | None = None,
    *,
    lazy: bool = True,
    report: Callable[[str], None] = print,
    **options: Any,
) -> dict[str, MergeResult | None]:
    """Run every merge of a multi-merge file in dependency order; returns each merge's result (None: reused)."""
    path, folder = Path(path), Path(intermediate_dir)
    steps = read_steps(path)
    if any(s.name is None and s.out_path is None for s in steps) and out is None:
        raise RecipeError(f"{path}: the final merge has no name, so it needs --out")
    results: dict[str, MergeResult | None] = {}
    redone: set[str] = set()
    for step in steps:
        label = step.label
        if step.name is not None:
            target = folder / step.name
        else:
            target = Path(step.out_path) if step.out_path is not None else Path(out)  # type: ignore[arg-type]
        recipe = _resolved(step, folder, {s.name for s in steps if s.name is not None})
        if lazy and not redone.intersection(step.needs) and _finished(target, recipe):
            report(f"{label}: up to date in {target}")
            results[label] = None
            continue
        if target.exists() and any(target.iterdir()) and not (target / MANIFEST_FILE).exists():
            raise RecipeError(f"{target}: exists and is not a mergesmith output; choose another folder")
        try:
            result = merge(recipe, target, force=True, **options)
        except MergeError as e:
            raise type(e)(f"{path} ({label}): {e}") from None
        report(f"{label}: {result.summary()}")
        results[label] = result
        redone.add(label)
    return results
