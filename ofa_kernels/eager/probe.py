"""The probe ops in plain PyTorch (the ``torch`` backend): same contract as ``triton/probe.py``.

Probes are materialised here (int64 counters, then values), which the kernels avoid; this path
serves CPU tensors and is the reference the kernels are tested against.
"""

from __future__ import annotations

import torch

from .. import rng
from ..precision import acc_dtype


def _nu(keys, probe, counters, distribution, dtype):
    k = keys[probe]
    return rng.values(counters, k[:, 0:1], k[:, 1:2], distribution, torch.float32).to(dtype)


def probe_perturb(x, gamma, eps, keys, rows_per_probe, distribution, scale_by_rms, add_x, row_offset=0):
    M, N = x.shape
    acc = acc_dtype(x.dtype)
    xs = x.to(acc)
    if scale_by_rms:
        rms = xs.pow(2).mean(-1).sqrt()
        scale = eps * torch.where(rms > 0, rms, torch.ones_like(rms))
    else:
        scale = torch.full((M,), eps, dtype=acc, device=x.device)
    rows = torch.arange(M, device=x.device)
    probe = rows // rows_per_probe
    counters = (rows - probe * rows_per_probe + row_offset)[:, None] * N + torch.arange(N, device=x.device)
    y = scale[:, None] * gamma.to(acc) * _nu(keys, probe, counters, distribution, acc)
    if add_x:
        y = xs + y
    return y.to(x.dtype), scale


def probe_rows(coef, gamma, keys, probe, base, N, distribution):
    counters = base[:, None] + torch.arange(N, device=coef.device)
    out = coef[:, None] * _nu(keys, probe, counters, distribution, coef.dtype)
    return out * gamma.to(coef.dtype) if gamma is not None else out


def probe_dot(a, b, c, d, scale, keys, probe, base, distribution):
    R, N = a.shape
    acc = scale.dtype
    nu = probe_rows(torch.ones_like(scale), None, keys, probe, base, N, distribution)
    delta = a.to(acc) - b.to(acc)
    if c is not None:
        delta = delta - (c.to(acc) - d.to(acc)).repeat(R // c.shape[0], 1)
    return -(nu * delta).sum(-1) / scale
