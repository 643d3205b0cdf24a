"""Probe ops on the compiled kernels: the perturbation only (CPU and CUDA). The gathered-row ops (a
few rows per layer) have no native kernel; ``ops/probe.py`` runs them as plain PyTorch."""

from __future__ import annotations

import torch

from ..precision import acc_dtype
from . import load


def probe_perturb(x, gamma, eps, keys, rows_per_probe, distribution, scale_by_rms, add_x, row_offset=0):
    module, reason = load()
    if module is None or (x.is_cuda and not module.with_cuda()):  # dispatch hands out this backend only when it runs
        raise RuntimeError(f"the native probe kernel is not available for {x.device} tensors: {reason}")
    M, N = x.shape
    acc = acc_dtype(x.dtype)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    scale = torch.empty(M, dtype=acc, device=x.device)
    module.probe_perturb(x, y, gamma.to(acc).contiguous(), scale, keys.contiguous(), rows_per_probe, row_offset, eps,
                         scale_by_rms, add_x, distribution == "gaussian")
    return y, scale
