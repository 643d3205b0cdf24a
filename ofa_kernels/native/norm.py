"""Norm ops on the compiled kernels (csrc/): same contract as ``ofa_kernels/eager/norm.py``.

Outputs are allocated here; weights and bias are passed in the accumulation dtype. y / dy may be in
x's dtype or the accumulation dtype (other combinations compute in the accumulation dtype and cast).
"""

from __future__ import annotations

import torch

from ..eager.norm import acc_dtype as _acc
from . import load

_CAST_CODE = {"llama": 0, "gemma": 1, "none": 2}


_LOADED: list = []


def _C():
    if not _LOADED:  # looked up once: the extension does not change within a process
        module, reason = load()
        if module is None:
            raise RuntimeError(reason)
        _LOADED.append(module)
    return _LOADED[0]


def _vec(t: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype != acc:
        t = t.to(acc)
    return t if t.is_contiguous() else t.contiguous()


def _partner(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A y/dy-like tensor in a dtype the kernels pair with x (x's or the accumulation dtype)."""
    return t if t.dtype in (x.dtype, _acc(x.dtype)) else t.to(_acc(x.dtype))


def norm_fwd(x, weight, bias, eps, offset, is_rms, cast_mode, out_dtype):
    M, N = x.shape
    acc = _acc(x.dtype)
    y_dtype = out_dtype if out_dtype in (x.dtype, acc) else acc
    y = torch.empty((M, N), dtype=y_dtype, device=x.device)
    rstd = torch.empty(M, dtype=acc, device=x.device)
    mean = torch.empty(0 if is_rms else M, dtype=acc, device=x.device)
    if M:
        _C().norm_fwd(x, _vec(weight, acc), _vec(bias, acc), y, mean if not is_rms else rstd, rstd, eps, offset,
                      is_rms, _CAST_CODE[cast_mode])
    return (y if y.dtype == out_dtype else y.to(out_dtype)), mean, rstd


def _parts(parts, x, needed, N, acc):
    return torch.empty((parts, N), dtype=acc, device=x.device) if needed else None


def norm_bwd(dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db, *, dw_dtype=None,
             db_dtype=None):
    """(dx, dw, db): dw/db in the accumulation dtype (``dw_dtype``/``db_dtype`` are for backends that write
    the parameters' dtypes directly; the caller casts these)."""
    M, N = x.shape
    acc = _acc(x.dtype)
    dy = _partner(dy, x)
    parts = _C().num_parts(x, dy, False)
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device) if need_dx else None
    dw_part = _parts(parts, x, need_dw, N, acc)
    db_part = _parts(parts, x, need_db, N, acc)
    if M or need_dw or need_db:
        _C().norm_bwd(dy, x, _vec(weight, acc), mean if not is_rms else rstd, rstd, dx, dw_part, db_part,
                      parts, offset, is_rms, _CAST_CODE[cast_mode])
    return dx, _summed(dw_part), _summed(db_part)


def _summed(part: torch.Tensor | None) -> torch.Tensor | None:
    """The sum over the partial rows (one part is the result itself)."""
    if part is None:
        return None
    return part[0] if part.shape[0] == 1 else part.sum(0)


def norm_bwd_bwd(dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, offset, is_rms, need_ddy, need_dx, need_dw):
    M, N = x.shape
    acc = _acc(x.dtype)
    dy_k = _partner(dy, x)
    parts = _C().num_parts(x, dy_k, True)
    need_dw = need_dw and grad_dx is not None
    d_dy = torch.empty((M, N), dtype=dy_k.dtype, device=x.device) if need_ddy else None
    d_x = torch.empty((M, N), dtype=x.dtype, device=x.device) if need_dx else None
    dw_part = _parts(parts, x, need_dw, N, acc)
    if need_ddy or need_dx or need_dw:
        a = None if grad_dx is None else grad_dx.to(x.dtype)
        _C().norm_bwd_bwd(dy_k, x, _vec(weight, acc), mean if not is_rms else rstd, rstd, a, _vec(grad_dw, acc),
                          _vec(grad_db, acc), d_dy, d_x, dw_part, parts, offset, is_rms)
    return (None if d_dy is None else d_dy.to(dy.dtype)), d_x, _summed(dw_part)
