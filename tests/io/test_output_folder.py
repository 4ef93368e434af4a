"""Hostile and broken inputs, interrupted runs, locks, resume, verify, reproducibility.

Every broken input is generated here and must give its own one-line error, exit status 2 from the CLI, no
traceback, and leave nothing behind (neither the output nor the hidden partial folder).
"""

from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mergesmith import CheckpointError, MergeError, merge
from mergesmith.io.safetensors_io import save_file
from tests.helpers import build_llama, load_tensors

ROOT = Path(__file__).resolve().parents[2]


def linear_recipe(*models: Path) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m)} for m in models]}


def assert_clean(folder: Path, keep: tuple[str, ...] = ()) -> None:
    leftovers = sorted(p.name for p in folder.iterdir() if p.name not in keep)
    assert leftovers == [], leftovers


# -- a corpus of broken checkpoint files ----------------------------------------------------------------------
def valid_file(path: Path) -> bytes:
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}, path)
    return path.read_bytes()


def with_header(header: dict, data: bytes = b"\0" * 40) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


CORRUPT = {
    "empty file": (lambda good: b"", "shorter than 8 bytes"),
    "truncated data": (lambda good: good[:-9], "do not fit its shape"),
    "truncated header": (lambda good: good[:20], "corrupt or truncated safetensors header"),
    "huge header length": (lambda good: struct.pack("<Q", 2**40) + good[8:], "corrupt or truncated"),
    "header not JSON": (lambda good: struct.pack("<Q", 10) + b"{not json}" + b"\0" * 8, "not JSON"),
    "header not an object": (lambda good: struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    "offsets past the end": (
        lambda good: with_header({"a": {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]}}),
        "do not fit",
    ),
    "overlapping tensors": (
        lambda good: with_header(
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            }
        ),
        "overlap",
    ),
    "unknown dtype": (
        lambda good: with_header({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}),
        "unsupported dtype 'F33'",
    ),
    "malformed entry": (lambda good: with_header({"a": {"dtype": "F32"}}), "malformed header entry"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_safetensors(case, tmp_path, llamas):
    make, message = CORRUPT[case]
    good = valid_file(tmp_path / "good.safetensors")
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "model.safetensors").write_bytes(make(good))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(CheckpointError, match=message) as info:
        merge(linear_recipe(llamas["a"], bad_dir), work / "out", progress=False)
    assert "\n" not in str(info.value) and "bad/model.safetensors" in str(info.value)
    assert_clean(work)


def sharded_copy(src: Path, dst: Path) -> Path:
    merge(linear_recipe(src), dst, shard_size="40KB", progress=False)
    return dst


def test_index_points_at_missing_shard(tmp_path, llamas):
    model = sharded_copy(llamas["a"], tmp_path / "sharded")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (model / victim).unlink()
    with pytest.raises(CheckpointError, match=f"points to missing shard '{victim}'"):
        merge(linear_recipe(llamas["b"], model), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_index_names_the_wrong_shard(tmp_path, llamas):
    model = sharded_copy(llamas["a"], tmp_path / "sharded")
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    index["weight_map"][name] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"'{name}' is listed in shard '{other}' but not stored there"):
        merge(linear_recipe(llamas["b"], model), tmp_path / "out", progress=False)


def test_index_not_json(tmp_path, llamas):
    model = sharded_copy(llamas["a"], tmp_path / "sharded")
    (model / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not a valid index"):
        merge(linear_recipe(llamas["b"], model), tmp_path / "out", progress=False)


# -- values ---------------------------------------------------------------------------------------------------
def test_nonfinite_refused_unless_allowed(tmp_path, llamas):
    def poison(tensors):
        tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")

    bad = tmp_path / "nan"
    bad.mkdir()
    tensors = load_tensors(llamas["a"])
    poison(tensors)
    save_file(tensors, bad / "model.safetensors")
    (bad / "config.json").write_text((llamas["a"] / "config.json").read_text())
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(
        CheckpointError, match=r"tensor 'model\.layers\.1\.mlp\.down_proj\.weight' contains NaN or Inf"
    ):
        merge(linear_recipe(llamas["b"], bad), work / "out", progress=False)
    assert_clean(work)
    merge(linear_recipe(llamas["b"], bad), work / "out", allow_nonfinite=True, progress=False)
    assert torch.isnan(load_tensors(work / "out")["model.layers.1.mlp.down_proj.weight"][0, 0])


def test_dtype_mix_merges_in_fp32(tmp_path, llamas, bf16_llamas):
    """A bf16 model and an fp32 model of the same architecture: computed in fp32, written in the base's dtype."""
    bf16_a = build_llama(tmp_path / "bf16_a", 1, llamas["base"], dtype=torch.bfloat16)
    merge(linear_recipe(bf16_a, llamas["b"]), tmp_path / "out", progress=False)
    out, a, b = (load_tensors(p) for p in (tmp_path / "out", bf16_a, llamas["b"]))
    name = "model.layers.0.self_attn.o_proj.weight"
    assert out[name].dtype == torch.bfloat16  # the first model is the reference for linear
    assert torch.equal(out[name], ((a[name].float() + b[name]) / 2).to(torch.bfloat16))


# -- output location ------------------------------------------------------------------------------------------
def test_unwritable_location(llamas):
    with pytest.raises(MergeError) as info:
        merge(linear_recipe(llamas["a"], llamas["b"]), "/proc/mergesmith-out", progress=False)
    assert "\n" not in str(info.value)


def test_output_is_a_file(tmp_path, llamas):
    (tmp_path / "out").write_text("x")
    with pytest.raises(MergeError, match="exists and is not a folder"):
        merge(linear_recipe(llamas["a"], llamas["b"]), tmp_path / "out", progress=False)


@pytest.fixture
def tiny_fs(tmp_path):
    mount = tmp_path / "fs"
    mount.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=120k", "tmpfs", str(mount)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE test covers the write path")
    yield mount
    # the unmount fails while any file on it is still open: a leaked descriptor is a bug
    assert subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0, (
        "a file on the output is still open"
    )


