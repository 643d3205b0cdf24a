"""The accumulation dtype every backend computes statistics and arithmetic in (its one home)."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (so gradcheck is exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
