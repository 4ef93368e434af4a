"""Where the per-tensor rules run: ``--device cpu | cuda | cuda:N | mps | auto``.

Tensors are read on the CPU (memory-mapped), moved to the device as stored (bf16 crosses the bus at half the
bytes of fp32), merged there in the compute dtype, cast to the output dtype there and moved back for writing.
Random masks are drawn on the CPU from the same seeded generators, so a seed gives the same masks on every
device; the arithmetic itself agrees with the CPU's to fp32 rounding (different kernels sum in different orders).
A data-driven method's fit (training, statistics over data) still runs on the CPU; its tensors reach the rules on
the device.
"""

from __future__ import annotations

import torch

from mergesmith.errors import MergeError

CPU = torch.device("cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device ``name`` means on this machine, or a one-line error saying why it cannot be used."""
    if name is None:
        return CPU
    if str(name) == "auto":  # mergekit's auto: the GPU when there is one
        return torch.device("cuda", 0) if torch.cuda.is_available() else CPU
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise MergeError(f"--device: '{name}' is not a device; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cpu":
        return CPU
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeError(
                f"--device {name}: this torch cannot use a CUDA GPU (torch.cuda.is_available() is False: a CPU "
                "build of torch, or no GPU driver); install a CUDA build of torch, or leave --device out"
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise MergeError(
                f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1})"
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise MergeError(
                f"--device {name}: this torch cannot use Apple's MPS (not a Mac with an MPS build)"
            )
        return device
    raise MergeError(f"--device {name}: merging runs on cpu, cuda or mps, not {device.type}")


def describe_device(device: torch.device) -> str:
    """``cpu``, or the device with its model name (for the manifest)."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
