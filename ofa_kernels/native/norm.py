"""Norm ops on the compiled kernels (csrc/): same contract as ``ofa_kernels/eager/norm.py``.

The extension allocates the outputs, converts the weight vectors and sums the weight-gradient
partials itself (one call per stage, so none of that host work runs in Python). y / dy
may be in x's dtype or the accumulation dtype (other combinations compute in the accumulation dtype
and cast).
"""

from __future__ import annotations

import torch

from ..precision import NormSpec
from ..precision import acc_dtype as _acc
from . import load



_LOADED: list = []


def _C():
    if not _LOADED:  # looked up once: the extension does not change within a process
        module, reason = load()
        if module is None:
            raise RuntimeError(reason)
        _LOADED.append(module)
    return _LOADED[0]


def _partner(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A y/dy-like tensor in a dtype the kernels pair with x (x's or the accumulation dtype)."""
    return t if t.dtype in (x.dtype, _acc(x.dtype)) else t.to(_acc(x.dtype))


def norm_fwd(x, weight, bias, eps, spec: NormSpec, out_dtype):
    acc = _acc(x.dtype)
    y_dtype = out_dtype if out_dtype in (x.dtype, acc) else acc
    y, mean, rstd = _C().forward(x, weight, bias, eps, spec.offset, spec.is_rms, spec.cast_code, y_dtype)
    return (y if y.dtype == out_dtype else y.to(out_dtype)), mean, rstd


def norm_bwd(dy, x, weight, mean, rstd, spec: NormSpec, needs, *, dw_dtype=None, db_dtype=None):
    """(dx, dw, db): dw/db in the accumulation dtype (``dw_dtype``/``db_dtype`` are for backends that write
    the parameters' dtypes directly; the caller casts these)."""
    return _C().backward(_partner(dy, x), x, weight, mean, rstd, spec.offset, spec.is_rms, spec.cast_code, *needs)


def norm_bwd_bwd(dy, x, weight, mean, rstd, cotangents, spec: NormSpec, needs):
    grad_dx, grad_dw, grad_db = cotangents
    a = None if grad_dx is None else grad_dx.to(x.dtype)
    d_dy, d_x, d_w = _C().double_backward(_partner(dy, x), x, weight, mean, rstd, a, grad_dw, grad_db, spec.offset,
                                          spec.is_rms, *needs)
    return (None if d_dy is None else d_dy.to(dy.dtype)), d_x, d_w