def test_refuses_to_start_without_disk_space(tiny_fs, llamas):
    with pytest.raises(
        MergeError, match=r"not enough free disk: the output needs 0\.00 GB, 0\.00 GB are free"
    ):
        merge(linear_recipe(llamas["a"], llamas["b"]), tiny_fs / "out", progress=False)
    assert_clean(tiny_fs)


def test_disk_full_mid_write(tiny_fs, llamas, monkeypatch):
    from mergesmith.api import pipeline

    monkeypatch.setattr(pipeline, "check_free_space", lambda folder, needed: None)  # let it run out for real
    with pytest.raises(MergeError, match="writing the output failed \\(No space left on device\\)"):
        merge(linear_recipe(llamas["a"], llamas["b"]), tiny_fs / "out", shard_size="40KB", progress=False)
    assert_clean(tiny_fs)


def test_file_size_limit_mid_write(tmp_path, llamas):
    """RLIMIT_FSIZE makes the kernel refuse writes past 60 KB: the merge fails cleanly, in a real process."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(linear_recipe(llamas["a"], llamas["b"])))
    work = tmp_path / "work"
    work.mkdir()
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000)); "
        "from mergesmith.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "merge", str(recipe), str(work / "out"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "File too large" in proc.stderr and "Traceback" not in proc.stderr
    assert_clean(work)


def test_lock_refuses_a_second_writer(tmp_path, llamas):
    from mergesmith.io.output import OutputLock

    with OutputLock(tmp_path / "out"), pytest.raises(MergeError, match="another merge is writing"):
        merge(linear_recipe(llamas["a"], llamas["b"]), tmp_path / "out", progress=False)


# -- interrupted runs, resume, verify --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_models(tmp_path_factory):
    """~12 M-parameter Llamas (50 MB each): a merge long enough to interrupt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("big")
    config = LlamaConfig(
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    paths = {}
    for i, name in enumerate(("base", "a", "b")):
        torch.manual_seed(i)
        LlamaForCausalLM(config).save_pretrained(root / name)
        paths[name] = root / name
    return paths


def ties_recipe_file(tmp_path: Path, models: dict[str, Path]) -> Path:
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(models["base"]),
                "models": [{"model": str(models["a"])}, {"model": str(models["b"])}],
            }
        )
    )
    return recipe


