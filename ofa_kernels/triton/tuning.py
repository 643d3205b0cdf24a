"""The measured launch table of the Triton norm kernels: which knobs won, per GPU, kernel, dtype, width.

``tuned.json`` (written by ``benchmarks/tune_norm.py --write-table`` on a GPU) maps

    arch ("sm90", ...) -> kernel ("fwd", "bwd", "bwd_bwd") -> dtype ("bfloat16", ...) -> width -> knobs

with knobs among ``rows_per_program``, ``num_warps``, ``programs_per_sm``, ``max_block_n`` (a chunk cap:
below the width it selects the looped path) and ``reduce_in_kernel``. A width between two measured
ones takes the knobs of the nearest measured width at or below it (the smallest one below that),
with ``rows_per_program`` scaled so a program's tile keeps the measured number of elements. Nothing
measured for a GPU, kernel or dtype: the launchers keep their default rule.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from ..measured import gpu_arch, nearest_measured

TABLE_PATH = Path(__file__).with_name("tuned.json")
KNOBS = ("rows_per_program", "num_warps", "programs_per_sm", "max_block_n", "reduce_in_kernel")


@functools.lru_cache(maxsize=None)
def table() -> dict:
    """The packaged table ({} when there is none yet)."""
    if not TABLE_PATH.exists():
        return {}
    return json.loads(TABLE_PATH.read_text())


arch = gpu_arch  # the table's key for a device (``measured.gpu_arch``)


@functools.lru_cache(maxsize=4096)
def knobs(device_arch: str, kernel: str, dtype: torch.dtype, width: int) -> dict:
    """The tuned knobs for one launch ({} where nothing was measured)."""
    by_width = table().get(device_arch, {}).get(kernel, {}).get(str(dtype).removeprefix("torch."), {})
    if not by_width:
        return {}
    measured = nearest_measured((int(w) for w in by_width), width)
    found = {k: v for k, v in by_width[str(measured)].items() if k in KNOBS}
    if measured != width and "rows_per_program" in found:  # keep the tile's element count
        rows = max(1, found["rows_per_program"] * measured // max(1, width))
        found["rows_per_program"] = 1 << (rows.bit_length() - 1)  # a power of two, rounded down
    return found


def merge(found: dict, into: dict) -> dict:
    """``into`` with every (arch, kernel, dtype, width) entry of ``found`` replacing its own."""
    out = json.loads(json.dumps(into))
    for a, kernels in found.items():
        for kernel, dtypes in kernels.items():
            for dtype, widths in dtypes.items():
                out.setdefault(a, {}).setdefault(kernel, {}).setdefault(dtype, {}).update(widths)
    return out
