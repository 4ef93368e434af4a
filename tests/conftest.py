"""Shared fixtures: tiny Llama checkpoints built locally with random init (no downloads)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers import build_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the tests never write into the user's cache (input hashes, zoos)
os.environ.setdefault("MERGESMITH_CACHE", tempfile.mkdtemp(prefix="mergesmith-test-cache-"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only waits, and on a busy machine its spinning made a module ~8×
    slower (3.6 s with one thread, 27 s with two next to a training job). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def llamas(tmp_path_factory) -> dict[str, Path]:
    """base + three fine-tunes (float32, untied, 4 layers)."""
    root = tmp_path_factory.mktemp("llamas")
    base = build_llama(root / "base", 0)
    return {
        "base": base,
        **{name: build_llama(root / name, seed, base) for name, seed in (("a", 1), ("b", 2), ("c", 3))},
    }


@pytest.fixture(scope="session")
def tied_llamas(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tied")
    base = build_llama(root / "base", 10, tied=True)
    return {
        "base": base,
        "a": build_llama(root / "a", 11, base, tied=True),
        "b": build_llama(root / "b", 12, base, tied=True),
    }


@pytest.fixture(scope="session")
def bf16_llamas(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bf16")
    base = build_llama(root / "base", 20, dtype=torch.bfloat16)
    return {
        "base": base,
        "a": build_llama(root / "a", 21, base, dtype=torch.bfloat16),
        "b": build_llama(root / "b", 22, base, dtype=torch.bfloat16),
    }


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """A two-task text zoo on a tiny random BERT (tests/bench/zoo_fixtures.py): base, experts, heads, splits."""
    from tests.bench.zoo_fixtures import build_tiny_zoo

    return build_tiny_zoo(tmp_path_factory.mktemp("zoo"))
