"""Fitness kinds for the evolve tests, named by import path (``tests.drivers.evolve_kinds:closeness``) so that
Ray workers build them too: closeness to a target model's weights (cheap, exact, with a known optimum), one that
kills its worker process the first time it runs, and one that returns NaN."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def closeness(settings: dict[str, Any], spec: Any):
    """−mean squared distance to ``target``'s weights (0 at the target)."""
    target: dict[str, torch.Tensor] = {}
    for f in sorted(Path(settings["target"]).glob("*.safetensors")):
        target.update(load_file(f))

    def score(state, config) -> float:
        total = sum(float((state[n].float() - t.float()).pow(2).mean()) for n, t in target.items())
        return -total / len(target)

    return score


def dies_once(settings: dict[str, Any], spec: Any):
    """``closeness``, but the first evaluation (across every worker: a marker file) kills its own process."""
    marker = Path(settings.pop("marker"))
    inner = closeness(settings, spec)

    def score(state, config) -> float:
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return inner(state, config)

    return score


def not_finite(settings: dict[str, Any], spec: Any):
    return lambda state, config: math.nan


def layers_near(settings: dict[str, Any], spec: Any):
    """For data-flow searches: −|layer count − ``layers``| − a small penalty on the branch-output scales' distance
    from 1 (the candidate's config gives its layer count)."""
    goal = int(settings["layers"])

    def score(state, config) -> float:
        return -abs(config["num_hidden_layers"] - goal)

    return score
