"""``torch.func`` support for the three norm stages: plain differentiable twins and batching rules.

The fused stages read saved statistics (mean, rstd) as plain inputs and carry their dependence on x
in closed form. The *plain twins* here compute the same stage with PyTorch ops, the statistics
rebuilt as functions of x (same values), so any transform (grad, jvp, vmap, at any depth) can go
through them exactly. They serve three purposes: the third derivative, forward-mode through the
double backward, and the batching rules' general case.

Batching rules (``vmap`` staticmethods of the eager Functions and ``torch.library.register_vmap`` of
the registered ops share them): a norm is row-wise, so when only per-row tensors (x, dy, the dx
cotangent, mean, rstd) carry the batch dim, the batch is folded into the rows and the fused stage runs
once on ``[B*M, N]``. Column sums (dw, db, the double backward's d_w) must stay per batch entry, and
a batched weight / bias (or their cotangents) cannot be folded into one kernel call: those outputs
come from ``torch.vmap`` over the plain twin (vectorised PyTorch ops, no Python loop over the batch).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..eager import norm as plain_formulas
from ..eager.norm import acc_dtype


def stats_of(x: Tensor, mean: Tensor, rstd: Tensor, is_rms: bool) -> tuple[Tensor, Tensor]:
    """mean and rstd as differentiable functions of x with the saved values (eps recovered from rstd)."""
    xs = x.to(acc_dtype(x.dtype))
    if is_rms:
        var, mean_f = xs.pow(2).mean(-1), mean
    else:
        m = xs.mean(-1)
        var = (xs - m[:, None]).pow(2).mean(-1)
        mean_f = m + (mean - m).detach()
    eps_hat = (rstd.pow(-2) - var).detach()
    return mean_f, (var + eps_hat).rsqrt()


def plain_fwd(x, weight, bias, eps, offset, is_rms, cast_mode, out_dtype):
    """The forward stage in PyTorch ops: ``(y, mean, rstd)``."""
    return plain_formulas.norm_fwd(x, weight, bias, eps, offset, is_rms, cast_mode, out_dtype)


def plain_bwd(dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db):
    """The backward stage in PyTorch ops, differentiable through the statistics: ``(dx, dw, db)``."""
    mean_f, rstd_f = stats_of(x, mean, rstd, is_rms)
    return plain_formulas.norm_bwd(dy, x, weight, mean_f, rstd_f, offset, is_rms, cast_mode, need_dx,
                                   need_dw and weight is not None, need_db)


def plain_bwd_bwd(dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, offset, is_rms, need_ddy, need_dx, need_dw):
    """The double backward in PyTorch ops, differentiable through the statistics: ``(d_dy, d_x, d_w)``."""
    mean_f, rstd_f = stats_of(x, mean, rstd, is_rms)
    return plain_formulas.norm_bwd_bwd(dy, x, weight, mean_f, rstd_f, grad_dx, grad_dw, grad_db, offset, is_rms,
                                       need_ddy, need_dx, need_dw and weight is not None)


def present(fn: Callable[..., tuple], mask: tuple[bool, ...]) -> Callable[..., tuple]:
    """``fn`` returning only the outputs ``mask`` selects (transforms want tensors, not None)."""
    def call(*args):
        return tuple(o for o, keep in zip(fn(*args), mask) if keep)
    return call


def scatter(values: tuple, mask: tuple[bool, ...]) -> list:
    """The inverse of ``present``: None where ``mask`` is False."""
    it = iter(values)
    return [next(it) if keep else None for keep in mask]


# ------------------------------------------------------------------------------------ batching


def _batch_first(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.unsqueeze(0).expand(size, *t.shape)


def _fold(t: Tensor, dim: int | None, size: int) -> Tensor:
    """[B, M, ...] (batch at ``dim``, or broadcast when unbatched) -> [B*M, ...]."""
    t = _batch_first(t, dim, size)
    return t.reshape(-1, *t.shape[2:])


def _vmapped(fn, in_dims, args, mask):
    """``torch.vmap`` of ``fn`` over ``args``; outputs where ``mask`` says, None elsewhere."""
    if not any(mask):
        return [None] * len(mask)
    return scatter(torch.vmap(present(fn, mask), in_dims=tuple(in_dims))(*args), mask)


def fwd_rule(fused, size, in_dims, x, weight, bias, eps, offset, is_rms, cast_mode, backend, out_dtype):
    """Batching rule of the forward stage: ``((y, mean, rstd), out_dims)``."""
    x_dim, w_dim, b_dim = in_dims[:3]
    if w_dim is None and b_dim is None:
        rows = _fold(x, x_dim, size)
        M, N = (x.shape[:x_dim] + x.shape[x_dim + 1:]) if x_dim is not None else x.shape
        y, mean, rstd = fused(rows, weight, bias, eps, offset, is_rms, cast_mode, backend)
        return (y.view(size, M, N), mean.view(size, 0 if is_rms else M), rstd.view(size, M)), (0, 0, 0)

    def fn(x, w, b):
        return plain_fwd(x, w, b, eps, offset, is_rms, cast_mode, out_dtype)
    return tuple(_vmapped(fn, (x_dim, w_dim, b_dim), (x, weight, bias), (True, True, True))), (0, 0, 0)


def bwd_rule(fused, size, in_dims, dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db,
             backend):
    """Batching rule of the backward stage: ``([dx, dw, db], out_dims)``, None for what was not asked."""
    dims = in_dims[:5]
    need_dw = need_dw and weight is not None
    fused_dx = need_dx and dims[2] is None
    dx = None
    if fused_dx:  # dx is row-wise: the batch folds into the rows, one fused call
        dy_r, x_r, mean_r, rstd_r = (_fold(t, d, size) for t, d in zip((dy, x, mean, rstd), dims[:2] + dims[3:]))
        dx = fused(dy_r, x_r, weight, mean_r, rstd_r, offset, is_rms, cast_mode, True, False, False, backend)[0]
        dx = dx.view(size, x_r.shape[0] // size, x_r.shape[-1])

    def fn(dy, x, w, mean, rstd):
        return plain_bwd(dy, x, w, mean, rstd, offset, is_rms, cast_mode, need_dx and not fused_dx, need_dw, need_db)
    rest = _vmapped(fn, dims, (dy, x, weight, mean, rstd), (need_dx and not fused_dx, need_dw, need_db))
    out = [dx if fused_dx else rest[0], rest[1], rest[2]]
    return out, tuple(None if o is None else 0 for o in out)


def bwd_bwd_rule(fused, size, in_dims, dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, offset, is_rms,
                 need_ddy, need_dx, need_dw, backend):
    """Batching rule of the double backward: ``([d_dy, d_x, d_w], out_dims)``."""
    dy_d, x_d, w_d, m_d, r_d, a_d, bw_d, e_d = in_dims[:8]
    need_dw = need_dw and weight is not None and grad_dx is not None
    foldable = w_d is None and bw_d is None and e_d is None
    d_dy = d_x = None
    if foldable and (need_ddy or need_dx):
        rows = [_fold(t, d, size) for t, d in ((dy, dy_d), (x, x_d), (mean, m_d), (rstd, r_d))]
        a_r = None if grad_dx is None else _fold(grad_dx, a_d, size)
        d_dy, d_x, _ = fused(rows[0], rows[1], weight, rows[2], rows[3], a_r, grad_dw, grad_db, offset, is_rms,
                             need_ddy, need_dx, False, backend)
        M, N = rows[1].shape[0] // size, rows[1].shape[-1]
        d_dy = d_dy.view(size, M, N) if need_ddy else None
        d_x = d_x.view(size, M, N) if need_dx else None
    rest_mask = (need_ddy and not foldable, need_dx and not foldable, need_dw)

    def fn(dy, x, w, mean, rstd, a, bw, e):
        return plain_bwd_bwd(dy, x, w, mean, rstd, a, bw, e, offset, is_rms, *rest_mask)
    rest = _vmapped(fn, (dy_d, x_d, w_d, m_d, r_d, a_d, bw_d, e_d),
                    (dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db), rest_mask)
    out = [d_dy if foldable else rest[0], d_x if foldable else rest[1], rest[2]]
    return out, tuple(None if o is None else 0 for o in out)
