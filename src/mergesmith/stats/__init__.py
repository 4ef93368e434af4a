"""Statistics collectors: they run each expert on its own task's examples and measure what a merge rule needs
(Fisher diagonals for Fisher merging, input Gram matrices of the linear layers for RegMean).

Shared helpers live here: the seeded example sample every collector draws, and eval mode for the shared module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mergesmith.zoo.models import Encoded


def sample_examples(data: Encoded, n_examples: int, seed: int) -> Encoded:
    """``n_examples`` examples drawn without replacement with a seeded permutation (all of them, in a seeded
    order, when fewer are given), trimmed to the longest one."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.batch(order[: min(n_examples, len(data))])


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Statistics are measured on the deterministic network (no dropout); the module's mode is restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
