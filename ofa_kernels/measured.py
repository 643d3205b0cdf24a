"""Lookups in the tables measured on GPUs (``ops/auto_backends.json``, ``triton/tuned.json``): the
architecture key of a device and the nearest-measured-width rule (one home for both)."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch


@functools.lru_cache(maxsize=64)
def gpu_arch(device: torch.device) -> str:
    """"sm90" for an H100/H200, "sm80" for an A100; "interpreter" off CUDA (Triton's CPU interpreter)."""
    if device.type != "cuda":
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def nearest_measured(widths: Iterable[int], width: int) -> int:
    """The measured width that stands for ``width``: the largest at or below it, else the smallest one."""
    measured = sorted(widths)
    if not measured:
        raise ValueError("nothing was measured")
    below = [w for w in measured if w <= width]
    return below[-1] if below else measured[0]
