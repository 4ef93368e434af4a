"""Continual merging: models arrive one at a time and the running merge absorbs each without keeping the earlier
ones (``mergesmith continual init | add | export``).

A **state** is a folder:

    state.json        the method and its parameters, the base, the method's scalars (OPCM's λ_t and the task
                      vectors' norms), and the history: which models came in which order, with their files' sha256
    merged-<t>/       the running merge after t models: an HF model folder (config, tokenizer, model.safetensors)

Each ``add`` runs the merge engine (streamed tensor by tensor: memory does not grow with the number of models or
with the model's size) into ``.work/`` inside the state, moves the result to ``merged-<t+1>/`` and then replaces
``state.json`` in one atomic rename — the commit point: an add that fails or is killed before it leaves the
previous state as it was (what it left in ``.work/`` is removed by the next add).

Methods, as the official OPCM code and its continual baselines run them (``fusion_bench/method/opcm/``):

- ``opcm`` (α = 0.5): θ^(1) = θ_1; then each step of :mod:`mergesmith.methods.opcm` gives θ', and
  θ^(t) = θ₀ + (θ' − θ₀) · n̄_t / ‖θ' − θ₀‖, λ_t = ‖θ' − θ₀‖ / n̄_t, with n̄_t the mean of ‖θ_i − θ₀‖ over the
  models so far (norms over every floating-point tensor);
- ``task_arithmetic`` (λ = 0.3): θ^(t) = θ^(t−1) + λ (θ_t − θ₀), from θ^(0) = θ₀;
- ``ties`` (λ = 0.5, K = 20 %): θ^(t) = θ^(t−1) + λ · TIES(θ^(t−1) − θ₀, θ_t − θ₀) (top 20 % of each vector's
  magnitudes over the whole model, sign election, disjoint sum), from θ^(0) = θ₀ (the first step is θ₀ + λ τ_1);
- ``average``: θ^(t) = ((t − 1) θ^(t−1) + θ_t) / t.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mergesmith.api.pipeline import MergeResult, merge
from mergesmith.api.publish import OutputNotes, card_header, model_name
from mergesmith.errors import CheckpointError, MergeError, RecipeError
from mergesmith.io.models import open_model
from mergesmith.io.reader import close_sources
from mergesmith.io.writer import input_sha256
from mergesmith.methods.opcm import OPCM_STEP
from mergesmith.version import __version__

STATE_FILE = "state.json"
FORMAT = 1
METHODS = {
    "opcm": {"alpha": 0.5},
    "task_arithmetic": {"lambda": 0.3},
    "ties": {"lambda": 0.5, "density": 0.2},
    "average": {},
}
INTERNAL_FILES = ("manifest.json", "README.md", "mergesmith_recipe.yaml")  # the engine's account of a step


@dataclass
class ContinualState:
    """What ``state.json`` holds (see the module docstring)."""

    method: str
    params: dict[str, float]
    base: str
    history: list[dict[str, Any]] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)  # ‖θ_i − θ₀‖ of each model (OPCM)
    lam: float = 1.0  # OPCM's λ_t
    format: int = FORMAT
    version: str = __version__

    @property
    def count(self) -> int:
        return len(self.history)

    def merged(self, root: Path) -> Path | None:
        return root / f"merged-{self.count}" if self.count else None

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "format": self.format,
                    "mergesmith_version": self.version,
                    "method": self.method,
                    "params": self.params,
                    "base": self.base,
                    "lambda": self.lam,
                    "norms": self.norms,
                    "history": self.history,
                },
                indent=1,
            )
            + "\n"
        )


def read_state(root: str | Path) -> ContinualState:
    """The state in ``root``; one-line errors for a missing, unreadable or other-version state."""
    path = Path(root) / STATE_FILE
    if not path.exists():
        raise MergeError(
            f"{root}: no continual state here (create one with `mergesmith continual init BASE {root}`)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MergeError(f"{path}: not a readable continual state ({e})") from None
    if data.get("format") != FORMAT or data.get("mergesmith_version") != __version__:
        raise MergeError(
            f"{path}: written by mergesmith {data.get('mergesmith_version')} (state format {data.get('format')}); "
            f"this is {__version__} (format {FORMAT}): export it with that version, or start a new state"
        )
    return ContinualState(
        data["method"], data["params"], data["base"], data["history"], data["norms"], data["lambda"]
    )


def init_state(
    base: str, root: str | Path, method: str, params: dict[str, float] | None = None
) -> ContinualState:
    """A new, empty state in ``root`` (an empty or new folder) for ``method`` with its defaults updated by ``params``."""
    if method not in METHODS:
        raise RecipeError(f"continual: method '{method}' is not one of {', '.join(METHODS)}")
    unknown = set(params or {}) - set(METHODS[method])
    if unknown:
        known = ", ".join(METHODS[method]) or "none"
        raise RecipeError(
            f"continual: {method} has no parameter '{sorted(unknown)[0]}' (its parameters: {known})"
        )
    folder = Path(root)
    if folder.exists() and any(folder.iterdir()):
        raise MergeError(f"{folder}: exists and is not empty; a continual state needs a new folder")
    close_sources([open_model(base)])  # the base opens: a typo fails now, not at the first add
    state = ContinualState(method, {**METHODS[method], **(params or {})}, str(base))
    folder.mkdir(parents=True, exist_ok=True)
    _commit(folder, state)
    return state


def _commit(root: Path, state: ContinualState) -> None:
    tmp = root / f".{STATE_FILE}.tmp"
    tmp.write_text(state.to_json())
    os.replace(tmp, root / STATE_FILE)


def model_fingerprint(model: str) -> dict[str, str]:
    """sha256 of each of the model's files (what the history records and compares)."""
    source = open_model(model)
    try:
        return {Path(p).name: input_sha256(Path(p)) for p in source.files()}
    finally:
        close_sources([source])


