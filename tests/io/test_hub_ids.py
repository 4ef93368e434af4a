"""Hub model ids (``org/name``, ``org/name@revision``) in recipes, resolved from a local Hugging Face cache folder
with ``HF_HUB_OFFLINE=1`` (never the network)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from mergesmith import merge
from mergesmith.cli import main
from mergesmith.errors import CheckpointError
from mergesmith.io.hub import hub_id, resolve_model
from tests.helpers import load_tensors

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


def cache_model(cache: Path, repo: str, folder: Path, commit: str = COMMIT, ref: str | None = "main") -> Path:
    """Lay ``folder``'s files out as the Hub cache does: models--org--name/snapshots/<commit>/, refs/<ref>."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    if ref is not None:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, llamas, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache_model(cache, "org/base", llamas["base"])
    cache_model(cache, "org/a", llamas["a"])
    cache_model(cache, "org/a", llamas["c"], commit=OLD, ref=None)  # an older revision of org/a
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_ids_are_recognised_but_local_paths_win(tmp_path, monkeypatch):
    assert hub_id("org/name") == ("org/name", None)
    assert hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert hub_id("./org/name") is None and hub_id("/abs/path") is None and hub_id("single") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_id("org/name") is None  # an existing local folder of that spelling


def test_merge_with_hub_ids_equals_merge_with_local_folders(hub, llamas, tmp_path):
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "org/base",
        "parameters": {"lambda": 0.5},
        "models": [{"model": "org/a"}, {"model": f"org/a@{OLD}"}],
    }
    merge(recipe, tmp_path / "hub-out", progress=False)
    local = {
        **recipe,
        "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas["a"])}, {"model": str(llamas["c"])}],
    }
    merge(local, tmp_path / "local-out", progress=False)
    got, want = load_tensors(tmp_path / "hub-out"), load_tensors(tmp_path / "local-out")
    assert got.keys() == want.keys() and all(bool((got[k] == want[k]).all()) for k in got)
    card = (tmp_path / "hub-out" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["org/base", "org/a", f"org/a@{OLD}"]  # ids as written, no cache paths
    written = yaml.safe_load((tmp_path / "hub-out" / "mergesmith_recipe.yaml").read_text())
    assert written["base_model"] == "org/base"


def test_offline_miss_is_one_line_and_writes_nothing(hub, tmp_path, capsys):
    with pytest.raises(
        CheckpointError, match="HF_HUB_OFFLINE is set and org/missing is not in the Hugging Face"
    ):
        resolve_model("org/missing")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump({"merge_method": "linear", "models": [{"model": "org/a"}, {"model": "org/missing"}]})
    )
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "hf download org/missing" in err[0]
    assert not (tmp_path / "out").exists()


def test_pickle_only_snapshot_needs_allow_pickle(hub, tmp_path):
    import torch

    from tests.helpers import load_tensors as tensors_of

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(
        tensors_of(Path(hub / "models--org--base" / "snapshots" / COMMIT)), pickled / "pytorch_model.bin"
    )
    (pickled / "config.json").write_text(
        (hub / "models--org--base" / "snapshots" / COMMIT / "config.json").read_text()
    )
    cache_model(hub, "org/pickled", pickled)
    with pytest.raises(CheckpointError, match="no safetensors weights; pass --allow-pickle"):
        resolve_model("org/pickled")
    assert (resolve_model("org/pickled", allow_pickle=True) / "pytorch_model.bin").exists()
