"""The output folder's life cycle: lock, partial folder with a resume journal, free-space check, final rename,
and ``verify``.

    OUT/                    appears only complete, by one rename at the end
    .OUT.lock               an flock held while a merge writes OUT (a second merge is refused)
    .OUT.partial/           the work in progress; journal.json records each finished shard's sha256

A merge that is killed leaves ``.OUT.partial`` behind, never OUT. ``--resume`` continues from it when the recipe,
options and input files are unchanged (the journal's fingerprint), reusing each finished shard only after its
sha256 is recomputed and matches. Without ``--resume`` a leftover partial folder is discarded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mergesmith.errors import CheckpointError, MergeError
from mergesmith.io.cache import write_json
from mergesmith.io.safetensors_io import SafetensorsFile
from mergesmith.io.writer import sha256_file

JOURNAL = "journal.json"


class OutputLock:
    """An exclusive, non-blocking flock on a sibling ``.OUT.lock`` file; released when the process dies."""

    def __init__(self, out: Path):
        self.path = out.parent / f".{out.name}.lock"
        self.fd = -1

    def __enter__(self) -> OutputLock:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MergeError(f"{self.path.parent}: cannot write here ({e.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise MergeError(
                f"{self.path.parent / self.path.name[1:-5]}: another merge is writing this output right now; "
                "wait for it or choose another output folder"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)


def fingerprint(recipe_yaml: str, options: dict[str, Any], input_files: list[Path]) -> str:
    """What must not change for a resume: the recipe, the options that shape the output, and each input file's
    size and modification time (cheap; finished shards are still verified by their sha256)."""
    digest = hashlib.sha256(recipe_yaml.encode())
    digest.update(json.dumps(options, sort_keys=True).encode())
    for path in sorted(input_files):
        st = path.stat()
        digest.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class PartialFolder:
    """``.OUT.partial``: created fresh, or reopened for ``--resume`` with its verified finished shards."""

    def __init__(self, out: Path, fingerprint_: str, resume: bool):
        self.path = out.parent / f".{out.name}.partial"
        self.fingerprint = fingerprint_
        self.finished: dict[str, str] = {}
        self.resumed_from = 0
        if resume and (self.path / JOURNAL).exists():
            self._reopen()
        elif self.path.exists():
            shutil.rmtree(self.path)
        try:
            self.path.mkdir(exist_ok=True)
        except OSError as e:
            raise MergeError(f"{out}: cannot create the output next to it ({e.strerror})") from None
        self._save()

    def _reopen(self) -> None:
        try:
            journal = json.loads((self.path / JOURNAL).read_text())
        except (OSError, json.JSONDecodeError):
            journal = {}
        if journal.get("fingerprint") != self.fingerprint:
            shutil.rmtree(self.path)  # the recipe, options or inputs changed: nothing can be reused
            return
        for file_name, digest in journal.get("shards", {}).items():
            shard = self.path / file_name
            if shard.exists() and sha256_file(shard) == digest:
                self.finished[file_name] = digest
        self.resumed_from = len(self.finished)

    def _save(self) -> None:
        write_json(self.path / JOURNAL, {"fingerprint": self.fingerprint, "shards": self.finished}, indent=1)

    def shard_done(self, file_name: str, digest: str) -> None:
        self.finished[file_name] = digest
        self._save()

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def publish(self, out: Path) -> None:
        """Rename into place; an existing OUT (with --force) is moved aside first and removed after."""
        (self.path / JOURNAL).unlink(missing_ok=True)
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            self.path.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            self.path.rename(out)


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise MergeError(
            f"{folder}: not enough free disk: the output needs {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB are free; "
            "free space or choose another output location"
        )


def verify(out: Path) -> list[str]:
    """Recheck an output folder against its manifest: every shard's sha256, the safetensors headers, and the
    index. Returns a list of problems (empty when the folder is intact)."""
    out = Path(out)
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        raise MergeError(f"{out}: no manifest.json (not a mergesmith output folder)")
    try:
        manifest = json.loads(manifest_path.read_text())
        shards: dict[str, str] = manifest["output_sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise MergeError(f"{manifest_path}: unreadable manifest (no output_sha256)") from None
    problems = []
    names: set[str] = set()
    intact: set[str] = set()  # the index is compared with these shards only: a bad shard is reported once
    for file_name, digest in shards.items():
        path = out / file_name
        if not path.exists():
            problems.append(f"{file_name}: missing")
            continue
        if sha256_file(path) != digest:
            problems.append(f"{file_name}: sha256 differs from the manifest (modified or corrupt)")
            continue
        try:
            names |= set(SafetensorsFile(path).keys())
            intact.add(file_name)
        except CheckpointError as e:
            problems.append(str(e))
    index = out / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        if {n for n, f in weight_map.items() if f in intact} != names:
            problems.append("model.safetensors.index.json: its tensor list differs from the shards' contents")
        if set(weight_map.values()) - set(shards):
            problems.append("model.safetensors.index.json: names a shard the manifest does not list")
    return problems


@contextlib.contextmanager
def atomic_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """Write a folder that appears only complete: yields the hidden ``.OUT.partial`` sibling to write into, renames
    it to ``out`` when the block ends, and removes it on any error or interrupt (nothing to resume). The same lock,
    partial folder and rename as a merge's output."""
    out = Path(out)
    if out.parent.exists() and not out.parent.is_dir():
        raise MergeError(f"{out}: {out.parent} is not a folder; choose another output path")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise MergeError(f"{out}: exists and is not an empty folder; pass force=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):
        partial = PartialFolder(out, "", resume=False)
        try:
            yield partial.path
        except BaseException:
            partial.discard()
            raise
        partial.publish(out)


def file_digests(folder: Path, suffix: str = ".safetensors") -> dict[str, str]:
    """sha256 of every ``suffix`` file in ``folder`` (a manifest's ``output_sha256``, which ``verify`` checks)."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).glob(f"*{suffix}"))}