def task_vector_norm(model: str | Path, base: str | Path) -> float:
    """‖θ − θ₀‖₂ over every floating-point tensor, read one tensor at a time."""
    a, b = open_model(str(model)), open_model(str(base))
    try:
        total = 0.0
        for name in b.keys():
            tensor = b.get(name)
            if not tensor.dtype.is_floating_point:
                continue
            total += float((a.get(name).double() - tensor.double()).pow(2).sum())
        return math.sqrt(total)
    finally:
        close_sources([a, b])


def _run(recipe: dict[str, Any], out: Path, method: Any = None) -> MergeResult:
    result = merge(recipe, out, force=True, progress=False, method=method)
    for name in INTERNAL_FILES:  # a step's manifest holds its wall time: the state would not be reproducible
        (out / name).unlink(missing_ok=True)
    return result


def add_model(root: str | Path, model: str, progress: bool = False) -> ContinualState:
    """Absorb ``model`` into the state in ``root`` (the module docstring); returns the new state."""
    folder = Path(root)
    state = read_state(folder)
    fingerprint = model_fingerprint(model)
    for i, entry in enumerate(state.history):
        if entry["sha256"] == fingerprint:
            raise MergeError(
                f"{model}: already added (model {i + 1} of this state, {entry['model']}); each model is absorbed once"
            )
    work = folder / ".work"
    shutil.rmtree(work, ignore_errors=True)  # what an interrupted add left
    work.mkdir()
    started = time.perf_counter()
    previous = state.merged(folder)
    out = work / "merged"
    t = state.count + 1
    new_state = dataclasses.replace(state, history=list(state.history), norms=list(state.norms))
    base = state.base
    if state.method == "opcm":
        new_state.norms.append(task_vector_norm(model, base))
        if previous is None:
            _run(_passthrough(model), out)
            new_state.lam = 1.0
        else:
            step = work / "step"
            recipe = {
                "merge_method": "opcm",
                "base_model": base,
                "models": [{"model": str(previous)}, {"model": model}],
                "parameters": {"alpha": state.params["alpha"], "previous_lambda": state.lam},
            }
            _run(recipe, step, OPCM_STEP)
            mean_norm = sum(new_state.norms) / len(new_state.norms)
            merged_norm = task_vector_norm(step, base)
            scale = mean_norm / merged_norm if merged_norm > 0 else 1.0
            _run(_combination([(str(step), scale), (base, 1.0 - scale)]), out)
            new_state.lam = merged_norm / mean_norm if mean_norm > 0 else 1.0
    elif state.method == "task_arithmetic":
        lam = state.params["lambda"]
        current = str(previous) if previous else base
        _run(_combination([(current, 1.0), (model, lam), (base, -lam)]), out)
    elif state.method == "ties":
        lam = state.params["lambda"]
        if previous is None:
            _run(_combination([(base, 1.0), (model, lam), (base, -lam)]), out)
        else:
            step = work / "ties"
            recipe = {
                "merge_method": "ties",
                "base_model": base,
                "models": [{"model": str(previous)}, {"model": model}],
                "parameters": {
                    "density": state.params["density"],
                    "disjoint": "sum",
                    "trim_scope": "global",
                    "lambda": 1.0,
                },
            }
            _run(recipe, step)
            _run(_combination([(str(previous), 1.0), (str(step), lam), (base, -lam)]), out)
    else:  # average
        if previous is None:
            _run(_passthrough(model), out)
        else:
            _run(_combination([(str(previous), (t - 1) / t), (model, 1 / t)]), out)
    new_state.history.append(
        {"model": model, "sha256": fingerprint, "seconds": round(time.perf_counter() - started, 3)}
    )
    final = folder / f"merged-{t}"
    shutil.rmtree(final, ignore_errors=True)  # a stale one from an add that failed after moving it
    os.replace(out, final)
    _commit(folder, new_state)  # the commit point
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return new_state


