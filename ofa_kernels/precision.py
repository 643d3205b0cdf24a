"""How every backend computes and casts (one home for these facts): the accumulation dtype, and the
cast rules of the norms' output with the codes the compiled and Triton kernels take for them."""

from __future__ import annotations

import torch

# "llama": normalise in the accumulation dtype, cast to the input dtype, then multiply by the weight;
# "gemma": multiply by (offset + weight) in the accumulation dtype, then cast; "none": no cast between.
CAST_MODES = ("llama", "gemma", "none")
CAST_CODE = {mode: code for code, mode in enumerate(CAST_MODES)}  # what the kernels receive


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (so gradcheck is exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
