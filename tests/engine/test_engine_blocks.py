"""The engine's memory bound and thread safety: large tensors of elementwise methods are merged in row blocks.

With the block size lowered to a few hundred elements, the tiny Llamas' embeddings (2048 elements) and MLP
weights are split into blocks. The merged output must equal the whole-tensor merge (bit for bit, except DARE
whose drop masks are drawn per block), no rule call may see more than one block's worth of elements, no more
than ``threads`` rule calls may run at once, and 1 and 4 threads must write identical files.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading

import pytest
import torch
import yaml

from mergesmith.api import merge
from mergesmith.engine import execute as engine
from mergesmith.engine.plan import Job, Plan
from mergesmith.methods import get_method
from tests.helpers import load_tensors

BLOCK = 256

RECIPES = {
    "linear": ({"merge_method": "linear"}, {"weight": 0.7}),
    "task_arithmetic": ({"merge_method": "task_arithmetic", "parameters": {"lambda": 0.8}}, {"weight": 0.5}),
    "ties_paper": ({"merge_method": "ties", "parameters": {"density": 0.3}}, {"weight": 1.0}),
    "ties_mergekit": (
        {"merge_method": "ties", "compat": "mergekit", "parameters": {"normalize": True}},
        {"weight": 1.0, "density": 0.4},
    ),
    "dare_ties_mergekit": (
        {"merge_method": "dare_ties", "compat": "mergekit", "seed": 3},
        {"weight": 1.0, "density": 0.6},
    ),
    "dare_linear": ({"merge_method": "dare_linear", "seed": 5}, {"weight": 1.0, "density": 0.7}),
}


def _recipe(llamas, name: str) -> dict:
    top, per_model = RECIPES[name]
    recipe = {**top, "models": [{"model": str(llamas[k]), "parameters": per_model} for k in ("a", "b", "c")]}
    if top["merge_method"] != "linear":
        recipe["base_model"] = str(llamas["base"])
    return recipe


def _merge(llamas, tmp_path, name: str, block: int, threads: int, monkeypatch, tag: str) -> dict:
    monkeypatch.setattr(engine, "PART_ELEMENTS", block)
    path = tmp_path / f"{name}-{tag}.yaml"
    path.write_text(yaml.safe_dump(_recipe(llamas, name)))
    out = tmp_path / f"out-{name}-{tag}"
    merge(path, out, threads=threads, progress=False)
    return load_tensors(out)


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties_paper", "ties_mergekit"])
def test_blocks_equal_whole_tensors(llamas, tmp_path, monkeypatch, name):
    whole = _merge(llamas, tmp_path, name, 10**9, 1, monkeypatch, "whole")
    blocks = _merge(llamas, tmp_path, name, BLOCK, 3, monkeypatch, "blocks")
    assert whole.keys() == blocks.keys()
    for key in whole:
        assert torch.equal(whole[key], blocks[key]), key


@pytest.mark.parametrize("name", ["dare_ties_mergekit", "dare_linear"])
def test_random_blocks_are_reproducible_across_threads(llamas, tmp_path, monkeypatch, name):
    one = _merge(llamas, tmp_path, name, BLOCK, 1, monkeypatch, "t1")
    four = _merge(llamas, tmp_path, name, BLOCK, 4, monkeypatch, "t4")
    assert all(torch.equal(one[k], four[k]) for k in one)


def test_dare_l1_rescale_over_blocks_matches_whole_tensor_norms(llamas, tmp_path, monkeypatch):
    """mergekit's L1 rescale must use the whole tensor's norms even when the tensor arrives in blocks."""
    from mergesmith.io.reader import CheckpointSource

    out = _merge(llamas, tmp_path, "dare_ties_mergekit", BLOCK, 2, monkeypatch, "l1")
    # one expert alone: θ = θ₀ + τ ⊙ m · ‖τ‖₁/‖τ ⊙ m‖₁, so the merged task vector's L1 norm equals ‖τ‖₁ per tensor
    recipe = _recipe(llamas, "dare_ties_mergekit")
    recipe["models"] = recipe["models"][:1]
    path = tmp_path / "single.yaml"
    path.write_text(yaml.safe_dump(recipe))
    merge(path, tmp_path / "single", threads=2, progress=False)
    single = load_tensors(tmp_path / "single")
    base, expert = CheckpointSource(llamas["base"]), CheckpointSource(llamas["a"])
    name = "model.embed_tokens.weight"  # 2048 elements: 8 blocks
    tau = expert.get(name).float() - base.get(name).float()
    merged_tau = single[name].float() - base.get(name).float()
    assert float(merged_tau.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5)
    assert (merged_tau != 0).float().mean() == pytest.approx(0.6, abs=0.05)
    assert out.keys() == single.keys()


def test_memory_bound_and_concurrency(llamas, tmp_path, monkeypatch):
    """No rule call sees more than one block of elements, and at most ``threads`` calls run at once."""
    method = get_method("ties")
    rule = method.rule
    largest, running, most = [0], [0], [0]
    lock = threading.Lock()

    def watched(base, experts, params, ctx):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            largest[0] = max(largest[0], max(e.numel() for e in experts))
        try:
            return rule(base, experts, params, ctx)
        finally:
            with lock:
                running[0] -= 1

    object.__setattr__(
        method, "rule", dataclasses.replace(rule, fn=watched)
    )  # the entry is a frozen dataclass
    try:
        out4 = _merge(llamas, tmp_path, "ties_mergekit", BLOCK, 4, monkeypatch, "watched")
    finally:
        object.__setattr__(method, "rule", rule)
    assert largest[0] <= BLOCK
    assert 1 <= most[0] <= 4
    out1 = _merge(llamas, tmp_path, "ties_mergekit", BLOCK, 1, monkeypatch, "serial")
    assert all(torch.equal(out1[k], out4[k]) for k in out1)


def test_blocks_of_a_tensor_cover_it_exactly(monkeypatch):
    monkeypatch.setattr(engine, "PART_ELEMENTS", 20)
    plan = Plan(get_method("linear"), [], 0)
    parts = engine.parts_of(plan, Job("w", torch.float32, (10, 7), None, [], {}, None))
    assert parts[0][0] == 0 and parts[-1][1] == 10
    assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
    assert all((r1 - r0) * 7 <= 20 for r0, r1 in parts)
    # methods that need whole tensors (SVD, norms) are never split
    assert engine.parts_of(
        Plan(get_method("tsv"), [], 0), Job("w", torch.float32, (10, 7), None, [], {}, None)
    ) == [None]


def test_input_hash_cache(tmp_path, monkeypatch):
    """Input digests are remembered by file identity and mtime; a rewritten file is hashed again."""
    import os

    from mergesmith.io import writer

    monkeypatch.setenv("MERGESMITH_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    first = writer.input_sha256(f)
    assert first == writer.sha256_file(f)
    calls = []
    real = writer.sha256_file
    monkeypatch.setattr(writer, "sha256_file", lambda p: calls.append(p) or real(p))
    assert writer.input_sha256(f) == first and calls == []  # from the cache
    f.write_bytes(b"abd" * 1000)
    os.utime(f, ns=(1, 1))
    assert writer.input_sha256(f) == real(f) != first and len(calls) == 1


def test_in_memory_merge_assembles_blocks(llamas, monkeypatch):
    """merge_state_dicts (no file to write blocks into) assembles the blocks into whole tensors."""
    from mergesmith.api import merge_state_dicts
    from mergesmith.io.reader import CheckpointSource

    states = {
        k: {n: CheckpointSource(p).get(n).clone() for n in CheckpointSource(p).keys()}
        for k, p in llamas.items()
    }
    experts = [states[k] for k in ("a", "b", "c")]
    whole = merge_state_dicts(states["base"], experts, "ties", density=0.3, threads=1)
    monkeypatch.setattr(engine, "PART_ELEMENTS", BLOCK)
    blocks = merge_state_dicts(states["base"], experts, "ties", density=0.3, threads=3)
    assert whole.keys() == blocks.keys() and all(torch.equal(whole[k], blocks[k]) for k in whole)


def test_allocator_keeps_freed_blocks_on_glibc():
    """Block temporaries are reused instead of being unmapped and page-faulted in again (glibc's mallopt)."""
    import platform

    from mergesmith.engine.execute import keep_freed_blocks

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_blocks() is glibc
    assert keep_freed_blocks() is glibc  # idempotent


def test_streaming_digest_matches_the_file_for_out_of_order_threaded_writes(tmp_path):
    """The shard's sha256 is advanced while blocks arrive in any order from several threads; it must equal the
    digest of the finished file, and a shard with an unreported range falls back to hashing the file."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    from mergesmith.io.safetensors_io import ShardWriter
    from mergesmith.io.writer import sha256_file

    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"t{i}": torch.randn(rows, 300, generator=gen).to(torch.bfloat16)
        for i, rows in enumerate([700, 1, 0, 2000, 37])
    }
    writer = ShardWriter(
        tmp_path / "a.safetensors",
        [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()],
        {"format": "pt"},
    )
    writer.digest.CHUNK = 4096  # many chunks per range
    blocks = [(n, r, t[r : r + 50]) for n, t in tensors.items() for r in range(0, max(t.shape[0], 1), 50)]
    random.Random(1).shuffle(blocks)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda b: writer.write(b[0], b[2], b[1]), blocks))
    writer.close()
    assert writer.sha256() == sha256_file(tmp_path / "a.safetensors")

    partial = ShardWriter(tmp_path / "b.safetensors", [("x", torch.float32, (4, 4))], {"format": "pt"})
    partial.write("x", torch.ones(2, 4), 0)  # rows 2..3 never written
    partial.close()
    assert partial.sha256() is None


def test_output_layout_follows_the_merge_order_and_not_the_threads(llamas, tmp_path, monkeypatch):
    """Large per-tensor-statistics tensors come first in the shard, largest first, then the rest in model order
    (the digest advances while the merge runs); the bytes do not depend on the thread count."""
    import json
    import math
    import struct

    monkeypatch.setattr(engine, "PART_ELEMENTS", BLOCK)
    files = {}
    for threads in (1, 3):
        path = tmp_path / f"ties-{threads}.yaml"
        path.write_text(yaml.safe_dump(_recipe(llamas, "ties_mergekit")))
        merge(path, tmp_path / f"out{threads}", threads=threads, progress=False)
        files[threads] = (tmp_path / f"out{threads}" / "model.safetensors").read_bytes()
    assert files[1] == files[3]
    raw = files[1]
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    header.pop("__metadata__")
    order = sorted(header, key=lambda n: header[n]["data_offsets"][0])
    size = {n: math.prod(header[n]["shape"]) for n in header}
    big = [n for n in order if size[n] > BLOCK]
    assert order[: len(big)] == big and [size[n] for n in big] == sorted((size[n] for n in big), reverse=True)
    model_order = list(load_tensors(llamas["a"]))  # the checkpoint's own order (the plan's)
    rest = [n for n in order if size[n] <= BLOCK]
    assert rest == [n for n in model_order if n in rest]
