"""User data for data-driven merges: a JSONL or CSV file, or a split of a model zoo.

A recipe gives each model its data (``models[i].data``), or one ``data:`` for every model without its own::

    data: {path: reviews.jsonl, text_column: sentence, label_column: label, limit: 256}
    data: {zoo: text8, task: sentiment, split: train, limit: 256}
    data: reviews.csv                       # a bare path: the defaults below

Files: ``.jsonl`` (one JSON object per line; blank lines are skipped) or ``.csv`` (a header row, then one example
per row). Labels are ints (class ids from 0) or strings; string labels are mapped to ids in sorted order (the
mapping is recorded in the output's manifest), so a task head's class ``i`` must be the ``i``-th label name in
sorted order. ``limit`` takes the first examples of the file: shuffle a file that is sorted by label. Relative
paths are relative to the working directory, like model paths.

Whether labels are read is the method's decision (its ``DataNeed``: Fisher's empirical variant needs labels,
AdaMerging reads inputs only); ``labeled: true`` passes labels to a method that would not need them, ``labeled:
false`` hides them (test-time methods never see labels anyway). Every problem with a file is a one-line
:class:`~mergesmith.errors.RecipeError` naming the file and, where it applies, the line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergesmith.errors import RecipeError
from mergesmith.io.cache import zoo_dir

FORMATS = (".jsonl", ".csv")
ZOO_ONLY_KEYS = ("task", "split", "quick")
INT_TEXT = re.compile(r"[+-]?\d+")
MAX_LENGTH = 64  # tokens per example unless the recipe's data: sets max_length


class DataSpec(BaseModel):
    """Where a model's examples come from: ``path:`` (a .jsonl or .csv file) or ``zoo:`` + ``task:`` (+ ``split:``)."""

    model_config = ConfigDict(extra="forbid")
    path: str | None = None
    zoo: str | None = None  # a zoo built into the cache folder (mergesmith.io.cache.zoo_dir), e.g. text8
    task: str | None = None
    split: Literal["train", "val", "test"] | None = None  # zoo: only; default train
    quick: bool | None = None  # zoo: only; the quick zoo (mergesmith zoo build text8 --quick)
    text_column: str = "text"
    label_column: str = "label"
    limit: int | None = Field(default=None, ge=1)
    max_length: int = Field(default=MAX_LENGTH, ge=1)
    labeled: bool | None = None  # None: the method's DataNeed decides

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.path is None) == (self.zoo is None):
            raise ValueError(
                "give either `path:` (a .jsonl or .csv file) or `zoo:` with `task:`, not both or neither"
            )
        if self.zoo is not None and not self.task:
            raise ValueError(f"`zoo: {self.zoo}` needs `task:` (one of the zoo's tasks)")
        stray = [k for k in ZOO_ONLY_KEYS if getattr(self, k) is not None] if self.path is not None else []
        if stray:
            raise ValueError(f"`{stray[0]}:` goes with `zoo:`, not with `path:`")
        return self

    def file(self) -> Path:
        """The file the examples are read from (a zoo split is ``<zoo>/data/<task>/<split>.jsonl``)."""
        if self.path is not None:
            return Path(self.path)
        return zoo_dir(str(self.zoo), bool(self.quick)) / "data" / str(self.task) / f"{self.split_name}.jsonl"

    @property
    def split_name(self) -> str:
        return self.split or "train"


@dataclass
class Examples:
    """Texts and, when needed, class ids; ``label_names[i]`` is the string label that became id ``i``."""

    texts: list[str]
    labels: list[int] | None
    label_names: list[str] | None
    file: Path
    sha256: str

    def report(self) -> dict[str, Any]:
        """What the manifest records about these examples."""
        out: dict[str, Any] = {
            "file": str(self.file),
            "sha256": self.sha256,
            "examples": len(self.texts),
            "labeled": self.labels is not None,
        }
        if self.label_names is not None:
            out["label_ids"] = {name: i for i, name in enumerate(self.label_names)}
        return out


