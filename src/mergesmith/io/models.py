"""A recipe's model string → an opened :class:`~mergesmith.io.reader.Source`: a local folder or file, a Hub id
(``org/name[@revision]``), ``BASE+ADAPTER`` (mergekit's LoRA syntax, each part a path or a Hub id), or a PEFT
adapter folder alone (applied to the base its config names)."""

from __future__ import annotations

from pathlib import Path

from mergesmith.errors import CheckpointError, RecipeError
from mergesmith.io.hub import resolve_model
from mergesmith.io.lora import Adapter, LoraSource, is_adapter
from mergesmith.io.reader import CheckpointSource, Source


def split_adapter(spec: str) -> tuple[str, str] | None:
    """(base, adapter) of ``BASE+ADAPTER``; None for a plain model (or a path that really contains a '+')."""
    if "+" not in spec or Path(spec).expanduser().exists():
        return None
    base, adapter = spec.rsplit("+", 1)
    return (base, adapter) if base and adapter else None


def _adapter(spec: str) -> Adapter:
    folder = resolve_model(spec)
    if not folder.is_dir() or not is_adapter(folder):
        raise CheckpointError(f"{spec}: not a PEFT adapter folder (no adapter_config.json)")
    return Adapter(folder)


def _checkpoint(spec: str, allow_pickle: bool) -> CheckpointSource:
    local = resolve_model(spec, allow_pickle)
    if not local.exists():
        raise RecipeError(
            f"model path '{spec}' does not exist (a local folder or file, a Hub id org/name, or BASE+ADAPTER)"
        )
    source = CheckpointSource(local, allow_pickle=allow_pickle)
    source.label = spec
    return source


def open_model(spec: str, allow_pickle: bool = False) -> Source:
    """Open what a recipe names as a model (see the module docstring); errors are one line naming ``spec``."""
    pair = split_adapter(spec)
    if pair is not None:
        base, adapter = pair
        return LoraSource(_checkpoint(base, allow_pickle), _adapter(adapter), spec)
    local = resolve_model(spec, allow_pickle)
    if local.is_dir() and is_adapter(local):
        adapter = Adapter(local)
        base = adapter.base_model
        if not base or (not Path(base).expanduser().exists() and "/" not in base):
            raise CheckpointError(
                f"{spec}: a LoRA adapter whose base is not recorded; give it as BASE+{spec}"
            )
        try:
            base_source = _checkpoint(base, allow_pickle)
        except CheckpointError as e:
            raise CheckpointError(
                f"{spec}: a LoRA adapter of {base}, which is not available ({e}); give it as BASE+{spec}"
            ) from None
        return LoraSource(base_source, adapter, spec)
    return _checkpoint(spec, allow_pickle)