def _passthrough(model: str) -> dict[str, Any]:
    return {"merge_method": "passthrough", "models": [{"model": model}]}


def _combination(terms: list[tuple[str, float]]) -> dict[str, Any]:
    """Σ w_i θ_i (no normalisation): the linear method with explicit weights."""
    return {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in terms],
        "parameters": {"normalize": False},
    }


def export_state(
    root: str | Path, out: str | Path, force: bool = False, progress: bool = True
) -> MergeResult:
    """The running merge as an HF folder with a manifest (the history included) and a model card."""
    folder = Path(root)
    state = read_state(folder)
    merged = state.merged(folder)
    if merged is None:
        raise MergeError(
            f"{folder}: no model has been added yet; `mergesmith continual add {folder} MODEL` first"
        )
    record = {
        "method": state.method,
        "params": state.params,
        "base": state.base,
        "models": [{"model": h["model"], "sha256": h["sha256"]} for h in state.history],
        "lambda": state.lam,
    }
    names = [model_name(h["model"]) for h in state.history]
    card = (
        card_header([model_name(state.base), *names], ["merge", "mergesmith", "continual"], "Continual merge")
        + f"Made with [mergesmith](https://pypi.org/project/mergesmith/) {__version__} `continual` ({state.method}, "
        f"{json.dumps(state.params)}): {len(names)} models absorbed one at a time, in this order: "
        + ", ".join(names)
        + ".\n"
    )
    notes = OutputNotes("continual", "continual", record, {STATE_FILE: state.to_json()}, card)
    return merge(_passthrough(str(merged)), out, force=force, progress=progress, notes=notes)


def state_tensors(root: str | Path) -> dict[str, torch.Tensor]:
    """The running merge's tensors (tests and benchmarks)."""
    state = read_state(root)
    merged = state.merged(Path(root))
    if merged is None:
        raise CheckpointError(f"{root}: no model has been added yet")
    out: dict[str, torch.Tensor] = {}
    for path in sorted(merged.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out