def read_examples(spec: DataSpec, need_labels: bool, where: str = "") -> Examples:
    """Read and check ``spec``'s file; the first ``limit`` examples. Raises one-line RecipeErrors."""
    path = spec.file()
    shown = spec.path if spec.path is not None else str(path)
    prefix = f"{where}: {shown}" if where else shown
    if spec.zoo is not None and not path.exists():
        raise RecipeError(
            f"{prefix}: not found; the {spec.zoo} zoo has no '{spec.task}' {spec.split_name} split here "
            f"(build it with `mergesmith zoo build {spec.zoo}{' --quick' if spec.quick else ''}`)"
        )
    if path.suffix.lower() not in FORMATS:
        raise RecipeError(f"{prefix}: unknown data format '{path.suffix}' (use a .jsonl or .csv file)")
    if not path.is_file():
        raise RecipeError(f"{prefix}: data file not found")
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")
    except OSError as e:
        raise RecipeError(f"{prefix}: cannot read the data file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{prefix}: not UTF-8 text (byte {e.start})") from None
    rows = _jsonl_rows(text, prefix) if path.suffix.lower() == ".jsonl" else _csv_rows(text, prefix)
    if not rows:
        raise RecipeError(f"{prefix}: no examples (the file is empty)")
    texts: list[str] = []
    raw_labels: list[tuple[int, Any]] = []
    for line, row in rows:
        value = row.get(spec.text_column)
        if value is None:
            raise RecipeError(
                f"{prefix}: line {line} has no '{spec.text_column}' column (columns: "
                f"{', '.join(map(str, row)) or 'none'}); set text_column:"
            )
        if not isinstance(value, str) or not value.strip():
            raise RecipeError(
                f"{prefix}: line {line}: empty text"
                if isinstance(value, str)
                else f"{prefix}: line {line}: '{spec.text_column}' must be a string, got {value!r}"
            )
        texts.append(value)
        if need_labels:
            label = row.get(spec.label_column)
            if spec.label_column not in row:
                raise RecipeError(
                    f"{prefix}: line {line} has no '{spec.label_column}' column (columns: "
                    f"{', '.join(map(str, row))}); the method needs labels: set label_column:"
                )
            if label is None or label == "":
                raise RecipeError(f"{prefix}: line {line}: no label (the method needs labels)")
            raw_labels.append((line, label))
    if spec.limit is not None and len(texts) < spec.limit:
        raise RecipeError(f"{prefix}: {len(texts)} examples, the recipe asks for {spec.limit} (limit)")
    labels, names = _class_ids(raw_labels, prefix) if need_labels else (None, None)
    end = spec.limit if spec.limit is not None else len(texts)
    return Examples(
        texts[:end],
        labels[:end] if labels is not None else None,
        names,
        path,
        hashlib.sha256(raw).hexdigest(),
    )


def _jsonl_rows(text: str, prefix: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{prefix}: line {number} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise RecipeError(f'{prefix}: line {number} is not a JSON object ({{"text": ..., "label": ...}})')
        rows.append((number, row))
    return rows


def _csv_rows(text: str, prefix: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines())
    rows = []
    try:
        for row in reader:
            # cells missing from a short row are None; a long row's extra cells (key None) are dropped
            rows.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
    except csv.Error as e:
        raise RecipeError(f"{prefix}: line {reader.line_num} is not valid CSV ({e})") from None
    return rows


def _class_ids(raw: list[tuple[int, Any]], prefix: str) -> tuple[list[int], list[str] | None]:
    """Integer labels (ints, or strings of digits as CSV cells are) are class ids; otherwise every label is a name,
    and names get ids in sorted order."""
    for line, value in raw:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise RecipeError(f"{prefix}: line {line}: label {value!r} must be an int (class id) or a string")
    if all(isinstance(v, int) or INT_TEXT.fullmatch(v.strip()) for _, v in raw):
        ids = [int(v) for _, v in raw]
        for (line, _), i in zip(raw, ids):
            if i < 0:
                raise RecipeError(f"{prefix}: line {line}: label {i} is negative (class ids start at 0)")
        return ids, None
    names = sorted({str(v) for _, v in raw})
    index = {name: i for i, name in enumerate(names)}
    return [index[str(v)] for _, v in raw], names