def start_merge(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mergesmith",
            "merge",
            str(recipe),
            str(out),
            "--quiet",
            "--shard-size",
            "2MB",
            "--threads",
            "1",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        # a shell that runs the tests in the background (`make test &`, nohup) starts them with SIGINT ignored, and
        # the child would inherit that: Python then installs no KeyboardInterrupt handler and the merge runs on
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_shards(out: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    journal = out.parent / f".{out.name}.partial" / "journal.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the merge finished before it could be interrupted"
        try:
            if len(json.loads(journal.read_text())["shards"]) >= count:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    raise AssertionError("no shard finished in time")


def test_kill_then_resume(tmp_path, big_models):
    recipe = ties_recipe_file(tmp_path, big_models)
    out = tmp_path / "out"
    proc = start_merge(recipe, out)
    wait_for_shards(out, 3, proc)
    proc.kill()  # SIGKILL: no cleanup can run
    proc.wait()
    assert not out.exists()
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "mergesmith",
            "merge",
            str(recipe),
            str(out),
            "--quiet",
            "--shard-size",
            "2MB",
            "--resume",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed:" in resumed.stdout and "finished shards reused" in resumed.stdout
    assert json.loads((out / "manifest.json").read_text())["resumed_shards"] >= 3
    # a clean run gives the same bytes in every shard
    merge(recipe, tmp_path / "clean", shard_size="2MB", progress=False)
    for shard in sorted(out.glob("model-*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "clean" / shard.name).read_bytes(), shard.name
    assert_clean(tmp_path, keep=("out", "clean", "ties.yaml"))


def test_resume_rejects_a_tampered_shard(tmp_path, big_models):
    recipe = ties_recipe_file(tmp_path, big_models)
    out = tmp_path / "out"
    proc = start_merge(recipe, out)
    wait_for_shards(out, 2, proc)
    proc.kill()
    proc.wait()
    partial = tmp_path / ".out.partial"
    finished = json.loads((partial / "journal.json").read_text())["shards"]
    first = sorted(finished)[0]
    data = bytearray((partial / first).read_bytes())
    data[-1] ^= 0xFF
    (partial / first).write_bytes(bytes(data))
    result = merge(recipe, out, shard_size="2MB", resume=True, progress=False)
    assert result.resumed_shards == len(finished) - 1  # the tampered shard was recomputed
    merge(recipe, tmp_path / "clean", shard_size="2MB", progress=False)
    assert (out / first).read_bytes() == (tmp_path / "clean" / first).read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_no_output(tmp_path, big_models, sig):
    recipe = ties_recipe_file(tmp_path, big_models)
    out = tmp_path / "out"
    proc = start_merge(recipe, out)
    # as soon as the partial folder's journal exists: the merge is then certainly still running (waiting for a
    # finished shard raced with the end of a merge whose last shards are written in a moment)
    wait_for_shards(out, 0, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted: no output was written" in stderr and "Traceback" not in stderr
    assert not out.exists()
    assert not (tmp_path / ".out.lock").exists()
    rerun = merge(recipe, out, shard_size="2MB", progress=False)  # without --resume: starts over, succeeds
    assert rerun.resumed_shards == 0 and not (tmp_path / ".out.partial").exists()


def test_verify(tmp_path, llamas):
    out = tmp_path / "out"
    merge(linear_recipe(llamas["a"], llamas["b"]), out, shard_size="40KB", progress=False)
    ok = subprocess.run(
        [sys.executable, "-m", "mergesmith", "verify", str(out)], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "OK" in ok.stdout
    shard = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    bad = subprocess.run(
        [sys.executable, "-m", "mergesmith", "verify", str(out)], capture_output=True, text=True
    )
    assert bad.returncode == 1 and f"{shard.name}: sha256 differs" in bad.stdout
    # only what is wrong: the index still matches the intact shards
    assert "index" not in bad.stdout, bad.stdout


# -- reproducibility ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,params", [("ties", {}), ("dare_ties", {"density": 0.5}), ("pcb", {}), ("della", {"density": 0.5})]
)
def test_byte_identical_across_thread_counts(tmp_path, llamas, method, params):
    recipe = {
        "merge_method": method,
        "base_model": str(llamas["base"]),
        "parameters": params,
        "seed": 11,
        "models": [{"model": str(llamas[k])} for k in ("a", "b", "c")],
    }
    merge(recipe, tmp_path / "t1", threads=1, shard_size="50KB", progress=False)
    merge(recipe, tmp_path / "t4", threads=4, shard_size="50KB", progress=False)
    files = sorted(p.name for p in (tmp_path / "t1").glob("model*"))
    assert files == sorted(p.name for p in (tmp_path / "t4").glob("model*")) and len(files) > 2
    for name in files:
        assert (tmp_path / "t1" / name).read_bytes() == (tmp_path / "t4" / name).read_bytes(), name
    m1 = json.loads((tmp_path / "t1" / "manifest.json").read_text())
    m4 = json.loads((tmp_path / "t4" / "manifest.json").read_text())
    assert m1["output_sha256"] == m4["output_sha256"]


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_nonfinite_in_a_late_block_is_refused_by_multi_pass_methods(tmp_path, llamas, monkeypatch, method):
    """Per-tensor statistics read a tensor several times; the NaN check runs on the first pass only and must still
    see every block (here the last one of a tensor split in row blocks)."""
    from mergesmith.engine import execute as engine

    monkeypatch.setattr(engine, "PART_ELEMENTS", 64)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors = load_tensors(llamas["a"])
    tensors[name][-1, -1] = float("inf")
    bad = tmp_path / "inf"
    bad.mkdir()
    save_file(tensors, bad / "model.safetensors")
    (bad / "config.json").write_text((llamas["a"] / "config.json").read_text())
    recipe = {
        "merge_method": method,
        "base_model": str(llamas["base"]),
        "models": [
            {"model": str(bad), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(llamas["b"]), "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "parameters": {"trim_scope": "tensor"}
        if method == "ties"
        else {"rescale": "l1", "sign_zero": "positive"},
    }
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(name)}' contains NaN or Inf"):
        merge(recipe, tmp_path / "out", progress=False)
