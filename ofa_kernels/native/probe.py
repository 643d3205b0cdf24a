"""Probe ops on the compiled kernels: the perturbation is native (CPU and CUDA); the gathered-row ops
(a few rows per layer) use the plain-PyTorch versions."""

from __future__ import annotations

import torch

from ..eager import probe as _eager
from ..eager.norm import acc_dtype
from . import load

probe_rows = _eager.probe_rows
probe_dot = _eager.probe_dot


def probe_perturb(x, gamma, eps, keys, rows_per_probe, distribution, scale_by_rms, add_x, row_offset=0):
    module, reason = load()
    if module is None or (x.is_cuda and not module.with_cuda()):
        return _eager.probe_perturb(x, gamma, eps, keys, rows_per_probe, distribution, scale_by_rms, add_x,
                                    row_offset)
    M, N = x.shape
    acc = acc_dtype(x.dtype)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    scale = torch.empty(M, dtype=acc, device=x.device)
    module.probe_perturb(x, y, gamma.to(acc).contiguous(), scale, keys.contiguous(), rows_per_probe, row_offset, eps,
                         scale_by_rms, add_x, distribution == "gaussian")
    return y, scale
