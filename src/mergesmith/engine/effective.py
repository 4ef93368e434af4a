"""What a recipe means once every default is filled in: the parameters in effect, checked where the user wrote
them, and the notices a mergekit user needs.

A recipe leaves most parameters unset. Where a method's paper and mergekit disagree (TIES' density 0.2 vs 1.0, a
global vs per-tensor trim, …) an unset parameter silently means different things in the two tools, so
:func:`effective_recipe`

- writes every method parameter the recipe leaves unset into its top-level ``parameters`` with the value in effect
  (``compat: paper`` or ``mergekit``): the recipe saved beside the output then reproduces it under either compat;
- returns one notice line naming the paper's values and ``--compat mergekit`` when such a parameter was unset;
- accepts what a mergekit recipe may carry that changes nothing here (``int8_mask``, a memory option; a method's
  own ignored keys), with a notice;
- switches a scope parameter (TIES' ``trim_scope``) from ``global`` to per tensor, with a notice, when the recipe
  gives a per-layer gradient or filters for a setting that a global scope needs constant (one top-k over the
  whole network cannot have a density per layer) and leaves the scope unset;
- checks every parameter name and value where it was written: an error names the recipe key and the model.

:func:`check_filters` then checks, once the tensor names are known, that every ``filter:`` matches some tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mergesmith.errors import RecipeError
from mergesmith.methods.base import REQUIRED, MergeMethod, Param
from mergesmith.recipe.schema import Conditional, Recipe

Settings = dict[str, Any]


def settings_of(recipe: Recipe) -> Iterator[tuple[str, Settings]]:
    """Every ``parameters:`` mapping of the recipe with where it is written (``models[1] (path).parameters``)."""
    yield "parameters", recipe.parameters
    for i, entry in enumerate(recipe.models):
        yield f"models[{i}] ({entry.model}).parameters", entry.parameters
    for k, slc in enumerate(recipe.slices or []):
        yield f"slices[{k}].parameters", slc.parameters
        for j, src in enumerate(slc.sources):
            yield f"slices[{k}].sources[{j}] ({src.model}).parameters", src.parameters


def values_of(setting: Any) -> Iterator[Any]:
    """The scalar values a setting can take: itself, a gradient's points, each filter entry's value."""
    if isinstance(setting, Conditional):
        yield from values_of(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from values_of(item)
    else:
        yield setting


def varies(setting: Any) -> bool:
    """Whether a setting can differ between tensors (a gradient or filters, not one scalar)."""
    return isinstance(setting, (list, Conditional))


def given(method: MergeMethod, settings: Settings) -> set[str]:
    """The method parameters a settings mapping sets, directly or through an alias (mergekit's spellings)."""
    return {method.aliases[key][0] if key in method.aliases else key for key in settings}


def _check_settings(method: MergeMethod, where: str, settings: Settings) -> None:
    for key, setting in settings.items():
        if method.ignored_reason(key) is not None:
            continue
        method.check_param_name(key, where)
        if key in method.aliases:
            _, mapping = method.aliases[key]
            for value in values_of(setting):
                if value not in mapping:
                    raise RecipeError(f"{where}.{key}: must be one of {list(mapping)}, got {value!r}")
            continue
        param = method.param(key)
        for value in values_of(setting):
            param.validate(value, f"{where}.{key}")


def _scope_value(param: Param, recipe: Recipe, default: Any) -> tuple[Any, str | None]:
    """A scope parameter's value in effect and, when it was switched to per tensor, the notice saying why."""
    if not param.global_over or default != "global":
        return default, None
    for where, settings in settings_of(recipe):
        for key in param.global_over:
            if key in settings and varies(settings[key]):
                return "tensor", (
                    f"{where}.{key} varies over tensors, so {param.name} is 'tensor' (a global scope needs one "
                    f"{key} per model over the whole network); set {param.name} to choose"
                )
    return default, None


def _fallback_users(recipe: Recipe, method: MergeMethod) -> list[Settings]:
    """The settings that fall back to the top-level ``parameters`` for a parameter they do not set: each
    merged model's (per-model parameters) and each slice's (shared ones)."""
    experts = [
        m.parameters for m in recipe.models if m.model != recipe.base_model or method.base.value == "ignored"
    ]
    for slc in recipe.slices or []:
        experts += [s.parameters for s in slc.sources if s.model != recipe.base_model]
    return experts


def effective_recipe(recipe: Recipe, method: MergeMethod, where: str = "recipe") -> tuple[Recipe, list[str]]:
    """The recipe with every unset method parameter written in with its value in effect, and the notices.
    Errors name ``where`` (the recipe file), the key and the model."""
    recipe = recipe.model_copy(deep=True)
    notices: list[str] = _read_patterns(recipe)
    for key, settings in settings_of(recipe):
        try:
            _check_settings(method, key, settings)
        except RecipeError as e:
            raise RecipeError(f"{where}: {e}") from None
    top = given(method, recipe.parameters)
    models = [given(method, s) for s in _fallback_users(recipe, method)] or [set()]
    slices = [given(method, s.parameters) for s in recipe.slices or []] or [set()]
    filled: Settings = {}
    paper_vs_mergekit: list[tuple[str, Any, Any]] = []
    for param in method.params:
        if param.name in top:
            continue
        default = param.default_for(recipe.compat)
        if default is REQUIRED or default is None:
            continue
        # does some tensor take this fallback? (a per-model parameter: a model that does not set it)
        falls_back = any(param.name not in m for m in (models if param.per_model else slices))
        value, why = _scope_value(param, recipe, default)
        if why is not None and falls_back:
            notices.append(why)
        filled[param.name] = value
        differs = param.mergekit is not REQUIRED and param.mergekit != param.default
        if recipe.compat == "paper" and differs and falls_back and why is None:
            paper_vs_mergekit.append((param.name, value, param.mergekit))
    if paper_vs_mergekit:
        ours = ", ".join(f"{name}={value}" for name, value, _ in paper_vs_mergekit)
        theirs = ", ".join(f"{name}={value}" for name, _, value in paper_vs_mergekit)
        notices.insert(
            0,
            f"{method.name}: unset parameters take the paper's values {ours} (mergekit: {theirs}); "
            "--compat mergekit (or compat: mergekit) for mergekit's",
        )
    for where, settings in settings_of(recipe):
        for key in settings:
            reason = method.ignored_reason(key)
            if reason is not None:
                notices.append(f"{where}.{key}: {reason}; ignored")
    parameters = {**recipe.parameters, **filled}
    return recipe.model_copy(update={"parameters": parameters}), notices


def _read_patterns(recipe: Recipe) -> list[str]:
    """``pattern:`` entries (published mergekit recipes use it; mergekit ignores it, so the entry matches every
    tensor) become ``filter:`` — or, under ``compat: mergekit``, are dropped as mergekit drops them — in place."""
    notices = []
    for where, settings in settings_of(recipe):
        for key, setting in settings.items():
            entries = setting if isinstance(setting, list) else [setting]
            for entry in entries:
                if not isinstance(entry, Conditional) or entry.pattern is None:
                    continue
                if recipe.compat == "mergekit":
                    notices.append(
                        f"{where}.{key}: pattern '{entry.pattern}' is ignored, as mergekit ignores it (the entry "
                        "applies to every tensor it reaches); write filter: to select tensors"
                    )
                elif entry.filter is None:
                    entry.filter = entry.pattern
                    notices.append(
                        f"{where}.{key}: pattern '{entry.pattern}' is read as filter: (mergekit ignores pattern: "
                        "and applies the entry to every tensor; --compat mergekit does the same)"
                    )
                entry.pattern = None
    return notices


def check_filters(recipe: Recipe, names: set[str]) -> None:
    """Every ``filter:`` of the recipe matches at least one tensor name (a typo would otherwise fall through to
    the fallback value everywhere, silently)."""
    for where, settings in settings_of(recipe):
        for key, setting in settings.items():
            entries = setting if isinstance(setting, list) else [setting]
            for entry in entries:
                if not isinstance(entry, Conditional) or entry.filter in (None, "*"):
                    continue
                if not any(entry.filter in name for name in names):
                    ordered = sorted(names)
                    example = next((n for n in ordered if "layers." in n), ordered[0] if ordered else "")
                    raise RecipeError(
                        f"{where}.{key}: filter '{entry.filter}' matches no tensor (a filter is a substring of "
                        f"tensor names such as '{example}'); fix it or remove the entry"
                    )
